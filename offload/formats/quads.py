"""Quantized matrices in "row quads": the layout of the integer dot-product GEMV (offload.cpu.intdot).

Same numbers as offload.formats.packed (w[r, c] = S[g, r]·q[r, c] + M[g, r], or S·(q − zero); codes of
4, 5, 6 or 8 bits; groups of 16 or 32 columns; two-level fp16 scales), laid out for ``vpdpbusd``
(u8 × s8, four products summed into each 32-bit lane) with lanes over rows: a 32-bit lane holds 4
consecutive columns (a "quad") of one row, and a 64-byte vector the same quad of 16 rows. Broadcasting
the quad's 4 int8 x values to every lane gives, in lane r, row r's partial sum: no horizontal sums,
and the 16 sums of a block come out as one vector, next to the block's scales (16 fp16 values each).

Layout (NB = ceil(R / 16) blocks of 16 rows, G groups, g = ``group`` columns per group, padded; padding
rows and columns hold code 0 and scale 0; byte 4r + j of a 64-byte vector belongs to row r of the block
and column j of a quad, so bytes 0..31 are rows 0..7 and a 256-bit ISA takes a vector in two halves):

* ``codes`` uint8 [NB, G, group_bytes]: per block and group, in this order
    - 8 bits: g/4 vectors; vector k, byte 4r + j = q[r, 4k + j]
    - 4, 5, 6 bits: g/8 nibble vectors; vector i, byte 4r + j = q[r, 8i + j] & 15 | (q[r, 8i + 4 + j] & 15) << 4
      (quad 2i in the low nibbles, quad 2i + 1 in the high: a group of 16 is two vectors of its own), then
    - 5 bits: 1 vector; byte 4r + j, bit k = bit 4 of q[r, 4k + j] (k = 0..g/4 − 1; g = 16 uses 4 bits of 8)
    - 6 bits: g/16 vectors; vector v, byte 4r + j, bits 2k..2k+1 = q[r, 16v + 4k + j] >> 4
  so a quad's codes are a load, a shift and a mask (and for 5/6 bits a shift, a mask and an or).
* ``d``, ``m`` fp16 bits (uint16) [NB, Gd or 0, 16], ``sc``, ``mc`` int8 [NB, G or 0, 16]: packed's
  scales with 16-row tiles (S = d[dmap[g]]·sc[g], M = m[dmap[g]]·mc[g]; absent sc/mc are ones, absent
  m means the symmetric M = −zero·S), read as one 16-lane vector per block and group.
* ``gmap`` int32 [C], ``dmap`` int32 [G]: as packed's; ``xmap`` int32 [C]: where column c sits in the
  padded x of G·g columns (gmap[c]·g + its rank in its group; c itself for a GGUF tensor).

Bytes per weight (R a multiple of 16), equal to packed's and so to the GGUF block's: Q4_0 0.5625,
Q4_1 0.625, Q5_0 0.6875, Q5_1 0.75, Q8_0 1.0625, Q4_K 0.578 (GGUF 0.5625), Q5_K 0.703 (0.6875),
Q6_K 0.8203; a 5-bit matrix with groups of 16 (quantize only) carries 0.125 unused.

The arrays lie in huge pages (offload.formats.arena: +10-30 % read speed for matrices under 4 MB).
:func:`to_quads` repacks a PackedMatrix losslessly, :func:`quads_from_gguf` packs a GGUF tensor directly;
:func:`row_codes` and :func:`dequantize_rows` read it back (packed's dequantization, bit for bit).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from offload.formats.arena import weight_array
from offload.formats.gguf_blocks import BLOCK_TYPES, Codes, bit_fields, split_rows
from offload.formats.packed import CHUNK_WEIGHTS, PackedMatrix, dequantize_codes, put_scales
from offload.formats.packed import row_codes as packed_row_codes

BLOCK = 16  # rows per block: the 16 32-bit lanes of a 512-bit vector
GROUPS = (16, 32)  # supported columns per group
HAS_SC, HAS_M = 1, 2  # flags: per-group multipliers sc (and mc), mins m


def group_bytes(bits: int, group: int) -> int:
    """Code bytes of one block (16 rows) and group."""
    if bits == 8:
        return BLOCK * group
    high = {4: 0, 5: 1, 6: group // 16}[bits]
    return BLOCK * group // 2 + 64 * high


@dataclass
class QuadMatrix:
    """A quantized matrix in row quads (layout in the module docstring)."""
    rows: int
    cols: int
    bits: int
    group: int
    zero: int            # symmetric types: M = −zero·S; always 2^(bits−1) (0 when m is stored)
    codes: np.ndarray    # uint8 [NB, G, group_bytes]
    d: np.ndarray        # uint16 [NB, Gd, 16]
    m: np.ndarray        # uint16 [NB, Gd or 0, 16]
    sc: np.ndarray       # int8 [NB, G or 0, 16]
    mc: np.ndarray       # int8 [NB, G or 0, 16]
    gmap: np.ndarray     # int32 [C]
    dmap: np.ndarray     # int32 [G]
    xmap: np.ndarray     # int32 [C]

    @property
    def n_blocks(self) -> int:
        return self.codes.shape[0]

    @property
    def n_groups(self) -> int:
        return self.codes.shape[1]

    @property
    def flags(self) -> int:
        return (HAS_SC if self.sc.shape[1] else 0) | (HAS_M if self.m.shape[1] else 0)

    @property
    def direct_x(self) -> bool:
        """x needs no scatter: column c is position c of the padded x, and there is no padding."""
        return self.cols == self.n_groups * self.group and bool(np.all(self.xmap == np.arange(self.cols)))

    @property
    def nbytes(self) -> int:
        """Bytes one dense GEMV reads: the codes and the scales."""
        return sum(a.nbytes for a in (self.codes, self.d, self.m, self.sc, self.mc))


def _layout(gmap: np.ndarray, group: int) -> np.ndarray:
    """xmap: gmap[c]·group + the rank of c among its group's columns (in column order)."""
    order = np.argsort(gmap, kind="stable")
    gs = gmap[order]
    start = np.searchsorted(gs, gs, side="left")
    rank = np.empty(len(gmap), np.int64)
    rank[order] = np.arange(len(gmap)) - start
    if len(gmap) and rank.max() >= group:
        raise ValueError(f"a group holds more than {group} columns")
    return (gmap.astype(np.int64) * group + rank).astype(np.int32)


