"""offload.cpu.shadow: the CPU low-bit shadow kernels against torch references.

Two references per format:
* "same-x": the dequantized weights (offload.predict.quant) times x quantized exactly as the kernel
  does (int8 per group of 32 for int4 weights, int16 for int8 weights), in float64: the kernels must
  match it to float32 rounding (they compute the integer dot products exactly).
* "fp32-x": the plain formula of offload/predict/shadow.py (dequantize, F.linear on fp32 x,
  |act(g, u)|): int8 weights (x in int16) match it to ~1e-5 of the scale; int4 weights (x in int8)
  within the bound that x's rounding implies, |Δy_i| <= Σ_j |w_ij| · s_x(j) / 2.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from offload.cpu import ir, lowbit_ir
from offload.cpu import shadow as lowbit
from offload.cpu.shadow import Int4Matrix, Int4Shadow, Int8Shadow
from offload.cpu.topk import kth_key, kth_key_bisect, kth_key_radix, topk_indices
from offload.models.ffn_kind import activation
from offload.predict.quant import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

SHAPES = [(37, 72), (130, 576), (9, 40)]  # (n, d): neither a multiple of 8 rows nor of 32 columns


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(n, d, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    wg = torch.randn(n, d, generator=g) / d ** 0.5
    wu = torch.randn(n, d, generator=g) / d ** 0.5
    bg = bu = None
    if bias:
        bg, bu = 0.3 * torch.randn(n, generator=g), 0.3 * torch.randn(n, generator=g)
    return wg, wu, bg, bu


def make_x(b, d, seed=1):
    g = torch.Generator().manual_seed(seed)
    # uneven magnitudes across columns (outlier features), as real FFN inputs
    return torch.randn(b, d, generator=g) * (0.2 + 3 * torch.rand(1, d, generator=g))


def quantize_x(x: torch.Tensor, qmax: int):
    """x as the kernels see it: per token and group of 32 columns, s = max|x|/qmax,
    q = floor(x·(qmax/max|x|) + 0.5). Returns (dequantized x [b, d] float64, s [b, G])."""
    b, d = x.shape
    G = -(-d // 32)
    xp = torch.zeros(b, G * 32)
    xp[:, :d] = x
    g = xp.view(b, G, 32)
    m = g.abs().amax(-1, keepdim=True)
    inv = torch.where(m > 0, qmax / m, torch.zeros_like(m))
    q = torch.floor(g * inv + 0.5)
    s = m / qmax
    return (q.double() * s.double()).view(b, -1)[:, :d], s.view(b, G)


def score(kind, g, u):
    return activation(kind, g, u).abs()


def ref_scores(kind, x, wg, wu, bg=None, bu=None):
    g, u = x @ wg.T, x @ wu.T
    if bg is not None:
        g, u = g + bg.to(g.dtype), u + bu.to(u.dtype)
    return score(kind, g, u)


def assert_close_scaled(out, ref, rel):
    """|out - ref| <= rel · max|ref| (+ a float32 floor)."""
    ref = np.asarray(ref, np.float64)
    err = np.abs(np.asarray(out, np.float64) - ref).max()
    scale = np.abs(ref).max()
    assert err <= rel * scale + 1e-6, f"max error {err:.3g} > {rel:g} x scale {scale:.3g}"


# ------------------------------------------------------------------------------------------- int4
@pytest.mark.parametrize("kind", ["swiglu", "relu", "drelu"])
@pytest.mark.parametrize("b", [1, 3, 8])
@pytest.mark.parametrize("n,d", SHAPES)
def test_int4_shadow_matches_references(kind, b, n, d):
    wg, wu, _, _ = make(n, d, seed=n + b)
    qg, sg = quantize_int4(wg)
    qu, su = quantize_int4(wu)
    x = make_x(b, d, seed=b)
    out = Int4Shadow(qg, sg, qu, su, d=d, kind=kind).scores(x)
    assert out.shape == (b, n) and out.dtype == np.float32
    dg, du = dequantize_int4(qg, sg, d).double(), dequantize_int4(qu, su, d).double()
    xq, _ = quantize_x(x, 127)
    assert_close_scaled(out, ref_scores(kind, xq, dg, du).numpy(), 1e-5)
    # against fp32 x (shadow.py's formula): the gap is x's int8 rounding, ~0.5 % of the scale
    assert_close_scaled(out, ref_scores(kind, x, dg.float(), du.float()).numpy(), 2e-2)


@pytest.mark.parametrize("b", [1, 3, 8])
def test_int4_gemv_within_x_rounding_bound(b):
    n, d = 130, 200
    w = make(n, d, seed=3)[0]
    q, s = quantize_int4(w)
    x = make_x(b, d, seed=b)
    y = Int4Matrix(q, s, d=d).matvec(x)
    wd = dequantize_int4(q, s, d).double()
    xq, sx = quantize_x(x, 127)
    torch.testing.assert_close(torch.from_numpy(y).double(), xq @ wd.T, atol=1e-5, rtol=1e-5)
    # exact x: |x·w - xq·w| <= Σ_j |w_ij| · s_x(j) / 2
    bound = (0.5 * sx.double().repeat_interleave(32, dim=1)[:, :d]) @ wd.abs().T
    err = (torch.from_numpy(y).double() - x.double() @ wd.T).abs()
    assert torch.all(err <= bound + 1e-5)
    assert torch.equal(torch.from_numpy(lowbit.int4_gemv(x, q, s)), torch.from_numpy(y))


def test_int4_other_inputs():
    """[d] x, fp16/fp64 x, numpy inputs, biases, a batch above the kernel's 4-token passes."""
    n, d = 37, 72
    wg, wu, bg, bu = make(n, d, bias=True)
    qg, sg = quantize_int4(wg)
    qu, su = quantize_int4(wu)
    sh = Int4Shadow(qg.numpy(), sg.numpy(), qu.numpy(), su.numpy(), d=d, gate_bias=bg, up_bias=bu)
    x = make_x(11, d)
    out = sh.scores(x)
    xq, _ = quantize_x(x, 127)
    dg, du = dequantize_int4(qg, sg, d).double(), dequantize_int4(qu, su, d).double()
    assert_close_scaled(out, ref_scores("swiglu", xq, dg, du, bg, bu).numpy(), 1e-5)
    np.testing.assert_array_equal(sh.scores(x[4]), out[4:5])
    np.testing.assert_array_equal(sh.scores(x.double().numpy()), out)
    assert sh.scores(x.half()).shape == (11, n)


