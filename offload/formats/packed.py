"""Packed quantized matrices in "column planes": GGUF weights used as stored, read once per GEMV.

A matrix W [R rows (outputs), C columns (inputs)] is quantized in groups of consecutive input
columns of one row: w[r, c] = S[g, r]·q[r, c] + M[g, r] (g = gmap[c], q unsigned, ``bits`` ∈
{4, 5, 6, 8}). The layout serves a one-token GEMV that streams the bytes once with plain numba
loops that LLVM vectorizes (offload.cpu.packed_gemv): y += Σ_c x_c·q[:, c] runs as long axpy
loops over rows, so the codes of one input column for many rows must be contiguous. Row-major
GGUF blocks (32 codes of one row, then their scale) only give 16–32-long inner loops: a plain
numba loop over them ran at 1.7–3.2 G weights/s (Q4_0/Q4_1/Q4_K), 1.0–1.2 (Q8_0), 0.5–1.3 (Q6_K)
on one thread, the kernels over this layout at 5.8–8.5, 4.1–5.6 and 2.8–3.7
(benchmarks/cpu_kernels.py has the table; Q5_0's plain loop is the closest: 2.1–4.7 against 3.4–4.3).

Layout (T = ceil(R / tile) tiles of ``tile`` rows; padding rows have q = S = M = 0):

* ``planes`` uint8 [T, C, plane_bytes]: for (tile, column) the codes of the tile's rows r = 0..tile-1
    - 8 bits: byte r = q[r]
    - 4 bits: byte r = q[r] | q[r + tile/2] << 4                       (tile/2 bytes)
    - 5 bits: the 4-bit nibble plane, then tile/8 bytes: bit k of byte b = bit 4 of q[b + k·tile/8]
    - 6 bits: the nibble plane, then tile/4 bytes: bits 2k..2k+1 of byte b = q[b + k·tile/4] >> 4
  so every unpacking loop reads bytes contiguously over rows with loop-invariant shifts.
* scales as fp16 bits (uint16) and int8 multipliers, all [T, ·, tile] (one value per row):
    S[g] = d[dmap[g]] · sc[g]                 (sc absent: S = d[dmap[g]])
    M[g] = m[dmap[g]] · mc[g]                 (mc absent: M = m[dmap[g]]; m absent: M = −zero·S)
  d and m are per group (Q4_0…Q8_0, ``quantize``) or per 256-column super-block with an int8
  multiplier per group (the K types: d·sc and dmin·mn are exact in fp32 and GGUF computes them the
  same way), so fp16 is lossless for every GGUF type and the scales cost what GGUF's do. The
  symmetric types (Q4_0, Q5_0, Q8_0, Q6_K, 8-bit ``quantize``) store no M. fp32 S and M per group
  would make Q4_K 0.75 B/weight (+30 %) and Q6_K 1.25 (+52 %).
* ``gmap`` int32 [C]: the group of each column; ``dmap`` int32 [G]: the d/m row of each group.
  take_cols keeps only the referenced groups and renumbers both.

Bytes per weight (planes + scales; R a multiple of the tile), against the GGUF block's own:
Q4_0 0.5625 (=), Q4_1 0.625 (=), Q5_0 0.6875 (=), Q5_1 0.75 (=), Q8_0 1.0625 (=),
Q4_K 0.578 (GGUF 0.5625: its 6-bit scales are packed), Q5_K 0.703 (0.6875), Q6_K 0.8203 (=).

:func:`dequantize` reproduces ``gguf.quants.dequantize`` bit for bit (fp32: S·q + M, or S·(q −
zero) for the symmetric types, in the order GGUF rounds).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from offload.formats.gguf_blocks import BLOCK_TYPES, Codes, bit_fields, split_rows

# tiles default_tile chooses from (multiples of 64: a 5-bit plane needs tile/8 bytes)
TILES = (64, 128, 192, 256, 320, 384, 448, 512)
# least tile per bit width: LLVM runs a decode loop vectorized only from a minimum trip count (its
# cost of the runtime alias checks): 32 bytes for the 5-bit extra bytes (tile/8 of them per
# column), 24 for the 6-bit ones (tile/4), 16 for a nibble plane (tile/2), host and AVX2 alike;
# tests/test_packed_gemv.py reads those thresholds from the compiled code
MIN_TILE = {4: 64, 5: 256, 6: 128, 8: 64}
# weights per temporary chunk when packing, unpacking or quantizing (bounds the temporaries)
CHUNK_WEIGHTS = 1 << 21


@dataclass
class PackedMatrix:
    """A quantized matrix in column planes (layout in the module docstring)."""
    rows: int
    cols: int
    bits: int
    tile: int
    group: int           # nominal columns per group (32, or 16 for Q6_K)
    zero: int            # used when m is empty: M = −zero·S
    planes: np.ndarray   # uint8 [T, C, plane_bytes(bits, tile)]
    d: np.ndarray        # uint16 (fp16 bits) [T, Gd, tile]
    m: np.ndarray        # uint16 (fp16 bits) [T, Gd or 0, tile]
    sc: np.ndarray       # int8 [T, G or 0, tile]
    mc: np.ndarray       # int8 [T, G or 0, tile]
    gmap: np.ndarray     # int32 [C]
    dmap: np.ndarray     # int32 [G]

    def __post_init__(self):
        # the kernels are compiled for C-contiguous arrays (a fancy-indexed result may not be one)
        for name, dtype in (("planes", np.uint8), ("d", np.uint16), ("m", np.uint16), ("sc", np.int8),
                            ("mc", np.int8), ("gmap", np.int32), ("dmap", np.int32)):
            setattr(self, name, np.ascontiguousarray(getattr(self, name), dtype=dtype))

    @property
    def n_tiles(self) -> int:
        return self.planes.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes one dense GEMV reads: the planes and the scales."""
        return sum(a.nbytes for a in (self.planes, self.d, self.m, self.sc, self.mc))

    @cached_property
    def all_cols(self) -> np.ndarray:
        """int64 [C] 0..C-1: the column list of a dense GEMV."""
        return np.arange(self.cols, dtype=np.int64)


