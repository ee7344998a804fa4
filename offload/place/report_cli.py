"""``offload report`` inputs: model sizes without weights, cached profiles, and the argparse wiring.

The report itself (tables, JSON schema, roofline, plot) is in :mod:`offload.place.report`.
"""
from __future__ import annotations

import json
import os
import re
import sys

import numpy as np

from offload.errors import ArtifactError, CheckpointError, OffloadError
from offload.place.report import DEFAULT_GPU, build_report, format_report_table, gpu_bandwidth, plot_report
from offload.prepare import PREDICTOR_FILE, PROFILE_FILE
from offload.units import parse_memory_size


def model_sizes(model=None, *, local_files_only: bool = False, revision: str | None = None) -> tuple[dict, str]:
    """(HF config dict, model identity) without loading or downloading any weight.

    GGUF files and local directories with safetensors: config and file headers. A directory with only
    config.json: the config (identity derived from the config's expected tensors). A hub id: the local
    cache if it has the model, else config.json and the safetensors headers over HTTP
    (``get_safetensors_metadata``) — unless ``HF_HUB_OFFLINE`` or ``local_files_only``."""
    from offload.checkpoint import model_identity, open_checkpoint
    from offload.models import family_for

    def config_only(config: dict) -> tuple[dict, str]:
        module, config_cls, _ = family_for(config.get("model_type"))
        return config, model_identity(config, module.expected_tensors(config_cls.from_hf(config)))

    path = None if model is None else os.fspath(model)
    if path is None or path.endswith(".gguf") or (os.path.isdir(path) and any(
            n.endswith(".safetensors") for n in os.listdir(path))):
        ckpt = open_checkpoint(path)
        return ckpt.config, ckpt.identity
    if os.path.isdir(path):
        return config_only(_read_json(os.path.join(path, "config.json")))
    import huggingface_hub as hub
    from huggingface_hub import constants

    try:  # fully cached: exactly what loading would see
        ckpt = open_checkpoint(path, revision=revision, local_files_only=True)
        return ckpt.config, ckpt.identity
    except CheckpointError:
        pass
    offline = local_files_only or constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1", "ON", "YES", "TRUE")
    if offline:
        cached = hub.try_to_load_from_cache(path, "config.json", revision=revision)
        if not isinstance(cached, str):
            raise CheckpointError(f"{path}: not in the local Hugging Face cache and downloads are off "
                                  "(HF_HUB_OFFLINE=1 or --local-files-only)")
        return config_only(_read_json(cached))
    try:
        config = _read_json(hub.hf_hub_download(path, "config.json", revision=revision))
        meta = hub.get_safetensors_metadata(path, revision=revision)
    except Exception as e:  # network errors, missing or gated repos, repos without safetensors
        raise CheckpointError(f"{path}: cannot read config.json and safetensors headers from the hub: {e}") from None
    shapes = {name: tuple(info.shape) for f in meta.files_metadata.values() for name, info in f.tensors.items()}
    return config, model_identity(config, shapes)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (expected a HF model directory with config.json)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def load_profile_frequencies(path, identity: str | None = None) -> list[np.ndarray]:
    """Per-layer activation frequencies from a profile.safetensors: ``layers.{i}.counts`` (int64 [n],
    activations per neuron) over ``layers.{i}.tokens`` (or one global ``tokens``); metadata
    ``model_identity`` is checked against ``identity``."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # missing file, not safetensors
        raise ArtifactError(f"{path}: cannot read the profile ({e})") from None
    made_for = meta.get("model_identity") or meta.get("identity")
    if identity and made_for and made_for != identity:
        raise ArtifactError(f"{path}: this profile was made for model {made_for!r}, not for this model "
                            f"({identity!r}); profile this model first (offload profile)")
    counts = {int(m.group(1)): v for k, v in tensors.items() if (m := re.search(r"(\d+)\.counts$", k))}
    tokens = {int(m.group(1)): v for k, v in tensors.items() if (m := re.search(r"(\d+)\.tokens$", k))}
    if not counts or sorted(counts) != list(range(len(counts))):
        raise ArtifactError(f"{path}: expected tensors layers.0.counts … layers.N.counts (and tokens), "
                            f"found {sorted(tensors)[:6]}")
    freqs = []
    for i in range(len(counts)):
        total = tokens.get(i, tensors.get("tokens"))
        if total is None or float(np.sum(total)) <= 0:
            raise ArtifactError(f"{path}: no positive token count for layer {i} (layers.{i}.tokens or tokens)")
        freqs.append(np.clip(counts[i].astype(np.float64) / float(np.sum(total)), 0.0, 1.0))
    return freqs


def add_report_arguments(p) -> None:
    """The ``offload report`` options, on an argparse (sub)parser."""
    p.add_argument("model", nargs="?", default=None,
                   help="hub repo id, local HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--gpu-memory", required=True, help="GPU budget, e.g. 8GiB (2^30) or 8GB (10^9)")
    p.add_argument("--context", type=int, default=4096, help="KV cache length in tokens (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--dtype", default="float16", help="GPU weight dtype (default float16)")
    p.add_argument("--cpu-dtype", default="float32", help="cold rows' dtype in CPU RAM (default float32)")
    p.add_argument("--profile", default=None, help="profile.safetensors (default: the model's cached profile, if any)")
    p.add_argument("--density", type=float, default=0.5,
                   help="without a profile: every neuron's assumed activation frequency (default 0.5)")
    p.add_argument("--predictor-bytes", default=None,
                   help="one layer's predictor size on the GPU, e.g. 2MiB (default: from the model's cached "
                        "predictor.safetensors, else 0)")
    p.add_argument("--min-hot", type=int, default=0, help="each layer holds 0 or at least this many hot neurons")
    p.add_argument("--method", default="auto", choices=("auto", "greedy", "milp"), help="placement solver")
    p.add_argument("--gpu", default=None,
                   help=f"GPU name for the bandwidth table (default: the detected GPU, else {DEFAULT_GPU})")
    p.add_argument("--gpu-bandwidth", default=None, help="GPU memory bandwidth, bytes/s (e.g. 3.35e12 or 3.35TB)")
    p.add_argument("--cpu-bandwidth", default=None, help="CPU memory bandwidth, bytes/s (default: measured)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="write frequency curves and hot shares")
    p.add_argument("--revision", default=None, help="hub revision")
    p.add_argument("--local-files-only", action="store_true", help="never reach the hub; use its local cache")


def run_report(args, *, load_frequencies=None, out=None) -> int:
    """Run ``offload report`` from parsed ``args``. ``load_frequencies(path, identity) → list of arrays``
    reads the profile (default: ``load_profile_frequencies``). Raises OffloadError subclasses with
    messages meant for the user."""
    from offload.cache import model_cache_dir

    out = out or sys.stdout
    budget = parse_memory_size(args.gpu_memory, name="--gpu-memory")  # bad input fails before any I/O
    rate = {k: parse_memory_size(v, name=f"--{k.replace('_', '-')}") if v is not None else None
            for k, v in (("gpu_bandwidth", args.gpu_bandwidth), ("cpu_bandwidth", args.cpu_bandwidth))}
    predictor = None
    if args.predictor_bytes not in (None, "0"):
        predictor = parse_memory_size(args.predictor_bytes, name="--predictor-bytes")
    if args.context < 1 or args.batch < 1:
        raise OffloadError(f"--context and --batch must be ≥ 1, got {args.context} and {args.batch}")
    config, identity = model_sizes(args.model, local_files_only=args.local_files_only, revision=args.revision)
    profile = args.profile
    if profile is None:
        cached = os.path.join(model_cache_dir(identity, create=False), PROFILE_FILE)
        profile = cached if os.path.isfile(cached) else None
    freqs = (load_frequencies or load_profile_frequencies)(profile, identity) if profile else None
    if predictor is None:
        predictor = cached_predictor_bytes(identity, config.get("num_hidden_layers") or 1)
    gpu = args.gpu
    if gpu is None and rate["gpu_bandwidth"] is None:
        gpu = _detected_gpu()
    held: list = []
    report = build_report(config, budget=budget, frequencies=freqs, density=args.density, context=args.context,
                          batch=args.batch, dtype=args.dtype, cpu_dtype=args.cpu_dtype, predictor_bytes=predictor,
                          min_hot_per_layer=args.min_hot, method=args.method, identity=identity,
                          source=args.model or "default (SmolLM2-135M-Instruct)", profile=profile, gpu=gpu,
                          gpu_bw=rate["gpu_bandwidth"], cpu_bw=rate["cpu_bandwidth"], placement_out=held)
    print(json.dumps(report, indent=1) if args.json else format_report_table(report), file=out)
    if args.plot:
        plot_report(held[2], held[1], args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cached_predictor_bytes(identity: str, layers: int) -> int:
    """One layer's predictor bytes from the model's cached predictor.safetensors (0 if none): the
    tensors' bytes from the file header, spread evenly over the layers."""
    from offload.cache import model_cache_dir
    from offload.checkpoint import read_safetensors_header

    path = os.path.join(model_cache_dir(identity, create=False), PREDICTOR_FILE)
    if not os.path.isfile(path):
        return 0
    header = read_safetensors_header(path)
    total = sum(end - begin for name, info in header.items() if name != "__metadata__"
                for begin, end in [info["data_offsets"]])
    return total // max(layers, 1)


def _detected_gpu() -> str:
    """The CUDA device's name when it is in the table, else the default."""
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            gpu_bandwidth(name)
            return name
    except Exception:  # no torch CUDA, or a GPU not in the table
        pass
    return DEFAULT_GPU
