"""Low-bit GEMV on the CPU for the quantized shadow predictor (numba + explicit LLVM vector IR).

The shadow predictor (offload/predict/shadow.py) scores neuron i of a gated FFN by
``|act(g̃_i, ũ_i)|`` with ``g̃ = Q(W_gate)·x`` and ``ũ = Q(W_up)·x`` from low-bit copies of the gate
and up rows. Dequantizing to fp32 and running BLAS reads 8× (int4) the packed bytes, so it is slower
than the dense gate+up it should save. These kernels read the packed weights once.

API (NumPy arrays or CPU torch tensors in, NumPy float32 out)::

    sh = Int4Shadow(q_gate, s_gate, q_up, s_up, kind="swiglu", threads=1)   # prepare once per layer
    scores = sh.scores(x)                      # x [d] or [b, d] -> [b, n] float32
    idx = topk_indices(scores, k)              # offload.cpu.topk: sorted union of each token's top-k
    Int8Shadow(q_gate, s_gate, q_up, s_up, ...)        # the int8 format, same interface
    shadow_from_predictor(pred)                # Int4Shadow / Int8Shadow from a ShadowPredictor
    shadow_scores_int4(x, q_gate, s_gate, q_up, s_up, kind)   # one-shot (prepares every call)
    shadow_scores_int8(...)
    Int4Matrix(packed, scales).matvec(x)       # plain int4 GEMV y = Q(W)·x, [b, n]
    int4_gemv(x, packed, scales)               # one-shot

Input formats are offload.predict.quant's (int4: packed uint8 [n, d_pad/2], fp16 scales
[n, d_pad/32], groups of 32 columns, w = scale·(nibble − 8); int8: int8 [n, d], fp16 scale per row).
kind: "swiglu" |silu(g)·u|, "relu" |relu(g)·u|, "drelu" relu(g)·relu(u). Optional gate/up biases.

How it computes (int4):

* x is quantized per token to int8 with one fp32 scale per group of 32 columns (the weights' groups),
  llama.cpp's Q8 activations. Measured on SmolLM2's real FFN inputs (30 layers × 512 validation
  tokens, top-k at density 0.5): recall of the oracle top-k 0.9368 with fp32 x, 0.9365 with int8 x
  (int16 x: 0.9368). The int4 weights' own error dwarfs it. For int8 *weights* int8 x did cost
  (0.9938 → 0.9910), so Int8Shadow quantizes x to int16 (exact to ~1e-5): 0.9938.
* The integer arithmetic and the prepared layout (lanes over rows, 144 bytes per 8-row block and
  group) are described in offload.cpu.lowbit_ir, which holds the vector code.
* Batches: tokens are processed 1–4 at a time per block (the weights of a block are unpacked once
  and stay in registers / L1 for the others); blocks outer, so the matrix streams from DRAM once
  per call whatever b is.
* Threads: ``threads=1`` (the default) runs on the caller's thread; more split the neurons into
  contiguous ranges run on offload.cpu.team's blocking helper threads (no spinning after the call;
  numba's ``parallel=True`` busy-waits ~12 ms of CPU after each call on this machine). Measured on
  this 2-core machine while other jobs kept both cores busy, 2 threads were slower than 1 for
  SmolLM2 (a ~70 µs call: the helper's wake-up and the contended core cost more than half the
  work) and no better at 7B; on an idle machine the 7B shape should gain (one core streams
  ~15 GB/s through this kernel, two could approach the DRAM bandwidth): re-measure there.
* Each call quantizes x (in every thread, ~1.5 µs at d = 576, ~6 µs at d = 4096 per token) and has
  ~6 µs of fixed Python/numba overhead.

Measured: ``python benchmarks/shadow_scores.py`` (table in its docstring).

What was tried before these kernels: offload.cpu.lowbit_ir.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from numba import njit, prange

from offload.cpu.lowbit_ir import (BLK, CACHE, GROUP, I4_BYTES, I8_BYTES, i4_gemv_k1, i4_gemv_k2, i4_gemv_k3,
                                   i4_gemv_k4, i4_shadow_k1, i4_shadow_k2, i4_shadow_k3, i4_shadow_k4, i8_shadow_k1,
                                   i8_shadow_k2, i8_shadow_k3, i8_shadow_k4)
from offload.cpu.shadow_layout import (as_numpy, block_biases, check_int4, pack_int4_blocks, pack_int8_blocks,
                                       pad_rows)
from offload.cpu.team import team
from offload.formats.arena import in_huge_pages
from offload.models.ffn_kind import FFNKind

__all__ = ["GROUP", "Int4Matrix", "Int4Shadow", "Int8Shadow", "int4_gemv", "shadow_from_predictor",
           "shadow_scores_int4", "shadow_scores_int8"]


# ---------------------------------------------------------------------------------------------
# numba drivers (one call per thread: quantize x, then a contiguous range of blocks)


@njit(nogil=True, cache=CACHE, fastmath={"nnan", "ninf", "nsz"})
def quantize_x(x, qmax, XQ, XS, XC):
    """Per token and group of 32 columns: s = max|x|/qmax, q = floor(x·(qmax/max|x|) + 0.5) (0 for
    an all-zero group); XC = 8·Σq (the int4 nibble offset). Columns past x's width are zero.
    (No 'contract'/'reassoc' fast-math: the rounding is the reference's, bit for bit.)"""
    b, d = x.shape
    G = XS.shape[1]
    buf = np.empty(GROUP, np.float32)
    for t in range(b):
        for g in range(G):
            lo = g * GROUP
            m = min(GROUP, d - lo)
            for j in range(m):
                buf[j] = x[t, lo + j]
            for j in range(m, GROUP):
                buf[j] = np.float32(0.0)
            amax = np.float32(0.0)
            for j in range(GROUP):
                amax = max(amax, abs(buf[j]))
            if amax > 0:
                inv = np.float32(qmax) / amax
                XS[t, g] = amax / np.float32(qmax)
            else:
                inv = np.float32(0.0)
                XS[t, g] = np.float32(0.0)
            c = np.int32(0)
            for j in range(GROUP):
                q = np.int32(np.floor(buf[j] * inv + np.float32(0.5)))
                XQ[t, lo + j] = q
                c += q
            XC[t, g] = 8 * c


@njit(nogil=True, cache=CACHE)
def i4_shadow_run(x, W, B, kind, lo, hi, out):
    b = x.shape[0]
    G = W.shape[1]
    XQ = np.empty((b, G * GROUP), np.int8)
    XS = np.empty((b, G), np.float32)
    XC = np.empty((b, G), np.int32)
    quantize_x(x, 127, XQ, XS, XC)
    for p in range(lo, hi):
        t0 = 0
        while t0 < b:
            r = b - t0
            if r >= 4:
                i4_shadow_k4(W, p, XQ, XS, XC, t0, B, kind, out)
                t0 += 4
            elif r == 3:
                i4_shadow_k3(W, p, XQ, XS, XC, t0, B, kind, out)
                t0 += 3
            elif r == 2:
                i4_shadow_k2(W, p, XQ, XS, XC, t0, B, kind, out)
                t0 += 2
            else:
                i4_shadow_k1(W, p, XQ, XS, XC, t0, B, kind, out)
                t0 += 1


@njit(nogil=True, cache=CACHE, parallel=True)
def i4_shadow_parallel(x, W, B, kind, parts, out):
    """i4_shadow_run over ``parts`` contiguous block ranges on numba's pool (CPU-only decode)."""
    blocks = W.shape[0]
    for c in prange(parts):
        i4_shadow_run(x, W, B, kind, blocks * c // parts, blocks * (c + 1) // parts, out)


@njit(nogil=True, cache=CACHE)
def i4_gemv_run(x, W, lo, hi, out):
    b = x.shape[0]
    G = W.shape[1]
    XQ = np.empty((b, G * GROUP), np.int8)
    XS = np.empty((b, G), np.float32)
    XC = np.empty((b, G), np.int32)
    quantize_x(x, 127, XQ, XS, XC)
    for k in range(lo, hi):
        t0 = 0
        while t0 < b:
            r = b - t0
            if r >= 4:
                i4_gemv_k4(W, k, XQ, XS, XC, t0, out)
                t0 += 4
            elif r == 3:
                i4_gemv_k3(W, k, XQ, XS, XC, t0, out)
                t0 += 3
            elif r == 2:
                i4_gemv_k2(W, k, XQ, XS, XC, t0, out)
                t0 += 2
            else:
                i4_gemv_k1(W, k, XQ, XS, XC, t0, out)
                t0 += 1


@njit(nogil=True, cache=CACHE)
def i8_shadow_run(x, W, S, B, kind, lo, hi, out):
    b = x.shape[0]
    G = W.shape[1]
    XQ = np.empty((b, G * GROUP), np.int16)
    XS = np.empty((b, G), np.float32)
    XC = np.empty((b, G), np.int32)
    quantize_x(x, 32767, XQ, XS, XC)
    for p in range(lo, hi):
        t0 = 0
        while t0 < b:
            r = b - t0
            if r >= 4:
                i8_shadow_k4(W, S, p, XQ, XS, t0, B, kind, out)
                t0 += 4
            elif r == 3:
                i8_shadow_k3(W, S, p, XQ, XS, t0, B, kind, out)
                t0 += 3
            elif r == 2:
                i8_shadow_k2(W, S, p, XQ, XS, t0, B, kind, out)
                t0 += 2
            else:
                i8_shadow_k1(W, S, p, XQ, XS, t0, B, kind, out)
                t0 += 1


# ---------------------------------------------------------------------------------------------
# argument checks (the layouts: offload.cpu.shadow_layout)


def _check_x(x, d: int) -> np.ndarray:
    xa = as_numpy(x, "x")
    if xa.ndim == 1:
        xa = xa[None, :]
    if xa.ndim != 2:
        raise ValueError(f"x must be [d] or [b, d], got shape {xa.shape}")
    if xa.shape[1] != d:
        raise ValueError(f"x must have d={d} columns (the weights' width), got shape {xa.shape}")
    if xa.shape[0] < 1:
        raise ValueError("x has no rows")
    if not np.issubdtype(xa.dtype, np.floating):
        raise TypeError(f"x must be floating point, got {xa.dtype}")
    return np.ascontiguousarray(xa, dtype=np.float32)  # must be finite (NaN/inf: undefined scores)


def _resolve_d(d: Optional[int], d_pad: int, group: int) -> int:
    if d is None:
        return d_pad
    d = int(d)
    if not d_pad - group < d <= d_pad:
        raise ValueError(f"d={d} does not match the packed width (rows padded to {d_pad} columns)")
    return d


def _check_kind(kind: str) -> int:
    kind = FFNKind.of(kind).check_kernels("the shadow predictor's CPU kernels (offload.cpu.shadow)")
    if not kind.gated:
        raise ValueError(f"kind {kind.value!r} has no gate to shadow (OPT uses the low-rank predictor)")
    return kind.code


def _threads(threads: Optional[int]) -> int:
    t = 1 if threads is None else int(threads)
    if t < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return t


def _ranges(total: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, total))
    bounds = [total * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def _run_split(fn, nunits: int, threads: int, make_args) -> None:
    """fn(*make_args(lo, hi)) over [0, nunits) split into `threads` contiguous ranges; helpers from
    offload.cpu.team (blocking, no spinning)."""
    ranges = _ranges(nunits, threads)
    if len(ranges) == 1:
        fn(*make_args(*ranges[0]))
        return
    team(len(ranges)).run(fn, [make_args(lo, hi) for lo, hi in ranges])


# ---------------------------------------------------------------------------------------------
# public classes


class Int4Shadow:
    """int4 shadow of one layer's gate and up rows, prepared once; ``scores(x)`` per token batch.

    Args: q_gate/q_up uint8 [n, d_pad/2] and s_gate/s_up fp16 [n, d_pad/32] (quantize_int4's
    output; NumPy arrays or CPU tensors), d (x's width; default d_pad), kind, optional gate/up
    biases [n], threads (1 = the caller's thread only), pool (``"team"``: helper threads that sleep
    between calls; ``"numba"``: numba's parallel pool, whose workers spin between calls, for CPU-only
    decode).

    The prepared copy (``self.W``, 0.5625 bytes per weight like the input) does not reference the
    inputs, which may be freed.
    """

    bits = 4

    def __init__(self, q_gate, s_gate, q_up, s_up, d: Optional[int] = None, kind: str = "swiglu",
                 gate_bias=None, up_bias=None, threads: Optional[int] = 1, pool: str = "team"):
        qg, sg, qu, su = (as_numpy(q_gate, "q_gate"), as_numpy(s_gate, "s_gate"), as_numpy(q_up, "q_up"), as_numpy(s_up, "s_up"))
        if pool not in ("team", "numba"):
            raise ValueError(f"pool must be 'team' or 'numba', got {pool!r}")
        self.pool = pool
        d_pad, G = check_int4("gate", qg, sg)
        if qu.shape != qg.shape or su.shape != sg.shape:
            raise ValueError(f"up must have the gate's shapes {qg.shape}, {sg.shape}; got {qu.shape}, {su.shape}")
        check_int4("up", qu, su)
        self.kind = kind
        self.code = _check_kind(kind)
        self.n = n = qg.shape[0]
        self.d_pad, self.groups = d_pad, G
        self.d = _resolve_d(d, d_pad, GROUP)
        self.threads = _threads(threads)
        n_pad = -(-n // BLK) * BLK
        nbp = n_pad // BLK
        pad = lambda a, fill: pad_rows(a, n_pad, fill)  # noqa: E731
        # rows ordered gate block 0, up block 0, gate block 1, ...; padded rows: q = 8 (zero), scale 0
        rows_q = np.stack([pad(qg, 0x88).reshape(nbp, BLK, -1), pad(qu, 0x88).reshape(nbp, BLK, -1)], 1)
        rows_s = np.stack([pad(sg, 0).reshape(nbp, BLK, -1), pad(su, 0).reshape(nbp, BLK, -1)], 1)
        W = pack_int4_blocks(rows_q.reshape(2 * n_pad, -1), rows_s.reshape(2 * n_pad, -1))
        # [pair, group, gate|up, 144]: one sequential stream per call
        self.W = in_huge_pages(W.reshape(nbp, 2, G, I4_BYTES).transpose(0, 2, 1, 3).reshape(nbp, G, 2 * I4_BYTES))
        self.B = block_biases(n, n_pad, gate_bias, up_bias)
        self.blocks = nbp

    @property
    def nbytes(self) -> int:
        """Bytes one call streams (the prepared weights and scales)."""
        return self.W.nbytes

    def scores(self, x, out: Optional[np.ndarray] = None) -> np.ndarray:
        """[b, n] float32 scores for x [d] or [b, d]."""
        xa = _check_x(x, self.d)
        out = _out(out, (xa.shape[0], self.n))
        if self.pool == "numba" and self.threads > 1:
            i4_shadow_parallel(xa, self.W, self.B, self.code, min(self.threads, self.blocks), out)
        else:
            _run_split(i4_shadow_run, self.blocks, self.threads,
                       lambda lo, hi: (xa, self.W, self.B, self.code, lo, hi, out))
        return out


class Int8Shadow:
    """int8 shadow (one fp16 scale per row; quantize_int8's output q int8 [n, d], scales [n]).

    Same interface as :class:`Int4Shadow`; x is quantized to int16 per group of 32 (exact to ~1e-5
    relative), since int8 x measurably lowered this format's recall."""

    bits = 8

    def __init__(self, q_gate, s_gate, q_up, s_up, d: Optional[int] = None, kind: str = "swiglu",
                 gate_bias=None, up_bias=None, threads: Optional[int] = 1):
        qg, sg, qu, su = (as_numpy(q_gate, "q_gate"), as_numpy(s_gate, "s_gate"), as_numpy(q_up, "q_up"), as_numpy(s_up, "s_up"))
        for name, q, s in (("gate", qg, sg), ("up", qu, su)):
            if q.dtype != np.int8 or q.ndim != 2:
                raise TypeError(f"{name}: int8 weights must be int8 [n, d], got {q.dtype} {q.shape}")
            if s.reshape(-1).shape != (q.shape[0],) or not np.issubdtype(s.dtype, np.floating):
                raise ValueError(f"{name}: scales must be float [n={q.shape[0]}], got {s.dtype} {s.shape}")
        if qu.shape != qg.shape:
            raise ValueError(f"up must have the gate's shape {qg.shape}, got {qu.shape}")
        self.kind = kind
        self.code = _check_kind(kind)
        self.n, width = qg.shape
        n = self.n
        if d is not None and int(d) != width:
            raise ValueError(f"d={d} does not match the int8 rows' width {width}")
        self.d = width
        self.groups = G = -(-width // GROUP)
        self.d_pad = G * GROUP
        self.threads = _threads(threads)
        n_pad = -(-n // BLK) * BLK
        nbp = n_pad // BLK
        rows_q = np.stack([pad_rows(qg, n_pad, 0).reshape(nbp, BLK, -1),
                           pad_rows(qu, n_pad, 0).reshape(nbp, BLK, -1)], 1)
        rows_s = np.stack([pad_rows(sg.reshape(-1).astype(np.float32), n_pad, 0).reshape(nbp, BLK),
                           pad_rows(su.reshape(-1).astype(np.float32), n_pad, 0).reshape(nbp, BLK)], 1)
        W = pack_int8_blocks(rows_q.reshape(2 * n_pad, width), G)
        self.W = in_huge_pages(W.reshape(nbp, 2, G, I8_BYTES).transpose(0, 2, 1, 3).reshape(nbp, G, 2 * I8_BYTES))
        self.S = np.ascontiguousarray(rows_s.reshape(2 * nbp, BLK))
        self.B = block_biases(n, n_pad, gate_bias, up_bias)
        self.blocks = nbp

    @property
    def nbytes(self) -> int:
        return self.W.nbytes + self.S.nbytes

    def scores(self, x, out: Optional[np.ndarray] = None) -> np.ndarray:
        xa = _check_x(x, self.d)
        out = _out(out, (xa.shape[0], self.n))
        _run_split(i8_shadow_run, self.blocks, self.threads,
                   lambda lo, hi: (xa, self.W, self.S, self.B, self.code, lo, hi, out))
        return out


class Int4Matrix:
    """Plain int4 GEMV ``y = Q(W)·x`` (y [b, n] float32) over quantize_int4's output, prepared once."""

    def __init__(self, packed, scales, d: Optional[int] = None, threads: Optional[int] = 1):
        q, s = as_numpy(packed, "packed"), as_numpy(scales, "scales")
        self.d_pad, self.groups = check_int4("W", q, s)
        self.d = _resolve_d(d, self.d_pad, GROUP)
        self.n = n = q.shape[0]
        self.threads = _threads(threads)
        n_pad = -(-n // BLK) * BLK
        self.W = pack_int4_blocks(pad_rows(q, n_pad, 0x88), pad_rows(s, n_pad, 0))
        self.blocks = n_pad // BLK

    @property
    def nbytes(self) -> int:
        return self.W.nbytes

    def matvec(self, x, out: Optional[np.ndarray] = None) -> np.ndarray:
        xa = _check_x(x, self.d)
        out = _out(out, (xa.shape[0], self.n))
        _run_split(i4_gemv_run, self.blocks, self.threads, lambda lo, hi: (xa, self.W, lo, hi, out))
        return out


def _out(out, shape) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == shape
            and out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
    return out


# ---------------------------------------------------------------------------------------------
# one-shot functions and helpers


def shadow_scores_int4(x, q_gate, s_gate, q_up, s_up, kind: str = "swiglu", d: Optional[int] = None,
                       gate_bias=None, up_bias=None, threads: Optional[int] = 1) -> np.ndarray:
    """scores [b, n] of x [b, d] (or [d]) from quantize_int4 gate/up; prepares the layout on every
    call (a pass over the weights): build an :class:`Int4Shadow` once for repeated calls."""
    xa = as_numpy(x, "x")
    if d is None:
        d = xa.shape[-1]
    return Int4Shadow(q_gate, s_gate, q_up, s_up, d, kind, gate_bias, up_bias, threads).scores(xa)


def shadow_scores_int8(x, q_gate, s_gate, q_up, s_up, kind: str = "swiglu", gate_bias=None, up_bias=None,
                       threads: Optional[int] = 1) -> np.ndarray:
    """As :func:`shadow_scores_int4` for quantize_int8's format."""
    return Int8Shadow(q_gate, s_gate, q_up, s_up, None, kind, gate_bias, up_bias, threads).scores(x)


def int4_gemv(x, packed, scales, d: Optional[int] = None, threads: Optional[int] = 1) -> np.ndarray:
    """y [b, n] = x · Q(W)ᵀ; prepares the layout on every call (use :class:`Int4Matrix` to reuse)."""
    xa = as_numpy(x, "x")
    if d is None:
        d = xa.shape[-1]
    return Int4Matrix(packed, scales, d, threads).matvec(xa)


def shadow_from_predictor(pred, threads: Optional[int] = 1, pool: str = "team"):
    """Int4Shadow or Int8Shadow from an offload.predict.shadow.ShadowPredictor (duck-typed: kind, d,
    bits, group, q_gate, s_gate, q_up, s_up, gate_bias, up_bias). ``pool`` applies to int4 only."""
    if getattr(pred, "group", GROUP) != GROUP and pred.bits == 4:
        raise ValueError(f"the int4 kernel needs groups of {GROUP}, the predictor has {pred.group}")
    cls = {4: Int4Shadow, 8: Int8Shadow}.get(int(pred.bits))
    if cls is None:
        raise ValueError(f"bits={pred.bits}: expected 4 or 8")
    args = (pred.q_gate, pred.s_gate, pred.q_up, pred.s_up, pred.d, pred.kind,
            getattr(pred, "gate_bias", None), getattr(pred, "up_bias", None), threads)
    return cls(*args, pool=pool) if cls is Int4Shadow else cls(*args)