def test_int4_extreme_activations():
    """|g| up to ~100: the kernel's exp is clamped, silu stays finite and matches."""
    n, d = 37, 72
    wg, wu, _, _ = make(n, d)
    qg, sg = quantize_int4(wg * 40)
    qu, su = quantize_int4(wu)
    x = make_x(3, d)
    out = Int4Shadow(qg, sg, qu, su, d=d).scores(x)
    assert np.all(np.isfinite(out))
    xq, _ = quantize_x(x, 127)
    ref = ref_scores("swiglu", xq, dequantize_int4(qg, sg, d).double(), dequantize_int4(qu, su, d).double())
    assert ref.abs().max() > 50
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_zero_and_padded_inputs():
    n, d = 9, 40
    wg, wu, _, _ = make(n, d)
    qg, sg = quantize_int4(wg)
    qu, su = quantize_int4(wu)
    sh = Int4Shadow(qg, sg, qu, su, d=d)
    assert np.all(sh.scores(torch.zeros(2, d)) == 0)
    # no write past [b, n]: the output is a contiguous view of a larger buffer with sentinels
    buf = np.full(3 * n + 16, -7.0, np.float32)
    out = buf[: 3 * n].reshape(3, n)
    sh.scores(make_x(3, d), out=out)
    assert np.all(buf[3 * n:] == -7.0) and np.all(out >= 0)


# ------------------------------------------------------------------------------------------- int8
@pytest.mark.parametrize("kind", ["swiglu", "relu", "drelu"])
@pytest.mark.parametrize("b", [1, 3, 8])
@pytest.mark.parametrize("n,d", SHAPES)
def test_int8_shadow_matches_references(kind, b, n, d):
    wg, wu, bg, bu = make(n, d, seed=n + b, bias=b == 3)
    qg, sg = quantize_int8(wg)
    qu, su = quantize_int8(wu)
    x = make_x(b, d, seed=b)
    out = Int8Shadow(qg, sg, qu, su, kind=kind, gate_bias=bg, up_bias=bu).scores(x)
    assert out.shape == (b, n) and out.dtype == np.float32
    dg, du = dequantize_int8(qg, sg).double(), dequantize_int8(qu, su).double()
    xq, _ = quantize_x(x, 32767)
    assert_close_scaled(out, ref_scores(kind, xq, dg, du, bg, bu).numpy(), 1e-5)
    assert_close_scaled(out, ref_scores(kind, x.double(), dg, du, bg, bu).numpy(), 1e-4)


