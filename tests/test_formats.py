"""Storage formats (offload.formats) against the dense torch Linear they replace, and the CPU engine with
them against the dense model: fp32 (the same numbers) and fp16 (the same as an fp32 model whose weights
were rounded through fp16)."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from offload.checkpoint import open_checkpoint
from offload.cpu.gemv import gemv_rows_parallel
from offload.cpu.decode import FusedAttention, FusedGatedFFN, FusedLlamaLayers, fuse_decode_blocks
from offload.cpu.matvec import matvec_into
from offload.cpu.pool import start_pool
from offload.formats import Float16Linear, Float32Linear, apply_weight_format
from offload.loading import build_model
from offload.models.common import Linear

from helpers import greedy_logits


@pytest.mark.parametrize("n,d", [(1, 1), (5, 33), (7, 576), (1031, 577)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("split", [False, True])
def test_matvec_matches_reference(n, d, dtype, split):
    """split: the row split matvec runs on numba's pool for large matrices (called directly: matvec's own
    size threshold is compiled in, so these small matrices would never reach it)."""
    start_pool()
    g = torch.Generator().manual_seed(n + d)
    w = (torch.randn(n, d, generator=g) * 0.05).to(dtype)
    x = torch.randn(d, generator=g)
    expected = (w.double() @ x.double()).float()
    operand = w.numpy().view(np.uint16) if dtype == torch.float16 else w.numpy()
    y = np.empty(n, np.float32)
    if split:
        gemv_rows_parallel(operand, x.numpy(), y, 2)
    else:
        matvec_into(operand, x.numpy(), y, 1)
    torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [Float32Linear, Float16Linear])
@pytest.mark.parametrize("bias", [False, True])
def test_format_linear_equals_torch_linear(cls, bias):
    g = torch.Generator().manual_seed(int(bias))
    lin = Linear(33, 21, bias)
    lin.weight.data = torch.randn(21, 33, generator=g)
    if bias:
        lin.bias.data = torch.randn(21, generator=g)
    ref = copy.deepcopy(lin)
    if cls is Float16Linear:
        ref.weight.data = ref.weight.data.half().float()
    fmt = cls(lin.weight, lin.bias, threads=1)
    for shape in ((33,), (1, 1, 33), (2, 5, 33)):  # one token (the numba GEMV) and a prompt (F.linear)
        x = torch.randn(shape, generator=g)
        torch.testing.assert_close(fmt(x), ref(x), rtol=1e-5, atol=1e-5)
    assert fmt.nbytes == 21 * 33 * (2 if cls is Float16Linear else 4)
    with pytest.raises(TypeError, match="fp32 activations"):
        fmt(torch.randn(33, dtype=torch.float64))


def rounded_fp32(model):
    """The reference: the same model in fp32 with every 2-D weight rounded through fp16."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        if p.dim() == 2:
            p.data = p.data.half().float()
    return ref


@pytest.mark.parametrize("kind", ["llama", "llama_relu", "llama_tied", "qwen2", "opt_project"])
@pytest.mark.parametrize("weights", ["float32", "float16"])
def test_cpu_engine_equals_reference(tiny_checkpoint, kind, weights):
    """Formats applied and decode blocks fused: logits of a prompt and 6 greedy steps (the one-token
    numba paths) equal the dense model's (fp32) or the fp16-rounded fp32 model's (fp16)."""
    dense = build_model(open_checkpoint(tiny_checkpoint(kind)), progress=False)
    ref = rounded_fp32(dense) if weights == "float16" else dense
    model = fuse_decode_blocks(apply_weight_format(copy.deepcopy(dense), weights, 2))
    assert not any(isinstance(m, Linear) for m in model.modules())
    if kind.startswith("llama") or kind == "qwen2":
        assert all(isinstance(b.attn, FusedAttention) and isinstance(b.mlp, FusedGatedFFN) for b in model.layers)
    if kind == "llama_tied":  # the head reads the embedding's storage: one tensor
        assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(greedy_logits(model, ids, 6), greedy_logits(ref, ids, 6), rtol=1e-4, atol=1e-4)


