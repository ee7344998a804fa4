"""One-token (and few-token) GEMV over packed quantized matrices (offload.formats.packed), numba.

    gemv(P, x, y=None, threads=1, cols=None)   # y [R] = W·x for x [C]; or Y [b, R] for X [b, C]
    K = PackedGemv(P); K(x, y, threads, cols)  # the same, prepared once for repeated calls

The packed bytes are read once, dequantized in registers and accumulated in fp32: the result equals
dequantize(P) @ x to float32 rounding (~1e-6 relative). ``cols`` (a sorted int array of active
input columns) reads only those columns' planes: TEAL-style input sparsity, or a sparse FFN down
whose inactive neurons are zero in x; the min term uses Σ x over each group's active columns.

How (per tile of ``tile`` rows, whose partial outputs stay in L1):

    for each run of active columns of one group g:
        p[r] = Σ_c x_c·q[r, c]         four columns per pass, a plain loop over the tile's rows
        acc[r] += S[g, r]·p[r] + M[g, r]·Σ_c x_c      (or S·(p − zero·Σx) for symmetric types)

Every inner loop runs over the rows of a tile, reads bytes contiguously and unpacks them in float
arithmetic (``np.float32(byte)`` is one vectorizable uitofp; nibbles are ``floor(f/16)`` and
``f − 16·floor(f/16)``), so LLVM vectorizes it on any x86 target (AVX-512 and AVX2 checked in
tests/test_packed_gemv.py). Integer shifts and masks are avoided in the hot loops: numba widens
them to int64, which AVX2 cannot convert to float as vectors. Four columns per pass, not two:
half the loads and stores of p per weight, and at 64-row tiles 1.8× the speed (a 32-iteration
loop is too short for LLVM's vector loop with two columns' body, which then runs scalar).

4-bit and 8-bit planes are accumulated straight from their bytes; the extra bits of 5- and 6-bit
planes are first decoded into a float buffer (then added to the nibbles in the same pass), and a
batched call (X [b, C]) decodes every plane once into floats and accumulates them per token.

Measured (one thread, CPU time, SmolLM2/7B shapes, tiles 64–512, the machine shared): 4-bit
5–8 G weights/s, 8-bit 4–6, 6-bit 3–4, 5-bit 3–3.7 (the extra-bit decode is ~4 operations per
weight); benchmarks/cpu_kernels.py has the table against plain loops and a STREAM read.

threads: 1 runs on the caller's thread, no parallel region; more run one ``prange`` region over
``threads`` contiguous ranges of tiles. The thread policy is the caller's.
"""
from __future__ import annotations

import numpy as np
from numba import literally, njit, prange

from offload.cpu import own_name
from offload.cpu.widen import as_f32
from offload.formats.packed import PackedMatrix

C16, C1_16 = np.float32(16.0), np.float32(1.0 / 16)
C2, C1_2, C4, C1_4 = np.float32(2.0), np.float32(0.5), np.float32(4.0), np.float32(0.25)
HAS_SC, HAS_M = 1, 2  # flags: the matrix has per-group multipliers sc (and mc), has mins m

# ----- hot loops -----
# Each is a plain loop over the rows of a tile. They index whole arrays (planes[t, c, r]) instead
# of taking slices: a slice made in a loop costs two atomic reference-count updates (NRT calls),
# which at small tiles cost more than the arithmetic. Indices other than the loop's r are loop
# invariants, and r counts from 0, so numba's negative-index wraparound folds away. They are
# inlined into gemv_tiles by numba (LLVM left the calls in place: Q5_0 ran 10–15 % slower).


