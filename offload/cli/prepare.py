"""``offload prepare [MODEL]``: build (or reuse) the cached profile, predictors and operating point of a
model and weight format; prints the per-layer table, the operating point, whether its targets are met
(with the fix when not) and where the artifacts are."""
from __future__ import annotations

import json
import time

from offload.cli.common import add_model_options, info, load_model, subcommand_main

DESCRIPTION = ("Profile a model, build its activity predictors and choose the operating point (density), cached "
               "per model, weight format and predictor design; `generate --gpu-memory` and `eval` do it when needed.")


def add_arguments(p, model_arg: bool = True) -> None:
    if model_arg:
        add_model_options(p, hybrid=False)
    p.add_argument("--text", default=None, help="calibration text file (default: Python's pydoc_data.topics); "
                   "a held-out part of it is kept for `offload eval`")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if cached artifacts exist")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="shadow predictor bits (SwiGLU)")
    p.add_argument("--max-ppl-ratio", type=float, default=1.05, help="validation perplexity target vs dense")
    p.add_argument("--max-bytes", type=float, default=0.65,
                   help="FFN bytes per token budget, fraction of the dense FFN counted at fp32, predictor included")
    p.add_argument("--recall-target", type=float, default=0.99, help="low-rank predictors (ReLU): recall target")
    p.add_argument("--profile-tokens", type=int, default=16384, help="calibration tokens to profile")
    p.add_argument("--tune-tokens", type=int, default=2048, help="validation tokens for the operating-point search")
    p.add_argument("--json", action="store_true", help="print the operating point as JSON")


def format_layers(rows: list[dict]) -> str:
    out = ["layer  recall  predicted  true   predictor KiB"]
    for r in rows:
        out.append(f"{r['layer']:>5}  {r['recall']:.3f}   {r['predicted_density']:.3f}    {r['true_density']:.3f}  "
                   f"{r['predictor_bytes'] / 1024:>9.1f}")
    return "\n".join(out)


def run(args) -> int:
    from offload.corpus import load_corpus
    from offload.prepare import prepare, targets_message

    t0 = time.perf_counter()
    load_corpus(args.text)  # a missing or empty text file fails before the model loads
    om = load_model(args)
    t_load = time.perf_counter() - t0
    prep = prepare(om, args.text, rebuild=args.rebuild, bits=args.bits, max_ppl_ratio=args.max_ppl_ratio,
                   max_bytes=args.max_bytes, recall_target=args.recall_target, profile_tokens=args.profile_tokens,
                   tune_tokens=args.tune_tokens, progress=not args.json, log=None if args.json else info)
    op = dict(prep.operating_point)
    op.update(reused=prep.reused, paths=prep.paths, load_s=t_load, wall_s=time.perf_counter() - t0)
    if args.json:
        print(json.dumps(op, indent=1, default=float))
        return 0
    print(format_layers(op["layers"]))
    dens = op.get("density")
    print(f"weights: {om.weights}; method: {op['method']}; density: {'predicted' if dens is None else f'{dens:.3f}'}; "
          f"mean recall {op['recall']:.3f}, predicted density {op['predicted_density']:.3f}, "
          f"true density {op['true_density']:.3f}")
    stored = op.get("stored_bytes_fraction", op["bytes_fraction"])
    as_stored = "" if abs(stored - op["bytes_fraction"]) < 5e-4 else f"; as stored in {om.weights}: {stored:.3f}"
    print(f"FFN bytes per token: {op['bytes_fraction']:.3f} of dense counted at fp32 (budget {op['max_bytes']}"
          f"{as_stored}); validation perplexity x{op['validation_ppl_ratio']:.4f} (target x{op['max_ppl_ratio']}); "
          f"targets {'met' if op['targets_met'] else 'NOT met'}")
    if not op["targets_met"]:
        print(targets_message(op, prep.directory, om.weights, args.bits))
    state = "reused" if prep.reused else f"built in {op['timings']['total_s']:.0f} s"
    print(f"artifacts ({state}): {prep.directory}; wall time {op['wall_s']:.0f} s (model load {t_load:.0f} s)")
    return 0


def main(argv=None) -> int:
    return subcommand_main("prepare", DESCRIPTION, add_arguments, run, argv)
