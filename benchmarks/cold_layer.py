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


def ffn_halves(m):
    """Each block's FFN half (offload.cpu.step.DenseFFNHalf or ColdFFNHalf) as a decode token uses it."""
    halves = [layer.mlp.step_half(layer.ffn_norm) for layer in m.model.layers]
    if any(h is None for h in halves):
        raise SystemExit("cold_layer: a block has no fused decode half (not a LLaMA-family CPU model?)")
    return halves


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from machine import cpu_description, describe  # benchmarks/ is on sys.path

    from offload import OffloadedModel
    from offload.cpu import step
    from offload.cpu.cold_kernels import cold_parallel
    from offload.cpu.shadow import i4_shadow_parallel
    from offload.cpu.topk import topk_union

    common = dict(device="cpu", weights="float16", progress=False, threads=args.threads)
    dense = ffn_halves(OffloadedModel.from_pretrained(**common))
    cold = ffn_halves(OffloadedModel.from_pretrained(gpu_memory=0, **common))
    if not all(isinstance(h, step.ColdFFNHalf) for h in cold):
        raise SystemExit("cold_layer: the hybrid has hot neurons or no all-cold path; nothing to compare")

    rng = np.random.default_rng(0)
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

    rows = {"dense FFN half (norm, gate/up, down, residual)": dense_half,
            "all-cold FFN half (one call)": cold_half,
            "  its int4 shadow scores": shadow_scores, "  its top-k": top_k, "  its cold gather": gather}
    for fn in rows.values():  # compile or load, and fill ids
        fn()
    per_neuron = cold[0].cold_w[0].nbytes
    nbytes = {"dense FFN half (norm, gate/up, down, residual)": sum(h.gate_up.nbytes + h.down.nbytes for h in dense),
              "  its int4 shadow scores": sum(h.shadow_w.nbytes + h.shadow_b.nbytes for h in cold),
              "  its cold gather": sum(len(i) for i in ids) * per_neuron}
    nbytes["all-cold FFN half (one call)"] = nbytes["  its int4 shadow scores"] + nbytes["  its cold gather"]
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(args.reps):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)

    dense_rate = nbytes["dense FFN half (norm, gate/up, down, residual)"] / best["dense FFN half (norm, gate/up, down, residual)"]
    density = sum(len(i) for i in ids) / sum(h.n for h in cold)
    print(f"SmolLM2 fp16 FFN halves, {len(dense)} layers in turn, {args.threads} threads, best of "
          f"{args.reps}; all-cold density {density:.3f}\n")
    print("| part | ms a token | MB read | GB/s | GB/s ÷ dense |\n|---|---|---|---|---|")
    for name, s in best.items():
        b = nbytes.get(name)
        rate = f"{b / s / 1e9:.1f} | {b / s / dense_rate:.2f}" if b else "— | —"
        print(f"| {name} | {1e3 * s:.2f} | {b / 1e6:.1f} | {rate} |" if b else f"| {name} | {1e3 * s:.2f} | — | {rate} |")
    parts = best["  its int4 shadow scores"] + best["  its top-k"] + best["  its cold gather"]
    print(f"\nparts together {1e3 * parts:.2f} ms, all-cold ÷ dense time "
          f"{best['all-cold FFN half (one call)'] / best['dense FFN half (norm, gate/up, down, residual)']:.2f}")
    print(describe(cpu_description()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
