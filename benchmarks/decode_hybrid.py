"""End-to-end CPU decode: the hybrid runtime at the prepared operating point against our dense
engine and transformers' dense model, on the same SmolLM2 GGUF, in the same run.

    python benchmarks/decode_hybrid.py [--new-tokens 64] [--reps 3] [--threads 2] [--budget-split 0.0 1.0]

``--budget-split s``: the share of FFN rows the "GPU" budget allows (CPU-only here, so the hot side
runs on CPU torch and the cold side on the numba kernel); 0 = every neuron cold, 1 = every neuron hot.
fp32, batch 1, EOS ignored. Prints decode tokens/s (mean ± sd), the ratio to transformers, and FFN
bytes touched per token.
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch

from baselines import PROMPT, hf_rates, load_transformers, offload_rates  # benchmarks/ is on sys.path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget-split", type=float, nargs="+", default=[0.0, 1.0])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from offload import OffloadedModel
    from offload.checkpoint import default_model_path
    from offload.prepare import prepare
    from offload.place.memory import plan_memory

    path = default_model_path()
    dense = OffloadedModel.from_pretrained(path, progress=False)
    prepared = prepare(dense, progress=True)
    plan = plan_memory(dense.checkpoint.config, dtype="float32", device="cpu", context=1024,
                       predictor_bytes=prepared.predictors.nbytes // len(dense.model.layers),
                       shapes=dense.checkpoint.shapes)
    engines = {"ours dense": dense}
    for split in args.budget_split:
        m = OffloadedModel(copy.deepcopy(dense.model), dense.tokenizer, dense.checkpoint, device=torch.device("cpu"))
        budget = plan.fixed_bytes + int(split * plan.ffn_bytes) + 1
        m.offload(budget, device=torch.device("cpu"), context=1024, prepared=prepared, progress=False)
        engines[f"ours hybrid, {split:.0%} hot"] = m
    hf = load_transformers(path)
    ids = dense.chat_ids(PROMPT)

    def run_hf(n):
        return hf_rates(hf, ids, n)[0]

    def run_ours(m, n):
        return offload_rates(m, ids, n)[0]

    rates = {name: [] for name in ["transformers", *engines]}
    bytes_per_token = {}
    with torch.inference_mode():
        run_hf(4)
        for m in engines.values():
            run_ours(m, 4)
        for _ in range(args.reps):
            rates["transformers"].append(run_hf(args.new_tokens))
            for name, m in engines.items():
                rates[name].append(run_ours(m, args.new_tokens))
                h = m.hybrid_stats
                if h is not None:
                    steps = args.new_tokens - 1
                    bytes_per_token[name] = (h.bytes_hot + h.bytes_cold) / steps
    dense_ffn = sum(3 * c.shape[0] * c.shape[1] * 4 for c in (layer.mlp.down for layer in dense.model.layers))
    base = statistics.mean(rates["transformers"])
    print("| engine | decode tok/s | × transformers | FFN bytes/token (÷ dense) |")
    print("|---|---|---|---|")
    for name, r in rates.items():
        b = bytes_per_token.get(name)
        frac = f"{b / 2**20:.1f} MiB ({b / dense_ffn:.2f})" if b else "—"
        print(f"| {name} | {statistics.mean(r):.1f} ± {statistics.pstdev(r):.1f} | {statistics.mean(r) / base:.2f} | "
              f"{frac} |")
    print(f"\n{args.new_tokens} new tokens, fp32, {args.threads} threads, {args.reps} alternating reps; "
          f"density {prepared.operating_point.get('density')}; FFN bytes exclude the predictor")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
