"""CPU GEMV kernels (offload.cpu.packed_gemv, offload.cpu.gemv) against NumPy references, and a
codegen check that their hot loops are vectorized for the host and for an AVX2 target."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from offload.cpu import gemv as dense
from offload.cpu.packed_gemv import PackedGemv, gemv
from offload.formats import packed as pk
from offload.formats.gguf_blocks import random_rows

# one type per kernel mode and scale layout: 4-bit affine, symmetric, with super-block scales; 5, 6, 8 bits
TYPES = [QT.Q4_1, QT.Q4_0, QT.Q4_K, QT.Q5_0, QT.Q5_K, QT.Q6_K, QT.Q8_0]


def close(y, ref, tol=2e-6):
    """|y − ref| ≤ tol·max|ref| (fp32 accumulation of ~1e3 terms against a float64 reference)."""
    return np.abs(np.asarray(y, np.float64) - ref).max() <= tol * max(np.abs(ref).max(), 1e-30)


@pytest.fixture(scope="module")
def matrices():
    """type → (packed [200, 512] matrix with 64-row tiles (a padded last tile), its fp64 dequantization)."""
    rng = np.random.default_rng(0)
    out = {}
    for qtype in TYPES:
        P = pk.pack_gguf(random_rows(qtype, 200, 512, rng), qtype, 512, tile=64)
        out[qtype] = (P, pk.dequantize(P).astype(np.float64))
    return out


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_one_token(matrices, qtype):
    P, W = matrices[qtype]
    x = np.random.default_rng(1).standard_normal(512).astype(np.float32)
    y = gemv(P, x)
    assert y.shape == (200,) and y.dtype == np.float32
    assert close(y, W @ x)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_sparse_columns(matrices, qtype):
    """cols: runs of every length 1..32 inside a group, whole groups skipped, the min term over active columns."""
    P, W = matrices[qtype]
    rng = np.random.default_rng(2)
    x = rng.standard_normal(512).astype(np.float32)
    cols = np.flatnonzero(rng.random(512) < 0.3)
    cols = np.union1d(cols, np.arange(64, 96))  # one whole group
    xa = np.zeros_like(x)
    xa[cols] = x[cols]
    assert close(gemv(P, x, cols=cols), W @ xa)
    assert np.all(gemv(P, x, cols=np.array([], np.int64)) == 0)
    one = np.array([511])
    assert close(gemv(P, x, cols=one), W[:, 511] * x[511])


@pytest.mark.parametrize("qtype", [QT.Q4_1], ids=lambda q: q.name)
def test_two_threads(matrices, qtype):
    """The parallel entry splits tiles (one compile per kernel mode: one mode is enough here)."""
    P, W = matrices[qtype]
    x = np.random.default_rng(3).standard_normal(512).astype(np.float32)
    y1 = gemv(P, x, threads=1)
    assert np.array_equal(gemv(P, x, threads=2), y1)  # same per-row arithmetic, split by tiles
    assert np.array_equal(gemv(P, x, threads=16), y1)  # more threads than tiles
    X = np.random.default_rng(4).standard_normal((3, 512)).astype(np.float32)
    assert np.array_equal(gemv(P, X, threads=2), gemv(P, X, threads=1))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_batch(matrices, qtype):
    P, W = matrices[qtype]
    rng = np.random.default_rng(5)
    X = rng.standard_normal((5, 512)).astype(np.float32)
    Y = gemv(P, X)
    assert Y.shape == (5, 200)
    assert close(Y, X.astype(np.float64) @ W.T)
    cols = np.sort(rng.choice(512, 77, replace=False))
    Xa = np.zeros_like(X)
    Xa[:, cols] = X[:, cols]
    assert close(gemv(P, X, cols=cols), Xa.astype(np.float64) @ W.T)
    assert close(gemv(P, X[:1])[0], gemv(P, X[0]), tol=1e-6)


def test_split_matrices_and_quantized(matrices):
    """take_rows / take_cols results (renumbered groups) and quantize()'s matrices through the kernel."""
    P, W = matrices[QT.Q4_K]
    rng = np.random.default_rng(6)
    x = rng.standard_normal(512).astype(np.float32)
    rows = np.sort(rng.choice(200, 70, replace=False))
    cols = np.sort(rng.choice(512, 123, replace=False))
    assert close(gemv(pk.take_rows(P, rows), x), W[rows] @ x)
    assert close(gemv(pk.take_cols(P, cols), x[cols]), W[:, cols] @ x[cols])
    for bits in (4, 8):
        Q = pk.quantize(rng.standard_normal((100, 256)).astype(np.float32), bits)
        assert close(gemv(Q, x[:256]), pk.dequantize(Q).astype(np.float64) @ x[:256])
    with pytest.raises(ValueError):
        gemv(P, x[:100])