def test_matches_shadow_predictor():
    """shadow_from_predictor(ShadowPredictor) scores like ShadowPredictor.scores (shadow.py)."""
    shadow = pytest.importorskip("offload.predict.shadow")
    n, d = 130, 576
    wg, wu, _, _ = make(n, d)
    x = make_x(3, d)
    for bits, rel in ((4, 2e-2), (8, 1e-4)):
        quant = quantize_int4 if bits == 4 else quantize_int8
        (qg, sg), (qu, su) = quant(wg), quant(wu)
        pred = shadow.ShadowPredictor("swiglu", n, d, bits, 32, qg, sg, qu, su)
        sh = lowbit.shadow_from_predictor(pred)
        assert isinstance(sh, Int4Shadow if bits == 4 else Int8Shadow)
        assert_close_scaled(sh.scores(x), pred.scores(x).numpy(), rel)
        one_shot = (lowbit.shadow_scores_int4 if bits == 4 else lowbit.shadow_scores_int8)(x, qg, sg, qu, su)
        np.testing.assert_array_equal(one_shot, sh.scores(x))


# ------------------------------------------------------------------------------------- threads, top-k
@pytest.mark.parametrize("cls", [Int4Shadow, Int8Shadow])
def test_threads_give_identical_results(cls):
    n, d = 130, 576
    wg, wu, _, _ = make(n, d)
    quant = quantize_int4 if cls is Int4Shadow else quantize_int8
    (qg, sg), (qu, su) = quant(wg), quant(wu)
    x = make_x(5, d)
    one = cls(qg, sg, qu, su, threads=1).scores(x)
    for t in (2, 3, 40):  # more threads than blocks: capped
        np.testing.assert_array_equal(cls(qg, sg, qu, su, threads=t).scores(x), one)
    if cls is Int4Shadow:  # numba's pool (CPU-only decode) splits the same blocks
        np.testing.assert_array_equal(cls(qg, sg, qu, su, threads=2, pool="numba").scores(x), one)
        with pytest.raises(ValueError, match="pool"):
            cls(qg, sg, qu, su, pool="omp")


def test_topk_indices():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(3, 50, generator=g)
    for k in (1, 7, 49):
        want = torch.unique(torch.topk(s, k, dim=1).indices).numpy()
        got = topk_indices(s.numpy(), k)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(topk_indices(s[1].numpy(), k), np.sort(torch.topk(s[1], k).indices.numpy()))
    assert topk_indices(s, 0).size == 0
    np.testing.assert_array_equal(topk_indices(s, 50), np.arange(50))
    np.testing.assert_array_equal(topk_indices(s, 80), np.arange(50))


def test_topk_indices_ties_signed_zeros_and_infinities():
    """Against a sort: each row's k largest (ties at the k-th value: lowest indices first, -0.0 below +0.0,
    ±inf), the sorted union over the rows; one row and several, many random sizes."""
    rng = np.random.default_rng(1)
    values = np.float32([-np.inf, -2.5, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0, np.inf])
    for case in range(300):
        b, n = int(rng.integers(1, 4)), int(rng.integers(2, 300))
        k = int(rng.integers(1, n))
        s = values[rng.integers(0, len(values), (b, n))] if case % 2 else rng.standard_normal((b, n)).astype(np.float32)
        want = set()
        for row in s:
            want.update(sorted(range(n), key=lambda i: (-row[i], bool(np.signbit(row[i])), i))[:k])
        np.testing.assert_array_equal(topk_indices(s, k), np.array(sorted(want), np.int64))


