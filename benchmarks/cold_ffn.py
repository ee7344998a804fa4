"""Cold FFN on the CPU: sparse (ColdFFN) vs dense BLAS vs naive fancy-index gather, same run.

    python benchmarks/cold_ffn.py                # table, fp32 4096 x 11008 SwiGLU, 2 threads
    python benchmarks/cold_ffn.py --json         # the same as JSON
    python benchmarks/cold_ffn.py --batch 8      # 8 tokens per call (idx = union over the batch)
    python benchmarks/cold_ffn.py --worker-only  # just the worker round-trip latency

For each density, repetitions alternate sparse, dense, naive on the same layer; the median of
``--reps`` is reported. ratio = (active bytes / sparse time) / (all bytes / dense time), with
active bytes = 3·d·4·k and all bytes = 3·d·n·4: 1.0 means the sparse path streams its active rows
as fast as BLAS streams the whole layer.

Each repetition: pause ``--settle`` s, one untimed sparse call on *other* neurons of the layer
(the previous layer's cold call, as in decode: it wakes the helper thread and the idle vCPU,
and leaves the timed rows out of cache), then timed sparse, dense, naive.
- ``--settle`` (default 0.15 s): OpenBLAS's idle workers busy-wait ~65 ms after every BLAS call
  (measured here: 0.92 of a core in the 50 ms after a 4096 x 11008 matvec, ~0 after 200 ms),
  which takes one of the two cores from whatever runs next. In decode the cold path does not
  follow a large BLAS call; ``--settle 0`` shows the interference.
- ``--no-prev`` times the first call after the pause instead: on this VM a helper thread idle for
  150 ms takes ~130 µs (at times 2 ms) to start, and single-thread bandwidth is lower too.

Measured on the 2-vCPU AMD EPYC VM, quiet moment (other processes 0.01 cores), default options:

| density | k | dense ms | sparse ms | speedup | ratio | dense GB/s | sparse GB/s | naive ratio |
|---|---|---|---|---|---|---|---|---|
| 5 % | 550 | 14.92 | 0.89 | 16.8x | 0.84 | 36.3 | 30.4 | 0.25 |
| 10 % | 1101 | 14.77 | 1.61 | 9.2x | 0.92 | 36.6 | 33.6 | 0.26 |
| 20 % | 2202 | 14.78 | 3.15 | 4.7x | 0.94 | 36.6 | 34.4 | 0.15 |
| 30 % | 3302 | 14.57 | 4.48 | 3.3x | 0.97 | 37.1 | 36.2 | 0.14 |
| 50 % | 5504 | 14.87 | 7.44 | 2.0x | 1.00 | 36.4 | 36.3 | 0.16 |
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--n", type=int, default=11008)
    p.add_argument("--densities", type=str, default="5,10,20,30,50", help="percent, comma list")
    p.add_argument("--batch", type=int, default=1, help="tokens per call (1..8)")
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--threads", type=int, default=2, help="threads for BLAS and the cold kernel")
    p.add_argument("--settle", type=float, default=0.15,
                   help="seconds to pause before each sparse rep (OpenBLAS spin-down)")
    p.add_argument("--no-prev", action="store_true",
                   help="time the sparse call straight after the settle pause, without the "
                        "untimed previous-layer call on other neurons")
    p.add_argument("--no-naive", action="store_true", help="skip the naive gather column")
    p.add_argument("--worker-only", action="store_true", help="only the worker round trip")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


args = _parse(sys.argv[1:]) if __name__ == "__main__" else None
if args is not None:
    # BLAS thread count must be fixed before NumPy loads its BLAS; respect what the user set
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))

import numpy as np  # noqa: E402

from offload.cpu.cold import ColdFFN  # noqa: E402
from offload.cpu.worker import ColdWorker  # noqa: E402


def _silu(g):
    with np.errstate(over="ignore"):
        return g / (1.0 + np.exp(-g))


def worker_latency(n_calls: int = 3000) -> dict:
    """Median/p90 µs of submit(noop).result() for ColdWorker and ThreadPoolExecutor(1)."""
    from concurrent.futures import ThreadPoolExecutor

    def noop(*a):
        return None

    def measure(call):
        for _ in range(200):
            call()
        ts = np.empty(n_calls)
        for i in range(n_calls):
            t0 = time.perf_counter()
            call()
            ts[i] = time.perf_counter() - t0
        return {"median_us": float(np.median(ts) * 1e6), "p90_us": float(np.percentile(ts, 90) * 1e6),
                "min_us": float(ts.min() * 1e6)}

    out = {}
    x = np.zeros(4096, np.float32)
    out["direct call"] = measure(lambda: noop(x))
    w = ColdWorker()
    out["ColdWorker"] = measure(lambda: w.submit(noop, x).result())
    w.close()
    ex = ThreadPoolExecutor(max_workers=1)
    out["ThreadPoolExecutor(1)"] = measure(lambda: ex.submit(noop, x).result())
    ex.shutdown()
    return out


def run(a) -> dict:
    d, n, b = a.d, a.n, a.batch
    rng = np.random.default_rng(a.seed)
    scale = np.float32(d ** -0.5)
    G = rng.standard_normal((n, d), dtype=np.float32) * scale
    U = rng.standard_normal((n, d), dtype=np.float32) * scale
    D = rng.standard_normal((d, n), dtype=np.float32) * np.float32(n ** -0.5)
    cold = ColdFFN(G, U, D, act="swiglu", threads=a.threads)
    DT = None if a.no_naive else np.ascontiguousarray(D.T)  # naive gathers rows of all three
    x = rng.standard_normal((b, d) if b > 1 else (d,), dtype=np.float32)
    xT = x.T

    def dense():
        return D @ (_silu(G @ xT) * (U @ xT))

    def naive(idx):
        return (_silu(G[idx] @ xT) * (U[idx] @ xT)).T @ DT[idx]

    def timed(f, *fa):
        t0 = time.perf_counter()
        f(*fa)
        return time.perf_counter() - t0

    for _ in range(5):  # page in / warm up, and load the compiled kernel
        dense()
        cold.forward(x, np.arange(0, n, 7))

    all_bytes = 3 * d * n * 4
    rows = []
    for pct in [float(s) for s in a.densities.split(",")]:
        k = max(1, int(round(n * pct / 100)))
        perm = rng.permutation(n)
        idx = np.sort(perm[:k])
        prev = np.sort(perm[k:2 * k] if 2 * k <= n else perm[k:])  # other neurons ("layer l-1")
        td, ts, tn = [], [], []
        for r in range(a.reps):
            if a.settle:
                time.sleep(a.settle)
            if not a.no_prev:
                cold.forward(x, prev)
            ts.append(timed(cold.forward, x, idx))
            td.append(timed(dense))
            if DT is not None:
                tn.append(timed(naive, idx))
            if r == 0:  # correctness of what is timed
                y = cold.forward(x, idx)
                y_ref = (_silu(G[idx] @ xT) * (U[idx] @ xT)).T @ D[:, idx].T
                err = float(np.abs(y - y_ref.reshape(y.shape)).max() / np.abs(y_ref).max())
                if err > 1e-4:
                    raise AssertionError(f"sparse result differs from dense-on-gathered: {err}")
        act_bytes = 3 * d * 4 * k
        dm, sm = float(np.median(td)), float(np.median(ts))
        row = {"density_pct": pct, "k": k, "dense_ms": dm * 1e3, "sparse_ms": sm * 1e3,
               "speedup": dm / sm, "ratio": (act_bytes / sm) / (all_bytes / dm),
               "dense_GBps": all_bytes / dm / 1e9, "sparse_GBps": act_bytes / sm / 1e9,
               "sparse_ms_min": min(ts) * 1e3, "dense_ms_min": min(td) * 1e3,
               "ratio_best": (act_bytes / min(ts)) / (all_bytes / min(td))}
        if tn:
            nm = float(np.median(tn))
            row.update(naive_ms=nm * 1e3, naive_ratio=(act_bytes / nm) / (all_bytes / dm),
                       naive_GBps=act_bytes / nm / 1e9)
        rows.append(row)
    return {"d": d, "n": n, "batch": b, "threads": a.threads, "reps": a.reps, "settle_s": a.settle,
            "prev_call": not a.no_prev,
            "act": "swiglu", "dtype": "float32", "rows": rows}


def _openblas_corename():
    """OpenBLAS's chosen kernel set (e.g. 'Haswell'), best effort; None when not found."""
    import ctypes
    import glob

    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                    "openblas_get_corename64_", "openblas_get_corename"):
            f = getattr(lib, sym, None)
            if f is not None:
                f.restype = ctypes.c_char_p
                return f().decode()
    return None


