"""The packed column-plane format (offload.formats.packed): lossless against gguf.quants, repacks,
round-to-nearest quantization."""
from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from offload.cpu.packed_gemv import gemv
from offload.formats import packed as pk
from offload.formats.gguf_blocks import BLOCK_TYPES, random_rows

QWEN = "/tmp/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
# GGUF's bytes per weight of each block type, and ours when the rows fill whole tiles
GGUF_BYTES = {QT.Q4_0: 18 / 32, QT.Q4_1: 20 / 32, QT.Q5_0: 22 / 32, QT.Q5_1: 24 / 32, QT.Q8_0: 34 / 32,
              QT.Q4_K: 144 / 256, QT.Q5_K: 176 / 256, QT.Q6_K: 210 / 256}
OUR_BYTES = {**GGUF_BYTES, QT.Q4_K: 0.5 + 2 / 32 + 4 / 256, QT.Q5_K: 0.625 + 2 / 32 + 4 / 256}


def bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def gguf_reference(raw: np.ndarray, qtype) -> np.ndarray:
    return gguf.quants.dequantize(raw, qtype).reshape(raw.shape[0], -1)


@pytest.mark.parametrize("qtype", list(BLOCK_TYPES), ids=lambda q: q.name)
def test_random_blocks_lossless(qtype):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 75, 512  # 75 rows: a padded last tile
    raw = random_rows(qtype, rows, cols, rng)
    P = pk.pack_gguf(raw, qtype, cols, tile=64)
    assert (P.rows, P.cols, P.n_tiles) == (rows, cols, 2)
    assert bitwise_equal(pk.dequantize(P), gguf_reference(raw, qtype))
    full = pk.pack_gguf(random_rows(qtype, 128, cols, rng), qtype, cols, tile=64)
    assert full.nbytes == pytest.approx(OUR_BYTES[qtype] * 128 * cols)


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_planes_roundtrip(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 2 ** bits, size=(3 * 128, 40), dtype=np.uint8)
    planes = pk.pack_planes(q, bits, 128)
    assert planes.shape == (3, 40, pk.plane_bytes(bits, 128))
    assert np.array_equal(pk.unpack_planes(planes, bits), q)


def test_chunked_packing_matches_whole():
    """pack_gguf works on chunks of rows (no fp32 copy of the tensor); chunk borders change nothing."""
    rng = np.random.default_rng(1)
    raw = random_rows(QT.Q4_K, 700, 512, rng)
    whole = pk.pack_gguf(raw, QT.Q4_K, 512, tile=64)
    old = pk.CHUNK_WEIGHTS
    pk.CHUNK_WEIGHTS = 64 * 512  # one tile per chunk
    try:
        chunked = pk.pack_gguf(raw, QT.Q4_K, 512, tile=64)
    finally:
        pk.CHUNK_WEIGHTS = old
    for name in ("planes", "d", "m", "sc", "mc"):
        assert np.array_equal(getattr(whole, name), getattr(chunked, name))


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q5_0, QT.Q4_K, QT.Q6_K, QT.Q8_0], ids=lambda q: q.name)
def test_take_rows_and_cols_lossless(qtype):
    rng = np.random.default_rng(2)
    raw = random_rows(qtype, 300, 768, rng)
    P = pk.pack_gguf(raw, qtype, 768, tile=128)
    W = pk.dequantize(P)
    rows = np.sort(rng.choice(300, 131, replace=False))
    R = pk.take_rows(P, rows)
    assert bitwise_equal(pk.dequantize(R), W[rows])
    cols = np.sort(rng.choice(768, 300, replace=False))
    Cm = pk.take_cols(P, cols)
    assert bitwise_equal(pk.dequantize(Cm), W[:, cols])
    assert Cm.d.shape[1] <= P.d.shape[1] and Cm.gmap.max() < len(Cm.dmap)
    # a split in both directions (gate/up rows of hot neurons, down columns of cold ones)
    both = pk.take_cols(pk.take_rows(P, rows[::-1]), cols[:17])
    assert bitwise_equal(pk.dequantize(both), W[rows[::-1]][:, cols[:17]])
    assert pk.take_rows(P, []).rows == 0 and pk.take_cols(P, []).cols == 0
    with pytest.raises(IndexError):
        pk.take_rows(P, [300])


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_quantize_round_to_nearest(bits):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((130, 256)).astype(np.float32) * np.linspace(0.01, 2, 256, dtype=np.float32)
    P = pk.quantize(w, bits)
    W = pk.dequantize(P)
    g = w.reshape(130, 8, 32)
    if bits == 8:
        step = np.abs(g).max(-1, keepdims=True) / 127
    else:
        step = (g.max(-1, keepdims=True) - g.min(-1, keepdims=True)) / (2 ** bits - 1)
    # half a step, plus the fp16 rounding of the scale (and of the min) over up to 2^bits steps
    bound = step * (0.5 + 2 ** bits * 2 ** -11) + np.abs(g).max(-1, keepdims=True) * 2 ** -11
    assert np.all(np.abs(W.reshape(130, 8, 32) - g) <= bound)
    f16 = pk.quantize(w.astype(np.float16), bits)  # fp16 checkpoints quantize the same way
    assert np.abs(pk.dequantize(f16) - W).max() <= 2 * step.max()


