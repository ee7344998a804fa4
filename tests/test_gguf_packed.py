"""Models as their GGUF stores them (weights="auto": quantized blocks packed, offload.formats) against
transformers, which dequantizes the same file to fp32: logits of a prompt and of 32 greedy decode steps
(teacher-forced reference over the same tokens) within 1e-3, and the same 32 greedy tokens.

Why 1e-3 and not fp32's 1e-4: the packed kernels sum the same products in another order (per group of
32, then across groups), over 30 layers; measured on SmolLM2 1.2e-4 on logits of magnitude ~40."""
from __future__ import annotations

import os

import pytest
import torch

from offload.formats import PackedLinear
from offload.generation import SamplingConfig, generate

TOL = 1e-3
# where scripts/fetch_qwen.py puts it by default (the tests' own OFFLOAD_CACHE is a fresh folder)
QWEN = os.path.expanduser("~/.cache/offload/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")


def check_against_transformers(ours, hf, prompt: str) -> None:
    assert isinstance(ours.model.layers[0].mlp.down, PackedLinear)
    ids = ours.chat_ids(prompt)
    logits: list = []
    out, _ = generate(ours.model, ids, SamplingConfig(max_new_tokens=32), max_context=4096, logits=logits)
    with torch.no_grad():
        ref_greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                                 do_sample=False)
        ref = hf(out[:, :-1]).logits  # the same tokens, teacher-forced
    got = torch.cat(logits, dim=1)
    assert got.shape == ref.shape
    prompt_err = (got[:, :ids.shape[1]] - ref[:, :ids.shape[1]]).abs().max().item()
    decode_err = (got[:, ids.shape[1]:] - ref[:, ids.shape[1]:]).abs().max().item()
    assert prompt_err <= TOL and decode_err <= TOL, (prompt_err, decode_err)
    assert torch.equal(out, ref_greedy)


def test_smollm2_q4_1_as_stored_matches_transformers(smollm2_packed, smollm2_hf):
    check_against_transformers(smollm2_packed, smollm2_hf, "Write a haiku about the sea.")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(QWEN), reason="python scripts/fetch_qwen.py assembles the Qwen GGUF")
def test_qwen_q4_k_m_as_stored_matches_transformers():
    from transformers import AutoModelForCausalLM

    from offload import OffloadedModel

    ours = OffloadedModel.from_pretrained(QWEN, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(QWEN), gguf_file=QWEN, dtype=torch.float32).eval()
    check_against_transformers(ours, hf, "Write a Python function that reverses a string.")
