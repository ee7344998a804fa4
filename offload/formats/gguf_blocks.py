"""GGUF (llama.cpp) quantized blocks split into integer codes and scales, without dequantizing.

Every supported block type dequantizes as ``w = S·q + M`` per group of columns, with q an unsigned
integer code and S, M built from fp16 numbers and small integers exactly as gguf.quants does
(so :mod:`offload.formats.packed` can rebuild its fp32 results bit for bit):

    type   bits group  S                M                 GGUF bytes/weight
    Q4_0   4    32     d                −8·d  (zero 8)    18/32
    Q4_1   4    32     d                m                 20/32
    Q5_0   5    32     d                −16·d (zero 16)   22/32
    Q5_1   5    32     d                m                 24/32
    Q8_0   8    32     d                −128·d (zero 128, q = int8 + 128)   34/32
    Q4_K   4    32     d·sc (6-bit sc)  −dmin·mn (6-bit)  144/256
    Q5_K   5    32     d·sc             −dmin·mn          176/256
    Q6_K   6    16     d·sc (int8 sc)   −32·d·sc (zero 32) 210/256

d, m, dmin: fp16 per block; the K types have one d (and dmin) per 256-column super-block and an
integer multiplier per group. "zero z" marks the symmetric types: w = S·(q − z), no M stored.

:func:`split_rows` takes the raw bytes of whole rows ([n, row_bytes] uint8, as ``GGUFReader``
gives a tensor's ``data``) and returns :class:`Codes`: per row, q [n, C] uint8, d [n, Gd] float16,
m [n, Gd] float16 or None, sc / mc [n, G] int8 or None (the K types' per-group multipliers;
m holds −dmin so that M = m·mc).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import Q4_K


@dataclass(frozen=True)
class BlockType:
    bits: int
    group: int    # columns per scale
    zero: int     # symmetric zero point (w = S·(q − zero)); 0 for the affine types (M stored)
    sub: int      # groups per d (1, or the groups of a 256-column super-block)


BLOCK_TYPES = {
    QT.Q4_0: BlockType(4, 32, 8, 1), QT.Q4_1: BlockType(4, 32, 0, 1),
    QT.Q5_0: BlockType(5, 32, 16, 1), QT.Q5_1: BlockType(5, 32, 0, 1),
    QT.Q8_0: BlockType(8, 32, 128, 1),
    QT.Q4_K: BlockType(4, 32, 0, 8), QT.Q5_K: BlockType(5, 32, 0, 8), QT.Q6_K: BlockType(6, 16, 32, 16),
}


@dataclass
class Codes:
    """Integer codes and scales of n rows (see the module docstring)."""
    q: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None
    sc: np.ndarray | None = None
    mc: np.ndarray | None = None


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, k, 16·j] bytes → [n, k, 2·16·j] codes: the low nibbles, then the high ones (GGUF's order)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def bit_fields(words: np.ndarray, count: int, width: int = 1) -> np.ndarray:
    """Fields i = 0..count-1 of ``width`` bits of every element, as a new last axis (uint8)."""
    shifts = np.arange(count, dtype=words.dtype) * width
    return ((words[..., None] >> shifts) & ((1 << width) - 1)).astype(np.uint8)


def _split_blocks(qtype: QT, b: np.ndarray) -> Codes:
    """b [n, type_size] uint8 blocks → codes [n, block_size] and per-block scales."""
    n = b.shape[0]
    if qtype in (QT.Q4_0, QT.Q5_0, QT.Q8_0):
        d, rest = b[:, :2], b[:, 2:]
    elif qtype in (QT.Q4_1, QT.Q5_1):
        d, m, rest = b[:, :2], b[:, 2:4], b[:, 4:]
    if qtype in (QT.Q4_0, QT.Q4_1):
        return Codes(_nibbles(rest), _f16(d), None if qtype == QT.Q4_0 else _f16(m))
    if qtype in (QT.Q5_0, QT.Q5_1):
        high = bit_fields(np.ascontiguousarray(rest[:, :4]).view(np.uint32)[:, 0], 32)
        q = _nibbles(rest[:, 4:]) | (high << 4)
        return Codes(q, _f16(d), None if qtype == QT.Q5_0 else _f16(m))
    if qtype == QT.Q8_0:
        return Codes(rest ^ np.uint8(0x80), _f16(d))  # int8 + 128 as uint8
    if qtype in (QT.Q4_K, QT.Q5_K):
        sc, mn = Q4_K.get_scale_min(b[:, 4:16])
        qs = b[:, 16:144] if qtype == QT.Q4_K else b[:, 48:176]
        q = _nibbles(qs.reshape(n, 4, 32)).reshape(n, 256)
        if qtype == QT.Q5_K:  # bit j of qh[:, i] is the 5th bit of element 32·j + i
            q |= bit_fields(b[:, 16:48], 8).transpose(0, 2, 1).reshape(n, 256) << 4
        return Codes(q, _f16(b[:, 0:2]), -_f16(b[:, 2:4]), sc.astype(np.int8), mn.astype(np.int8))
    if qtype == QT.Q6_K:
        ql = _nibbles(b[:, :128].reshape(n, 2, 64)).reshape(n, 2, 4, 32)  # [half, 2·nibble + part, 32]
        qh = bit_fields(b[:, 128:192].reshape(n, 2, 32), 4, 2).transpose(0, 1, 3, 2)  # [half, field, 32]
        q = ql | (qh << 4)
        return Codes(q.reshape(n, 256), _f16(b[:, 208:210]), sc=b[:, 192:208].view(np.int8))
    raise NotImplementedError(f"GGUF block type {QT(qtype).name} is not supported; "
                              f"supported: {', '.join(t.name for t in BLOCK_TYPES)}")


def split_rows(qtype, raw: np.ndarray, cols: int) -> Codes:
    """Codes of whole rows: raw [n, row_bytes] uint8 of a GGUF tensor with ``cols`` columns."""
    qtype = QT(qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    n = raw.shape[0]
    if cols % block or raw.shape[1] != cols // block * size:
        raise ValueError(f"{qtype.name}: {raw.shape[1]} bytes per row do not hold {cols} columns")
    c = _split_blocks(qtype, np.ascontiguousarray(raw).reshape(n * (cols // block), size))

    def per_row(a):
        return None if a is None else a.reshape(n, -1)
    return Codes(per_row(c.q), per_row(c.d), per_row(c.m), per_row(c.sc), per_row(c.mc))


def random_rows(qtype, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw rows [rows, row_bytes] of a block type (tests, benchmarks): random code bytes,
    fp16 scales in [0.001, 0.1) so that every block dequantizes to finite numbers."""
    qtype = QT(qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(rows * (cols // block), size), dtype=np.uint8)
    n = b.shape[0]
    fields = {QT.Q4_1: (0, 2), QT.Q5_1: (0, 2), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}
    for at in fields.get(qtype, (0,)):
        b[:, at:at + 2] = rng.uniform(0.001, 0.1, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return b.reshape(rows, -1)
