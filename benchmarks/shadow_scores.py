"""Shadow-predictor scoring on the CPU: packed int4/int8 kernels (offload.cpu.shadow) vs the dense fp32
gate+up GEMV they replace, same run.

    python benchmarks/shadow_scores.py                    # SmolLM2 (1536 x 576) and 7B (11008 x 4096), b=1
    python benchmarks/shadow_scores.py --batch 4          # 4 tokens per call
    python benchmarks/shadow_scores.py --shapes smollm2 --rounds 15
    python benchmarks/shadow_scores.py --json

Per shape and method, the "streamed" time cycles through enough distinct copies of the layer that
they total >= 4x the last-level cache (at least 2 copies; ~135 for SmolLM2's 1 MB int4 layer), as in
a real decode where 30 layers and everything else stream through the cache; the "hot" time repeats
one layer (cache-resident: the per-call floor). The methods alternate in rounds (rotating order):
in each round a method sleeps --settle seconds (so that OpenBLAS's/OpenMP's idle workers, which
spin for tens of ms after a call, stop competing for the cores), makes one untimed call, then
--block timed back-to-back calls on successive copies. Medians are reported. GB/s = bytes the
method reads per call / streamed time. "× dense fp32" = numpy dense fp32 gate+up (same thread
count, streamed) / this method (streamed); "× best dense" uses the faster of numpy's 1- and
2-thread times. The load average before and after the run is printed: other jobs on the machine
take cores from the 2-thread rows first.

Methods:
  numpy fp32        W_gu @ x, W_gu = [gate; up] fp32 [2n, d] (OpenBLAS; threads set through its API)
  torch fp32        torch.mv(W_gu, x) (torch.matmul for b > 1)
  reference         offload.predict.shadow.ShadowPredictor.scores: fp32 dequantized copy (cached
                    after the first call) + F.linear + |silu(g)·u|, i.e. dense fp32 bytes
  int4 / int8       offload.cpu.shadow.Int4Shadow / Int8Shadow .scores (packed bytes, scores out)

Results (AMD EPYC Zen 3 VM, 2 cores, 32 MB L3, AVX2; two other jobs kept both cores ~94 % busy
during the run, so absolute times are noisy by ±30 % run to run and the 2-thread rows are
pessimistic; b = 1; `python benchmarks/shadow_scores.py`):

    load average before: 2.82 (on 2 CPUs)

    n = 1536, d = 576, b = 1; streamed copies: dense 19, reference 19, int4 135, int8 76

    | method | threads | MB read | streamed µs | GB/s | × dense fp32 | × best dense | hot µs |
    |---|---|---|---|---|---|---|---|
    | numpy fp32 gate+up | 1 | 7.08 | 540 | 13.1 | 1.00 | 0.55 | 150 |
    | torch fp32 gate+up | 1 | 7.08 | 611 | 11.6 | 0.88 | 0.49 | 195 |
    | numpy fp32 gate+up | 2 | 7.08 | 299 | 23.6 | 1.00 | 1.00 | 7988 |
    | torch fp32 gate+up | 2 | 7.08 | 609 | 11.6 | 0.49 | 0.49 | 192 |
    | reference (shadow.py, cached fp32) | 1 | 7.08 | 665 | 10.6 | 0.81 | 0.45 | 254 |
    | reference (shadow.py, cached fp32) | 2 | 7.08 | 672 | 10.5 | 0.45 | 0.45 | 274 |
    | int4 Int4Shadow | 1 | 1.00 | 85 | 11.7 | 6.37 | 3.53 | 51 |
    | int4 Int4Shadow | 2 | 1.00 | 119 | 8.4 | 2.52 | 2.52 | 89 |
    | int8 Int8Shadow | 1 | 1.78 | 135 | 13.2 | 4.00 | 2.22 | 70 |
    | int8 Int8Shadow | 2 | 1.78 | 178 | 10.0 | 1.68 | 1.68 | 108 |

    Per-call overhead (Int4Shadow.scores on an 8 x 32 layer): 1 thread: 6.0 µs, 2 threads: 6.0 µs; topk_indices(k = n/2): 12 µs

    n = 11008, d = 4096, b = 1; streamed copies: dense 2, reference 2, int4 3, int8 2

    | method | threads | MB read | streamed µs | GB/s | × dense fp32 | × best dense | hot µs |
    |---|---|---|---|---|---|---|---|
    | numpy fp32 gate+up | 1 | 360.71 | 24101 | 15.0 | 1.00 | 1.00 | 33643 |
    | torch fp32 gate+up | 1 | 360.71 | 25721 | 14.0 | 0.94 | 0.94 | 24566 |
    | numpy fp32 gate+up | 2 | 360.71 | 28913 | 12.5 | 1.00 | 0.83 | 28491 |
    | torch fp32 gate+up | 2 | 360.71 | 24349 | 14.8 | 1.19 | 0.99 | 26697 |
    | reference (shadow.py, cached fp32) | 1 | 360.71 | 26873 | 13.4 | 0.90 | 0.90 | 28503 |
    | reference (shadow.py, cached fp32) | 2 | 360.71 | 26249 | 13.7 | 1.10 | 0.92 | 27427 |
    | int4 Int4Shadow | 1 | 50.72 | 5036 | 10.1 | 4.79 | 4.79 | 2637 |
    | int4 Int4Shadow | 2 | 50.72 | 4244 | 12.0 | 6.81 | 5.68 | 3607 |
    | int8 Int8Shadow | 1 | 90.27 | 10342 | 8.7 | 2.33 | 2.33 | 10056 |
    | int8 Int8Shadow | 2 | 90.27 | 6950 | 13.0 | 4.16 | 3.47 | 8586 |

    Per-call overhead (Int4Shadow.scores on an 8 x 32 layer): 1 thread: 6.6 µs, 2 threads: 6.6 µs; topk_indices(k = n/2): 51 µs

    load average after: 3.15

In other runs of the same command (same load) int4 at 1 thread measured 3.4-5.0 ms at 7B (4.8-5.3×
numpy dense) and 85-86 µs streamed / 51-54 µs hot at SmolLM2 (3.5-6.4×). With `--batch 4` (one
run, int4, 1 thread): SmolLM2 180 µs, 7B 7.8 ms (numpy's W @ X for 4 tokens: 1.18 ms and 62 ms).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import re
import sys
import time

SHAPES = {"smollm2": (1536, 576), "7b": (11008, 4096)}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="smollm2,7b", help="comma list of " + ",".join(SHAPES) + " or NxD")
    p.add_argument("--batch", type=int, default=1, help="tokens per call")
    p.add_argument("--rounds", type=int, default=7, help="rounds; each runs every method once, in rotated order")
    p.add_argument("--block", type=int, default=10, help="back-to-back streamed calls per method and round")
    p.add_argument("--hot-reps", type=int, default=41, help="repetitions on one cache-resident layer")
    p.add_argument("--settle", type=float, default=0.1, help="seconds of sleep before each method's block")
    p.add_argument("--cache-factor", type=float, default=4.0, help="streamed copies total >= this x LLC")
    p.add_argument("--max-copy-bytes", type=float, default=800e6, help="memory cap per method's copies")
    p.add_argument("--threads", default="1,2", help="thread counts to run")
    p.add_argument("--methods", default="numpy,torch,reference,int4,int8")
    p.add_argument("--json", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


args = _parse(sys.argv[1:]) if __name__ == "__main__" else None
if args is not None:
    # OpenBLAS sizes its pool at load; allow the largest count, lower it per call through its API
    nmax = str(max(int(t) for t in args.threads.split(",")))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, nmax)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from offload.cpu import shadow as lowbit  # noqa: E402
from offload.cpu.topk import topk_indices  # noqa: E402
from offload.predict.quant import quantize_int4, quantize_int8  # noqa: E402


# ------------------------------------------------------------------------------------- helpers
def _openblas_setter():
    """openblas_set_num_threads of the OpenBLAS NumPy loaded (None if not found)."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return None
    for path in sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", maps))):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, name):
                fn = getattr(lib, name)
                fn.argtypes = [ctypes.c_int]
                return fn
    return None


