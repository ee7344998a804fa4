"""The hybrid FFN with packed 4-bit hot rows (apply_placement(..., hot_format="int4")): on the CPU, with the
kernels' torch references, it gives the sparse-FFN semantics of the packed model (lossless hot rows), and
the round-to-nearest weights of a float model; GGUF layouts are kept or quantized per side. The sparse-FFN
semantics with selectors: test_hybrid.test_swiglu_matches_sparse_semantics; on a GPU: test_cuda_hybrid."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from offload.checkpoint import open_checkpoint
from offload.formats import apply_weight_format
from offload.formats import packed as pk
from offload.formats.gguf_blocks import random_rows
from offload.formats.packed_rows import dequantize_down, dequantize_rows
from offload.formats.quantized import PackedLinear
from offload.hybrid import HybridFFN, HybridStats, apply_placement
from offload.loading import build_model
from offload.models import llama
from offload.packed_hot import packed_hot_layouts
from offload.select import CallableSelector

from helpers import greedy_logits, oracle_relu


def packed_model(kind: str, tiny_checkpoint, activations: str = "float32"):
    """A tiny model with every weight matrix stored int4 on the CPU (offload.formats, weights="int4"). Its
    one-token products take fp32 x by default (activations="float32"): the hot side's exact semantics, where
    int8 x would round the reference's inputs."""
    model = build_model(open_checkpoint(tiny_checkpoint(kind)), progress=False)
    return apply_weight_format(model, "int4", threads=1, activations=activations)


@pytest.mark.parametrize("activations", ["float32", "int8"])  # column planes / row quads on the CPU side
def test_packed_hot_side_reads_the_int4_parts(tiny_checkpoint, activations):
    """(The sparse-FFN semantics of a packed model: test_hybrid.test_swiglu_matches_sparse_semantics.)"""
    dense = packed_model("llama", tiny_checkpoint, activations)
    assert packed_hot_layouts(dense) == [("q4_1", "q4_1")] * 2  # read from the int4 parts, losslessly
    hot = np.arange(0, 96, 5)
    gate_up, down = dense.layers[0].mlp.gate_up.dense_weight(), dense.layers[0].mlp.down.dense_weight()
    apply_placement(dense, [hot, np.arange(0)], None, device="cpu", hot_format="int4")
    first, second = (layer.mlp for layer in dense.layers)
    assert first.w1 is None and first.hot_rows.rows == 20 and second.hot_rows is None and second.hot_nbytes == 0
    rows = dequantize_rows(first.hot_rows)  # [2, h, d]: gate and up rows, bit for bit the CPU weights
    assert torch.equal(rows[0], gate_up[hot]) and torch.equal(rows[1], gate_up[96 + hot])
    assert torch.equal(dequantize_down(first.hot_down), down[:, hot].T)
    dense.hybrid_worker.close()


def test_opt_packed_hot_side_equals_dense(tiny_checkpoint):
    """ReLU (OPT: fc1 with its bias at the hot dtype, one packed projection) with the oracle: the dense
    logits of the packed model."""
    dense = packed_model("opt", tiny_checkpoint)
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = greedy_logits(dense, ids, 4)
    model = copy.deepcopy(dense)
    selectors = [oracle_relu(copy.deepcopy(layer.mlp)) for layer in dense.layers]
    hot = [np.arange(0, 128, 3), np.arange(128)]
    apply_placement(model, hot, selectors, device="cpu", hot_format="int4")
    assert model.layers[0].mlp.hot_rows.codes.shape == (1, len(hot[0]), 32)
    assert (greedy_logits(model, ids, 4) - expected).abs().max().item() <= 1e-4
    model.hybrid_worker.close()


def test_float_model_hot_rows_round_to_nearest(tiny_checkpoint):
    """A float model's hot rows are quantized (int4, round to nearest): all hot, no selector, it computes
    the model whose FFN weights are offload.formats.packed.quantize's."""
    dense = build_model(open_checkpoint(tiny_checkpoint("llama")), progress=False)
    reference = copy.deepcopy(dense)
    for layer in reference.layers:
        for lin in (layer.mlp.gate_up, layer.mlp.down):
            lin.weight.data = torch.from_numpy(pk.dequantize(pk.quantize(lin.weight.detach().numpy(), bits=4)))
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(5))
    model = copy.deepcopy(dense)
    apply_placement(model, [np.arange(96)] * 2, None, device="cpu", hot_format="int4")
    assert packed_hot_layouts(dense) == [("q4_1", "q4_1")] * 2
    got, want = greedy_logits(model, ids, 3), greedy_logits(reference, ids, 3)
    assert (got - want).abs().max().item() <= 1e-4
    assert (got - greedy_logits(dense, ids, 3)).abs().max().item() > 1e-3  # it did quantize
    model.hybrid_worker.close()


