"""offload.cpu.quad_rows (the one-call token-table lookup) against offload.formats.quads.dequantize_rows,
bit for bit: every GGUF type as stored, and quantize() at every code width and group with the column
maps of take_cols / take_rows (groups renumbered, x positions scattered)."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from offload.cpu.quad_rows import quad_rows_into
from offload.formats import packed as pk
from offload.formats import quads as qd
from offload.formats.gguf_blocks import random_rows

TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]


def check_rows(Q, ids):
    out = np.empty((len(ids), Q.cols), np.float32)
    quad_rows_into(Q, np.asarray(ids), out)
    ref = qd.dequantize_rows(Q, ids)
    assert out.view(np.uint32).tolist() == ref.view(np.uint32).tolist()  # bit for bit


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_gguf_rows_bit_for_bit(qtype):
    rng = np.random.default_rng(int(qtype))
    Q = qd.quads_from_gguf(random_rows(qtype, 37, 512, rng), qtype, 512)
    check_rows(Q, [0, 36, 17, 17, 5])


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize("group", [16, 32])
def test_quantized_and_split_rows_bit_for_bit(bits, group):
    rng = np.random.default_rng(bits * group)
    P = pk.quantize(rng.standard_normal((50, 6 * group)).astype(np.float32), bits, group=group)
    cols = np.sort(rng.choice(P.cols, 2 * group + 3, replace=False))
    for M in (P, pk.take_cols(P, cols), pk.take_rows(P, [3, 49, 0])):
        Q = qd.to_quads(M)
        check_rows(Q, np.arange(M.rows)[::-1])


def test_out_of_range_rows_are_refused():
    Q = qd.quads_from_gguf(random_rows(QT.Q8_0, 20, 64, np.random.default_rng(0)), QT.Q8_0, 64)
    out = np.empty((1, 64), np.float32)
    for bad in (20, -1):
        with pytest.raises(IndexError, match="0..19"):
            quad_rows_into(Q, np.array([bad]), out)