_set_blas = None


def set_threads(n: int) -> None:
    global _set_blas
    if _set_blas is None:
        np.dot(np.ones((2, 2)), np.ones(2))  # make sure the BLAS is loaded
        _set_blas = _openblas_setter() or (lambda n: None)
    _set_blas(n)
    torch.set_num_threads(n)


def llc_bytes() -> int:
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                size = open(f"{base}/{entry}/size").read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
            best = max(best, int(size.rstrip("KMG")) * mult)
    except OSError:
        pass
    return best or 32 << 20


def n_copies(nbytes: int, a) -> int:
    want = math.ceil(a.cache_factor * llc_bytes() / max(nbytes, 1))
    cap = max(1, int(a.max_copy_bytes // max(nbytes, 1)))
    return max(2, min(want, cap))


def silu_score(g, u):
    return (torch.nn.functional.silu(g) * u).abs()


# ------------------------------------------------------------------------------------- methods
class Method:
    """name, threads, nbytes per call, call(i) runs on copy i % copies."""

    def __init__(self, name, threads, nbytes, copies, call):
        self.name, self.threads, self.nbytes, self.copies, self.call = name, threads, nbytes, copies, call
        self.streamed: list[float] = []
        self.hot: list[float] = []


def build_methods(n: int, d: int, b: int, a) -> tuple[list[Method], dict]:
    g = torch.Generator().manual_seed(a.seed)
    wg = torch.randn(n, d, generator=g) / d ** 0.5
    wu = torch.randn(n, d, generator=g) / d ** 0.5
    x_t = torch.randn(b, d, generator=g)
    x_np = x_t.numpy()
    threads = [int(t) for t in a.threads.split(",")]
    wanted = a.methods.split(",")
    methods: list[Method] = []
    info = {}

    if "numpy" in wanted or "torch" in wanted:
        dense_bytes = 2 * n * d * 4
        k = n_copies(dense_bytes, a)
        W = [np.concatenate([wg.numpy(), wu.numpy()]) for _ in range(k)]  # distinct copies
        W_t = [torch.from_numpy(w) for w in W]
        xv = x_np[0] if b == 1 else x_np.T.copy()
        xv_t = x_t[0] if b == 1 else x_t.T.contiguous()
        info["dense_copies"] = k
        for t in threads:
            if "numpy" in wanted:
                methods.append(Method("numpy fp32 gate+up", t, dense_bytes, k, lambda i, W=W: W[i % len(W)] @ xv))
            if "torch" in wanted:
                f = (lambda i, W=W_t: torch.mv(W[i % len(W)], xv_t)) if b == 1 else \
                    (lambda i, W=W_t: torch.matmul(W[i % len(W)], xv_t))
                methods.append(Method("torch fp32 gate+up", t, dense_bytes, k, f))

    qg4, sg4 = quantize_int4(wg)
    qu4, su4 = quantize_int4(wu)
    if "reference" in wanted:
        from offload.predict.shadow import ShadowPredictor

        ref_bytes = 2 * n * d * 4
        k = n_copies(ref_bytes, a)
        preds = [ShadowPredictor("swiglu", n, d, 4, 32, qg4, sg4, qu4, su4) for _ in range(k)]
        for p in preds:
            p.dequantized()
        info["reference_copies"] = k
        for t in threads:
            methods.append(Method("reference (shadow.py, cached fp32)", t, ref_bytes, k,
                                  lambda i, P=preds: P[i % len(P)].scores(x_t)))
    if "int4" in wanted:
        base = lowbit.Int4Shadow(qg4, sg4, qu4, su4, d=d)
        k = n_copies(base.nbytes, a)
        shadows = [base] + [_copy_shadow(base) for _ in range(k - 1)]
        info["int4_copies"] = k
        for t in threads:
            methods.append(Method("int4 Int4Shadow", t, base.nbytes, k,
                                  lambda i, S=shadows, t=t: _scores(S[i % len(S)], x_np, t)))
    if "int8" in wanted:
        qg8, sg8 = quantize_int8(wg)
        qu8, su8 = quantize_int8(wu)
        base = lowbit.Int8Shadow(qg8, sg8, qu8, su8)
        k = n_copies(base.nbytes, a)
        shadows = [base] + [_copy_shadow(base) for _ in range(k - 1)]
        info["int8_copies"] = k
        for t in threads:
            methods.append(Method("int8 Int8Shadow", t, base.nbytes, k,
                                  lambda i, S=shadows, t=t: _scores(S[i % len(S)], x_np, t)))
    return methods, info


def _copy_shadow(sh):
    import copy

    c = copy.copy(sh)
    c.W = sh.W.copy()
    if hasattr(sh, "S"):
        c.S = sh.S.copy()
    return c


def _scores(sh, x, threads):
    sh.threads = threads
    return sh.scores(x)


def run_shape(n: int, d: int, a) -> dict:
    methods, info = build_methods(n, d, a.batch, a)
    # warm-up (compiles, first-touch, thread pools)
    for m in methods:
        set_threads(m.threads)
        for i in range(min(m.copies, 3)):
            m.call(i)
    for rnd in range(a.rounds):
        order = methods[rnd % len(methods):] + methods[: rnd % len(methods)]
        for m in order:
            set_threads(m.threads)
            if a.settle:
                time.sleep(a.settle)
            base = rnd * (a.block + 1)
            m.call(base)  # untimed: wakes the thread pool and the clock after the pause
            for j in range(1, a.block + 1):
                t0 = time.perf_counter()
                m.call(base + j)
                m.streamed.append(time.perf_counter() - t0)
    for m in methods:
        set_threads(m.threads)
        if a.settle:
            time.sleep(a.settle)
        for _ in range(5):
            m.call(0)
        for _ in range(a.hot_reps):
            t0 = time.perf_counter()
            m.call(0)
            m.hot.append(time.perf_counter() - t0)
    dense = {m.threads: float(np.median(m.streamed)) for m in methods if m.name.startswith("numpy")}
    best_dense = min(dense.values()) if dense else None
    rows = []
    for m in methods:
        ts = float(np.median(m.streamed))
        rows.append({
            "method": m.name, "threads": m.threads, "copies": m.copies, "bytes": m.nbytes,
            "streamed_us": ts * 1e6, "hot_us": float(np.median(m.hot)) * 1e6,
            "gbps": m.nbytes / ts / 1e9,
            "x_dense": (dense[m.threads] / ts) if m.threads in dense else None,
            "x_best_dense": (best_dense / ts) if best_dense else None,
        })
    return {"n": n, "d": d, "batch": a.batch, "rows": rows, **info, "overhead": call_overhead(a),
            "topk_us": topk_time(n, a)}


def topk_time(n: int, a) -> float:
    """Median µs of topk_indices(scores [b, n], k = n/2)."""
    s = np.abs(np.random.default_rng(2).standard_normal((a.batch, n)).astype(np.float32))
    topk_indices(s, n // 2)
    ts = []
    for _ in range(200):
        t0 = time.perf_counter()
        topk_indices(s, n // 2)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)) * 1e6


def call_overhead(a) -> dict:
    """Median µs of Int4Shadow.scores on a tiny layer (8 neurons x 32): the fixed cost per call."""
    g = torch.Generator().manual_seed(1)
    qg, sg = quantize_int4(torch.randn(8, 32, generator=g))
    qu, su = quantize_int4(torch.randn(8, 32, generator=g))
    x = np.random.default_rng(0).standard_normal((a.batch, 32)).astype(np.float32)
    out = {}
    for t in [int(t) for t in a.threads.split(",")]:
        sh = lowbit.Int4Shadow(qg, sg, qu, su, threads=t)
        for _ in range(200):
            sh.scores(x)
        ts = []
        for _ in range(2000):
            t0 = time.perf_counter()
            sh.scores(x)
            ts.append(time.perf_counter() - t0)
        out[t] = float(np.median(ts)) * 1e6
    return out


def markdown(res: dict) -> str:
    lines = [f"n = {res['n']}, d = {res['d']}, b = {res['batch']}; streamed copies: "
             + ", ".join(f"{k.split('_')[0]} {v}" for k, v in res.items() if k.endswith("_copies")),
             "",
             "| method | threads | MB read | streamed µs | GB/s | × dense fp32 | × best dense | hot µs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        xd = f"{r['x_dense']:.2f}" if r["x_dense"] is not None else "-"
        xb = f"{r['x_best_dense']:.2f}" if r["x_best_dense"] is not None else "-"
        lines.append(f"| {r['method']} | {r['threads']} | {r['bytes'] / 1e6:.2f} | {r['streamed_us']:.0f} | "
                     f"{r['gbps']:.1f} | {xd} | {xb} | {r['hot_us']:.0f} |")
    ov = ", ".join(f"{t} thread{'s' if t > 1 else ''}: {v:.1f} µs" for t, v in res["overhead"].items())
    lines.append("")
    lines.append(f"Per-call overhead (Int4Shadow.scores on an 8 x 32 layer): {ov}; "
                 f"topk_indices(k = n/2): {res['topk_us']:.0f} µs")
    return "\n".join(lines)


def main(a) -> None:
    results = []
    if not a.json:
        print(f"load average before: {os.getloadavg()[0]:.2f} (on {os.cpu_count()} CPUs)\n")
    for s in a.shapes.split(","):
        if s in SHAPES:
            n, d = SHAPES[s]
        else:
            n, d = (int(v) for v in s.lower().split("x"))
        results.append(run_shape(n, d, a))
        if not a.json:
            print(markdown(results[-1]))
            print(flush=True)
    if not a.json:
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    if a.json:
        print(json.dumps({"machine": platform.processor() or platform.machine(), "results": results}, indent=1))


if __name__ == "__main__":
    main(args)
