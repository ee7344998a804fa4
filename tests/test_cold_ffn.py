"""ColdFFN (CPU cold-neuron FFN) against models.ffn_kind.reference_ffn (float64, gathered rows)."""
import os
import signal

import numpy as np
import pytest
import torch

from offload.cpu import cold as cold_mod
from offload.cpu import cold_kernels
from offload.cpu.cold import ColdFFN
from offload.models.ffn_kind import FFNKind, reference_ffn

KINDS = [k.value for k in FFNKind if k.kernels]  # geglu: refused (tests/test_gemma3.py)
SPLIT = [pytest.param(False, id="inline"), pytest.param(True, id="split")]  # every call split over threads
TOL = dict(rtol=1e-5, atol=1e-5)


def reference_forward(x, idx, gate, up, down, act="swiglu", bias=None):
    """The float64 reference on NumPy arrays (HF shapes; up=None and bias=b1 for relu_fc)."""
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731
    y = reference_ffn(act, t(np.asarray(x, np.float64)), t(gate), t(gate) if up is None else t(up), t(down),
                      torch.as_tensor(np.asarray(idx, np.int64)), t(bias))
    return y.float().numpy()


@pytest.fixture
def split_always(monkeypatch):
    """Split every sparse call over the helper threads, however small (the real threshold is
    hundreds of KiB, more than these test layers)."""
    monkeypatch.setattr(cold_mod, "MIN_BYTES_PER_THREAD", 1)
    monkeypatch.setattr(cold_mod, "BLOCK_BYTES", 1)  # threads claim one neuron at a time


