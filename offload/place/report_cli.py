"""``offload report`` inputs: model sizes without weights, cached profiles and predictor sizes.

The report itself (tables, JSON schema, roofline, plot) is in :mod:`offload.place.report`; the
command's options and wiring in :mod:`offload.cli.report`.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from offload.errors import ArtifactError, CheckpointError
from offload.place.report import DEFAULT_GPU, gpu_bandwidth
from offload.prepare import PREDICTOR_FILE, PROFILE_FILE, default_artifacts


def model_sizes(model=None, *, local_files_only: bool = False, revision: str | None = None) -> tuple[dict, str]:
    """(HF config dict, model identity) without loading or downloading any weight.

    GGUF files and local directories with safetensors: config and file headers. A directory with only
    config.json: the config (identity derived from the config's expected tensors). A hub id: the local
    cache if it has the model, else config.json and the safetensors headers over HTTP
    (``get_safetensors_metadata``) — unless ``HF_HUB_OFFLINE`` or ``local_files_only``."""
    from offload.checkpoint import hub_error, model_identity, offline_reason, open_checkpoint
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
    offline = offline_reason(local_files_only)
    if offline:
        cached = hub.try_to_load_from_cache(path, "config.json", revision=revision)
        if not isinstance(cached, str):
            raise CheckpointError(f"{path}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}), and "
                                  f"{offline}")
        return config_only(_read_json(cached))
    try:
        config = _read_json(hub.hf_hub_download(path, "config.json", revision=revision))
        meta = hub.get_safetensors_metadata(path, revision=revision)
    except Exception as e:  # network errors, missing or gated repos, repos without safetensors
        raise hub_error(path, e) from None
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


def cached_profile(identity: str, weights: str) -> str | None:
    """The model's cached profile.safetensors for a weight format (default settings), else None."""
    directory = default_artifacts(identity, weights)
    return os.path.join(directory, PROFILE_FILE) if directory else None


def cached_predictor_bytes(identity: str, layers: int, weights: str = "float32") -> int:
    """One layer's predictor bytes from the model's cached predictor.safetensors (0 if none): the
    tensors' bytes from the file header, spread evenly over the layers."""
    from offload.checkpoint import read_safetensors_header

    directory = default_artifacts(identity, weights)
    if directory is None:
        return 0
    path = os.path.join(directory, PREDICTOR_FILE)
    header = read_safetensors_header(path)
    total = sum(end - begin for name, info in header.items() if name != "__metadata__"
                for begin, end in [info["data_offsets"]])
    return total // max(layers, 1)


def detected_gpu() -> str:
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
