"""Sparse FFN on the dense engine: oracle sparsity is exact on ReLU models, gathers equal masks, errors."""
from __future__ import annotations

import pytest
import torch

from offload.checkpoint import open_checkpoint
from offload.loading import build_model
from offload.formats import apply_weight_format
from offload.sparse import (OracleSelector, SparseFFN, SparsityError, densify, ffn_bytes_fraction, ffn_dense_bytes,
                            ffn_weights, is_sparse, masked_ffn_forward, sparse_ffn_forward, sparse_stats, sparsify,
                            true_activity)


def tiny(tiny_checkpoint, kind):
    return build_model(open_checkpoint(tiny_checkpoint(kind)), progress=False)


def ids(b=2, t=12, seed=1):
    return torch.randint(0, 97, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["llama_relu", "opt"])
def test_oracle_sparse_logits_equal_dense(tiny_checkpoint, kind):
    net = tiny(tiny_checkpoint, kind)
    x = ids()
    with torch.no_grad():
        ref = net(x)
        sparsify(net, "oracle")
        out = net(x)  # prefill: per-token masks
        stats = sparse_stats(net, reset=True)
        cache = net.new_cache(1, x.shape[1])
        steps = [net(x[:1, t:t + 1], cache, t) for t in range(x.shape[1])]  # decode: row gathers
    assert (out - ref).abs().max().item() <= 1e-5
    assert (torch.cat(steps, 1) - ref[:1]).abs().max().item() <= 1e-5
    assert 0.0 < stats["density"] < 1.0  # random ReLU models: about half the neurons are active
    assert len(stats["layers"]) == len(net.layers) and stats["tokens"] == x.numel()


def test_densify_restores_the_original_modules(tiny_checkpoint):
    net = tiny(tiny_checkpoint, "llama_relu")
    originals = [layer.mlp for layer in net.layers]
    sparsify(net, "oracle")
    assert is_sparse(net) and all(isinstance(layer.mlp, SparseFFN) for layer in net.layers)
    sparsify(net, "oracle", density=0.5)  # re-sparsifying wraps the originals, not the wrappers
    assert all(layer.mlp.dense is m for layer, m in zip(net.layers, originals))
    densify(net)
    assert not is_sparse(net) and all(layer.mlp is m for layer, m in zip(net.layers, originals))


@pytest.mark.parametrize("kind", ["llama", "llama_relu", "opt"])
def test_gather_equals_mask_and_all_neurons_equal_dense(tiny_checkpoint, kind):
    net = tiny(tiny_checkpoint, kind)
    mlp = net.layers[0].mlp
    n, d = ffn_weights(mlp).n, ffn_weights(mlp).d
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, d, generator=g)
    idx = torch.randperm(n, generator=g)[: n // 3].sort().values
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, idx] = True
    with torch.no_grad():
        assert torch.allclose(sparse_ffn_forward(mlp, x, idx), masked_ffn_forward(mlp, x, mask), atol=1e-5)
        assert torch.allclose(sparse_ffn_forward(mlp, x, torch.arange(n)), mlp(x), atol=1e-5)


def test_swiglu_oracle_topk(tiny_checkpoint):
    net = tiny(tiny_checkpoint, "llama")
    mlp = net.layers[0].mlp
    x = torch.randn(5, ffn_weights(mlp).d)
    with torch.no_grad():
        m = true_activity(mlp, x, 0.25)
    assert (m.sum(-1) == round(0.25 * ffn_weights(mlp).n)).all()
    with torch.no_grad():
        act = mlp.intermediate(x).abs()
    assert (act.masked_fill(~m, float("inf")).min(-1).values >= act.masked_fill(m, -1).max(-1).values).all()
    with torch.no_grad():
        sparsify(net, "oracle", density=1.0)
        y = net(ids())
        densify(net)
        assert torch.allclose(y, net(ids()), atol=1e-5)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), "half"])
def test_density_outside_0_1_is_refused(tiny_checkpoint, bad):
    net = tiny(tiny_checkpoint, "llama_relu")
    with pytest.raises(SparsityError, match=r"expected a number in \(0, 1\]"):
        sparsify(net, "oracle", density=bad)
    assert not is_sparse(net)


def test_swiglu_oracle_needs_a_density_and_per_layer_lengths_are_checked(tiny_checkpoint):
    net = tiny(tiny_checkpoint, "llama")
    with pytest.raises(SparsityError, match="swiglu FFN has no exact zeros"):
        sparsify(net, "oracle")
    with pytest.raises(SparsityError, match="3 per-layer values for a model with 2 layers"):
        sparsify(net, "oracle", density=[0.5, 0.5, 0.5])
    with pytest.raises(SparsityError, match="expected 'oracle' or a PredictorSet"):
        sparsify(net, "magic")


def test_bytes_accounting(tiny_checkpoint):
    net = tiny(tiny_checkpoint, "llama")  # d=64, n=96: 3·n·d fp32 per layer
    assert ffn_dense_bytes(net) == [3 * 96 * 64 * 4] * 2
    assert ffn_bytes_fraction(net, [0.5, 0.5]) == pytest.approx(0.5)
    assert ffn_bytes_fraction(net, [0.5, 0.5], [3 * 96 * 64, 3 * 96 * 64]) == pytest.approx(0.75)
    opt = tiny(tiny_checkpoint, "opt")  # fc1 row + fc2 column
    assert ffn_dense_bytes(opt) == [2 * 128 * 64 * 4] * 2
    assert OracleSelector(opt.layers[0].mlp).nbytes == 0
    packed = apply_weight_format(tiny(tiny_checkpoint, "llama"), "int4", threads=1)  # as stored: 4-bit codes
    stored = ffn_dense_bytes(packed)
    assert stored == [packed.layers[0].mlp.gate_up.nbytes + packed.layers[0].mlp.down.nbytes] * 2
    assert stored[0] < 3 * 96 * 64 * 4 / 6 and ffn_dense_bytes(packed, 4) == [3 * 96 * 64 * 4] * 2
