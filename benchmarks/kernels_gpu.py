"""Hot-side kernels on the GPU against torch's dense GEMVs and the GPU's peak bandwidth.

For each FFN shape (default: LLaMA-7B's 4096 × 11008 and LLaMA-70B's 8192 × 28672), fp16 weights,
batch 1, it times (triton.testing.do_bench, median, L2 flushed between runs as at decode, where a
layer's weights are not cached)

  gather_gemv     x · [W_gate; W_up][idx]ᵀ + SwiGLU         vs  dense gate + up (two F.linear) + SwiGLU
  sparse_down     h · W_down_t[idx]                          vs  dense down (F.linear)
  hot FFN         both                                       vs  the dense FFN
  shadow int4     |silu(x·Q(W_gate)ᵀ)·(x·Q(W_up)ᵀ)|, packed   vs  dense gate + up (what exact scores cost)

at each density of active neurons, checks each kernel's output against its torch reference, and
prints a markdown table: median time, the bandwidth it implies (the bytes the op must move: active
weight rows, activations, indices; int4 nibbles and fp16 scales for the shadow), that bandwidth as a
share of the GPU's peak (offload.place.report's table of GPUs, or --peak-bandwidth), and the time as a
fraction of the dense op's.

    python benchmarks/kernels_gpu.py [--shapes 4096x11008,8192x28672] [--batch 1] [--dtype fp16]
                                     [--densities 0.05,0.1,0.2,0.3,0.5] [--peak-bandwidth BYTES_PER_S]
    python benchmarks/kernels_gpu.py --dry-run     # CPU, Triton's interpreter, tiny shapes

``--dry-run`` runs the same code on CPU tensors with the kernels in Triton's interpreter
(TRITON_INTERPRET=1, set here before triton is imported) at tiny shapes, timed with perf_counter: it
checks the script and the kernels' results, and its times say nothing about a GPU. Without a CUDA GPU
and without --dry-run it prints "skipped: needs a CUDA GPU" and exits 0. Exit status 1 when a kernel's
output differs from its reference. Triton's autotuner reports the tile config it picks for each shape
(TRITON_PRINT_AUTOTUNING=1, set here unless the environment sets it).
"""
from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton (torch may import it)
os.environ.setdefault("TRITON_PRINT_AUTOTUNING", "1")  # Triton prints the config it picks for each shape

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DRY_RUN = dict(shapes="64x96,128x256", densities="0.1,0.5")  # a few interpreter programs per call


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4096x11008,8192x28672", help="comma-separated d x n (model width x neurons)")
    p.add_argument("--batch", type=int, default=1, help="tokens per call, 1..8 (default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.5", help="comma-separated fractions of active neurons")
    p.add_argument("--peak-bandwidth", type=float, default=None,
                   help="bytes/s (default: the GPU's from offload.place.report's table)")
    p.add_argument("--dry-run", action="store_true", help="CPU tensors, Triton's interpreter, tiny shapes")
    args = p.parse_args(argv)
    if args.dry_run:
        args.shapes, args.densities = DRY_RUN["shapes"], DRY_RUN["densities"]
    args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    args.densities = [float(s) for s in args.densities.split(",")]
    return args