@njit(nogil=True, fastmath=True, inline="always")
def nibbles4(planes, t, c0, c1, c2, c3, x0, x1, x2, x3, p2):
    """4-bit planes of four columns: p2[0] += low nibbles·x, p2[1] += high nibbles·x (p2 [2, tile/2])."""
    for r in range(p2.shape[1]):
        fa, fb = np.float32(planes[t, c0, r]), np.float32(planes[t, c1, r])
        fc, fe = np.float32(planes[t, c2, r]), np.float32(planes[t, c3, r])
        ha, hb = np.floor(fa * C1_16), np.floor(fb * C1_16)
        hc, he = np.floor(fc * C1_16), np.floor(fe * C1_16)
        p2[0, r] += (fa - C16 * ha) * x0 + (fb - C16 * hb) * x1 + (fc - C16 * hc) * x2 + (fe - C16 * he) * x3
        p2[1, r] += ha * x0 + hb * x1 + hc * x2 + he * x3


@njit(nogil=True, fastmath=True, inline="always")
def nibbles4_high(planes, t, c0, c1, c2, c3, x0, x1, x2, x3, w2, p2):
    """nibbles4 for 5/6-bit planes: codes = nibble + w2[i] (the 16·high bits high_bits1/2 decoded)."""
    for r in range(p2.shape[1]):
        fa, fb = np.float32(planes[t, c0, r]), np.float32(planes[t, c1, r])
        fc, fe = np.float32(planes[t, c2, r]), np.float32(planes[t, c3, r])
        ha, hb = np.floor(fa * C1_16), np.floor(fb * C1_16)
        hc, he = np.floor(fc * C1_16), np.floor(fe * C1_16)
        p2[0, r] += ((fa - C16 * ha + w2[0, 0, r]) * x0 + (fb - C16 * hb + w2[1, 0, r]) * x1
                     + (fc - C16 * hc + w2[2, 0, r]) * x2 + (fe - C16 * he + w2[3, 0, r]) * x3)
        p2[1, r] += ((ha + w2[0, 1, r]) * x0 + (hb + w2[1, 1, r]) * x1
                     + (hc + w2[2, 1, r]) * x2 + (he + w2[3, 1, r]) * x3)


@njit(nogil=True, fastmath=True, inline="always")
def bytes4(planes, t, c0, c1, c2, c3, x0, x1, x2, x3, p):
    """8-bit planes of four columns: p[0] += q·x."""
    for r in range(p.shape[1]):
        p[0, r] += (np.float32(planes[t, c0, r]) * x0 + np.float32(planes[t, c1, r]) * x1
                 + np.float32(planes[t, c2, r]) * x2 + np.float32(planes[t, c3, r]) * x3)


@njit(nogil=True, fastmath=True, inline="always")
def axpy4(w, x0, x1, x2, x3, p, i):
    """p[i] += Σ_k w[k]·x_k over the decoded codes w [4, tile] of four columns."""
    for r in range(p.shape[1]):
        p[i, r] += w[0, r] * x0 + w[1, r] * x1 + w[2, r] * x2 + w[3, r] * x3


@njit(nogil=True, fastmath=True, inline="always")
def four_fields(f, inv, base, wx, i, k0, b):
    """wx[i, k0 + k, b] = 16·(field k of f), k = 0..3, for f a float holding 4 fields of
    log2(base) bits (base 2: bits of a nibble; base 4: 2-bit fields of a byte); inv = 1/base."""
    h = np.floor(f * inv)
    wx[i, k0, b] = (f - base * h) * C16
    f = np.floor(h * inv)
    wx[i, k0 + 1, b] = (h - base * f) * C16
    h = np.floor(f * inv)
    wx[i, k0 + 2, b] = (f - base * h) * C16
    wx[i, k0 + 3, b] = h * C16


@njit(nogil=True, fastmath=True, inline="always")
def high_bits1(ext, t, c, w8, i):
    """w8[i, k, b] = 16·(bit k of byte b) of a 5-bit plane's extra bytes ext[t, c, 4, :] (tile/8)."""
    for b in range(w8.shape[2]):
        f = np.float32(ext[t, c, 4, b])
        h = np.floor(f * C1_16)
        four_fields(f - C16 * h, C1_2, C2, w8, i, 0, b)
        four_fields(h, C1_2, C2, w8, i, 4, b)


