"""Where a CPU decode token goes: wall-clock timers around the hot spots of one generate call.

    python benchmarks/decode_breakdown.py [--weights float16|float32] [--dense] [--new-tokens 128]

Runs SmolLM2 (the embedded GGUF) on the CPU, by default the all-cold hybrid with fp16 weights (the
fastest CPU setting), once to warm up and once timed, and prints per token: each wrapped function's
time (a numba kernel's line includes its dispatch; a Python method's includes everything it calls).
The timers wrap module attributes for the run's duration; they cost ~1 µs a call, so the sum is
slightly above the unwrapped rate printed first.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import time



@contextlib.contextmanager
def timed(targets):
    """Wrap ``(owner, attribute, label)`` callables with accumulating timers; yields (seconds, calls)."""
    seconds, calls, saved = collections.defaultdict(float), collections.Counter(), []

    def wrap(fn, label):
        def timer(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - t0
                calls[label] += 1
        return timer

    for owner, name, label in targets:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, wrap(getattr(owner, name), label))
    try:
        yield seconds, calls
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", choices=("float16", "float32"), default="float16")
    ap.add_argument("--dense", action="store_true", help="the dense engine instead of the all-cold hybrid")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from offload import OffloadedModel, hybrid
    from offload.cpu import cold_step, decode
    from offload.formats import cpu as cpu_formats
    from offload.models import common, llama

    m = OffloadedModel.from_pretrained(device="cpu", weights=args.weights, progress=False,
                                       gpu_memory=None if args.dense else 0, threads=args.threads)
    from baselines import PROMPT  # benchmarks/ is on sys.path

    ids = m.chat_ids(PROMPT)
    # functions are patched where they are looked up (the module that calls them)
    targets = [(decode, "decode_layer", "numba decode_layer: one block in one call (CPU formats)"),
               (decode, "attention_block", "numba attention_block: norm, qkv, attention, o, residual"),
               (decode, "gated_ffn_block", "numba gated_ffn_block: norm, gate/up, act, down, residual"),
               (cold_step, "shadow_topk_cold", "numba shadow_topk_cold: norm, int4 scores, top-k, cold kernel, residual"),
               (cpu_formats, "matvec_into", "numba GEMV from a CpuLinear (the head; prompts' other paths)"),
               (decode.FusedAttention, "residual", "FusedAttention.residual (Python, incl.)"),
               (decode.FusedGatedFFN, "residual", "FusedGatedFFN.residual (Python, incl.)"),
               (hybrid.HybridFFN, "residual", "HybridFFN.residual (Python, incl.)"),
               (common.RMSNorm, "forward", "RMSNorm.forward (Python, incl.)"),
               (llama.LlamaModel, "forward", "LlamaModel.forward: a whole step")]
    with torch.inference_mode():
        m.generate(ids, max_new_tokens=8, eos_token_id=[])  # warm-up
        m.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=[])
        rate = m.last_stats.decode_tokens_per_second
        with timed(targets) as (seconds, calls):
            m.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=[])
    steps = args.new_tokens  # the prompt forward plus new_tokens - 1 decode steps
    print(f"{'dense' if args.dense else 'hybrid, every neuron cold'}, weights {args.weights}: "
          f"{rate:.1f} tok/s unwrapped ({1e3 / rate:.2f} ms a token); per token with timers:")
    print("| ms/token | calls | µs/call | what |\n|---|---|---|---|")
    for label, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"| {1e3 * s / steps:.2f} | {calls[label]} | {1e6 * s / calls[label]:.1f} | {label} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