def env_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import numba
        nb = numba.__version__
    except ImportError:
        nb = None
    return {"cpu": cpu, "cpus": os.cpu_count(), "numpy": np.__version__, "numba": nb,
            "openblas_core": _openblas_corename(),
            "python": platform.python_version(),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "env": {k: v for k, v in os.environ.items()
                    if k.startswith(("OPENBLAS", "OMP_", "MKL_", "NUMBA_"))}}


def _markdown(res: dict) -> str:
    naive = "naive_ms" in res["rows"][0]
    out = [f"fp32 d={res['d']} n={res['n']} SwiGLU, batch {res['batch']}, {res['threads']} threads, "
           f"median of {res['reps']} alternating reps, settle {res['settle_s']} s, "
           f"{'after' if res['prev_call'] else 'without'} an untimed call on other neurons", ""]
    hdr = ("| density | k | dense ms | sparse ms | speedup | ratio | ratio (best of reps) "
           "| dense GB/s | sparse GB/s |")
    sep = "|---|---|---|---|---|---|---|---|---|"
    if naive:
        hdr += " naive ms | naive ratio | naive GB/s |"
        sep += "---|---|---|"
    out += [hdr, sep]
    for r in res["rows"]:
        s = (f"| {r['density_pct']:g} % | {r['k']} | {r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | "
             f"{r['speedup']:.2f}x | {r['ratio']:.2f} | {r['ratio_best']:.2f} | {r['dense_GBps']:.1f} | "
             f"{r['sparse_GBps']:.1f} |")
        if naive:
            s += f" {r['naive_ms']:.2f} | {r['naive_ratio']:.2f} | {r['naive_GBps']:.1f} |"
        out.append(s)
    out.append("")
    if res.get("other_processes_cores") is not None:
        out.append(f"other processes used {res['other_processes_cores']:.2f} of the "
                   f"{os.cpu_count()} cores during these reps (0 = quiet machine)")
    out.append("naive = G[idx]@x, U[idx]@x, h@D.T[idx] (fancy-index gather + BLAS, down pre-transposed)")
    return "\n".join(out)