def gguf_ffn_model(down_types=(QT.Q4_0, QT.Q6_K)):
    """A 2-layer LLaMA (d = 256, n = 512) whose FFNs are GGUF blocks: gate/up Q4_K, down per layer."""
    cfg = llama.LlamaConfig(vocab_size=50, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=32)
    model = llama.LlamaModel(cfg, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.05
    rng = np.random.default_rng(0)
    for layer, down_type in zip(model.layers, down_types):
        # fp32 x in the reference (activations="float32"), as on the hot side
        layer.mlp.gate_up = PackedLinear(pk.pack_gguf(random_rows(QT.Q4_K, 1024, 256, rng), QT.Q4_K, 256),
                                         activations="float32")
        layer.mlp.down = PackedLinear(pk.pack_gguf(random_rows(down_type, 256, 512, rng), down_type, 512),
                                      activations="float32")
    return model


def test_gguf_layouts_kept_or_quantized():
    model = gguf_ffn_model()
    assert packed_hot_layouts(model) == [("q4_k", "q4_0"), ("q4_k", "q4_1")]  # Q6_K down: quantized (int4)
    mlp = model.layers[0].mlp
    hot = np.sort(np.random.default_rng(1).choice(512, 300, replace=False))
    active = torch.from_numpy(np.sort(np.random.default_rng(2).choice(512, 200, replace=False)))
    select = CallableSelector(lambda x: active, 512)
    side = dict(device="cpu", hot_dtype=torch.float32, worker=None, stats=HybridStats(), cold_threads=1,
                cold_pool="numba", hot_format="int4")
    layer = HybridFFN(mlp, hot, select, **side)
    assert layer.hot_rows.layout.name == "q4_k" and layer.hot_down.layout.name == "q4_0"
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(3)) * 1e-3
    mask = torch.zeros(512)
    mask[active] = 1
    want = mlp.down(mlp.intermediate(x) * mask)
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    other = HybridFFN(model.layers[1].mlp, hot, select, **side)
    assert other.hot_rows.layout.name == "q4_k" and other.hot_down.layout.name == "q4_1"


def test_bad_hot_format_and_unpackable_widths(tiny_checkpoint):
    dense = build_model(open_checkpoint(tiny_checkpoint("llama")), progress=False)
    with pytest.raises(ValueError, match="hot_format='int8'"):
        apply_placement(copy.deepcopy(dense), [np.arange(4)] * 2, None, device="cpu", hot_format="int8")
    cfg = llama.LlamaConfig(vocab_size=10, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=24, max_position_embeddings=8)
    odd = llama.LlamaModel(cfg, dtype=torch.float32, device="cpu")
    for p in odd.parameters():
        p.data = torch.zeros(p.shape)
    with pytest.raises(ValueError, match="groups of 32 .* d=48, n=64"):
        apply_placement(odd, [np.arange(4)], None, device="cpu", hot_format="int4")


def test_gpu_hybrid_build_of_a_gguf_keeps_ffn_blocks(smollm2_gguf, smollm2_ours):
    """from_pretrained(gguf, device="cuda", gpu_memory=...) builds this CPU model (offload.api.build_for_gpu_hybrid):
    the FFNs as stored, the rest dense fp32 (it moves to the device). Its prompt logits are the fp32
    model's; with every neuron hot the hybrid, reading packed 4-bit hot rows losslessly from the Q4_1
    blocks, computes them too (here the "device" is the CPU: the kernels' torch references)."""
    from offload.api import build_for_gpu_hybrid, is_quantized_gguf
    from offload.formats import format_name
    from offload.models.common import Embedding, Linear

    ckpt = open_checkpoint(smollm2_gguf)
    assert is_quantized_gguf(ckpt)
    net = build_for_gpu_hybrid(ckpt, "auto", "float32", progress=False)
    assert format_name(net) == "gguf" and isinstance(net.embed, Embedding)
    assert isinstance(net.layers[0].attn.qkv, Linear) and net.lm_head.weight is net.embed.weight
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    want = smollm2_ours.model(ids, smollm2_ours.model.new_cache(1, 8), 0)
    assert (net(ids, net.new_cache(1, 8), 0) - want).abs().max().item() <= 1e-3
    layers = len(net.layers)
    assert packed_hot_layouts(net) == [("q4_1", "q4_1")] * layers
    apply_placement(net, [np.arange(1536)] * layers, None, device="cpu", hot_format="int4")
    assert net.layers[0].mlp.hot_rows.layout.name == "q4_1"
    assert (net(ids, net.new_cache(1, 8), 0) - want).abs().max().item() <= 1e-3
    net.hybrid_worker.close()
