"""Rows of a quantized matrix in row quads (offload.formats.quads), dequantized in one numba call: the
token-table lookup of a decode step (a quantized embedding table, tied to the output head).

    quad_rows_into(Q, ids, out=None)   # out [len(ids), C] float32 = rows ids of dequantize(Q)

Reference: offload.formats.quads.dequantize_rows (NumPy; the same numbers bit for bit, which the tests
check for every code width). offload.formats.quantized.dequantize_rows calls it for row quads. Why: that
reference takes ~20 NumPy operations a lookup, and run right after the decode blocks have streamed their
weights through the caches, one SmolLM2 Q8_0 row cost 0.45-0.6 ms of a ~10 ms token (AMD Zen 3 VM); this
call is one dispatch.

Layout (offload.formats.quads' module docstring): row r lies in block r // 16, lane r % 16; column c of the
row is position ``xmap[c]`` of the padded row, group g = position // group, and within the group quad k =
(position % group) // 4, byte j = position % 4. Scales S = d[dmap[g]]·sc[g] and M = m[dmap[g]]·mc[g]
(absent sc, mc: ones; absent m: w = S·(q − zero)), in fp32 without fused multiply-adds, as the reference.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from offload.cpu.widen import as_f32
from offload.formats.quads import BLOCK, QuadMatrix


@njit(nogil=True, cache=True)
def _code(codes, b, g, p, lane, bits, group):
    """The code of padded position p (within group g) of lane ``lane`` of block b."""
    k, j = p // 4, p % 4
    if bits == 8:
        return np.int32(codes[b, g, 64 * k + 4 * lane + j])
    byte = np.int32(codes[b, g, 64 * (k // 2) + 4 * lane + j])
    q = (byte >> 4) if k % 2 else (byte & 15)
    ext = 8 * group  # the nibble vectors' bytes
    if bits == 5:
        q |= ((np.int32(codes[b, g, ext + 4 * lane + j]) >> k) & 1) << 4
    elif bits == 6:
        q |= ((np.int32(codes[b, g, ext + 64 * (p // 16) + 4 * lane + j]) >> (2 * ((p % 16) // 4))) & 3) << 4
    return q


@njit(nogil=True, cache=True)
def quad_rows_kernel(codes, d, m, sc, mc, gmap, dmap, xmap, zero, bits, group, ids, out):
    """out[i] = row ids[i] of the matrix (arrays as offload.formats.quads.QuadMatrix's fields)."""
    for i in range(ids.shape[0]):
        r = ids[i]
        b, lane = r // BLOCK, r % BLOCK
        for c in range(out.shape[1]):
            pos = xmap[c]
            g = pos // group
            q = np.float32(_code(codes, b, g, pos % group, lane, bits, group))
            dg = dmap[gmap[c]]
            s = as_f32(d[b, dg, lane])
            if sc.shape[1]:
                s = s * np.float32(sc[b, gmap[c], lane])
            if m.shape[1]:
                mm = as_f32(m[b, dg, lane])
                if mc.shape[1]:
                    mm = mm * np.float32(mc[b, gmap[c], lane])
                out[i, c] = s * q + mm
            else:
                out[i, c] = s * (q - np.float32(zero))


def quad_rows_into(Q: QuadMatrix, ids, out: np.ndarray | None = None) -> np.ndarray:
    """out [len(ids), Q.cols] float32 (allocated when None) = rows ``ids`` (each in 0..rows-1: IndexError
    otherwise)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if out is None:
        out = np.empty((ids.size, Q.cols), np.float32)
    if ids.size and (ids.min() < 0 or ids.max() >= Q.rows):
        raise IndexError(f"rows must lie in 0..{Q.rows - 1}")
    quad_rows_kernel(Q.codes, Q.d, Q.m, Q.sc, Q.mc, Q.gmap, Q.dmap, Q.xmap, Q.zero, Q.bits, Q.group, ids, out)
    return out