def test_kth_key_bisection_against_the_radix_select():
    """kth_key_bisect (from the row's mean) gives the radix select's (k-th key, ties taken) wherever it
    finds the k-th: positive scores of any scale, with ties at the k-th (rounded rows), a constant row,
    rows of ±0.0, many sizes and k; and reports not found (kth_key then uses the radix select) where the
    k-th is far from the mean, as for ReLU rows of zeros or an inf/NaN mean."""
    rng = np.random.default_rng(3)
    hist = np.empty((4, 2048), np.int32)
    found_rows = 0
    for case in range(600):
        n = int(rng.integers(2, 3000)) if case % 4 else 1536
        k = int(rng.integers(1, n))
        s = (np.abs(rng.standard_normal(n)) * np.exp(0.5 * rng.standard_normal(n))).astype(np.float32)
        s *= np.float32(np.exp(4 * rng.standard_normal()))
        if case % 5 == 1:
            s = np.round(s * 4 / s.mean()).astype(np.float32)  # ties, also at the k-th
        if case % 17 == 2:
            s = np.full(n, 0.75, np.float32)  # one value: the range narrows to a single key
        if case % 19 == 3:
            s = np.where(rng.random(n) < 0.5, np.float32(0.0), np.float32(-0.0))
        keys, cand = np.empty(n, np.uint32), np.empty(n, np.uint32)
        want = kth_key_radix(s, k, keys, cand, hist)
        found, prefix, need = kth_key_bisect(s, k, keys, cand)
        if case % 5 != 1 and case % 19 != 3:  # positive rows: the k-th is within 16x of the mean
            assert found or np.sort(s)[n - k] < s.mean() / 16 or n < 20, (case, n, k)
        if found:
            found_rows += 1
            assert (prefix, need) == want, (case, n, k)
        assert kth_key(s, k, keys, cand, hist) == want
    assert found_rows > 450
    zeros = np.zeros(1536, np.float32)
    zeros[:100] = 1.0  # ReLU-like: the k-th (0.0) is far below the mean
    for row, k in ((zeros, 200), (np.float32([np.inf, 1.0, 2.0, 3.0]), 2), (np.float32([np.nan, 1.0, 2.0, 3.0]), 2)):
        keys, cand = np.empty(len(row), np.uint32), np.empty(len(row), np.uint32)
        assert not kth_key_bisect(row, k, keys, cand)[0]
        assert kth_key(row, k, keys, cand, hist) == kth_key_radix(row, k, keys, cand, hist)


# ------------------------------------------------------------------------------------------- errors
def test_rejects_bad_inputs():
    n, d = 37, 72
    wg, wu, bg, _ = make(n, d, bias=True)
    qg, sg = quantize_int4(wg)
    qu, su = quantize_int4(wu)
    with pytest.raises(ValueError, match="no gate to shadow"):
        Int4Shadow(qg, sg, qu, su, kind="relu_fc")
    with pytest.raises(ValueError, match="FFN kind 'gelu'"):
        Int4Shadow(qg, sg, qu, su, kind="gelu")
    q16, s16 = quantize_int4(wg, group=16)
    with pytest.raises(ValueError, match="groups of 32 columns"):
        Int4Shadow(q16, s16, q16, s16)
    with pytest.raises(ValueError, match="up must have the gate's shapes"):
        Int4Shadow(qg, sg, qu[:-1], su[:-1])
    with pytest.raises(TypeError, match="packed int4 must be uint8"):
        Int4Shadow(qg.int(), sg, qu, su)
    with pytest.raises(ValueError, match="d=50 does not match"):
        Int4Shadow(qg, sg, qu, su, d=50)
    with pytest.raises(ValueError, match="gate_bias and up_bias or neither"):
        Int4Shadow(qg, sg, qu, su, gate_bias=bg)
    with pytest.raises(ValueError, match=r"gate_bias must have shape \[n=37\]"):
        Int4Shadow(qg, sg, qu, su, gate_bias=bg[:-1], up_bias=bg[:-1])
    with pytest.raises(ValueError, match="threads must be >= 1"):
        Int4Shadow(qg, sg, qu, su, threads=0)
    sh = Int4Shadow(qg, sg, qu, su, d=d)
    with pytest.raises(ValueError, match="x must have d=72 columns"):
        sh.scores(torch.randn(2, 96))
    with pytest.raises(ValueError, match=r"x must be \[d\] or \[b, d\]"):
        sh.scores(torch.randn(2, 2, d))
    with pytest.raises(TypeError, match="x must be floating point"):
        sh.scores(torch.ones(2, d, dtype=torch.int32))
    with pytest.raises(ValueError, match="out must be a C-contiguous float32 array"):
        sh.scores(torch.randn(2, d), out=np.empty((2, n), np.float64))
    q8, s8 = quantize_int8(wg)
    with pytest.raises(TypeError, match="int8 weights must be int8"):
        Int8Shadow(qg, s8, qg, s8)
    with pytest.raises(ValueError, match="scales must be float"):
        Int8Shadow(q8, s8[:-1], q8, s8)
    with pytest.raises(ValueError, match="topk|scores must be"):
        topk_indices(np.zeros((2, 2, 2)), 1)