@njit(nogil=True, fastmath=True, inline="always")
def high_bits2(ext, t, c, w4, i):
    """w4[i, k, b] = 16·(bits 2k..2k+1 of byte b) of a 6-bit plane's extra bytes ext[t, c, 2, :] (tile/4)."""
    for b in range(w4.shape[2]):
        four_fields(np.float32(ext[t, c, 2, b]), C1_4, C4, w4, i, 0, b)


@njit(nogil=True, fastmath=True, inline="always")
def high_bits(ext, t, c, wx, i, pb, tile):
    """high_bits1 or high_bits2 by the plane size pb (nothing for 4 and 8 bits)."""
    if pb * 8 == tile * 5:
        high_bits1(ext, t, c, wx, i)
    elif pb * 4 == tile * 3:
        high_bits2(ext, t, c, wx, i)


@njit(nogil=True, fastmath=True, inline="always")
def decode(planes, ext, t, c, w, w2, wx, i):
    """w[i] = the codes of plane (t, c), any bit width. w2, wx: views of w as [4, 2, tile/2] and
    [4, k, tile/k] (k = 8 for 5 bits, 4 for 6); ext: planes viewed as [T, C, ·, tile/k]."""
    tile, pb = w.shape[1], planes.shape[2]
    if pb == tile:
        for r in range(tile):
            w[i, r] = np.float32(planes[t, c, r])
        return
    high_bits(ext, t, c, wx, i, pb, tile)
    if pb * 2 == tile:
        for r in range(w2.shape[2]):
            f = np.float32(planes[t, c, r])
            h = np.floor(f * C1_16)
            w2[i, 0, r] = f - C16 * h
            w2[i, 1, r] = h
    else:
        for r in range(w2.shape[2]):
            f = np.float32(planes[t, c, r])
            h = np.floor(f * C1_16)
            w2[i, 0, r] += f - C16 * h
            w2[i, 1, r] += h


@njit(nogil=True, fastmath=True, inline="always")
def add_group(d, m, sc, mc, flags, t, g, gd, p, acc, i, xs, zx):
    """acc[i] += S[g]·(p[i] − zx) + M[g]·xs in tile t, with S = d·sc and M = m·mc (zx = zero·xs:
    the symmetric types' M·xs is −S·zx). One loop for every scale layout: an absent sc, mc (ones)
    or m (zeros) is a [1, 1, tile] stand-in read at [0, 0] (flags: HAS_SC | HAS_M)."""
    ts, gs = (t, g) if flags & HAS_SC else (0, 0)
    tm, gm = (t, gd) if flags & HAS_M else (0, 0)
    tc, gc = (t, g) if flags == HAS_SC | HAS_M else (0, 0)
    for r in range(acc.shape[1]):
        acc[i, r] += (as_f32(d[t, gd, r]) * np.float32(sc[ts, gs, r]) * (p[i, r] - zx)
                      + as_f32(m[tm, gm, r]) * np.float32(mc[tc, gc, r]) * xs)


@njit(nogil=True, fastmath=True, inline="always")
def group_end(gmap, cols, k):
    """End of the run of cols[k:] in the same group as cols[k]."""
    g = gmap[cols[k]]
    e = k + 1
    while e < cols.shape[0] and gmap[cols[e]] == g:
        e += 1
    return e


@njit(nogil=True, fastmath=True, inline="always")
def four_cols(cols, j, e, quad):
    """quad = cols[j..j+3], repeating the run's last column past its end e (those get x = 0)."""
    for q in range(4):
        quad[q] = cols[min(j + q, e - 1)]


@njit(nogil=True, fastmath=True, inline="always")
def four_x(x, i, quad, n):
    """x[i] at the quad's columns, the last 4 − n of them 0 (n = valid columns, 1..4)."""
    z = np.float32(0)
    return x[i, quad[0]], x[i, quad[1]] if n > 1 else z, x[i, quad[2]] if n > 2 else z, x[i, quad[3]] if n > 3 else z


@njit(nogil=True, fastmath=True, inline="always")
def zero_fill(a):
    for i in range(a.shape[0]):
        for r in range(a.shape[1]):
            a[i, r] = 0


