"""The hybrid FFN against the dense model: all-hot, all-cold and random placements with the oracle
selector give the dense logits for ReLU models (≤ 1e-5, fp32) and the sparse-FFN semantics for SwiGLU."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from offload.checkpoint import open_checkpoint
from offload.formats import apply_weight_format
from offload.hybrid import apply_placement
from offload.loading import build_model
from offload.models.common import FFNModule
from offload.select import CallableSelector

from helpers import greedy_logits, oracle_relu


def topk_selector(mlp, density):
    """SwiGLU: the top-k neurons by |act| per token, union over the batch."""
    k = max(1, round(density * mlp.n))
    return CallableSelector(lambda x: torch.unique(mlp.intermediate(x).abs().topk(k, dim=-1).indices.flatten()),
                            mlp.n)


def placements(n, layers, rng):
    yield "all-hot", [np.arange(n)] * layers
    yield "all-cold", [np.arange(0)] * layers
    yield "random", [np.sort(rng.choice(n, size=rng.integers(1, n), replace=False)) for _ in range(layers)]


@pytest.mark.parametrize("kind", ["llama_relu", "opt"])
def test_relu_models_equal_dense(tiny_checkpoint, kind):
    dense = build_model(open_checkpoint(tiny_checkpoint(kind)), progress=False)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    expected = greedy_logits(dense, ids, 6)
    rng = np.random.default_rng(0)
    n = dense.config.intermediate_size
    for name, hot in placements(n, len(dense.layers), rng):
        model = copy.deepcopy(dense)
        selectors = [oracle_relu(copy.deepcopy(layer.mlp)) for layer in dense.layers]
        stats = apply_placement(model, hot, selectors, device="cpu")
        got = greedy_logits(model, ids, 6)
        assert (got - expected).abs().max().item() <= 1e-5, name
        assert stats.decode_calls == 6 * len(dense.layers)
        if name == "all-hot":
            assert stats.active_cold == 0 and stats.active_hot > 0
        if name == "all-cold":
            assert stats.active_hot == 0 and stats.active_cold > 0
        model.hybrid_worker.close()


def sparse_reference(dense, selectors):
    """The sparse-FFN semantics on the dense engine: each layer computes only the selected neurons."""
    class Sparse(FFNModule):
        def __init__(self, mlp, select):
            super().__init__()
            self.mlp, self.select = mlp, select

        def forward(self, x):
            x2 = x.reshape(-1, x.shape[-1])
            if x.shape[1] > 1:  # prompts run dense
                return self.mlp(x)
            mask = torch.zeros(self.mlp.n)
            mask[self.select.fn(x2)] = 1
            return self.mlp.down(self.mlp.intermediate(x) * mask)

    model = copy.deepcopy(dense)
    for layer, sel in zip(model.layers, selectors):
        layer.mlp = Sparse(layer.mlp, sel)
    return model


@pytest.mark.parametrize("hot_format", [None, "int4"])
def test_swiglu_matches_sparse_semantics(tiny_checkpoint, hot_format):
    """With hot_format="int4" the model is stored int4 on the CPU (offload.formats) and the hot side reads
    those rows losslessly (offload.packed_hot), through the packed kernels' torch references. The dense
    reference takes fp32 x (activations="float32"), as the hot side does."""
    dense = build_model(open_checkpoint(tiny_checkpoint("llama")), progress=False)
    if hot_format:
        dense = apply_weight_format(dense, "int4", threads=1, activations="float32")
    selectors = [topk_selector(copy.deepcopy(layer.mlp), 0.4) for layer in dense.layers]
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(3))
    expected = greedy_logits(sparse_reference(dense, selectors), ids, 5)
    rng = np.random.default_rng(1)
    for name, hot in placements(dense.config.intermediate_size, len(dense.layers), rng):
        model = copy.deepcopy(dense)
        stats = apply_placement(model, hot, selectors, device="cpu", hot_format=hot_format)
        got = greedy_logits(model, ids, 5)
        assert (got - expected).abs().max().item() <= 1e-5, name
        if hot_format and name == "all-hot":  # d = 64: gate and up rows 32 + 8 bytes, a down column 32 + 4
            assert stats.bytes_hot == stats.active_hot * (2 * (32 + 8) + 32 + 4) and stats.active_cold == 0
        model.hybrid_worker.close()


def test_no_selector_is_dense(tiny_checkpoint):
    dense = build_model(open_checkpoint(tiny_checkpoint("llama")), progress=False)
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    expected = greedy_logits(dense, ids, 3)
    model = copy.deepcopy(dense)
    apply_placement(model, [np.arange(0, 96, 2)] * 2, None, device="cpu")
    assert (greedy_logits(model, ids, 3) - expected).abs().max().item() <= 1e-5
    model.hybrid_worker.close()
