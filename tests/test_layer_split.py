"""The layer-split baseline (llama.cpp's -ngl policy on our engine): the policy as a pure function, and
the transform on the CPU with float64 "device" layers (every boundary conversion and the per-layer
KV cache exercised without a GPU) against the dense model."""
from __future__ import annotations

import copy

import pytest
import torch

from offload.checkpoint import open_checkpoint
from offload.errors import UnsupportedModelError
from offload.layer_split import apply_layer_split, plan_layer_split
from offload.loading import build_model

from helpers import greedy_logits


def test_plan_layer_split_policy():
    assert plan_layer_split([10, 10, 10], 5, budget=100) == (3, True, 35)
    assert plan_layer_split([10, 10, 10], 5, budget=32) == (3, False, 30)  # head does not fit after all
    assert plan_layer_split([10, 10, 10], 5, budget=25) == (2, False, 20)  # head never before all layers
    assert plan_layer_split([10, 10, 10], 5, budget=25, reserve=10) == (1, False, 20)
    assert plan_layer_split([10, 10], 5, budget=5) == (0, False, 0)


@pytest.mark.parametrize("kind", ["llama", "llama_tied"])
@pytest.mark.parametrize("budget_layers", [0, 1, 2, 3])  # 3: both layers and the head
def test_split_model_equals_dense(tiny_checkpoint, kind, budget_layers):
    dense = build_model(open_checkpoint(tiny_checkpoint(kind)), progress=False)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(1))
    expected = greedy_logits(dense, ids, 5)
    model = copy.deepcopy(dense)
    one_layer = sum(p.numel() for p in model.layers[0].parameters()) * 8 + 2 * 2 * 16 * 32 * 8  # + KV, fp64
    budget = {0: 1, 1: one_layer, 2: 2 * one_layer, 3: 10**9}[budget_layers]
    split = apply_layer_split(model, budget, "cpu", context=32, dtype=torch.float64)
    assert split.gpu_layers == min(budget_layers, 2) and split.head_on_device == (budget_layers == 3)
    assert {p.dtype for p in model.layers[0].parameters()} == {torch.float64 if budget_layers else torch.float32}
    got = greedy_logits(model, ids, 5)
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=1e-5)
    cache = model.new_cache(1, 8)  # per layer only when the layers' homes differ
    assert isinstance(cache.k, list) == (budget_layers == 1)
    assert [cache.k[i].dtype for i in range(2)] == [torch.float64 if i < budget_layers else torch.float32
                                                    for i in range(2)]
    assert cache.max_len == 8 and cache.nbytes == sum(cache.k[i].numel() * cache.k[i].element_size() for i in range(2)) * 2


def test_layer_split_refuses_opt(tiny_checkpoint):
    model = build_model(open_checkpoint(tiny_checkpoint("opt")), progress=False)
    with pytest.raises(UnsupportedModelError, match="LLaMA"):
        apply_layer_split(model, 10**9, "cpu", context=16)
