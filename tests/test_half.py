"""fp16 weight storage on the CPU (offload.half): the GEMV kernel, the transform, and the engine with it
against an fp32 model whose weights were rounded through fp16 (the same numbers, fp32 math)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from offload import half
from offload.checkpoint import open_checkpoint
from offload.hybrid import apply_placement
from offload.loading import build_model

from helpers import greedy_logits, oracle_relu


@pytest.mark.parametrize("n,d", [(1, 1), (5, 33), (7, 576), (1031, 577)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("split", [False, True])
def test_gemv_matches_reference(n, d, dtype, split, monkeypatch):
    if split:  # every call on numba's pool, however small
        monkeypatch.setattr(half, "MIN_BYTES_PER_THREAD", 1)
    g = torch.Generator().manual_seed(n + d)
    w = (torch.randn(n, d, generator=g) * 0.05).to(dtype)
    x = torch.randn(d, generator=g)
    expected = (w.double() @ x.double()).float()
    torch.testing.assert_close(half.gemv(w, x), expected, rtol=1e-5, atol=1e-5)


def rounded_fp32(model):
    """The reference: the same model in fp32 with every 2-D weight rounded through fp16."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        if p.dim() == 2:
            p.data = p.data.half().float()
    return ref


@pytest.mark.parametrize("kind", ["llama", "llama_relu", "llama_tied", "qwen2", "opt_project"])
def test_fp16_weights_equal_rounded_fp32(tiny_checkpoint, kind):
    dense = build_model(open_checkpoint(tiny_checkpoint(kind)), progress=False)
    ref = rounded_fp32(dense)
    model = half.store_weights_fp16(copy.deepcopy(dense))
    kinds = {p.dtype for p in model.parameters() if p.dim() == 2} | {model.dtype}
    assert {p.dtype for p in model.parameters() if p.dim() == 1} == {torch.float32}
    assert kinds == {torch.float16, torch.float32} and model.dtype == torch.float32
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    for decode_mode in (False, True):
        torch.testing.assert_close(greedy_logits(model, ids, 6, decode_mode), greedy_logits(ref, ids, 6, False),
                                   rtol=1e-4, atol=1e-4)


def test_store_weights_fp16_refuses_non_fp32(tiny_checkpoint):
    model = build_model(open_checkpoint(tiny_checkpoint("llama")), dtype=torch.float16, progress=False)
    with pytest.raises(ValueError, match="fp32 CPU model"):
        half.store_weights_fp16(model)


def test_from_pretrained_weights_option(tiny_checkpoint):
    from offload import OffloadedModel

    path = tiny_checkpoint("llama")
    with pytest.raises(ValueError, match="weights="):
        OffloadedModel.from_pretrained(path, weights="int8", progress=False)
    with pytest.raises(ValueError, match="fp32 activations"):
        OffloadedModel.from_pretrained(path, weights="float16", dtype="float16", progress=False)


@pytest.mark.parametrize("kind", ["llama_relu", "opt"])
def test_hybrid_with_fp16_weights_equals_dense(tiny_checkpoint, kind):
    """All-cold and random placements of an fp16-weight model (cold rows in fp16, numba's pool) give
    the dense fp16-weight model's logits with the exact ReLU oracle."""
    dense = half.store_weights_fp16(build_model(open_checkpoint(tiny_checkpoint(kind)), progress=False))
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    expected = greedy_logits(dense, ids, 6, True)
    rng = np.random.default_rng(0)
    n = dense.layers[0].mlp.n if hasattr(dense.layers[0].mlp, "n") else dense.layers[0].mlp.fc1.shape[0]
    for hot in ([np.arange(0)] * 2, [np.sort(rng.choice(n, n // 2, replace=False)) for _ in range(2)]):
        model = copy.deepcopy(dense)
        selectors = [oracle_relu(copy.deepcopy(layer.mlp)) for layer in dense.layers]
        apply_placement(model, hot, selectors, device="cpu")
        cold = model.layers[0].mlp.cold
        assert cold.W.dtype == np.float16 and cold.pool == "numba"
        torch.testing.assert_close(greedy_logits(model, ids, 6, True), expected, rtol=1e-5, atol=1e-5)
        model.hybrid_worker.close()


def test_all_cold_fused_decode_equals_separate_path(tiny_checkpoint):
    """CPU-only, fp16 weights, every neuron cold, int4 shadow selectors: the one-call path
    (offload.cold.fused) gives the logits and stats of scores → top-k → ColdFFN called separately."""
    from offload.api import _cpu_shadow_selector
    from offload.predict.shadow import ShadowPredictor

    dense = half.store_weights_fp16(build_model(open_checkpoint(tiny_checkpoint("llama")), progress=False))
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(5))
    runs = []
    for fused in (True, False):
        model = copy.deepcopy(dense)
        selectors = [_cpu_shadow_selector(ShadowPredictor.from_ffn(layer.mlp, density=0.4), spinning_pool=True)
                     for layer in model.layers]
        stats = apply_placement(model, [np.arange(0)] * 2, selectors, device="cpu")
        assert all((layer.mlp._fused is not None) for layer in model.layers)
        if not fused:
            for layer in model.layers:
                layer.mlp._fused = None
        runs.append((greedy_logits(model, ids, 6, True), stats.active_cold, stats.bytes_cold, stats.decode_calls))
        model.hybrid_worker.close()
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5)
    assert runs[0][1:] == runs[1][1:] and runs[0][3] == 12