def test_prepared_matrix_reused(matrices):
    """PackedGemv: one preparation, many calls; given y is filled; strided / float64 x accepted."""
    P, W = matrices[QT.Q6_K]
    K = PackedGemv(P)
    rng = np.random.default_rng(8)
    y = np.full(200, np.nan, np.float32)
    for _ in range(3):
        x2 = rng.standard_normal((512, 2))
        out = K(x2[:, 0], y)
        assert out is y and close(y, W @ x2[:, 0])
    assert close(K(x2[:, 1], cols=[1, 2, 3]), W[:, 1:4] @ x2[1:4, 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", [(37, 64), (9, 2048), (130, 2051)])
def test_dense_gemv(dtype, shape):
    """Row-major fp32 / fp16 GEMV, short rows (one per pass) and long ones (four per pass, remainder rows)."""
    rng = np.random.default_rng(7)
    W = rng.standard_normal(shape).astype(dtype)
    x = rng.standard_normal(shape[1]).astype(np.float32)
    ref = W.astype(np.float64) @ x
    assert close(dense.gemv(W, x), ref)
    assert close(dense.gemv(W, x, threads=2), ref)
    assert close(dense.gemv(W.view(np.uint16) if dtype == np.float16 else W, x, threads=3), ref)


# Compiled fresh (no cache: numba cannot show the assembly of cached code) in a subprocess per
# target; each hot loop's function alone, with the argument types the kernels pass it.
CODEGEN = r"""
import json, re, numpy as np
from offload.cpu import packed_gemv as k, gemv as g
tile, T, C = 256, 2, 8
u8, f32 = np.zeros((T, C, tile), np.uint8), np.float32(1)
w = np.zeros((4, tile), np.float32)
p = np.zeros((1, tile), np.float32)
i = 0
calls = {
    "nibbles4": (k.nibbles4, (u8[..., :tile // 2].copy(), i, i, i, i, i, f32, f32, f32, f32, p.reshape(1, 2, tile // 2)[0])),
    "nibbles4_high": (k.nibbles4_high, (u8[..., :tile // 2].copy(), i, i, i, i, i, f32, f32, f32, f32,
                                        w.reshape(4, 2, tile // 2), p.reshape(1, 2, tile // 2)[0])),
    "bytes4": (k.bytes4, (u8, i, i, i, i, i, f32, f32, f32, f32, p)),
    "axpy4": (k.axpy4, (w, f32, f32, f32, f32, p, i)),
    "high_bits1": (k.high_bits1, (np.zeros((T, C, 5, tile // 8), np.uint8), i, i, w.reshape(4, 8, tile // 8), i)),
    "high_bits2": (k.high_bits2, (np.zeros((T, C, 3, tile // 4), np.uint8), i, i, w.reshape(4, 4, tile // 4), i)),
    "add_group": (k.add_group, (np.zeros((T, 2, tile), np.uint16), np.zeros((T, 2, tile), np.uint16),
                                np.zeros((T, 8, tile), np.int8), np.zeros((T, 8, tile), np.int8), 3, i, i, i,
                                p, p.copy(), i, f32, f32)),
    "gemv_rows_f32": (g.gemv_rows, (np.zeros((8, 64), np.float32), np.zeros(64, np.float32), np.zeros(8, np.float32), 0, 8)),
    "gemv_rows_f16": (g.gemv_rows, (np.zeros((8, 64), np.uint16), np.zeros(64, np.float32), np.zeros(8, np.float32), 0, 8)),
}
out = {}
for name, (fn, args) in calls.items():
    fn(*args)
    sig = [s for s in fn.signatures if fn.typeof_pyval(args[0]) == s[0]][-1]
    asm = fn.inspect_asm(sig)
    vec = r"%[yz]mm\d+"
    ir = fn.inspect_llvm(sig)
    out[name] = {
        "min_trip": [int(v) for v in re.findall(r"min\.iters\.check = icmp ult i64 [^,]+, (\d+)", ir)],
        "zmm": "zmm" in asm,
        "cvt": len(re.findall(r"vcvt(dq2ps|qq2ps|ph2psx?|udq2ps)\s+[^\n]*" + vec, asm)),
        "fma": len(re.findall(r"vf(n?)m(add|sub)\d*ps\s+[^\n]*" + vec, asm)),
        "floor": len(re.findall(r"v(round|rndscale)ps\s+[^\n]*" + vec, asm)),
    }
print(json.dumps(out))
"""


def codegen(env_extra: dict, tmp_path) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), **env_extra}
    run = subprocess.run([sys.executable, "-c", CODEGEN], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("target", ["host", "avx2"])
def test_hot_loops_vectorized(target, tmp_path):
    if target == "avx2":
        env = {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""}  # the name alone keeps the host's ISA
    else:
        env = {}
    stats = codegen(env, tmp_path)
    for name, s in stats.items():
        assert s["fma"] > 0, (name, s)  # packed FMAs on ymm/zmm registers: the loop is vectorized
        if name not in ("axpy4", "gemv_rows_f32"):
            assert s["cvt"] > 0, (name, s)  # bytes / fp16 / int8 converted as vectors, not one by one
        if name.startswith("nibbles") or name.startswith("high_bits"):
            assert s["floor"] > 0, (name, s)
        if target == "avx2":
            assert not s["zmm"], (name, s)
    # the least tile of each bit width gives each decode loop a trip count LLVM runs vectorized
    for name, bits, per_tile in (("nibbles4", 4, 2), ("high_bits1", 5, 8), ("high_bits2", 6, 4)):
        assert max(stats[name]["min_trip"]) <= pk.MIN_TILE[bits] // per_tile, (name, stats[name])
