"""Dense decode: our engine against transformers on the same SmolLM2 GGUF, in the same run.

    python benchmarks/decode_dense.py [--new-tokens 128] [--reps 3] [--threads 2] [--json]

fp32, batch 1, the same chat prompt, EOS ignored so both generate exactly --new-tokens tokens.
Repetitions alternate between the engines; prints decode tokens/s (mean ± sd) of each and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from baselines import PROMPT, load_transformers, offload_rates as run_ours, hf_rates as run_hf  # benchmarks/ on sys.path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=".gguf file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from offload import OffloadedModel
    from offload.checkpoint import default_model_path

    path = args.model or default_model_path()
    ours = OffloadedModel.from_pretrained(path, progress=False)
    hf = load_transformers(path)
    ids = ours.chat_ids(PROMPT)
    run_ours(ours, ids, 8), run_hf(hf, ids, 8)  # warm-up
    rates = {"ours": [], "transformers": []}
    prefill = {"ours": [], "transformers": []}
    for _ in range(args.reps):
        for name, fn, model in (("ours", run_ours, ours), ("transformers", run_hf, hf)):
            with torch.inference_mode():
                tg, pp = fn(model, ids, args.new_tokens)
            rates[name].append(tg)
            prefill[name].append(pp)
    summary = {name: {"decode_tok_s_mean": statistics.mean(r), "decode_tok_s_sd": statistics.pstdev(r),
                      "prefill_tok_s_mean": statistics.mean(prefill[name]), "runs": r}
               for name, r in rates.items()}
    ratio = summary["ours"]["decode_tok_s_mean"] / summary["transformers"]["decode_tok_s_mean"]
    result = {"model": os.path.basename(path), "dtype": "float32", "threads": args.threads,
              "prompt_tokens": ids.shape[1], "new_tokens": args.new_tokens, "reps": args.reps,
              "engines": summary, "ratio_ours_over_transformers": ratio}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"| engine | decode tok/s | prefill tok/s ({ids.shape[1]} tokens) |")
        print("|---|---|---|")
        for name, s in summary.items():
            print(f"| {name} | {s['decode_tok_s_mean']:.1f} ± {s['decode_tok_s_sd']:.1f} | "
                  f"{s['prefill_tok_s_mean']:.0f} |")
        print(f"\nratio ours / transformers (decode): {ratio:.2f}x  "
              f"({args.new_tokens} new tokens, fp32, {args.threads} threads, {args.reps} reps)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
