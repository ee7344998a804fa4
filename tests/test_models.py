"""Our dense models against transformers on the same weights (fp32, max abs logit diff ≤ 1e-4)."""
from __future__ import annotations

import pytest
import torch
from helpers import hf_logits

from offload.checkpoint import open_checkpoint
from offload.loading import build_model

KINDS = ["llama", "llama_relu", "llama_tied", "llama3_rope", "qwen2", "opt", "opt_project", "opt_postln", "gemma3",
         "gemma3_softcap"]
TOL = 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(tiny_checkpoint, kind):
    path = tiny_checkpoint(kind)
    model = build_model(open_checkpoint(path), progress=False)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids)
    ref = hf_logits(path, ids)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL


def test_sharded_checkpoint_is_read(tiny_checkpoint):
    import os

    path = tiny_checkpoint("llama")
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    assert len({f for f in open_checkpoint(path).files.values()}) > 1


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt"])
def test_prefill_then_cached_decode_equals_full_forward(tiny_checkpoint, kind):
    model = build_model(open_checkpoint(tiny_checkpoint(kind)), progress=False)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 12)
        pieces = [model(ids[:, :5], cache, 0)]  # prefill 5
        pieces.append(model(ids[:, 5:8], cache, 5))  # a 3-token chunk after a cached prefix
        for pos in range(8, 12):  # then one token at a time
            pieces.append(model(ids[:, pos:pos + 1], cache, pos))
    stepped = torch.cat(pieces, dim=1)
    assert (stepped - full).abs().max().item() <= 1e-5


def test_smollm2_logits_match_transformers(smollm2_ours, smollm2_hf):
    ids = smollm2_ours.chat_ids("Write a haiku about the sea.")
    with torch.no_grad():
        ref = smollm2_hf(ids).logits
    ours = smollm2_ours(ids)
    assert (ours - ref).abs().max().item() <= TOL


def test_drelu_ffn_matches_its_definition():
    from offload.models.llama import GatedFFN

    torch.manual_seed(0)
    ffn = GatedFFN(16, 24, "drelu", bias=False)
    ffn.gate_up.weight.data.normal_()
    ffn.down.weight.data.normal_()
    x = torch.randn(3, 16)
    g, u = x @ ffn.gate_up.weight[:24].T, x @ ffn.gate_up.weight[24:].T
    expected = (torch.relu(g) * torch.relu(u)) @ ffn.down.weight.T
    assert torch.allclose(ffn(x), expected, atol=1e-5)
