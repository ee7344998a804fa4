"""Integer dot-product GEMV over quantized matrices in row quads (offload.formats.quads), numba + LLVM IR.

    K = QuadGemv(Q); K(x, y=None, threads=1, cols=None)   # y [R] = W·x̂ for x [C]; Y [b, R] for X [b, C]
    gemv(Q, x, y=None, threads=1, cols=None)              # one-shot
    reference(Q, x, cols=None)                            # float64, the same quantized x (tests)

llama.cpp's scheme: x is quantized per group of the matrix's columns (32, or 16) to int8 with one fp32
scale, x̂_c = xs_g·xq_c with xs_g = max|x_g|/127 and xq_c = floor(x_c/xs_g + 0.5); the integer sum of
each (row, group) is exact; then per group one conversion and FMA. With h = 2^(bits−1) (the symmetric
types' zero point, and the centre the affine types' codes are taken from):

    y[r] = Σ_g S[g, r]·xs_g·Σ_c (q[r, c] − h)·xq_c                              symmetric types
    y[r] = Σ_g S[g, r]·(xs_g·Σ_c (q[r, c] − h)·xq_c + h·Σ_c x_c) + M[g, r]·Σ_c x_c   affine types

with the exact fp32 Σx of the group. The affine form is S·xs·Σq·xq + M·Σx (llama.cpp's) with h·S·Σx
taken from the exact x instead of x̂: the rounding error then scales with |q − h| ≤ h rather than
q ≤ 2h − 1 (half the error, the same instructions). The vector code, per instruction set, is
offload.cpu.intdot_ir's.

Error: against W·x with W = dequantize(Q) and x in fp32, each column's x is off by at most xs_g/2, so

    |y[r] − (W·x)[r]| ≤ Σ_c |S[g, r]·(q[r, c] − h)|·xs_g/2

plus fp32 rounding of the per-group terms (~1e-7 of Σ_g |term|). Against the same formula in float64
(the same x̂) the result matches to that fp32 rounding (tests/test_intdot.py checks both). In logits:
SmolLM2's tied Q8_0 head moved by up to 0.26 (of ~25) against fp32 x: enough to flip a near tie.

cols (sorted active input columns; the others are taken as 0, as a sparse FFN down's inactive neurons
are): x is zeroed outside them and only the groups that hold an active column are read, so the
granularity is the group (32 columns; 16 for Q6_K): a group with one active column costs a whole group.

threads: 1 runs on the caller's thread, no parallel region; more run one ``prange`` region over
``threads`` contiguous ranges of 16-row blocks (x is quantized once, before it).

Measured: `python benchmarks/cpu_kernels.py` ("<type>/int8x" rows; the README has the table).
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import literally, njit, prange

from offload.cpu import own_name
from offload.cpu.intdot_ir import correction, quad_block
from offload.cpu.ir import CACHE
from offload.formats.quads import BLOCK, QuadMatrix, group_scales, row_codes

QMAX = 127  # int8 x in −127..127 (never −128: the avx2 sign trick negates x)


@njit(nogil=True, fastmath=True, cache=CACHE)
def quantize_x(X, xmap, direct, group, corr, XQ, XS, XC, XM):
    """Per token and group of the padded x (column c of X at xmap[c], or at c when ``direct``):
    XS = max|x|/127, XQ = floor(x·127/max|x| + 0.5) (0 for an all-zero group), XC = −corr·ΣXQ (the
    kernel's zero-point term, intdot_ir.correction), XM = Σx."""
    b, C = X.shape
    G = XS.shape[1]
    buf = np.zeros(G * group, np.float32)
    for t in range(b):
        if direct:
            for c in range(C):
                buf[c] = X[t, c]
        else:
            for c in range(C):
                buf[xmap[c]] = X[t, c]
        for g in range(G):
            lo = g * group
            amax = np.float32(0)
            s = np.float32(0)
            for j in range(group):
                v = buf[lo + j]
                amax = max(amax, abs(v))
                s += v
            inv = np.float32(QMAX) / amax if amax > 0 else np.float32(0)
            XS[t, g] = amax / np.float32(QMAX)
            XM[t, g] = s
            c = np.int32(0)
            for j in range(group):
                q = np.int32(np.floor(buf[lo + j] * inv + np.float32(0.5)))
                XQ[t, lo + j] = q
                c += q
            XC[t, g] = -corr * c


@njit(nogil=True, cache=CACHE)
def x_buffers(b, G, group):
    return (np.empty((b, G * group), np.int8), np.empty((b, G), np.float32), np.empty((b, G), np.int32),
            np.empty((b, G), np.float32))


@njit(nogil=True, cache=CACHE)
def run_blocks(bits, group, flags, tmax, codes, d, m, sc, mc, dmap, groups, XQ, XS, XC, XM, Y, b0, b1):
    """Y = blocks b0..b1-1 of the matrix times the quantized tokens. bits, group, flags, tmax: compile-time
    constants (numba prunes the other branches); tmax 1 compiles the one-token kernel only, else tokens
    go 4, 3, 2 or 1 at a time."""
    literally(bits)
    literally(group)
    literally(flags)
    literally(tmax)
    nb = XQ.shape[0]
    for blk in range(b0, b1):
        if tmax == 1:
            quad_block(bits, group, flags, 1, codes, d, m, sc, mc, dmap, groups, XQ, XS, XC, XM, blk, 0, Y)
            continue
        t0 = 0
        while t0 < nb:
            r = nb - t0
            if r >= 4:
                quad_block(bits, group, flags, 4, codes, d, m, sc, mc, dmap, groups, XQ, XS, XC, XM, blk, t0, Y)
                t0 += 4
            elif r == 3:
                quad_block(bits, group, flags, 3, codes, d, m, sc, mc, dmap, groups, XQ, XS, XC, XM, blk, t0, Y)
                t0 += 3
            elif r == 2:
                quad_block(bits, group, flags, 2, codes, d, m, sc, mc, dmap, groups, XQ, XS, XC, XM, blk, t0, Y)
                t0 += 2
            else:
                quad_block(bits, group, flags, 1, codes, d, m, sc, mc, dmap, groups, XQ, XS, XC, XM, blk, t0, Y)
                t0 += 1


def _entry_points(bits: int, group: int, flags: int, tmax: int):
    """(serial, parallel) kernels for one storage kind: quantize X, then every block. numba caches each
    closure by the values it captures; each has a name of its own per kind (offload.cpu.own_name)."""
    corr = correction(bits)
    kind = f"b{bits}g{group}f{flags}t{tmax}"

    @njit(nogil=True, cache=CACHE)
    @own_name(kind)
    def serial(codes, d, m, sc, mc, dmap, groups, xmap, direct, X, Y):
        XQ, XS, XC, XM = x_buffers(X.shape[0], codes.shape[1], group)
        quantize_x(X, xmap, direct, group, corr, XQ, XS, XC, XM)
        # b0 typed int64, as in the parallel kernel: a literal 0 would compile run_blocks a second time
        run_blocks(bits, group, flags, tmax, codes, d, m, sc, mc, dmap, groups, XQ, XS, XC, XM, Y, np.int64(0),
                   codes.shape[0])

    @njit(nogil=True, cache=CACHE, parallel=True)
    @own_name(kind)
    def parallel(codes, d, m, sc, mc, dmap, groups, xmap, direct, X, Y, parts):
        XQ, XS, XC, XM = x_buffers(X.shape[0], codes.shape[1], group)
        quantize_x(X, xmap, direct, group, corr, XQ, XS, XC, XM)
        NB = codes.shape[0]
        for i in prange(parts):
            run_blocks(bits, group, flags, tmax, codes, d, m, sc, mc, dmap, groups, XQ, XS, XC, XM, Y,
                       NB * i // parts, NB * (i + 1) // parts)
    return serial, parallel


_KERNELS: dict = {}


def kernels(bits: int, group: int, flags: int, tmax: int = 1):
    """(serial, parallel) for a storage kind; tmax 1: one token per call, else up to MAX_TOKENS per pass."""
    key = (bits, group, flags, 1 if tmax == 1 else 4)
    if key not in _KERNELS:
        _KERNELS[key] = _entry_points(*key)
    return _KERNELS[key]


# ----- operands: what offload.cpu.matvec reads, one named tuple class per storage kind (compile-time) -----

OPERAND_FIELDS = ("codes", "d", "m", "sc", "mc", "dmap", "groups", "xmap", "direct", "rows")
QUAD_OPERANDS: dict = {}  # (bits, group, flags) → class
QUAD_KINDS: dict = {}     # class → (bits, group, flags)
for _bits in (4, 5, 6, 8):
    for _group in (16, 32):
        for _flags in range(4):
            _name = f"Quads{_bits}g{_group}f{_flags}"
            _cls = namedtuple(_name, OPERAND_FIELDS)
            globals()[_name] = _cls  # numba's cache pickles the class by module and name
            QUAD_OPERANDS[(_bits, _group, _flags)], QUAD_KINDS[_cls] = _cls, (_bits, _group, _flags)

_stand_ins: dict = {}


def kernel_arrays(Q: QuadMatrix) -> tuple:
    """(codes, d, m, sc, mc, dmap, xmap, direct) as the kernels take them; absent m, sc, mc replaced by a
    shared [1, 1, 16] array (the kernel compiled for the matrix's flags never reads it)."""
    if not _stand_ins:
        _stand_ins["u16"], _stand_ins["i8"] = np.zeros((1, 1, BLOCK), np.uint16), np.zeros((1, 1, BLOCK), np.int8)
    m = Q.m if Q.m.shape[1] else _stand_ins["u16"]
    sc = Q.sc if Q.sc.shape[1] else _stand_ins["i8"]
    mc = Q.mc if Q.mc.shape[1] else _stand_ins["i8"]
    return Q.codes, Q.d, m, sc, mc, Q.dmap, Q.xmap, Q.direct_x


def quad_operand(Q: QuadMatrix):
    """The named tuple offload.cpu.matvec takes for Q (every group active)."""
    codes, d, m, sc, mc, dmap, xmap, direct = kernel_arrays(Q)
    return QUAD_OPERANDS[(Q.bits, Q.group, Q.flags)](codes, d, m, sc, mc, dmap, np.arange(Q.n_groups, dtype=np.int64),
                                                      xmap, direct, Q.rows)


# ----- Python entry -----


class QuadGemv:
    """A row-quad matrix prepared for repeated GEMVs: ``K(x, y=None, threads=1, cols=None)``."""

    def __init__(self, Q: QuadMatrix):
        self.Q = Q
        self.rows, self.cols, self.n_blocks = Q.rows, Q.cols, Q.n_blocks
        codes, d, m, sc, mc, dmap, self.xmap, self.direct = kernel_arrays(Q)
        self.arrays = (codes, d, m, sc, mc, dmap)
        self.all_groups = np.arange(Q.n_groups, dtype=np.int64)
        self.one, self.batch = kernels(Q.bits, Q.group, Q.flags, 1), kernels(Q.bits, Q.group, Q.flags, 4)

    def active(self, x: np.ndarray, cols) -> tuple[np.ndarray, np.ndarray]:
        """(x zeroed outside ``cols``, the groups holding an active column); all groups when cols is None."""
        if cols is None:
            return x, self.all_groups
        cols = np.asarray(cols, dtype=np.int64).reshape(-1)
        xa = np.zeros_like(x)
        xa[..., cols] = x[..., cols]
        return xa, np.unique(self.Q.gmap[cols]).astype(np.int64)

    def __call__(self, x: np.ndarray, y: np.ndarray | None = None, threads: int = 1, cols=None) -> np.ndarray:
        """y = W·x̂: x [C] → y [R], or X [b, C] → Y [b, R]. cols: sorted active input columns (default all)."""
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[-1] != self.cols or x.ndim > 2:
            raise ValueError(f"x {x.shape} does not match the matrix's {self.cols} columns")
        x, groups = self.active(x, cols)
        if y is None:
            y = np.empty(x.shape[:-1] + (self.rows,), np.float32)
        serial, parallel = self.one if x.ndim == 1 else self.batch
        X, Y = (x[None], y[None]) if x.ndim == 1 else (x, y)
        threads = min(threads, self.n_blocks)
        if threads <= 1:
            serial(*self.arrays, groups, self.xmap, self.direct, X, Y)
        else:
            parallel(*self.arrays, groups, self.xmap, self.direct, X, Y, threads)
        return y


def gemv(Q: QuadMatrix, x: np.ndarray, y: np.ndarray | None = None, threads: int = 1, cols=None) -> np.ndarray:
    """One-shot ``QuadGemv(Q)(x, y, threads, cols)``; hold a QuadGemv for repeated calls."""
    return QuadGemv(Q)(x, y, threads, cols)


def quantized_x(Q: QuadMatrix, X: np.ndarray) -> tuple:
    """(XQ int8 [b, G·group], XS, XC, XM [b, G]): X [b, C] float32 quantized as the kernel does."""
    X = np.ascontiguousarray(X, dtype=np.float32).reshape(-1, Q.cols)
    bufs = x_buffers(X.shape[0], Q.n_groups, Q.group)
    quantize_x(X, Q.xmap, Q.direct_x, Q.group, correction(Q.bits), *bufs)
    return bufs


def reference(Q: QuadMatrix, x: np.ndarray, cols=None) -> tuple[np.ndarray, np.ndarray]:
    """(y, scale) in float64 with x quantized as the kernel quantizes it: y the formula of the module
    docstring, scale Σ_g |term| per output (what its fp32 rounding is relative to). x [C] or [b, C]."""
    xa, groups = QuadGemv(Q).active(np.ascontiguousarray(x, dtype=np.float32), cols)
    XQ, XS, _, XM = quantized_x(Q, xa)
    h = 1 << (Q.bits - 1)
    S, M = group_scales(Q)
    q = row_codes(Q, np.arange(Q.rows)).q.astype(np.float64) - h
    xq = XQ[:, Q.xmap].astype(np.float64)  # [b, C]
    onehot = np.zeros((Q.cols, Q.n_groups))
    onehot[np.arange(Q.cols), Q.gmap] = 1
    p = np.stack([(q * xt) @ onehot for xt in xq])  # [b, R, G]: exact integer sums per (row, group)
    xs, xm = XS[:, None, :].astype(np.float64), XM[:, None, :].astype(np.float64)
    terms = [S[None] * xs * p] if M is None else [S[None] * (xs * p + h * xm), M[None] * xm]
    keep = np.zeros(Q.n_groups, bool)
    keep[groups] = True
    y = sum(t[..., keep].sum(-1) for t in terms)
    scale = sum(np.abs(t[..., keep]).sum(-1) for t in terms)
    return (y[0], scale[0]) if np.ndim(x) == 1 else (y, scale)