def _busy_jiffies():
    """System-wide busy CPU time in seconds (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class _OtherLoad:
    """CPU used by *other* processes while a block runs, in cores (machine-noise indicator)."""

    def __enter__(self):
        self.w, self.b, self.p = time.perf_counter(), _busy_jiffies(), time.process_time()
        return self

    def __exit__(self, *exc):
        b = _busy_jiffies()
        dw = time.perf_counter() - self.w
        self.cores = (None if b is None or self.b is None
                      else max(0.0, (b - self.b) - (time.process_time() - self.p)) / dw)


def main(a) -> int:
    t0 = time.perf_counter()
    res = {"env": env_info()}
    if not a.worker_only:
        with _OtherLoad() as ol:
            res["ffn"] = run(a)
        res["ffn"]["other_processes_cores"] = ol.cores
    res["worker_roundtrip"] = worker_latency()
    res["wall_s"] = time.perf_counter() - t0
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    e = res["env"]
    print(f"CPU: {e['cpu']} ({e['cpus']} CPUs), numpy {e['numpy']} (OpenBLAS core "
          f"{e['openblas_core']}), numba {e['numba']}, python {e['python']}, env {e['env']}")
    print(f"load average at start: {e['loadavg']}")
    if "ffn" in res:
        print()
        print(_markdown(res["ffn"]))
    print()
    print("worker round trip, submit(noop).result():")
    print("| how | median µs | p90 µs | min µs |")
    print("|---|---|---|---|")
    for k, v in res["worker_roundtrip"].items():
        print(f"| {k} | {v['median_us']:.1f} | {v['p90_us']:.1f} | {v['min_us']:.1f} |")
    print(f"\n({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(args))
