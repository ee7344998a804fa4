"""``offload report [MODEL] --gpu-memory SIZE``: the placement under a GPU budget, per layer, with the
memory breakdown and a roofline estimate; reads no weights (sizes come from headers)."""
from __future__ import annotations

import json
import sys

from offload.cli.common import DTYPES, add_model_argument, positive_int, subcommand_main
from offload.place.report import DEFAULT_GPU, build_report, format_report_table, plot_report
from offload.place.report_cli import (cached_predictor_bytes, cached_profile, detected_gpu, load_profile_frequencies,
                                      model_sizes)
from offload.units import parse_memory_size

DESCRIPTION = ("Placement under a GPU budget: per-layer hot neurons, GPU memory by role (a CUDA context reserve "
               "included), and a roofline estimate of decode tokens/s.")


def add_arguments(p) -> None:
    add_model_argument(p)
    p.add_argument("--gpu-memory", required=True, metavar="SIZE", help="GPU budget, e.g. 8GiB (2^30) or 8GB (10^9)")
    p.add_argument("--context", type=positive_int, default=4096, help="KV cache length in tokens")
    p.add_argument("--batch", type=positive_int, default=1, help="sequences decoded together")
    p.add_argument("--dtype", choices=(*DTYPES, "int4"), default="float16",
                   help="GPU weight dtype; int4: hot FFN rows packed 4-bit (scale and min per group of 32, "
                        "offload.formats.packed_rows), the rest float16")
    p.add_argument("--cpu-dtype", choices=DTYPES, default="float32",
                   help="cold rows' dtype in CPU RAM (generate's --weights)")
    p.add_argument("--profile", default=None, help="profile.safetensors (default: the model's cached profile for "
                                                   "--cpu-dtype weights, if prepared)")
    p.add_argument("--density", type=float, default=0.5,
                   help="without a profile: every neuron's assumed activation frequency")
    p.add_argument("--predictor-bytes", default=None, metavar="SIZE",
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


def run(args, *, load_frequencies=None, out=None) -> int:
    """``load_frequencies(path, identity) → list of arrays`` reads the profile (default:
    ``load_profile_frequencies``)."""
    out = out or sys.stdout
    budget = parse_memory_size(args.gpu_memory, name="--gpu-memory")  # bad input fails before any I/O
    rate = {k: parse_memory_size(v, name=f"--{k.replace('_', '-')}") if v is not None else None
            for k, v in (("gpu_bandwidth", args.gpu_bandwidth), ("cpu_bandwidth", args.cpu_bandwidth))}
    predictor = None
    if args.predictor_bytes not in (None, "0"):
        predictor = parse_memory_size(args.predictor_bytes, name="--predictor-bytes")
    config, identity = model_sizes(args.model, local_files_only=args.local_files_only, revision=args.revision)
    profile = args.profile or cached_profile(identity, args.cpu_dtype)
    freqs = (load_frequencies or load_profile_frequencies)(profile, identity) if profile else None
    if predictor is None:
        predictor = cached_predictor_bytes(identity, config.get("num_hidden_layers") or 1, args.cpu_dtype)
    gpu = args.gpu
    if gpu is None and rate["gpu_bandwidth"] is None:
        gpu = detected_gpu()
    held: list = []
    dtype, packed = ("float16", {"hot_format": "int4"}) if args.dtype == "int4" else (args.dtype, {})
    report = build_report(config, budget=budget, frequencies=freqs, density=args.density, context=args.context,
                          batch=args.batch, dtype=dtype, cpu_dtype=args.cpu_dtype, predictor_bytes=predictor,
                          min_hot_per_layer=args.min_hot, method=args.method, identity=identity,
                          source=args.model or "default (SmolLM2-135M-Instruct)", profile=profile, gpu=gpu,
                          gpu_bw=rate["gpu_bandwidth"], cpu_bw=rate["cpu_bandwidth"], placement_out=held, **packed)
    print(json.dumps(report, indent=1) if args.json else format_report_table(report), file=out)
    if args.plot:
        plot_report(held[2], held[1], args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return subcommand_main("report", DESCRIPTION, add_arguments, run, argv)