def empty_quads(rows, cols, bits, group, zero, gmap, dmap, n_d, has_m, has_sc) -> QuadMatrix:
    if group not in GROUPS or bits not in (4, 5, 6, 8):
        raise ValueError(f"row quads hold 4/5/6/8-bit codes in groups of 16 or 32, not {bits} bits × {group}")
    if zero != (0 if has_m else 1 << (bits - 1)):
        raise ValueError(f"zero point {zero} for {bits}-bit codes: the kernels assume 2^(bits−1), or 0 with mins")
    NB, G = -(-rows // BLOCK), len(dmap)
    gmap = np.asarray(gmap, np.int32)
    return QuadMatrix(rows, cols, bits, group, zero,
                      codes=weight_array((NB, G, group_bytes(bits, group)), np.uint8),
                      d=weight_array((NB, n_d, BLOCK), np.uint16),
                      m=weight_array((NB, n_d if has_m else 0, BLOCK), np.uint16),
                      sc=weight_array((NB, G if has_sc else 0, BLOCK), np.int8),
                      mc=weight_array((NB, G if has_sc and has_m else 0, BLOCK), np.int8),
                      gmap=gmap, dmap=np.asarray(dmap, np.int32), xmap=_layout(gmap, group))


def pack_codes(qp: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Codes qp [nb·16, G·group] uint8 (padded columns) → [nb, G, group_bytes] (module docstring)."""
    nb, G = qp.shape[0] // BLOCK, qp.shape[1] // group
    q4 = qp.reshape(nb, BLOCK, G, group // 4, 4).transpose(0, 2, 3, 1, 4)  # [nb, G, quad, row, j]
    if bits == 8:
        return np.ascontiguousarray(q4).reshape(nb, G, -1)
    parts = [((q4[:, :, 0::2] & 15) | ((q4[:, :, 1::2] & 15) << 4)).reshape(nb, G, -1)]
    high = q4 >> 4
    if bits == 5:
        ext = np.zeros((nb, G, BLOCK, 4), np.uint8)
        for k in range(group // 4):
            ext |= high[:, :, k] << k
        parts.append(ext.reshape(nb, G, -1))
    elif bits == 6:
        h = high.reshape(nb, G, group // 16, 4, BLOCK, 4)
        parts.append((h[:, :, :, 0] | h[:, :, :, 1] << 2 | h[:, :, :, 2] << 4 | h[:, :, :, 3] << 6).reshape(nb, G, -1))
    return np.concatenate(parts, axis=2)


def unpack_codes(codes: np.ndarray, bits: int, group: int) -> np.ndarray:
    """[nb, G, group_bytes] → codes [nb·16, G·group] uint8 (inverse of pack_codes)."""
    nb, G, _ = codes.shape
    nq = group // 4
    if bits == 8:
        q4 = codes.reshape(nb, G, nq, BLOCK, 4)
    else:
        nib = codes[:, :, :BLOCK * group // 2].reshape(nb, G, nq // 2, BLOCK, 4)
        q4 = np.stack([nib & 15, nib >> 4], axis=3).reshape(nb, G, nq, BLOCK, 4)
        ext = codes[:, :, BLOCK * group // 2:]
        if bits == 5:
            q4 = q4 | (bit_fields(ext[:, :, :64].reshape(nb, G, BLOCK, 4), nq).transpose(0, 1, 4, 2, 3) << 4)
        elif bits == 6:
            h = bit_fields(ext.reshape(nb, G, group // 16, BLOCK, 4), 4, 2)  # [nb, G, v, row, j, k]
            q4 = q4 | (h.transpose(0, 1, 2, 5, 3, 4).reshape(nb, G, nq, BLOCK, 4) << 4)
    return np.ascontiguousarray(q4.transpose(0, 3, 1, 2, 4)).reshape(nb * BLOCK, G * group)


def put_rows(Q: QuadMatrix, r0: int, c: Codes) -> None:
    """Write the codes and scales of rows r0.. (r0 a multiple of 16) into Q, zero-padding the last block."""
    n = c.q.shape[0]
    b0, nb = r0 // BLOCK, -(-n // BLOCK)
    pad = nb * BLOCK - n
    qp = np.zeros((nb * BLOCK, Q.n_groups * Q.group), np.uint8)
    qp[:n, Q.xmap] = c.q
    Q.codes[b0:b0 + nb] = pack_codes(qp, Q.bits, Q.group)

    def blocks(a):  # per-row [n, K] → [nb, K, 16]
        return np.pad(a, ((0, pad), (0, 0))).reshape(nb, BLOCK, -1).transpose(0, 2, 1)
    put_scales(Q, b0, c, blocks)


def _chunk_rows(cols: int) -> int:
    return max(1, CHUNK_WEIGHTS // max(cols, 1) // BLOCK) * BLOCK


def to_quads(P: PackedMatrix) -> QuadMatrix:
    """P repacked in row quads (lossless); ValueError for groups other than 16 or 32."""
    Q = empty_quads(P.rows, P.cols, P.bits, P.group, P.zero, P.gmap, P.dmap, P.d.shape[1], P.m.shape[1] > 0,
                    P.sc.shape[1] > 0)
    step = _chunk_rows(P.cols)
    for r0 in range(0, P.rows, step):
        put_rows(Q, r0, packed_row_codes(P, np.arange(r0, min(P.rows, r0 + step))))
    return Q


def quads_from_gguf(raw: np.ndarray, qtype, cols: int) -> QuadMatrix:
    """A GGUF tensor packed in row quads: raw [R, row_bytes] uint8, ``cols`` its columns (as pack_gguf)."""
    bt = BLOCK_TYPES.get(qtype)
    if bt is None:
        split_rows(qtype, raw[:0], cols)  # raises the unsupported-type error
    G = cols // bt.group
    Q = empty_quads(raw.shape[0], cols, bt.bits, bt.group, bt.zero, np.arange(cols) // bt.group,
                    np.arange(G) // bt.sub, G // bt.sub, bt.zero == 0, bt.sub > 1)
    step = _chunk_rows(cols)
    for r0 in range(0, raw.shape[0], step):
        put_rows(Q, r0, split_rows(qtype, raw[r0:r0 + step], cols))
    return Q


def row_codes(Q: QuadMatrix, idx) -> Codes:
    """The codes and scales of rows ``idx`` (any order) as per-row arrays (packed.row_codes' form)."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if len(idx) and (idx.min() < 0 or idx.max() >= Q.rows):
        raise IndexError(f"rows must lie in 0..{Q.rows - 1}")
    blk, lane = idx // BLOCK, idx % BLOCK
    used, where = np.unique(blk, return_inverse=True)
    q = unpack_codes(Q.codes[used], Q.bits, Q.group)[where.reshape(-1) * BLOCK + lane][:, Q.xmap]

    def per_row(a):
        return a[blk, :, lane] if a.shape[1] else None
    m = per_row(Q.m)
    return Codes(q, per_row(Q.d).view(np.float16), None if m is None else m.view(np.float16),
                 per_row(Q.sc), per_row(Q.mc))


def dequantize_rows(Q: QuadMatrix, idx) -> np.ndarray:
    """fp32 [len(idx), C]: rows ``idx`` of the matrix, as packed.dequantize computes them (bit for bit)."""
    return dequantize_codes(row_codes(Q, idx), Q.gmap, Q.dmap, Q.zero)


def group_scales(Q: QuadMatrix) -> tuple[np.ndarray, np.ndarray | None]:
    """float64 S and M (None when symmetric) per row and group: [R, G] each (exact: fp16 × int8)."""
    c = row_codes(Q, np.arange(Q.rows))

    def expand(v, mult):
        a = v.astype(np.float64)[:, Q.dmap]
        return a * mult if mult is not None else a
    return expand(c.d, c.sc), (expand(c.m, c.mc) if c.m is not None else None)
