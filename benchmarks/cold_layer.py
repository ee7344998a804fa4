"""Where the all-cold FFN's time goes: its parts against the dense FFN half, on the real layers, same run.

    python benchmarks/cold_layer.py [--threads 2] [--reps 15]

Builds SmolLM2 (the embedded GGUF) twice with fp16 weights, dense and all-cold hybrid (``gpu_memory=0``;
its first run prepares the predictors, ~13 min on 2 cores, then cached), and times over its 30 layers in
turn each FFN half as a decode token runs it (offload.cpu.step: norm, products, activation, residual),
then the all-cold half's three parts called alone: the int4 shadow scores (offload.cpu.shadow), the top-k
(offload.cpu.topk) and the cold gather (offload.cpu.cold_kernels.cold_parallel). Rows alternate within
each repetition; each row is the best of ``--reps``. GB/s = the bytes a part must read ÷ its time; the
gather's GB/s ÷ the dense half's decides whether reading fewer bytes pays (1.0: the gather streams its
rows as fast as the dense GEMVs stream the whole FFN).

Inputs are random unit-RMS vectors (the selection is then a pseudo-random half of the neurons; k is fixed
per layer, so the bytes are those of real tokens). The parts called alone skip the one call's glue (norm,
buffers, residual); the decode loop also runs attention between FFNs, so ``benchmarks/decode.py`` remains
the measure of whole tokens.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


DENSE, COLD = "dense FFN half (norm, gate/up, down, residual)", "all-cold FFN half (one call)"
SCORES, TOPK, GATHER = "  its int4 shadow scores", "  its top-k", "  its cold gather"


def ffn_halves(net):
    """Each block's FFN half (offload.cpu.step.DenseFFNHalf or ColdFFNHalf) as a decode token uses it."""
    halves = [layer.mlp.step_half(layer.ffn_norm) for layer in net.layers]
    if any(h is None for h in halves):
        raise SystemExit("cold_layer: a block has no fused decode half (not a LLaMA-family CPU model?)")
    return halves


def time_ffn_parts(dense, cold, reps: int, seed: int = 0) -> dict:
    """{row: (best seconds over ``reps``, bytes it must read or None)} for the dense halves ``dense`` and the
    all-cold halves ``cold`` of the same model (one random input per layer), rows alternating."""
    from offload.cpu import step
    from offload.cpu.cold_kernels import cold_parallel
    from offload.cpu.shadow import i4_shadow_parallel
    from offload.cpu.topk import topk_union

    if not all(isinstance(h, step.ColdFFNHalf) for h in cold):
        raise SystemExit("cold_layer: the hybrid has hot neurons or no all-cold path; nothing to compare")
    rng = np.random.default_rng(seed)
    d = dense[0].norm_w.shape[0]
    xs = [rng.standard_normal(d).astype(np.float32) for _ in dense]
    out = np.empty(d, np.float32)
    nt = cold[0].parts.shape[0]
    scores = [np.empty((1, h.n), np.float32) for h in cold]
    ids = [np.empty(0, np.int64)] * len(cold)

    def dense_half():
        for h, x in zip(dense, xs):
            step.dense_half(h, x, out)

    def cold_half():
        for h, x in zip(cold, xs):
            step.cold_half(h, x, out)

    def shadow_scores():
        for i, (h, x) in enumerate(zip(cold, xs)):
            i4_shadow_parallel(x[None], h.shadow_w, h.shadow_b, h.shadow_kind, min(nt, h.shadow_w.shape[0]), scores[i])

    def top_k():
        for i, h in enumerate(cold):
            ids[i] = topk_union(scores[i], h.k)

    def gather():
        for h, x, idx in zip(cold, xs, ids):
            cold_parallel(h.cold_w, x[None], idx, np.zeros(2 + nt, np.int64), h.block, h.kind, h.bias, h.parts,
                          h.scratch)

    rows = {DENSE: dense_half, COLD: cold_half, SCORES: shadow_scores, TOPK: top_k, GATHER: gather}
    for fn in rows.values():  # compile or load, and fill ids
        fn()
    nbytes = {DENSE: sum(h.gate_up.nbytes + h.down.nbytes for h in dense),
              SCORES: sum(h.shadow_w.nbytes + h.shadow_b.nbytes for h in cold),
              GATHER: sum(len(i) for i in ids) * cold[0].cold_w[0].nbytes}  # a bundle: gate row, up row, down column
    nbytes[COLD] = nbytes[SCORES] + nbytes[GATHER]
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(reps):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: (best[name], nbytes.get(name)) for name in rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from machine import cpu_description, describe  # benchmarks/ is on sys.path

    from offload import OffloadedModel

    common = dict(device="cpu", weights="float16", progress=False, threads=args.threads)
    dense = ffn_halves(OffloadedModel.from_pretrained(**common).model)
    cold = ffn_halves(OffloadedModel.from_pretrained(gpu_memory=0, **common).model)
    rows = time_ffn_parts(dense, cold, args.reps)

    dense_rate = rows[DENSE][1] / rows[DENSE][0]
    density = rows[GATHER][1] / cold[0].cold_w[0].nbytes / sum(h.n for h in cold)
    print(f"SmolLM2 fp16 FFN halves, {len(dense)} layers in turn, {args.threads} threads, best of {args.reps}; "
          f"all-cold density {density:.3f}\n")
    print("| part | ms a token | MB read | GB/s | GB/s ÷ dense |\n|---|---|---|---|---|")
    for name, (sec, b) in rows.items():
        read = f"{b / 1e6:.1f} | {b / sec / 1e9:.1f} | {b / sec / dense_rate:.2f}" if b else "— | — | —"
        print(f"| {name} | {1e3 * sec:.2f} | {read} |")
    parts = rows[SCORES][0] + rows[TOPK][0] + rows[GATHER][0]
    print(f"\nparts together {1e3 * parts:.2f} ms, all-cold ÷ dense time {rows[COLD][0] / rows[DENSE][0]:.2f}")
    print(describe(cpu_description()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
