"""generate(): greedy parity with transformers on SmolLM2, sampling controls, the streamer."""
from __future__ import annotations

import pytest
import torch

# Prompts whose greedy answers run past 64 tokens, so all 64 new tokens are compared.
PROMPTS = ["Explain how a hash table works.", "Write a short poem about autumn leaves.",
           "Give me three tips for learning to cook."]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_transformers_64_tokens(smollm2_ours, smollm2_hf, prompt):
    ids = smollm2_ours.chat_ids(prompt)
    ours = smollm2_ours.generate(ids, max_new_tokens=64, do_sample=False)
    with torch.no_grad():
        ref = smollm2_hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False)
    assert ours.shape[1] == ids.shape[1] + 64
    assert ours.tolist() == ref.tolist()


def test_france_answer(smollm2_ours):
    ids = smollm2_ours.chat_ids("What is the capital of France?")
    out = smollm2_ours.generate(ids, max_new_tokens=20)
    text = smollm2_ours.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.strip() == "The capital of France is Paris."
    stats = smollm2_ours.last_stats
    assert stats.prompt_tokens == ids.shape[1] and stats.new_tokens == out.shape[1] - ids.shape[1]
    assert stats.prefill_seconds > 0 and stats.decode_seconds > 0


def test_text_streamer_streams_generate_output(smollm2_ours, capsys):
    from transformers import TextStreamer

    ids = smollm2_ours.chat_ids("What is the capital of France?")
    streamer = TextStreamer(smollm2_ours.tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = smollm2_ours.generate(ids, max_new_tokens=20, streamer=streamer)
    printed = capsys.readouterr().out
    expected = smollm2_ours.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert printed.strip() == expected.strip() and "Paris" in printed


def test_seed_makes_sampling_reproducible(smollm2_ours):
    ids = smollm2_ours.chat_ids("Tell me a story.")
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.3, top_k=40, top_p=0.95, eos_token_id=[])
    a = smollm2_ours.generate(ids, seed=7, **kw)
    b = smollm2_ours.generate(ids, seed=7, **kw)
    c = smollm2_ours.generate(ids, seed=8, **kw)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_eos_stops_and_stop_strings(smollm2_ours):
    ids = smollm2_ours.chat_ids("What is the capital of France?")
    out = smollm2_ours.generate(ids, max_new_tokens=40)
    assert out[0, -1].item() == smollm2_ours.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = smollm2_ours.generate(ids, max_new_tokens=40, stop_strings=["France"])
    text = smollm2_ours.tokenizer.decode(out[0, ids.shape[1]:])
    assert text.endswith("France") or text.rstrip().endswith("France")


def test_batch_of_two_equal_length_prompts(smollm2_ours):
    ids = smollm2_ours.chat_ids("What is the capital of France?")
    single = smollm2_ours.generate(ids, max_new_tokens=8, eos_token_id=[])
    both = smollm2_ours.generate(torch.cat([ids, ids]), max_new_tokens=8, eos_token_id=[])
    assert both[0].tolist() == single[0].tolist() == both[1].tolist()


def test_sampling_filters_match_definitions():
    from offload.generation import apply_repetition_penalty, filter_top_k_top_p

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    top2 = filter_top_k_top_p(logits, 2, 1.0)
    assert torch.isinf(top2[0, 2:]).all() and not torch.isinf(top2[0, :2]).any()
    # top_p=0.5: the first token alone has probability > 0.5, so only it survives.
    p = filter_top_k_top_p(logits, 0, 0.5)
    assert not torch.isinf(p[0, 0]) and torch.isinf(p[0, 1:]).all()
    pen = apply_repetition_penalty(logits, torch.tensor([[0, 3]]), 2.0)
    assert pen[0, 0].item() == 1.0 and pen[0, 3].item() == -2.0 and pen[0, 1].item() == 1.0


def test_repetition_penalty_matches_transformers_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from offload.generation import apply_repetition_penalty

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    seen = torch.tensor([[1, 4, 4, 9], [0, 2, 3, 3]])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), expected)


def test_cli_generate_in_a_fresh_process(smollm2_gguf):
    """The README's main job as a user runs it: the `offload generate` script in its own process (a crash
    that only a fresh process shows, such as numba's pool not yet started, fails here)."""
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(sys.executable), "offload")
    cmd = [script, "generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "12",
           "--activations", "float32"]  # transformers' numbers (test_cli's chat test says why)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout and "decode:" in proc.stderr, (proc.stdout, proc.stderr[-1000:])


def test_min_p_matches_transformers_warper():
    from transformers.generation.logits_process import MinPLogitsWarper

    from offload.generation import filter_min_p

    logits = torch.randn(3, 60, generator=torch.Generator().manual_seed(1)) * 3
    for min_p in (0.0, 0.05, 0.3, 1.0):
        expected = MinPLogitsWarper(min_p)(torch.zeros(3, 1, dtype=torch.long), logits.clone())
        assert torch.equal(filter_min_p(logits, min_p), expected), min_p


def test_min_p_one_keeps_only_the_most_likely_token(tiny_checkpoint):
    """min_p=1 after temperature keeps only the most likely token: sampling then equals greedy decoding."""
    from offload import OffloadedModel

    m = OffloadedModel.from_pretrained(tiny_checkpoint("llama"), progress=False)
    ids = torch.tensor([[5, 17, 3, 42]])
    greedy = m.generate(ids, max_new_tokens=8, eos_token_id=[])
    sampled = m.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, min_p=1.0, seed=3, eos_token_id=[])
    assert sampled.tolist() == greedy.tolist()
    loose = [m.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.5, min_p=0.0, seed=s, eos_token_id=[])
             for s in range(3)]
    assert any(x.tolist() != greedy.tolist() for x in loose)  # without it, sampling does differ
