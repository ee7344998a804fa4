"""The KV cache's dtype in CPU decode: fp32 against fp16 (``kv_cache="float16"``), same model, same run.

    python benchmarks/kv_cache.py [--prompts 100,900,1800] [--new-tokens 64] [--reps 4] [--weights auto]

Loads the model twice (default: the embedded SmolLM2 GGUF as stored, int8 x), once per cache dtype, and for
each prompt length (tokens of the default corpus' validation part) times decode after that prompt,
alternating the two within each repetition (median of ``--reps``). One-token attention reads every cached
key and value, so the cache's share of a token's bytes grows with the context: bytes/token = the weights a
decode token reads at their storage format + the K and V rows at the decode steps' mean position; "of
roofline" = t/s ÷ (measured bandwidth ÷ bytes/token). Ends with the CPU model and ISA.
"""
from __future__ import annotations

import argparse
import statistics


def kv_bytes_per_token(model, position: float, itemsize: int) -> float:
    """Bytes of K and V one decode token reads at ``position`` (every layer, every kv head)."""
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * position * itemsize


def decode_rates(models: dict, prompts: list, new_tokens: int, reps: int) -> dict:
    """{(kv name, prompt length): [decode t/s per rep]} for OffloadedModels ``models`` {kv name: model}
    after each prompt (ids [1, t]); models alternate within each repetition, after one warm-up each."""
    out = {}
    for p in prompts:
        for m in models.values():
            m.generate(p, max_new_tokens=min(new_tokens, 4), eos_token_id=[])
        for _ in range(reps):
            for name, m in models.items():
                m.generate(p, max_new_tokens=new_tokens, eos_token_id=[])
                out.setdefault((name, p.shape[1]), []).append(m.last_stats.decode_tokens_per_second)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--weights", default="auto")
    ap.add_argument("--prompts", default="100,900,1800", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from machine import cpu_description, describe  # benchmarks/ is on sys.path

    from offload import OffloadedModel
    from offload.corpus import default_corpus, tokenize
    from offload.formats import decode_bytes
    from offload.place.report import measure_cpu_bandwidth

    models = {kv: OffloadedModel.from_pretrained(args.model, weights=args.weights, threads=args.threads,
                                                 kv_cache=kv, progress=False) for kv in ("float32", "float16")}
    first = models["float32"]
    ids = tokenize(first.tokenizer, default_corpus().validation)
    lengths = [int(n) for n in args.prompts.split(",")]
    if max(lengths) + args.new_tokens > min(ids.numel(), first.max_context):
        raise SystemExit(f"--prompts: at most {min(ids.numel(), first.max_context) - args.new_tokens} tokens here")
    prompts = [ids[:n].view(1, -1) for n in lengths]
    rates = decode_rates(models, prompts, args.new_tokens, args.reps)
    bandwidth = measure_cpu_bandwidth()
    weights = decode_bytes(first.model)
    print(f"{args.model or 'SmolLM2-135M-Instruct (embedded GGUF)'}, weights={args.weights}, {args.threads} threads, "
          f"{args.new_tokens} new tokens after each prompt, median of {args.reps}; bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    print("| prompt | KV cache | decode t/s | ÷ fp32 cache | MB/token (weights + KV) | of roofline |")
    print("|---|---|---|---|---|---|")
    for n in lengths:
        base = statistics.median(rates[("float32", n)])
        for kv, itemsize in (("float32", 4), ("float16", 2)):
            tps = statistics.median(rates[(kv, n)])
            nbytes = weights + kv_bytes_per_token(first, n + args.new_tokens / 2, itemsize)
            print(f"| {n} | {kv} | {tps:.1f} | {tps / base:.2f} | {nbytes / 1e6:.1f} | "
                  f"{tps * nbytes / bandwidth:.0%} |")
    print("\n" + describe(cpu_description()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
