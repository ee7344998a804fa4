"""CPU GEMV and cold-FFN kernels against a plain numba loop on the same storage and a STREAM-style read.

    python benchmarks/cpu_kernels.py                     # markdown, host ISA, threads 1 and 2
    python benchmarks/cpu_kernels.py --target both       # also an AVX2 build (a subprocess)
    python benchmarks/cpu_kernels.py -o json --quick     # a few-second smoke run

Rows: one per (kernel, shape, threads). GB/s = bytes the kernel must read ÷ time, beside the plain
loop's GB/s over its own storage, and the ratios kernel ÷ plain and kernel ÷ STREAM (a sum over
an array of the same size). GEMV kernels run as decode runs them: offload.cpu.matvec on the operand
of each storage format, called from compiled code. Plain loops: fp32/fp16, the obvious row dot loop;
GGUF types, the obvious row-major loop over the GGUF blocks dequantizing element by element (what the
kernels replace; "<type>/int8x" rows, whose kernel rounds x to int8, are compared with the same fp32-x
loop); the cold FFN (``cold.fp32`` / ``cold.fp16``: half of the neurons of a bundled [n, 3, d] store),
the obvious loop over the selected neurons. Each timing streams ``--mb`` MB of distinct copies of the matrix, so
the weights come from DRAM (fp32/fp16 matrices and cold bundles in huge pages, as the engine keeps them;
kernel and plain loop read the same arrays); kernel, plain loop and STREAM alternate within a repetition,
best of ``--reps``.
One-thread rows are timed by the thread's CPU time (``--wall`` for the wall clock): on a shared
machine the wall clock mostly measures the other processes' time slices. Rows with more threads
are timed by the wall clock: a parallel region waits for its slowest (possibly descheduled) thread.
``--target avx2`` re-runs this script with NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES= (the CPU
name alone keeps the host's AVX-512). More kernels are more entries of CASES: a name, a setup
building the state for one shape, and the kernel / plain-loop calls.

Requirement: every kernel ≥ 0.8 × the plain loop's GB/s at the same shape and thread count. The
measured tables are in the README.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import math

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES
from numba import njit, prange
from numba.typed import List

from offload.cpu import cold, cold_kernels
from offload.cpu import gemv as dense
from offload.cpu.intdot import quad_operand
from offload.cpu.matvec import matvec
from offload.cpu.widen import as_f32
from offload.formats.arena import in_huge_pages
from offload.formats.gguf_blocks import random_rows
from offload.formats.packed import pack_gguf
from offload.formats.quads import quads_from_gguf
from offload.formats.quantized import packed_operand

SHAPES = {"smol.qkv": (960, 576), "smol.o": (576, 576), "smol.gate_up": (3072, 576), "smol.down": (576, 1536),
          "smol.head": (49152, 576), "7b.up": (11008, 4096), "7b.down": (4096, 11008)}
# the cold FFN: neurons × d of the bundled [n, 3, d] store, half of the neurons selected per token
FFN_SHAPES = {"smol.ffn": (1536, 576), "7b.ffn": (11008, 4096)}
COLD_DENSITY = 0.5
AVX2_ENV = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""}

# ----- plain loops: y[lo:hi] for rows lo..hi-1, one row at a time, element by element -----
# (not cached: numba's cache records the module's name, which differs between a run as a script
# and an import by the tests, and loading the other's entry fails)


@njit(nogil=True, fastmath=True)
def plain_dense(W, x, y, lo, hi):
    for i in range(lo, hi):
        s = np.float32(0)
        for j in range(W.shape[1]):
            s += as_f32(W[i, j]) * x[j]
        y[i] = s


@njit(nogil=True, fastmath=True, inline="always")
def fp16_at(b, k):
    return as_f32(np.uint16(b[k] | (np.uint16(b[k + 1]) << 8)))


def block_rows(block_dot, block_bytes: int, block_weights: int):
    """The plain loop over GGUF rows: for each row, for each block, s += block_dot(block, x, x0)."""
    @njit(nogil=True, fastmath=True)
    def plain(B, x, y, lo, hi):
        for i in range(lo, hi):
            s = np.float32(0)
            for g in range(B.shape[1] // block_bytes):
                s += block_dot(B[i, block_bytes * g:block_bytes * (g + 1)], x, block_weights * g)
            y[i] = s
    return plain


@njit(nogil=True, fastmath=True, inline="always")
def dot_q4_0(b, x, x0):  # d fp16, 16 bytes of nibbles; w = d·(q − 8)
    d = fp16_at(b, 0)
    s = np.float32(0)
    for k in range(16):
        s += d * np.float32((b[2 + k] & 15) - 8) * x[x0 + k] + d * np.float32((b[2 + k] >> 4) - 8) * x[x0 + 16 + k]
    return s


@njit(nogil=True, fastmath=True, inline="always")
def dot_q4_1(b, x, x0):  # d, m fp16, 16 bytes of nibbles; w = d·q + m
    d, m = fp16_at(b, 0), fp16_at(b, 2)
    s = np.float32(0)
    for k in range(16):
        s += (d * np.float32(b[4 + k] & 15) + m) * x[x0 + k] + (d * np.float32(b[4 + k] >> 4) + m) * x[x0 + 16 + k]
    return s


@njit(nogil=True, fastmath=True, inline="always")
def dot_q5_0(b, x, x0):  # d fp16, 32 fifth bits, 16 bytes of nibbles; w = d·(q − 16)
    d = fp16_at(b, 0)
    qh = np.uint32(b[2]) | np.uint32(b[3]) << 8 | np.uint32(b[4]) << 16 | np.uint32(b[5]) << 24
    s = np.float32(0)
    for k in range(16):
        lo4 = (b[6 + k] & 15) | ((qh >> k) & 1) << 4
        hi4 = (b[6 + k] >> 4) | ((qh >> (k + 16)) & 1) << 4
        s += d * np.float32(np.int32(lo4) - 16) * x[x0 + k] + d * np.float32(np.int32(hi4) - 16) * x[x0 + 16 + k]
    return s


@njit(nogil=True, fastmath=True, inline="always")
def dot_q8_0(b, x, x0):  # d fp16, 32 int8; w = d·q
    d = fp16_at(b, 0)
    q = b[2:34].view(np.int8)
    s = np.float32(0)
    for k in range(32):
        s += d * np.float32(q[k]) * x[x0 + k]
    return s


@njit(nogil=True, fastmath=True, inline="always")
def dot_q4_k(b, x, x0):  # 256: d, dmin fp16, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
    d, dmin = fp16_at(b, 0), fp16_at(b, 2)
    sc = b[4:16]
    s = np.float32(0)
    for j in range(8):
        if j < 4:
            a, m = sc[j] & 63, sc[j + 4] & 63
        else:
            a = (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4)
            m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
        ds, dm = d * np.float32(a), dmin * np.float32(m)
        shift = 4 * (j & 1)
        for k in range(32):
            s += (ds * np.float32((b[16 + 32 * (j // 2) + k] >> shift) & 15) - dm) * x[x0 + 32 * j + k]
    return s


@njit(nogil=True, fastmath=True, inline="always")
def dot_q6_k(b, x, x0):  # 256: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, d fp16
    d = fp16_at(b, 208)
    sc = b[192:208].view(np.int8)
    s = np.float32(0)
    for e in range(256):  # element e = 128·h + 32·k + l
        h, k, l = e // 128, (e // 32) % 4, e % 32
        q = ((b[64 * h + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 15) | (((b[128 + 32 * h + l] >> (2 * k)) & 3) << 4)
        s += d * np.float32(sc[e // 16]) * np.float32(np.int32(q) - 32) * x[x0 + e]
    return s


@njit(nogil=True, fastmath=True)
def stream_sum(a, x, out, lo, hi):
    """out[lo] = Σ a[lo:hi] (a STREAM-style read; x unused: the plain loops' signature)."""
    s = np.float32(0)
    seg = a[lo:hi]
    for j in range(seg.shape[0]):
        s += seg[j]
    out[lo] = s


def split_rows(fn):
    """fn(A, x, y, lo, hi) over ``parts`` contiguous row ranges in one prange region."""
    @njit(nogil=True, fastmath=True, parallel=True)
    def parallel(A, x, y, parts):
        n = A.shape[0]
        for i in prange(parts):
            fn(A, x, y, n * i // parts, n * (i + 1) // parts)
    return parallel


PLAIN = {"fp32": plain_dense, "fp16": plain_dense, "Q4_0": block_rows(dot_q4_0, 18, 32),
         "Q4_1": block_rows(dot_q4_1, 20, 32), "Q5_0": block_rows(dot_q5_0, 22, 32), "Q8_0": block_rows(dot_q8_0, 34, 32),
         "Q4_K": block_rows(dot_q4_k, 144, 256), "Q6_K": block_rows(dot_q6_k, 210, 256)}
PLAIN_PARALLEL = {name: split_rows(fn) for name, fn in PLAIN.items() if name != "fp16"}
PLAIN_PARALLEL["fp16"] = PLAIN_PARALLEL["fp32"]
STREAM_PARALLEL = split_rows(stream_sum)


@njit(nogil=True, fastmath=True)
def plain_cold(W, x, idx, acc, lo, hi):
    """acc += Σ_p silu(W[i,0]·x)·(W[i,1]·x)·W[i,2] over i = idx[lo:hi]: the cold SwiGLU FFN, plainly."""
    for p in range(lo, hi):
        i = idx[p]
        g = np.float32(0)
        u = np.float32(0)
        for j in range(W.shape[2]):
            g += as_f32(W[i, 0, j]) * x[j]
            u += as_f32(W[i, 1, j]) * x[j]
        a = g / (np.float32(1) + math.exp(-g)) * u
        for j in range(W.shape[2]):
            acc[j] += a * as_f32(W[i, 2, j])


@njit(nogil=True, fastmath=True, parallel=True)
def plain_cold_parallel(W, x, idx, parts):
    """plain_cold over ``parts.shape[0]`` contiguous slices of idx, one partial output each."""
    k, nt = idx.shape[0], parts.shape[0]
    for t in prange(nt):
        parts[t, :] = 0
        plain_cold(W, x, idx, parts[t], k * t // nt, k * (t + 1) // nt)


def run_plain(name, A, x, y, threads):
    if threads == 1:
        PLAIN[name](A, x, y, 0, A.shape[0])
    else:
        PLAIN_PARALLEL[name](A, x, y, threads)


# ----- cases -----


@dataclass
class Case:
    """One row of the table. ``setup(rng, copies)`` builds the state, a dict with at least
    kernel_bytes and plain_bytes (read per copy); ``kernel(state, threads)`` and
    ``plain(state, threads)`` each run over every copy; ``weights`` per copy."""
    name: str
    shape: str
    setup: Callable
    kernel: Callable
    plain: Callable
    weights: int


@njit(nogil=True)
def matvec_each(ops, x, y, threads):
    """offload.cpu.matvec over every operand in turn: the call the fused decode blocks make, from compiled
    code (a Python call per matrix would add microseconds to 50–100 µs GEMVs)."""
    for i in range(len(ops)):
        matvec(ops[i], x, y, threads)


def gemv_case(name: str, shape: str) -> Case:
    """fp32 / fp16 (offload.cpu.gemv), a GGUF type in column planes (offload.cpu.packed_gemv, fp32 x) or,
    named "<type>/int8x", in row quads (offload.cpu.intdot, x rounded to int8), one token: the operand a
    storage format hands offload.cpu.matvec."""
    R, C = SHAPES[shape]
    qtype = name.removesuffix(INT8_X)

    def setup(rng, copies):
        if name in ("fp32", "fp16"):
            W = dense.as_weight_array(rng.standard_normal((R, C)).astype(np.float32 if name == "fp32" else np.float16))
            plains = [in_huge_pages(W) for _ in range(copies)]  # copies in huge pages, as the engine stores them
            ops, kernel_bytes = plains, W.nbytes
        elif name.endswith(INT8_X):  # row quads, x rounded to int8: offload.cpu.intdot
            raw = random_rows(QT[qtype], R, C, rng)
            Q = quads_from_gguf(raw, QT[qtype], C)
            plains = [raw] + [raw.copy() for _ in range(copies - 1)]
            ops = [quad_operand(Q)] + [quad_operand(copy.deepcopy(Q)) for _ in range(copies - 1)]
            kernel_bytes = Q.nbytes
        else:  # column planes, fp32 x: offload.cpu.packed_gemv
            raw = random_rows(QT[name], R, C, rng)
            P = pack_gguf(raw, QT[name], C)
            plains = [raw] + [raw.copy() for _ in range(copies - 1)]
            ops = [packed_operand(P)] + [packed_operand(copy.deepcopy(P)) for _ in range(copies - 1)]
            kernel_bytes = P.nbytes
        return dict(ops=List(ops), plains=plains, kernel_bytes=kernel_bytes, plain_bytes=plains[0].nbytes,
                    x=rng.standard_normal(C).astype(np.float32), y=np.empty(R, np.float32))
    return Case(name, shape, setup, weights=R * C,
                kernel=lambda s, th: matvec_each(s["ops"], s["x"], s["y"], th),
                plain=lambda s, th: [run_plain(qtype, A, s["x"], s["y"], th) for A in s["plains"]])


def cold_case(name: str, shape: str) -> Case:
    """The cold FFN kernel (offload.cpu.cold_kernels: cold_chunk on one thread, cold_parallel on
    more; for one token both run cold_token) over half of the neurons, fp32 or fp16 bundles, one token,
    against plain_cold."""
    n, d = FFN_SHAPES[shape]
    k = int(n * COLD_DENSITY)

    def setup(rng, copies):
        dtype = np.float32 if name == "cold.fp32" else np.float16
        W = dense.as_weight_array((rng.standard_normal((n, 3, d)) * d ** -0.5).astype(dtype))
        Ws = [in_huge_pages(W) for _ in range(copies)]  # copies in huge pages, as offload.cpu.cold stores them
        idx = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
        nb = k * 3 * d * W.itemsize
        return dict(Ws=Ws, idx=idx, x=rng.standard_normal((1, d)).astype(np.float32), y=np.zeros(d, np.float32),
                    h=np.zeros((5, 1), np.float32), bias=np.zeros(0, np.float32), kernel_bytes=nb, plain_bytes=nb,
                    block=max(1, cold.BLOCK_BYTES // (3 * d * W.itemsize)))

    def kernel(s, th):
        for W in s["Ws"]:
            if th == 1:
                s["y"][:] = 0
                cold_kernels.cold_chunk(W, s["x"], s["idx"], 0, k, cold_kernels.SWIGLU, s["bias"], s["y"][None], s["h"])
            else:
                parts, scratch = np.zeros((th, 1, d), np.float32), np.zeros((th, 5, 1), np.float32)
                cold_kernels.cold_parallel(W, s["x"], s["idx"], np.zeros(2 + th, np.int64), s["block"],
                                           cold_kernels.SWIGLU, s["bias"], parts, scratch)
                np.sum(parts[:, 0], axis=0, out=s["y"])

    def plain(s, th):
        for W in s["Ws"]:
            parts = np.zeros((th, d), np.float32)
            if th == 1:
                plain_cold(W, s["x"][0], s["idx"], parts[0], 0, k)
            else:
                plain_cold_parallel(W, s["x"][0], s["idx"], parts)
            np.sum(parts, axis=0, out=s["y"])
    return Case(name, shape, setup, kernel, plain, weights=k * 3 * d)


KERNELS = ["fp32", "fp16", "Q4_1", "Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q6_K"]
# the K types' 256-column super-blocks do not divide SmolLM2's 576 columns (llama.cpp stores such
# tensors in other types)
INT8_X = "/int8x"
KERNELS += [k + INT8_X for k in KERNELS if k not in ("fp32", "fp16")]
CASES = [gemv_case(k, s) for k in KERNELS for s in SHAPES
         if k in ("fp32", "fp16") or SHAPES[s][1] % GGML_QUANT_SIZES[QT[k.removesuffix(INT8_X)]][0] == 0]
COLD_KERNELS = ["cold.fp32", "cold.fp16"]
CASES += [cold_case(k, s) for k in COLD_KERNELS for s in FFN_SHAPES]
ALL_SHAPES = {**SHAPES, **FFN_SHAPES}


# ----- measurement -----


def best_times(fns: dict, reps: int, clock=time.perf_counter) -> dict:
    """Best time of each callable; the callables alternate within every repetition."""
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = clock()
            f()
            best[k] = min(best[k], clock() - t)
    return best


def check(case: Case, state) -> None:
    """The kernel and the plain loop agree on the first copy (so the table compares like with like; x
    rounded to int8 moves a result by up to ~1 % of the largest)."""
    case.kernel(state, 1)
    y = state["y"].copy()
    case.plain(state, 1)
    scale = max(np.abs(state["y"]).max(), 1e-30)
    if np.abs(y - state["y"]).max() > (3e-2 if case.name.endswith(INT8_X) else 1e-3) * scale:
        raise AssertionError(f"{case.name} {case.shape}: kernel and plain loop disagree")


def measure(cases, threads_list, mb: float, reps: int, cpu_clock: bool = True) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for case in cases:
        probe = case.setup(rng, 1)
        per_copy = max(probe["kernel_bytes"], probe["plain_bytes"])
        copies = max(2, int(np.ceil(mb * 1e6 / per_copy)))
        state = case.setup(rng, copies)
        check(case, state)
        n_stream = copies * state["kernel_bytes"] // 4
        big = np.ones(n_stream, np.float32)
        out = np.zeros(n_stream, np.float32)
        for th in threads_list:
            def stream(th=th):
                if th == 1:
                    stream_sum(big, big, out, 0, n_stream)
                else:
                    STREAM_PARALLEL(big, big, out, th)
            stream()  # compile
            clock = time.thread_time if th == 1 and cpu_clock else time.perf_counter
            t = best_times({"kernel": lambda: case.kernel(state, th), "plain": lambda: case.plain(state, th),
                            "stream": stream}, reps, clock)
            kb, pb = state["kernel_bytes"] * copies, state["plain_bytes"] * copies
            row = dict(kernel=case.name, shape=case.shape, rows=ALL_SHAPES[case.shape][0],
                       cols=ALL_SHAPES[case.shape][1],
                       threads=th, copies=copies, clock="cpu" if clock is time.thread_time else "wall", gbs=kb / t["kernel"] / 1e9,
                       gws=case.weights * copies / t["kernel"] / 1e9, plain_gbs=pb / t["plain"] / 1e9,
                       plain_gws=case.weights * copies / t["plain"] / 1e9, stream_gbs=big.nbytes / t["stream"] / 1e9)
            row["vs_plain"] = row["gbs"] / row["plain_gbs"]
            row["vs_stream"] = row["gbs"] / row["stream_gbs"]
            rows.append(row)
            print(f"  {case.name} {case.shape} {th}T: {row['gbs']:.1f} GB/s ({row['vs_plain']:.2f}× plain)",
                  file=sys.stderr, flush=True)
        del state, big, out
    return rows


def machine() -> dict:
    import numba
    from llvmlite import binding as ll
    info = {"cpu": "?", "flags": []}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and info["cpu"] == "?":
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not info["flags"]:
                have = set(line.split(":", 1)[1].split())
                info["flags"] = [x for x in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni") if x in have]
    info["numba_cpu_name"] = numba.config.CPU_NAME or ll.get_host_cpu_name()
    features = numba.config.CPU_FEATURES
    if features is None:
        features = ll.get_host_cpu_features().flatten()
    info["numba_isa"] = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512vnni")
                         if f"+{f}" in (features or "").split(",")] or ["(CPU name defaults)"]
    info["cores"] = os.cpu_count()
    info["load"] = os.getloadavg()[0]
    return info


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"target {result['target']}: {m['cpu']}, {m['cores']} cores, CPU flags {' '.join(m['flags'])}; "
             f"numba CPU {m['numba_cpu_name']} ISA {' '.join(m['numba_isa'])}; load average {m['load']:.1f}; "
             f"{result['date']}", "",
             "| kernel | shape | threads (clock) | GB/s | G weights/s | plain GB/s | plain Gw/s | × plain | × STREAM |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['kernel']} | {r['shape']} {r['rows']}×{r['cols']} | {r['threads']} ({r['clock']}) | {r['gbs']:.1f} | "
                     f"{r['gws']:.1f} | {r['plain_gbs']:.1f} | {r['plain_gws']:.2f} | {r['vs_plain']:.2f} | "
                     f"{r['vs_stream']:.2f} |")
    worst = min((r["vs_plain"] for r in result["rows"]), default=float("nan"))
    lines.append(f"\nworst kernel ÷ plain loop: {worst:.2f} (requirement ≥ 0.8)")
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", choices=["host", "avx2", "both"], default="host")
    p.add_argument("-o", "--output", choices=["md", "json"], default="md")
    p.add_argument("--quick", action="store_true", help="one small shape, two kernels, one thread: a smoke run")
    p.add_argument("--kernels", default=",".join(KERNELS + COLD_KERNELS))
    p.add_argument("--shapes", default=",".join(ALL_SHAPES))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--mb", type=float, default=256, help="MB of distinct weight copies streamed per timing "
                   "(here a 32 MB sum ran at 28 GB/s, from cache; 128 MB 15.5, 256 MB 13.6, 1 GB 12.8)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--wall", action="store_true", help="time one-thread rows by the wall clock too (default: "
                   "the thread's CPU time, which leaves out time slices taken by other processes)")
    return p.parse_args(argv)


def run_target(args) -> dict:
    if args.target == "avx2" and os.environ.get("NUMBA_CPU_NAME") != "haswell":
        sub = ["--target", "avx2", "-o", "json", "--kernels", args.kernels, "--shapes", args.shapes,
               "--threads", args.threads, "--mb", str(args.mb), "--reps", str(args.reps),
               *(["--wall"] if args.wall else [])]
        out = subprocess.run([sys.executable, __file__, *sub, *(["--quick"] if args.quick else [])],
                             env={**os.environ, **AVX2_ENV}, stdout=subprocess.PIPE, text=True, check=True)
        return json.loads(out.stdout)
    if args.quick:
        kernels, shapes, threads, mb, reps = ["fp16", "Q4_1", "Q4_1" + INT8_X], ["smol.o"], [1], 4, 1
    else:
        kernels, shapes = args.kernels.split(","), args.shapes.split(",")
        threads, mb, reps = [int(t) for t in args.threads.split(",")], args.mb, args.reps
    cases = [c for c in CASES if c.name in kernels and c.shape in shapes]
    return dict(target=args.target, machine=machine(), date=datetime.date.today().isoformat(),
                rows=measure(cases, threads, mb, reps, not args.wall))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    targets = ["host", "avx2"] if args.target == "both" else [args.target]
    results = []
    for target in targets:
        args.target = target
        results.append(run_target(args))
    if args.output == "json":
        print(json.dumps(results[0] if len(results) == 1 else results, indent=1))
    else:
        print("\n\n".join(markdown(r) for r in results))


if __name__ == "__main__":
    main()
