"""The GPU hot-row format (offload.formats.packed_rows): lossless from GGUF 4-bit blocks and int4, bytes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from offload.formats import packed as pk
from offload.formats import packed_rows as pr
from offload.formats.gguf_blocks import random_rows

from helpers import Q4_SOURCES as SOURCES, q4_source as source


def bitwise_equal(a, b) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def hot_ids(n: int, seed: int = 1) -> np.ndarray:
    """Unsorted ids with odd ones and a repeat: the builders take any order."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(n, size=n // 3, replace=False)
    return np.concatenate([ids, ids[:1], [n - 1]])


@pytest.mark.parametrize("layout", list(SOURCES))
def test_rows_lossless(layout):
    n, d = 96, 256
    gate, up = source(layout, n, d, 0), source(layout, n, d, 1)
    hot = hot_ids(n)
    rows = pr.rows_from_packed([gate, up], [hot, hot])
    assert rows.layout is pr.hot_layout(layout) and rows.codes.shape == (2, len(hot), d // 2)
    w = pr.dequantize_rows(rows).numpy()
    assert bitwise_equal(w[0], pk.dequantize_rows(gate, hot)) and bitwise_equal(w[1], pk.dequantize_rows(up, hot))
    assert rows.nbytes == 2 * len(hot) * rows.layout.row_bytes(d)
    # a fused gate_up stored as one matrix [2n, d] (offload.formats stacks them): rows hot and n + hot
    fused = pk.stack_rows([gate, up])
    again = pr.dequantize_rows(pr.rows_from_packed([fused, fused], [hot, n + hot])).numpy()
    assert bitwise_equal(again, w)


@pytest.mark.parametrize("layout", list(SOURCES))
def test_down_lossless(layout, monkeypatch):
    d, n = 64, 512  # down [d outputs, n neurons]: groups of 32 run across neurons
    down = source(layout, d, n, 2)
    hot = hot_ids(n, 3)
    got = pr.down_from_packed(down, hot)
    assert got.codes.shape == (len(hot), d // 2) and torch.equal(got.group, torch.from_numpy(hot // 32).int())
    ref = pk.dequantize(down)[:, hot].T
    assert bitwise_equal(pr.dequantize_down(got).numpy(), ref)
    L = got.layout
    assert got.table_nbytes == L.table_bytes(n, d)
    assert got.nbytes == len(hot) * L.down_neuron_bytes(d) + L.table_bytes(n, d)
    monkeypatch.setattr(pr, "CHUNK_WEIGHTS", 3 * n)  # three output rows per chunk: borders change nothing
    assert bitwise_equal(pr.dequantize_down(pr.down_from_packed(down, hot)).numpy(), ref)


def test_quantize_builders_are_int4():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 96)).astype(np.float32)  # as a down matrix: 64 outputs, 96 neurons
    rows = pr.quantize_rows([w, 2 * w])
    assert rows.layout.name == "q4_1"
    q = pk.quantize(w, bits=4)
    assert bitwise_equal(pr.dequantize_rows(rows)[0].numpy(), pk.dequantize(q))
    down = pr.quantize_down(w, [5, 1, 90])
    assert bitwise_equal(pr.dequantize_down(down).numpy(), pk.dequantize(q)[:, [5, 1, 90]].T)
    assert np.abs(pk.dequantize(q) - w).max() < 0.25  # round to nearest, 16 levels over each group's range


@pytest.mark.parametrize("qtype", [QT.Q5_0, QT.Q5_K, QT.Q6_K, QT.Q8_0], ids=lambda q: q.name)
def test_other_types_have_no_layout(qtype):
    P = pk.pack_gguf(random_rows(qtype, 8, 256, np.random.default_rng(5)), qtype, 256)
    assert pr.layout_of(P) is None
    with pytest.raises(ValueError, match="4-bit layout"):
        pr.rows_from_packed([P], [[0, 1]])
    with pytest.raises(ValueError, match="4-bit layout"):
        pr.down_from_packed(P, [0, 1])


def test_layout_checks():
    q40, q41 = source("q4_0", 8, 64), source("q4_1", 8, 64)
    assert pr.layout_of(pk.take_cols(q40, [1, 2, 40])) is None  # groups taken apart
    with pytest.raises(ValueError, match="share one 4-bit layout"):
        pr.rows_from_packed([q40, q41], [[0], [0]])
    with pytest.raises(ValueError, match="as many rows"):
        pr.rows_from_packed([q40, q40], [[0], [0, 1]])
    with pytest.raises(IndexError, match="neurons must lie in 0..63"):
        pr.down_from_packed(q40, [64])
    with pytest.raises(ValueError, match="even number of output rows"):
        pr.down_from_packed(source("q4_0", 7, 64), [0])
    with pytest.raises(ValueError, match="expected one of int4, q4_0"):
        pr.hot_layout("int8")
    assert pr.hot_layout("int4") is pr.LAYOUTS["q4_1"]
    assert pr.layout_from(8, 0, True) is pr.LAYOUTS["q4_k"] and pr.layout_from(2, 8, False).name == "custom"
    with pytest.raises(ValueError, match="multiple of 256"):
        pr.LAYOUTS["q4_k"].row_bytes(96)


def test_bytes_per_weight_as_documented():
    d = 4096
    per_weight = {name: L.row_bytes(d) / d for name, L in pr.LAYOUTS.items()}
    assert per_weight == {"q4_0": 0.5625, "q4_1": 0.625, "q4_k": 0.578125}
    tables = {name: L.table_bytes(11008 // 32 * 32, d) / (11008 // 32 * 32 * d) for name, L in pr.LAYOUTS.items()}
    assert tables == {"q4_0": 1 / 16, "q4_1": 1 / 8, "q4_k": 5 / 64}
    for L in pr.LAYOUTS.values():  # gate + up + down column: ≥ 3.4× fewer bytes than fp16's 6·d
        assert 6 * d / (2 * L.row_bytes(d) + L.down_neuron_bytes(d)) > 3.4


def test_select_and_to():
    rows = pr.rows_from_packed([source("q4_k", 16, 256)], [np.arange(16)])
    sub = rows.select(torch.tensor([3, 3, 0]))
    assert torch.equal(pr.dequantize_rows(sub), pr.dequantize_rows(rows)[:, [3, 3, 0]])
    down = pr.down_from_packed(source("q4_0", 8, 64), [0, 33, 63])
    moved = down.to("cpu").select(torch.tensor([2]))
    assert moved.d is down.d and torch.equal(pr.dequantize_down(moved), pr.dequantize_down(down)[[2]])