@njit(nogil=True, fastmath=True, inline="always")
def extra_views(planes, w):
    """(planes as [T, C, ·, tile/k], w as [4, k, tile/k]) for the 5-bit (k = 8) and 6-bit (k = 4)
    extra bytes; trivial shapes for 4 and 8 bits."""
    T, C, pb = planes.shape
    tile = w.shape[1]
    k = 8 if pb * 8 == tile * 5 else 4 if pb * 4 == tile * 3 else 1
    if k == 1:
        return planes.reshape(T, C, 1, pb), w.reshape(4, 1, tile)
    return planes.reshape(T, C, pb // (tile // k), tile // k), w.reshape(4, k, tile // k)


# ----- kernels -----


@njit(nogil=True, fastmath=True, cache=True)
def gemv_tiles(mode, planes, d, m, sc, mc, flags, gmap, dmap, cols, zero, X, Y, t0, t1):
    """Y[:, rows of tiles t0..t1-1] = X·Wᵀ over the active columns ``cols``, X [b, C] float32.

    mode (compiled once per value: numba prunes the other branches): 4 or 8, one token, the planes
    accumulated straight from their bytes; 5 or 6, one token, the extra bits decoded into w first;
    0, any bit width and b tokens: every plane decoded into w once, then accumulated per token."""
    literally(mode)
    tile = d.shape[2]
    h = tile // 2
    nb = X.shape[0]
    p = np.empty((nb, tile), np.float32)
    p2 = p.reshape(nb, 2, h)[0]
    acc = np.empty((nb, tile), np.float32)
    xs = np.empty(nb, np.float32)
    w = np.empty((4, tile), np.float32)
    w2 = w.reshape(4, 2, h)
    ext, wx = extra_views(planes, w)
    quad = np.empty(4, np.int64)
    for t in range(t0, t1):
        zero_fill(acc)
        k = 0
        while k < cols.shape[0]:
            e = group_end(gmap, cols, k)
            zero_fill(p)
            xs[:] = 0
            for j in range(k, e, 4):
                four_cols(cols, j, e, quad)
                c0, c1, c2, c3 = quad[0], quad[1], quad[2], quad[3]
                if mode == 0:
                    for q in range(4):
                        decode(planes, ext, t, quad[q], w, w2, wx, q)
                    for i in range(nb):
                        x0, x1, x2, x3 = four_x(X, i, quad, e - j)
                        xs[i] += x0 + x1 + x2 + x3
                        axpy4(w, x0, x1, x2, x3, p, i)
                    continue
                x0, x1, x2, x3 = four_x(X, 0, quad, e - j)
                xs[0] += x0 + x1 + x2 + x3
                if mode == 4:
                    nibbles4(planes, t, c0, c1, c2, c3, x0, x1, x2, x3, p2)
                elif mode == 8:
                    bytes4(planes, t, c0, c1, c2, c3, x0, x1, x2, x3, p)
                else:
                    for q in range(4):
                        if mode == 5:
                            high_bits1(ext, t, quad[q], wx, q)
                        else:
                            high_bits2(ext, t, quad[q], wx, q)
                    nibbles4_high(planes, t, c0, c1, c2, c3, x0, x1, x2, x3, w2, p2)
            g = gmap[cols[k]]
            for i in range(nb):
                add_group(d, m, sc, mc, flags, t, g, dmap[g], p, acc, i, xs[i], zero * xs[i])
            k = e
        n = min(tile, Y.shape[1] - t * tile)
        for i in range(nb):
            Y[i, t * tile:t * tile + n] = acc[i, :n]


def _entry_points(mode: int):
    """(serial, parallel) kernels for one mode, callable from Python without re-dispatch: they pass
    ``mode`` to gemv_tiles as a compile-time constant. numba caches each closure by its value; each has
    a name of its own per mode (offload.cpu.own_name: else a cache shared by processes can link one
    mode's callers to another mode's kernel)."""
    @njit(nogil=True, fastmath=True, cache=True)
    @own_name(f"mode{mode}")
    def serial(planes, d, m, sc, mc, flags, gmap, dmap, cols, zero, X, Y, t0, t1):
        gemv_tiles(mode, planes, d, m, sc, mc, flags, gmap, dmap, cols, zero, X, Y, t0, t1)

    @njit(nogil=True, fastmath=True, cache=True, parallel=True)
    @own_name(f"mode{mode}")
    def parallel(planes, d, m, sc, mc, flags, gmap, dmap, cols, zero, X, Y, parts):
        """gemv_tiles over ``parts`` contiguous ranges of tiles, one prange region."""
        T = planes.shape[0]
        for i in prange(parts):
            gemv_tiles(mode, planes, d, m, sc, mc, flags, gmap, dmap, cols, zero, X, Y,
                       T * i // parts, T * (i + 1) // parts)
    return serial, parallel


# mode → (serial, parallel); compiled on first use
KERNELS = {mode: _entry_points(mode) for mode in (0, 4, 5, 6, 8)}


_stand_ins: dict = {}


def kernel_scales(P: PackedMatrix) -> tuple:
    """(d, m, sc, mc, flags) as gemv_tiles takes them: absent arrays replaced by [1, 1, tile]
    stand-ins (m zeros, sc and mc ones), shared by every matrix of that tile."""
    if P.tile not in _stand_ins:
        _stand_ins[P.tile] = (np.zeros((1, 1, P.tile), np.uint16), np.ones((1, 1, P.tile), np.int8))
    zeros, ones = _stand_ins[P.tile]
    flags = (HAS_SC if P.sc.shape[1] else 0) | (HAS_M if P.m.shape[1] else 0)
    return (P.d, P.m if flags & HAS_M else zeros, P.sc if flags & HAS_SC else ones,
            P.mc if flags == HAS_SC | HAS_M else ones, flags)


class PackedGemv:
    """A packed matrix prepared for repeated GEMVs: ``K(x, y=None, threads=1, cols=None)``.

    Holds the kernel's argument tuple, so a call costs ~1 µs of Python (``gemv`` rebuilds it,
    ~4 µs: 8 % of a SmolLM2 576×576 Q4_1 matrix)."""

    def __init__(self, P: PackedMatrix):
        self.P = P
        self.rows, self.cols, self.n_tiles = P.rows, P.cols, P.n_tiles
        self.args = (P.planes, *kernel_scales(P), P.gmap, P.dmap)
        self.all_cols = P.all_cols
        self.zero = np.float32(P.zero)
        self.one, self.batch = KERNELS[P.bits], KERNELS[0]

    def __call__(self, x: np.ndarray, y: np.ndarray | None = None, threads: int = 1,
                 cols: np.ndarray | None = None) -> np.ndarray:
        """y = W·x: x [C] float32 → y [R], or X [b, C] → Y [b, R] (b small: each plane is decoded
        once per call and applied to every token). cols: sorted active input columns (default all)."""
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[-1] != self.cols or x.ndim > 2:
            raise ValueError(f"x {x.shape} does not match the matrix's {self.cols} columns")
        if cols is None:
            cols = self.all_cols
        elif not (isinstance(cols, np.ndarray) and cols.dtype == np.int64 and cols.flags.c_contiguous):
            cols = np.ascontiguousarray(cols, dtype=np.int64)
        if y is None:
            y = np.empty(x.shape[:-1] + (self.rows,), np.float32)
        serial, parallel = self.one if x.ndim == 1 else self.batch
        X, Y = (x[None], y[None]) if x.ndim == 1 else (x, y)
        threads = min(threads, self.n_tiles)
        if threads <= 1:
            serial(*self.args, cols, self.zero, X, Y, 0, self.n_tiles)
        else:
            parallel(*self.args, cols, self.zero, X, Y, threads)
        return y


def gemv(P: PackedMatrix, x: np.ndarray, y: np.ndarray | None = None, threads: int = 1,
         cols: np.ndarray | None = None) -> np.ndarray:
    """One-shot ``PackedGemv(P)(x, y, threads, cols)``; hold a PackedGemv for repeated calls."""
    return PackedGemv(P)(x, y, threads, cols)