def test_fused_blocks_follow_new_caches_threads_and_swaps(tiny_checkpoint):
    """The fused blocks remember their per-token-constant arguments (offload.cpu.decode): a second cache
    (greedy_logits allocates one per call), a new thread count and a swapped weight module are picked up."""
    from offload.formats import set_threads

    dense = build_model(open_checkpoint(tiny_checkpoint("llama")), progress=False)
    model = fuse_decode_blocks(apply_weight_format(copy.deepcopy(dense), "float32", 1))
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    want = greedy_logits(dense, ids, 4)
    for _ in range(2):
        torch.testing.assert_close(greedy_logits(model, ids, 4), want, rtol=1e-4, atol=1e-4)
    set_threads(model, 2)
    torch.testing.assert_close(greedy_logits(model, ids, 4), want, rtol=1e-4, atol=1e-4)
    attn = model.layers[0].attn
    assert attn._fused_args(model.layers[0].attn_norm)[1][-1] == 2
    attn.o = Float32Linear(attn.o.dense_weight() * 0, None, 2)  # a swap: the attention output is now zero
    dense.layers[0].attn.o.weight.data.zero_()
    torch.testing.assert_close(greedy_logits(model, ids, 4), greedy_logits(dense, ids, 4), rtol=1e-4, atol=1e-4)


def test_block_calls_over_blocks_of_different_formats(tiny_checkpoint):
    """Decode tokens go through each block in one numba call (offload.cpu.step.decode_layer) over prepared
    arguments; block 1's FFN in fp16 among fp32 blocks gives two argument types. The logits equal the
    reference's (the dense model with that FFN rounded through fp16), and the block-by-block torch-module
    path's (LlamaLayers)."""
    import numba

    from offload.models.llama import LlamaLayers

    dense = build_model(open_checkpoint(tiny_checkpoint("llama")), progress=False)
    dense.layers.append(copy.deepcopy(dense.layers[1]))  # a third block (the tiny model has two)
    dense.config = dataclasses.replace(dense.config, num_hidden_layers=3)
    model = fuse_decode_blocks(apply_weight_format(copy.deepcopy(dense), "float32", 2))
    assert isinstance(model.layers, FusedLlamaLayers)
    mlp = model.layers[1].mlp
    mlp.gate_up = Float16Linear(mlp.gate_up.dense_weight(), None, 2)
    ref = copy.deepcopy(dense)
    ref.layers[1].mlp.gate_up.weight.data = ref.layers[1].mlp.gate_up.weight.data.half().float()
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    got = greedy_logits(model, ids, 5)
    plan = model.layers._step_plan(model.new_cache(1, 16))
    assert len({numba.typeof(pair) for pair in plan}) == 2
    torch.testing.assert_close(got, greedy_logits(ref, ids, 5), rtol=1e-4, atol=1e-4)
    model.layers = LlamaLayers(list(model.layers))
    torch.testing.assert_close(got, greedy_logits(model, ids, 5), rtol=1e-5, atol=1e-5)


def test_format_name_keys_what_the_ffn_stores(tiny_checkpoint):
    """The key of prepared artifacts: a CPU model's storage format, and for a GPU run's CPU model (torch
    Linears) the cold rows' dtype, fp16 after store_ffn_weights_fp16."""
    from offload.formats import format_name, store_ffn_weights_fp16

    build = lambda: build_model(open_checkpoint(tiny_checkpoint("llama")), progress=False)  # noqa: E731
    assert format_name(build()) == "float32"
    assert format_name(store_ffn_weights_fp16(build())) == "float16"
    for weights in ("float32", "float16", "int4"):
        assert format_name(apply_weight_format(build(), weights, 1)) == weights


def test_apply_weight_format_refuses_unknown_and_non_cpu(tiny_checkpoint):
    model = build_model(open_checkpoint(tiny_checkpoint("llama")), progress=False)
    with pytest.raises(ValueError, match="weights='int3'"):
        apply_weight_format(model, "int3", 1)
    model.layers[0].attn.o.weight = torch.nn.Parameter(torch.empty(64, 64, device="meta"), requires_grad=False)
    with pytest.raises(ValueError, match="on the CPU"):
        apply_weight_format(model, "float16", 1)


def test_from_pretrained_weights_option(tiny_checkpoint):
    from offload import OffloadedModel

    path = tiny_checkpoint("llama")
    with pytest.raises(ValueError, match="weights="):
        OffloadedModel.from_pretrained(path, weights="int3", progress=False)
    with pytest.raises(ValueError, match="computes in fp32"):
        OffloadedModel.from_pretrained(path, weights="float16", dtype="float16", progress=False)
    with pytest.raises(ValueError, match="threads=0"):
        OffloadedModel.from_pretrained(path, threads=0, progress=False)