# ------------------------------------------------------------------------------- generic IR fallback
_GENERIC_SCRIPT = """
import sys
import numpy as np, torch
from numba import njit
from offload.cpu import lowbit_ir
from offload.cpu import shadow as lowbit
from offload.predict.quant import quantize_int4, quantize_int8
from offload.cpu import ir
assert ir.ISA == "generic"
torch.set_num_threads(1)


@njit(cache=True)
def i4(x, W, B, out):  # one token, the T = 1 kernel only (compiles in ~1 s)
    G = W.shape[1]
    XQ, XS, XC = np.empty((1, 32 * G), np.int8), np.empty((1, G), np.float32), np.empty((1, G), np.int32)
    lowbit.quantize_x(x, 127, XQ, XS, XC)
    for p in range(W.shape[0]):
        lowbit_ir.i4_shadow_k1(W, p, XQ, XS, XC, 0, B, 0, out)


@njit(cache=True)
def i8(x, W, S, B, out):
    G = W.shape[1]
    XQ, XS, XC = np.empty((1, 32 * G), np.int16), np.empty((1, G), np.float32), np.empty((1, G), np.int32)
    lowbit.quantize_x(x, 32767, XQ, XS, XC)
    for p in range(W.shape[0]):
        lowbit_ir.i8_shadow_k1(W, S, p, XQ, XS, 0, B, 0, out)


g = torch.Generator().manual_seed(0)
wg, wu = torch.randn(37, 72, generator=g), torch.randn(37, 72, generator=g)
x = torch.randn(1, 72, generator=g).numpy()
out = {}
for name, cls, quant in (("i4", lowbit.Int4Shadow, quantize_int4), ("i8", lowbit.Int8Shadow, quantize_int8)):
    (qg, sg), (qu, su) = quant(wg), quant(wu)
    sh = cls(qg, sg, qu, su, d=72)
    out[name] = np.empty((1, 37), np.float32)
    if name == "i4":
        i4(x, sh.W, sh.B, out[name])
    else:
        i8(x, sh.W, sh.S, sh.B, out[name])
np.savez(sys.argv[1], **out)
"""


@pytest.mark.skipif(not ir.HAS_AVX2, reason="this host already runs the generic IR")
def test_generic_ir_matches_x86_intrinsics(tmp_path, request):
    """The non-AVX2 code path (generic LLVM vector IR instead of the vpmaddubsw/vpmaddwd intrinsics)
    computes the same numbers. A child process with OFFLOAD_GENERIC_IR=1 compiles the one-token
    kernels only; its code is cached in pytest's cache dir."""
    outf = str(tmp_path / "generic.npz")
    cache_provider = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = cache_provider.mkdir("offload-lowbit-generic-numba") if cache_provider else tmp_path
    env = dict(os.environ, OFFLOAD_GENERIC_IR="1", OFFLOAD_GENERIC_IR_CACHE="1", NUMBA_CACHE_DIR=str(cache))
    script = cache / "generic_check.py"  # a file, so that numba can cache its functions too
    if not script.exists() or script.read_text() != _GENERIC_SCRIPT:
        script.write_text(_GENERIC_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), outf], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(outf)
    g = torch.Generator().manual_seed(0)
    wg, wu = torch.randn(37, 72, generator=g), torch.randn(37, 72, generator=g)
    x = torch.randn(1, 72, generator=g)
    for name, cls, quant in (("i4", Int4Shadow, quantize_int4), ("i8", Int8Shadow, quantize_int8)):
        (qg, sg), (qu, su) = quant(wg), quant(wu)
        np.testing.assert_allclose(got[name], cls(qg, sg, qu, su, d=72).scores(x), rtol=1e-6, atol=1e-6)