def make_layer(act, n, d, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    s = d ** -0.5
    gate = (rng.standard_normal((n, d)) * s).astype(dtype)
    up = None if act == "relu_fc" else (rng.standard_normal((n, d)) * s).astype(dtype)
    down = (rng.standard_normal((d, n)) * n ** -0.5).astype(dtype)
    bias = (rng.standard_normal(n) * 0.1).astype(dtype) if act == "relu_fc" else None
    return gate, up, down, bias


def check(cold, x, idx, layer, act):
    gate, up, down, bias = layer
    y = cold.forward(x, idx)
    ref = reference_forward(x, idx, gate, up, down, act, bias)
    assert y.dtype == np.float32
    assert y.shape == np.shape(x)
    np.testing.assert_allclose(y, ref, **TOL)
    return y


@pytest.mark.parametrize("pool", ["team", "numba"])
@pytest.mark.parametrize("act", KINDS)
@pytest.mark.parametrize("n,d", [(200, 64), (131, 67)])
def test_fp16_storage_matches_reference(act, pool, n, d, monkeypatch):
    """fp16-stored bundles (widened in the kernel, fp32 accumulation) against the float64 reference on
    the same fp16-rounded weights, on both thread pools, every call split."""
    monkeypatch.setattr(cold_mod, "MIN_BYTES_PER_THREAD", 1)
    monkeypatch.setattr(cold_mod, "MIN_BYTES_PER_THREAD_SPINNING", 1)
    monkeypatch.setattr(cold_mod, "BLOCK_BYTES", 1)
    gate, up, down, bias = make_layer(act, n, d, seed=n)
    cold = ColdFFN(gate, up, down, act=act, bias=bias, threads=2, dtype=np.float16, pool=pool)
    assert cold.W.dtype == np.float16 and cold.bytes_per_neuron == cold.m * d * 2
    rounded = tuple(None if w is None else w.astype(np.float16).astype(np.float32) for w in (gate, up, down))
    rng = np.random.default_rng(2)
    for b in (1, 3, 8):
        x = rng.standard_normal((b, d)).astype(np.float32)
        for idx in (np.arange(n), np.sort(rng.choice(n, n // 3, replace=False)), np.array([], np.int64)):
            ref = reference_forward(x, idx, *rounded, act, bias)
            np.testing.assert_allclose(cold.forward(x, idx), ref, **TOL)
        np.testing.assert_allclose(cold.forward_dense(x), reference_forward(x, np.arange(n), *rounded, act, bias),
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(IndexError):
        cold.forward(x, np.array([0, n]))
    with pytest.raises(ValueError, match="pool"):
        ColdFFN(gate, up, down, act=act, bias=bias, pool="omp")
    with pytest.raises(ValueError, match="dtype"):
        ColdFFN(gate, up, down, act=act, bias=bias, dtype=np.float64)
    if pool == "numba":
        from offload.cpu.pool import start_pool

        start_pool()


@pytest.mark.parametrize("split", SPLIT)
@pytest.mark.parametrize("act", KINDS)
@pytest.mark.parametrize("n,d", [(200, 64), (131, 67), (37, 5)])
def test_matches_reference(act, split, n, d, monkeypatch):
    if split:
        monkeypatch.setattr(cold_mod, "MIN_BYTES_PER_THREAD", 1)
        monkeypatch.setattr(cold_mod, "BLOCK_BYTES", 1)  # threads claim one neuron at a time
    layer = make_layer(act, n, d, seed=n + d)
    gate, up, down, bias = layer
    cold = ColdFFN(gate, up, down, act=act, bias=bias, threads=2)
    rng = np.random.default_rng(1)
    subsets = [np.array([], np.int64), np.array([n // 2]), np.arange(n),
               np.sort(rng.choice(n, n // 3, replace=False)),
               rng.permutation(n)[: n // 2]]  # unsorted
    for b in (None, 1, 3, 5, 8):
        x = rng.standard_normal(d if b is None else (b, d)).astype(np.float32)
        for idx in subsets:
            y = check(cold, x, idx, layer, act)
            if len(idx) == 0:
                assert not y.any()


@pytest.mark.parametrize("act", KINDS)
def test_forward_dense_equals_all_indices(act):
    n, d = 200, 64
    gate, up, down, bias = make_layer(act, n, d, seed=3)
    cold = ColdFFN(gate, up, down, act=act, bias=bias)
    rng = np.random.default_rng(4)
    for t in (1, 5, 17):
        x = rng.standard_normal((t, d)).astype(np.float32)
        yd = cold.forward_dense(x)
        assert yd.shape == (t, d) and yd.dtype == np.float32
        np.testing.assert_allclose(yd, reference_forward(x, np.arange(n), gate, up, down, act, bias),
                                   **TOL)
        if t <= 8:
            np.testing.assert_allclose(yd, cold.forward(x, np.arange(n)), **TOL)
    x1 = rng.standard_normal(d).astype(np.float32)
    np.testing.assert_allclose(cold.forward_dense(x1), cold.forward(x1, np.arange(n)), **TOL)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_counts_agree(threads, split_always):
    n, d = 300, 64
    layer = make_layer("swiglu", n, d, seed=5)
    cold = ColdFFN(*layer[:3], threads=threads)
    x = np.random.default_rng(6).standard_normal((3, d)).astype(np.float32)
    check(cold, x, np.arange(n), layer, "swiglu")
    check(cold, x, np.arange(0, n, 3), layer, "swiglu")


def test_relu_kinds_skip_inactive_rows_exactly():
    # every gate row points away from x: all relu-family outputs are exactly zero
    n, d = 64, 32
    rng = np.random.default_rng(7)
    x = np.abs(rng.standard_normal(d)).astype(np.float32)
    gate = -np.abs(rng.standard_normal((n, d))).astype(np.float32)
    up = rng.standard_normal((n, d)).astype(np.float32)
    down = rng.standard_normal((d, n)).astype(np.float32)
    for act in ("relu", "drelu"):
        assert not ColdFFN(gate, up, down, act=act).forward(x, np.arange(n)).any()
    assert not ColdFFN(gate, None, down, act="relu_fc",
                       bias=np.zeros(n, np.float32)).forward(x, np.arange(n)).any()


def test_duplicates_count_like_reference():
    layer = make_layer("swiglu", 50, 16, seed=8)
    cold = ColdFFN(*layer[:3])
    x = np.ones(16, np.float32)
    check(cold, x, np.array([3, 3, 7]), layer, "swiglu")


def test_input_conversion_and_views():
    n, d = 40, 24
    gate, up, down, _ = make_layer("swiglu", n, d, seed=9, dtype=np.float64)
    cold = ColdFFN(gate, up, down)
    assert cold.W.dtype == np.float32 and cold.W.shape == (n, 3, d)
    np.testing.assert_array_equal(cold.gate, gate.astype(np.float32))
    np.testing.assert_array_equal(cold.up, up.astype(np.float32))
    np.testing.assert_array_equal(cold.down, down.astype(np.float32))
    assert cold.bytes_per_neuron == 3 * d * 4
    x = np.random.default_rng(0).standard_normal(d)  # float64 input, list indices
    y = cold.forward(x, [1, 2, 5])
    np.testing.assert_allclose(y, reference_forward(x, [1, 2, 5], gate, up, down), **TOL)
    fc = ColdFFN(gate, None, down, act="relu_fc", bias=np.zeros(n))
    assert fc.W.shape == (n, 2, d) and fc.up is None


@pytest.mark.parametrize("split", SPLIT)
def test_errors(split, monkeypatch):
    if split:
        monkeypatch.setattr(cold_mod, "MIN_BYTES_PER_THREAD", 1)
        monkeypatch.setattr(cold_mod, "BLOCK_BYTES", 1)  # threads claim one neuron at a time
    n, d = 20, 8
    gate, up, down, _ = make_layer("swiglu", n, d)
    cold = ColdFFN(gate, up, down, threads=2)
    x = np.zeros(d, np.float32)
    with pytest.raises(IndexError):
        cold.forward(x, [n])
    with pytest.raises(IndexError):
        cold.forward(x, [-1])
    with pytest.raises(IndexError):
        cold.forward(x, list(range(n)) + [n + 5])  # bad index in the last chunk
    with pytest.raises(ValueError):
        cold.forward(np.zeros(d + 1, np.float32), [0])
    with pytest.raises(ValueError):  # UnsupportedModelError is a ValueError
        ColdFFN(gate, up, down, act="gelu")
    with pytest.raises(ValueError):
        ColdFFN(gate, up, down.T)
    with pytest.raises(ValueError):
        ColdFFN(gate, None, down)  # swiglu needs up
    with pytest.raises(ValueError):
        ColdFFN(gate, up, down, act="relu_fc", bias=np.zeros(n))  # relu_fc takes no up
    with pytest.raises(ValueError):
        ColdFFN(gate, None, down, act="relu_fc")  # needs bias
    with pytest.raises(ValueError):
        ColdFFN(gate, up, down, bias=np.zeros(n))  # bias only for relu_fc


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("act", KINDS)
def test_one_token_kernel_matches_reference(act, dtype):
    """cold_token (the one-token case of cold_chunk and cold_parallel) called directly on index ranges
    with unsorted and duplicate ids: equal to the float64 reference on those ids; out-of-range ids are
    counted and skipped."""
    n, d = 97, 67
    gate, up, down, bias = make_layer(act, n, d, seed=5)
    cold = ColdFFN(gate, up, down, act=act, bias=bias, threads=1, dtype=dtype)
    W = cold.W.view(np.uint16) if dtype == np.float16 else cold.W
    b1 = np.zeros(n, np.float32) if bias is None else bias.astype(np.float32)
    rounded = tuple(None if w is None else w.astype(dtype).astype(np.float32) for w in (gate, up, down))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, d)).astype(np.float32)
    idx = np.concatenate([rng.permutation(n)[: n // 2], [3, 3, -1, n, n + 5]]).astype(np.int64)
    for lo, hi in ((0, len(idx)), (0, 0), (4, 9), (len(idx) - 6, len(idx))):
        acc = np.zeros(d, np.float32)
        bad = cold_kernels.cold_token(W, x[0], idx, lo, hi, FFNKind(act).code, b1, acc)
        part = idx[lo:hi]
        assert bad == int(((part < 0) | (part >= n)).sum())
        ref = reference_forward(x, part[(part >= 0) & (part < n)], *rounded, act, bias)
        np.testing.assert_allclose(acc, ref[0], **TOL)


def test_kernel_releases_gil_and_is_cached():
    opts = cold_kernels.cold_chunk.targetoptions
    assert opts.get("nogil") and not opts.get("parallel")
    assert cold_kernels.cold_chunk._cache is not None  # cache=True


def test_from_bundled_shares_weights():
    layer = make_layer("relu_fc", 60, 16, seed=10)
    a = ColdFFN(layer[0], None, layer[2], act="relu_fc", bias=layer[3])
    b = ColdFFN.from_bundled(a.W, act="relu_fc", bias=layer[3])
    assert b.W is a.W
    x = np.ones(16, np.float32)
    np.testing.assert_array_equal(a.forward(x, [1, 4, 9]), b.forward(x, [1, 4, 9]))
    with pytest.raises(ValueError):
        ColdFFN.from_bundled(a.W, act="swiglu")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_split_forward_in_forked_child(split_always):
    layer = make_layer("swiglu", 100, 32, seed=11)
    cold = ColdFFN(*layer[:3], threads=2)
    x = np.ones(32, np.float32)
    y = cold.forward(x, np.arange(100))  # parent's helper threads exist now
    pid = os.fork()
    if pid == 0:  # child: must not wait on the parent's (absent) helpers
        signal.alarm(20)
        ok = np.allclose(cold.forward(x, np.arange(100)), y, rtol=1e-5, atol=1e-5)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (
        f"child exit status {os.waitstatus_to_exitcode(status)}")
