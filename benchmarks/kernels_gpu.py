"""Hot-side FFN kernels against dense torch GEMVs on the GPU (triton.testing.do_bench).

Default shape: one LLaMA-7B FFN layer (d = 4096, n = 11008), fp16 weights, batch 1. For each
density of active neurons it times

  gather_gemv   x · [W_gate; W_up][idx]ᵀ + SwiGLU   vs  dense gate + up (two F.linear) + SwiGLU
  sparse_down   h · W_down_t[idx]                    vs  dense down (F.linear)
  hot FFN       both                                 vs  the dense FFN

and prints a markdown table with the median time, the bandwidth it implies (bytes the op must
read or write: active rows of the weights, activations, indices) and the fraction of the dense
time. do_bench flushes the L2 between runs, as at decode, where a layer's weights are not cached.

    python benchmarks/kernels_gpu.py [--d 4096] [--n 11008] [--batch 1] [--dtype fp16]
                                     [--densities 0.05,0.1,0.2,0.3,0.4,0.5]

Without a CUDA GPU it prints "skipped: needs a CUDA GPU" and exits 0.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=4096, help="model width (default 4096)")
    p.add_argument("--n", type=int, default=11008, help="FFN neurons (default 11008)")
    p.add_argument("--batch", type=int, default=1, help="tokens per call, 1..8 (default 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.4,0.5",
                   help="comma-separated fractions of active neurons")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 0

    import triton
    import triton.testing

    from offload.kernels.gather_gemv import gather_gemv, tuned_kernels as gg_tuned
    from offload.kernels.sparse_down import sparse_down, tuned_kernels as sd_tuned

    dev, dtype, b, d, n = "cuda", DTYPES[args.dtype], args.batch, args.d, args.n
    elt = torch.tensor([], dtype=dtype).element_size()
    torch.manual_seed(0)
    x = torch.randn(b, d, device=dev, dtype=dtype)
    w_gate = (torch.randn(n, d, device=dev) / d ** 0.5).to(dtype)
    w_up = (torch.randn(n, d, device=dev) / d ** 0.5).to(dtype)
    w_down = (torch.randn(d, n, device=dev) / n ** 0.5).to(dtype)  # HF layout [d, n]
    w_down_t = w_down.T.contiguous()  # [n, d]: neuron i's down column is a contiguous row

    def bench(fn):
        fn()  # compile / autotune outside the timed runs
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # µs

    def dense_gate_up():
        return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)

    h_dense = dense_gate_up()
    t_gu = bench(dense_gate_up)
    t_down = bench(lambda: F.linear(h_dense, w_down))
    t_ffn = bench(lambda: F.linear(dense_gate_up(), w_down))
    bytes_gu = 2 * n * d * elt + b * d * elt + b * n * elt
    bytes_down = n * d * elt + b * n * elt + b * d * elt

    rows = [("dense gate+up (F.linear x2, SwiGLU)", "1", n, t_gu, bytes_gu, t_gu),
            ("dense down (F.linear)", "1", n, t_down, bytes_down, t_down),
            ("dense FFN", "1", n, t_ffn, bytes_gu + bytes_down, t_ffn)]
    for density in (float(s) for s in args.densities.split(",")):
        k = max(1, round(density * n))
        idx = torch.randperm(n, device=dev)[:k].sort().values.to(torch.int32)
        h = gather_gemv(x, w_gate, idx, w_up, activation="swiglu")
        t_g = bench(lambda: gather_gemv(x, w_gate, idx, w_up, activation="swiglu"))
        t_s = bench(lambda: sparse_down(h, w_down_t, idx))
        t_h = bench(lambda: sparse_down(gather_gemv(x, w_gate, idx, w_up, activation="swiglu"),
                                        w_down_t, idx))
        by_g = 2 * k * d * elt + b * d * elt + 4 * k + 4 * b * k
        by_s = k * d * elt + 4 * b * k + 4 * k + 4 * b * d
        rows += [("gather_gemv (SwiGLU)", f"{density:g}", k, t_g, by_g, t_gu),
                 ("sparse_down", f"{density:g}", k, t_s, by_s, t_down),
                 ("hot FFN (gather_gemv + sparse_down)", f"{density:g}", k, t_h, by_g + by_s, t_ffn)]

    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__} · triton {triton.__version__} · "
          f"d={d} n={n} batch={b} {args.dtype}\n")
    print("| op | density | k | time (µs) | GB/s | fraction of dense time |")
    print("|---|---|---|---|---|---|")
    for name, density, k, t, nbytes, t_dense in rows:
        print(f"| {name} | {density} | {k} | {t:.1f} | {nbytes / t / 1e3:.0f} | {t / t_dense:.2f} |")
    print("\nGB/s counts the bytes each op must move (active weight rows, activations, indices);"
          " the fraction compares with the dense op doing the same job.")
    for label, tuned in (("gather_gemv", gg_tuned), ("sparse_down", sd_tuned)):
        for batch_pad, tuner in sorted(tuned.items()):
            for key, cfg in tuner.cache.items():
                print(f"autotuned {label} (batch pad {batch_pad}) key={key}: {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