def plane_bytes(bits: int, tile: int) -> int:
    return tile * bits // 8


def default_tile(rows: int, bits: int = 4) -> int:
    """The tile of least modelled cost: padded rows × (1 + 40/tile), the second factor being the
    per-(tile, column) loop overhead (fitted to one-thread Q4_1 timings at tiles 64–512: a row
    costs 1.6× as much at 64 as at 512, 1.25× at 128). 5- and 6-bit planes need tiles of at least
    MIN_TILE: their extra bytes decode in loops of tile/8 or tile/4 iterations, which run scalar
    below LLVM's threshold (Q5_0: 1.1 G weights/s with 192-row tiles, 2.9 with 256)."""
    tiles = [t for t in TILES if t >= MIN_TILE[bits]]
    return min(tiles, key=lambda t: (-(-rows // t) * t * (1 + 40 / t), -t))


def pack_planes(q: np.ndarray, bits: int, tile: int) -> np.ndarray:
    """Codes q [T·tile, C] uint8 → planes [T, C, plane_bytes] (see the module docstring)."""
    T = q.shape[0] // tile
    qt = q.reshape(T, tile, q.shape[1]).transpose(0, 2, 1)  # [T, C, tile]
    if bits == 8:
        return np.ascontiguousarray(qt)
    h = tile // 2
    nib = (qt[..., :h] & 15) | ((qt[..., h:] & 15) << 4)
    if bits == 4:
        return np.ascontiguousarray(nib)
    width = bits - 4
    k = 8 // width
    high = (qt >> 4).reshape(*qt.shape[:2], k, tile // k)
    ext = np.zeros(high.shape[:2] + high.shape[3:], np.uint8)
    for j in range(k):
        ext |= high[:, :, j] << (width * j)
    return np.concatenate([nib, ext], axis=2)


def unpack_planes(planes: np.ndarray, bits: int) -> np.ndarray:
    """planes [T, C, plane_bytes] → codes [T·tile, C] uint8 (inverse of pack_planes)."""
    T, C, pb = planes.shape
    tile = pb * 8 // bits
    if bits == 8:
        q = planes
    else:
        h = tile // 2
        nib = planes[..., :h]
        q = np.concatenate([nib & 15, nib >> 4], axis=-1)
        if bits > 4:
            width = bits - 4
            k = 8 // width
            high = bit_fields(planes[..., h:], k, width)  # [T, C, tile/k, k]
            q |= high.transpose(0, 1, 3, 2).reshape(T, C, tile) << 4
    return q.transpose(0, 2, 1).reshape(T * tile, C)


def _empty(rows, cols, bits, tile, group, zero, gmap, dmap, n_d, has_m, has_sc) -> PackedMatrix:
    if tile % 64 or tile <= 0:
        raise ValueError(f"tile must be a positive multiple of 64, got {tile}")
    T = -(-rows // tile)
    G = len(dmap)
    return PackedMatrix(
        rows, cols, bits, tile, group, zero,
        planes=np.zeros((T, cols, plane_bytes(bits, tile)), np.uint8),
        d=np.zeros((T, n_d, tile), np.uint16), m=np.zeros((T, n_d if has_m else 0, tile), np.uint16),
        sc=np.zeros((T, G if has_sc else 0, tile), np.int8), mc=np.zeros((T, G if has_sc and has_m else 0, tile), np.int8),
        gmap=gmap, dmap=dmap)


def _put(P: PackedMatrix, r0: int, c: Codes) -> None:
    """Write the codes of rows r0.. (r0 a multiple of the tile) into P, zero-padding the last tile."""
    n = c.q.shape[0]
    t0, nt = r0 // P.tile, -(-n // P.tile)
    pad = nt * P.tile - n

    def tiles(a):  # [n, K] → [nt, K, tile]
        return np.pad(a, ((0, pad), (0, 0))).reshape(nt, P.tile, -1).transpose(0, 2, 1)
    P.planes[t0:t0 + nt] = pack_planes(np.pad(c.q, ((0, pad), (0, 0))), P.bits, P.tile)
    put_scales(P, t0, c, tiles)


def put_scales(M, i0: int, c: Codes, slots) -> None:
    """Write the scales of ``c`` (d; m, sc, mc where both c and M have them) into M's [slots, K, rows]
    arrays from slot i0 (M a PackedMatrix, or offload.formats.quads' QuadMatrix); ``slots`` turns a
    per-row [n, K] array into M's [slots, K, rows]."""
    d = slots(c.d.view(np.uint16))
    M.d[i0:i0 + d.shape[0]] = d
    for name in ("m", "sc", "mc"):
        a = getattr(c, name)
        if a is not None and getattr(M, name).shape[1]:
            a = slots(a.view(np.uint16) if name == "m" else a)
            getattr(M, name)[i0:i0 + a.shape[0]] = a


def _chunk_rows(P: PackedMatrix) -> int:
    return max(1, CHUNK_WEIGHTS // max(P.cols, 1) // P.tile) * P.tile


def pack_gguf(raw: np.ndarray, qtype, cols: int, tile: int | None = None) -> PackedMatrix:
    """Pack a GGUF tensor: raw [R, row_bytes] uint8 (``ReaderTensor.data``), ``cols`` its columns
    (GGUF's ne0). Works on chunks of rows (a memmap stays mostly on disk; no fp32 copy is made)."""
    bt = BLOCK_TYPES.get(qtype)
    if bt is None:
        split_rows(qtype, raw[:0], cols)  # raises the unsupported-type error
    rows = raw.shape[0]
    G = cols // bt.group
    P = _empty(rows, cols, bt.bits, tile or default_tile(rows, bt.bits), bt.group, bt.zero,
               np.arange(cols) // bt.group, np.arange(G) // bt.sub, G // bt.sub, bt.zero == 0, bt.sub > 1)
    step = _chunk_rows(P)
    for r0 in range(0, rows, step):
        _put(P, r0, split_rows(qtype, raw[r0:r0 + step], cols))
    return P


def pack_gguf_tensor(tensor, tile: int | None = None) -> PackedMatrix:
    """pack_gguf of a ``gguf.ReaderTensor`` (2-D; its shape lists ne0 = columns first)."""
    return pack_gguf(tensor.data, tensor.tensor_type, int(tensor.shape[0]), tile)


def quantize(w: np.ndarray, bits: int = 4, group: int = 32, tile: int | None = None) -> PackedMatrix:
    """Round-to-nearest quantization of a float matrix [R, C] (C a multiple of ``group``).

    bits 4, 5, 6: affine per group (fp16 scale and min, codes 0..2^bits−1); 8: symmetric (fp16
    scale, int8 codes −127..127 stored as q + 128). The codes are computed against the fp16-rounded
    scale and min, so dequantize() is the nearest value the format holds."""
    rows, cols = w.shape
    if cols % group or bits not in (4, 5, 6, 8):
        raise ValueError(f"quantize needs bits in 4, 5, 6, 8 and columns a multiple of {group}")
    G = cols // group
    zero = 128 if bits == 8 else 0
    P = _empty(rows, cols, bits, tile or default_tile(rows, bits), group, zero,
               np.arange(cols) // group, np.arange(G), G, zero == 0, False)
    step = _chunk_rows(P)
    for r0 in range(0, rows, step):
        wg = np.asarray(w[r0:r0 + step], dtype=np.float32).reshape(-1, G, group)
        if bits == 8:
            d = (np.abs(wg).max(-1) / 127).astype(np.float16)
            m = None
            lo = np.float32(0)
        else:
            lo = wg.min(-1)
            d = ((wg.max(-1) - lo) / (2 ** bits - 1)).astype(np.float16)
            m = lo.astype(np.float16)
            lo = m.astype(np.float32)[..., None]
        d32 = d.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d32 > 0, np.rint((wg - lo) / d32), 0)
        q = np.clip(q + zero, 1 if bits == 8 else 0, 2 ** bits - 1).astype(np.uint8)
        _put(P, r0, Codes(q.reshape(-1, cols), d, m))
    return P


def _scales(P: PackedMatrix, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray | None]:
    """fp32 S and M (None when symmetric) of tiles t0..t1-1 per row and group: [n, G] each."""
    def expand(v, mult):
        a = v[t0:t1].view(np.float16).astype(np.float32)[:, P.dmap]
        if mult.shape[1]:
            a = a * mult[t0:t1].astype(np.float32)
        return a.transpose(0, 2, 1).reshape(-1, len(P.dmap))
    return expand(P.d, P.sc), (expand(P.m, P.mc) if P.m.shape[1] else None)


def dequantize(P: PackedMatrix) -> np.ndarray:
    """fp32 [R, C]: S·q + M (affine) or S·(q − zero) (symmetric), rounded as gguf.quants rounds."""
    out = np.empty((P.rows, P.cols), np.float32)
    step = _chunk_rows(P) // P.tile
    for t0 in range(0, P.n_tiles, step):
        t1 = min(P.n_tiles, t0 + step)
        q = unpack_planes(P.planes[t0:t1], P.bits).astype(np.float32)
        S, M = _scales(P, t0, t1)
        S = S[:, P.gmap]
        w = S * (q - np.float32(P.zero)) if M is None else S * q + M[:, P.gmap]
        r0 = t0 * P.tile
        out[r0:min(P.rows, t1 * P.tile)] = w[:P.rows - r0]
    return out


def row_codes(P: PackedMatrix, idx: np.ndarray) -> Codes:
    """The codes and scales of rows ``idx`` (int64, any order) as per-row arrays: q [k, C] uint8, d [k, Gd]
    (and m) float16, sc / mc [k, G] int8 or None; S and M per group as in the module docstring."""
    t, i = idx // P.tile, idx % P.tile
    q = np.empty((len(idx), P.cols), np.uint8)
    order = np.argsort(t, kind="stable")
    bounds = np.flatnonzero(np.diff(t[order])) + 1
    for sel in np.split(order, bounds):
        if len(sel):
            tt = t[sel[0]]
            q[sel] = unpack_planes(P.planes[tt:tt + 1], P.bits)[i[sel]]

    def per_row(a):
        return a[t, :, i] if a.shape[1] else None
    m = per_row(P.m)
    return Codes(q, P.d[t, :, i].view(np.float16), None if m is None else m.view(np.float16),
                 per_row(P.sc), per_row(P.mc))


def dequantize_codes(c: Codes, gmap: np.ndarray, dmap: np.ndarray, zero: int) -> np.ndarray:
    """fp32 [n, C] of per-row codes and scales (row_codes' form), rounded as gguf.quants rounds."""
    S = c.d.astype(np.float32)[:, dmap]
    if c.sc is not None:
        S = S * c.sc.astype(np.float32)
    S = S[:, gmap]
    q = c.q.astype(np.float32)
    if c.m is None:
        return S * (q - np.float32(zero))
    M = c.m.astype(np.float32)[:, dmap]
    if c.mc is not None:
        M = M * c.mc.astype(np.float32)
    return S * q + M[:, gmap]


def dequantize_rows(P: PackedMatrix, idx) -> np.ndarray:
    """fp32 [len(idx), C]: rows ``idx`` of dequantize(P), bit for bit (an embedding lookup reads one row
    of a packed table this way)."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    return dequantize_codes(row_codes(P, idx), P.gmap, P.dmap, P.zero)


def stack_rows(parts: list[PackedMatrix], tile: int | None = None) -> PackedMatrix:
    """One matrix of the rows of ``parts`` in order (lossless; fused q/k/v or gate/up stored alike).
    The parts must share the storage type (bits, groups, zero point, scale layout): ValueError if not."""
    first = parts[0]
    key = (first.cols, first.bits, first.group, first.zero, first.d.shape[1], first.m.shape[1] > 0,
           first.sc.shape[1] > 0)
    for P in parts[1:]:
        other = (P.cols, P.bits, P.group, P.zero, P.d.shape[1], P.m.shape[1] > 0, P.sc.shape[1] > 0)
        if other != key or not (np.array_equal(P.gmap, first.gmap) and np.array_equal(P.dmap, first.dmap)):
            raise ValueError("stack_rows: the parts are stored in different formats")
    rows = sum(P.rows for P in parts)
    out = _empty(rows, first.cols, first.bits, tile or default_tile(rows, first.bits), first.group, first.zero,
                 first.gmap, first.dmap, first.d.shape[1], first.m.shape[1] > 0, first.sc.shape[1] > 0)
    codes = [row_codes(P, np.arange(P.rows)) for P in parts]
    def cat(name):
        vals = [getattr(c, name) for c in codes]
        return None if vals[0] is None else np.concatenate(vals)
    joined = Codes(cat("q"), cat("d"), cat("m"), cat("sc"), cat("mc"))
    step = _chunk_rows(out)
    for r0 in range(0, rows, step):
        _put(out, r0, Codes(*(None if a is None else a[r0:r0 + step] for a in
                              (joined.q, joined.d, joined.m, joined.sc, joined.mc))))
    return out


def take_rows(P: PackedMatrix, idx, tile: int | None = None) -> PackedMatrix:
    """The matrix of output rows ``idx`` (lossless repack; e.g. a gate/up neuron subset)."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= P.rows):
        raise IndexError(f"take_rows: rows must lie in 0..{P.rows - 1}")
    out = _empty(len(idx), P.cols, P.bits, tile or default_tile(len(idx), P.bits), P.group, P.zero, P.gmap, P.dmap,
                 P.d.shape[1], P.m.shape[1] > 0, P.sc.shape[1] > 0)
    step = _chunk_rows(out)
    for k in range(0, len(idx), step):
        _put(out, k, row_codes(P, idx[k:k + step]))
    return out


def take_cols(P: PackedMatrix, idx) -> PackedMatrix:
    """The matrix of input columns ``idx`` (lossless; e.g. a down_proj neuron subset). Only the
    groups (and d/m rows) the kept columns use are kept; gmap and dmap are renumbered."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= P.cols):
        raise IndexError(f"take_cols: columns must lie in 0..{P.cols - 1}")
    used_g, gmap = np.unique(P.gmap[idx], return_inverse=True)
    used_d, dmap = np.unique(P.dmap[used_g], return_inverse=True)
    mc = P.mc[:, used_g] if P.mc.shape[1] else P.mc
    return PackedMatrix(
        P.rows, len(idx), P.bits, P.tile, P.group, P.zero, planes=P.planes[:, idx],
        d=P.d[:, used_d], m=P.m[:, used_d] if P.m.shape[1] else P.m,
        sc=P.sc[:, used_g] if P.sc.shape[1] else P.sc, mc=mc,
        gmap=gmap.reshape(-1), dmap=dmap.reshape(-1))