def test_smollm2_tensors_lossless(smollm2_gguf):
    reader = gguf.GGUFReader(smollm2_gguf)
    tensors = {t.name: t for t in reader.tensors}
    t = tensors["blk.0.ffn_gate.weight"]  # Q4_1 [1536, 576]
    assert t.tensor_type == QT.Q4_1
    P = pk.pack_gguf_tensor(t)
    assert (P.rows, P.cols) == (1536, 576)
    assert bitwise_equal(pk.dequantize(P), gguf_reference(np.asarray(t.data), QT.Q4_1))
    emb = tensors["token_embd.weight"]  # Q8_0 [49152, 576]: the first 700 rows
    raw = np.asarray(emb.data[:700])
    assert bitwise_equal(pk.dequantize(pk.pack_gguf(raw, emb.tensor_type, 576)), gguf_reference(raw, QT.Q8_0))


QWEN_TENSORS = {"blk.0.attn_q.weight": QT.Q5_0, "blk.0.attn_v.weight": QT.Q8_0,
                "blk.11.ffn_down.weight": QT.Q4_K, "blk.0.ffn_down.weight": QT.Q6_K}


@pytest.fixture(scope="module")
def qwen_tensors():
    """name → (raw rows, type, columns) of a few Qwen2.5-0.5B Q4_K_M tensors (one reader: parsing
    the file's metadata takes seconds)."""
    if not os.path.isfile(QWEN):
        pytest.skip(f"{QWEN} not present")
    reader = gguf.GGUFReader(QWEN)
    return {t.name: (t.data, t.tensor_type, int(t.shape[0])) for t in reader.tensors if t.name in QWEN_TENSORS}


@pytest.mark.parametrize("name", list(QWEN_TENSORS))
def test_qwen_tensors_lossless(qwen_tensors, name):
    raw, qtype, cols = qwen_tensors[name]
    assert qtype == QWEN_TENSORS[name]
    P = pk.pack_gguf(raw, qtype, cols)
    W = pk.dequantize(P)
    assert bitwise_equal(W, gguf_reference(np.asarray(raw), qtype))
    x = np.random.default_rng(0).standard_normal(cols).astype(np.float32)
    ref = W.astype(np.float64) @ x
    assert np.abs(gemv(P, x) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_unsupported_type_is_refused():
    with pytest.raises(NotImplementedError, match="Q2_K"):
        pk.pack_gguf(np.zeros((1, 84), np.uint8), QT.Q2_K, 256)