def make_timer(device: str):
    """bench(fn) → median µs: do_bench on CUDA (fn runs once first: compile and autotune outside the
    timed runs); on the CPU (dry run) the median of a few perf_counter runs."""
    if device == "cuda":
        import triton.testing

        def bench(fn):
            fn()
            torch.cuda.synchronize()
            return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
        return bench

    def bench(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6
    return bench


def peak_bandwidth(args, device: str) -> tuple[float | None, str]:
    """(bytes/s or None, where it comes from)."""
    if args.peak_bandwidth:
        return args.peak_bandwidth, "given"
    if device != "cuda":
        return None, "no GPU"
    from offload.errors import OffloadError
    from offload.place.report import gpu_bandwidth

    try:
        label, bw = gpu_bandwidth(torch.cuda.get_device_name())
    except OffloadError:
        return None, f"{torch.cuda.get_device_name()} is not in the table (give --peak-bandwidth)"
    return bw, f"table: {label}"


def close(got, want, tol) -> bool:
    return torch.allclose(got.float(), want.float(), atol=tol * max(1.0, want.abs().max().item()), rtol=tol)


def bench_shape(d: int, n: int, args, device: str, bench) -> list[tuple]:
    """Rows (op, density, k, µs, bytes moved, dense µs of the same job, output equals the reference)."""
    from offload.kernels.gather_gemv import gather_gemv, gather_gemv_reference
    from offload.kernels.shadow_scores import shadow_scores_int4, shadow_scores_int4_reference
    from offload.kernels.sparse_down import sparse_down, sparse_down_reference
    from offload.predict.quant import quantize_int4

    dtype, b = DTYPES[args.dtype], args.batch
    elt = torch.tensor([], dtype=dtype).element_size()
    gen, cpu_gen = torch.Generator(device=device).manual_seed(0), torch.Generator().manual_seed(1)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    x = randn(b, d)
    w_gate, w_up = randn(n, d, scale=d ** -0.5), randn(n, d, scale=d ** -0.5)
    w_down = randn(d, n, scale=n ** -0.5)  # HF layout [d, n]
    w_down_t = w_down.T.contiguous()  # [n, d]: neuron i's down column is a contiguous row
    (qg, sg), (qu, su) = quantize_int4(w_gate, search=False), quantize_int4(w_up, search=False)

    def dense_gate_up():
        return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)

    h_dense = dense_gate_up()
    t_gu = bench(dense_gate_up)
    t_down = bench(lambda: F.linear(h_dense, w_down))
    t_ffn = bench(lambda: F.linear(dense_gate_up(), w_down))
    bytes_gu = 2 * n * d * elt + b * d * elt + b * n * elt
    bytes_down = n * d * elt + b * n * elt + b * d * elt
    scores = shadow_scores_int4(x, qg, sg, qu, su, backend="triton")
    ok_s = close(scores, shadow_scores_int4_reference(x, qg, sg, qu, su), 1e-3)
    t_s = bench(lambda: shadow_scores_int4(x, qg, sg, qu, su, backend="triton"))
    bytes_s = 2 * (qg.numel() + sg.numel() * sg.element_size()) + b * d * elt + 4 * b * n
    rows = [("dense gate+up (F.linear x2, SwiGLU)", "1", n, t_gu, bytes_gu, t_gu, None),
            ("dense down (F.linear)", "1", n, t_down, bytes_down, t_down, None),
            ("dense FFN", "1", n, t_ffn, bytes_gu + bytes_down, t_ffn, None),
            ("shadow scores int4 (all n)", "1", n, t_s, bytes_s, t_gu, ok_s)]
    for density in args.densities:
        k = max(1, round(density * n))
        idx = torch.randperm(n, generator=cpu_gen)[:k].sort().values.to(device=device, dtype=torch.int32)

        def hot():
            return sparse_down(gather_gemv(x, w_gate, idx, w_up, backend="triton"), w_down_t, idx, backend="triton")

        h = gather_gemv(x, w_gate, idx, w_up, backend="triton")
        h_ref = gather_gemv_reference(x, w_gate, idx, w_up)
        ok_g = close(h, h_ref, 2e-2)
        ok_d = close(sparse_down(h_ref, w_down_t, idx, backend="triton"), sparse_down_reference(h_ref, w_down_t, idx),
                     2e-2)
        t_g = bench(lambda: gather_gemv(x, w_gate, idx, w_up, backend="triton"))
        t_d = bench(lambda: sparse_down(h, w_down_t, idx, backend="triton"))
        t_h = bench(hot)
        by_g = 2 * k * d * elt + b * d * elt + 4 * k + 4 * b * k
        by_d = k * d * elt + 4 * b * k + 4 * k + 4 * b * d
        rows += [("gather_gemv (SwiGLU)", f"{density:g}", k, t_g, by_g, t_gu, ok_g),
                 ("sparse_down", f"{density:g}", k, t_d, by_d, t_down, ok_d),
                 ("hot FFN (gather_gemv + sparse_down)", f"{density:g}", k, t_h, by_g + by_d, t_ffn, ok_g and ok_d)]
    return rows


def format_rows(rows, peak: float | None) -> list[str]:
    out = ["| op | density | k | time (µs) | GB/s | of peak | × dense time | = reference |",
           "|---|---|---|---|---|---|---|---|"]
    for name, density, k, t, nbytes, t_dense, ok in rows:
        gbs = nbytes / t / 1e3  # bytes per µs → GB/s
        share = f"{100 * gbs * 1e9 / peak:.0f}%" if peak else "—"
        check = "—" if ok is None else ("yes" if ok else "**NO**")
        rate = f"{gbs:.0f}" if gbs >= 10 else f"{gbs:.2f}"  # dry-run figures are tiny
        out.append(f"| {name} | {density} | {k} | {t:.1f} | {rate} | {share} | {t / t_dense:.2f} | {check} |")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    import triton

    from offload.kernels import interpreter_active

    if args.dry_run:
        if not interpreter_active():
            print("error: --dry-run needs Triton's interpreter, but triton was imported before TRITON_INTERPRET=1 "
                  "was set (run this file as a script)")
            return 1
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("skipped: needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run runs it on the CPU")
        return 0
    bench = make_timer(device)
    peak, peak_src = peak_bandwidth(args, device)
    where = (torch.cuda.get_device_name() if device == "cuda" else
             "CPU, Triton interpreter (dry run: the times say nothing about a GPU)")
    peak_text = f"{peak / 1e9:.0f} GB/s" if peak else "—"
    print(f"{where} · torch {torch.__version__} · triton {triton.__version__} · batch {args.batch} · "
          f"{args.dtype} · peak bandwidth {peak_text} ({peak_src})", flush=True)
    failed = 0
    for d, n in args.shapes:
        t0 = time.perf_counter()
        rows = bench_shape(d, n, args, device, bench)
        failed += sum(1 for r in rows if r[-1] is False)
        print(f"\n### d = {d}, n = {n} ({time.perf_counter() - t0:.0f} s)\n")
        print("\n".join(format_rows(rows, peak)), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    print("\nGB/s counts the bytes each op must move (active weight rows, activations, indices); × dense time "
          "compares with the dense op doing the same job (the shadow scores: with dense gate + up); "
          "= reference: the kernel's output against its torch reference.")
    if failed:
        print(f"\nFAILED: {failed} kernel outputs differ from their references")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
