"""Models as their GGUF stores them (weights="auto": quantized blocks packed, offload.formats) against
transformers, which dequantizes the same file to fp32.

activations="float32" (x as is): logits of a prompt and of 32 greedy decode steps (teacher-forced reference
over the same tokens) within 1e-3, and the same 32 greedy tokens. Why 1e-3 and not fp32's 1e-4: the packed
kernels sum the same products in another order (per group of 32, then across groups), over 30 layers;
measured on SmolLM2 1.2e-4 on logits of magnitude ~40.

activations="int8" (the default; x rounded to int8 per group of 32 in each one-token product, as llama.cpp
does, prompts included): logits within INT8_MAX_ABS / INT8_RMS and the teacher-forced argmax the same at
≥ 90 % of the steps. Why those: the rounding is a real change of the computation, not a summation order, and it
compounds over the layers. On SmolLM2, the same file and the same tokens (prompt + 32 steps), llama.cpp
(llama-cpp-python 0.3, which rounds prompt activations too) was off from transformers by 1.36 max abs on
the prompt and 1.05 on decode, 0.24 rms over all positions, argmax agreement 0.91; ours 2.04 (one prompt
position), 1.10, 0.28, 0.97.
A wrong scale or code in a kernel moves logits by whole units at every step (tests/test_intdot.py checks
the kernels to float32 rounding of their own formula)."""
from __future__ import annotations

import os

import pytest
import torch
from helpers import check_against_transformers as check_measured

from offload.formats import PackedLinear

# where scripts/fetch_qwen.py puts it by default (the tests' own OFFLOAD_CACHE is a fresh folder)
QWEN = os.path.expanduser("~/.cache/offload/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")


def check_against_transformers(ours, hf, prompt: str, exact: bool = True) -> None:
    """helpers.check_against_transformers on the prompt as a chat turn, 32 decode steps, FFNs as stored."""
    assert isinstance(ours.model.layers[0].mlp.down, PackedLinear)
    check_measured(ours, hf, ours.chat_ids(prompt), 32, exact)


def test_smollm2_q4_1_as_stored_matches_transformers(smollm2_gguf, smollm2_hf):
    from offload import OffloadedModel

    ours = OffloadedModel.from_pretrained(smollm2_gguf, activations="float32", progress=False)
    check_against_transformers(ours, smollm2_hf, "Write a haiku about the sea.")


def test_smollm2_q4_1_int8_activations_close_to_transformers(smollm2_packed, smollm2_hf):
    check_against_transformers(smollm2_packed, smollm2_hf, "Write a haiku about the sea.", exact=False)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(QWEN), reason="python scripts/fetch_qwen.py assembles the Qwen GGUF")
def test_qwen_q4_k_m_as_stored_matches_transformers():
    from transformers import AutoModelForCausalLM

    from offload import OffloadedModel

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(QWEN), gguf_file=QWEN, dtype=torch.float32).eval()
    prompt = "Write a Python function that reverses a string."
    for activations in ("float32", "int8"):
        ours = OffloadedModel.from_pretrained(QWEN, activations=activations, progress=False)
        check_against_transformers(ours, hf, prompt, exact=activations == "float32")
        del ours
