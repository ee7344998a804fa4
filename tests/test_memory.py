"""Memory accounting: bytes accounted from the config equal the bytes of the tensors actually built."""
import pytest
import torch

from offload.errors import BudgetError
from offload.models import llama, opt
from offload.place.memory import DEFAULT_CONTEXT_RESERVE, classify_tensor, plan_memory

LLAMA = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
OPT = dict(vocab_size=101, hidden_size=32, ffn_dim=72, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=40, word_embed_proj_dim=32)

CASES = {
    "llama-untied": (llama.LlamaModel, llama.LlamaConfig(**LLAMA, tie_word_embeddings=False)),
    "llama-tied": (llama.LlamaModel, llama.LlamaConfig(**LLAMA, tie_word_embeddings=True)),
    "qwen2-biases": (llama.LlamaModel, llama.LlamaConfig(**LLAMA, attention_bias=True, attention_out_bias=True,
                                                         mlp_bias=True, model_type="qwen2")),
    "opt-tied": (opt.OPTModel, opt.OPTConfig(**OPT, tie_word_embeddings=True)),
    "opt-untied-project": (opt.OPTModel, opt.OPTConfig(**{**OPT, "word_embed_proj_dim": 16},
                                                       tie_word_embeddings=False)),
}


def built_bytes(model, cache) -> int:
    """Every parameter once (a tied head shares the embedding's storage) plus the KV cache."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total + cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()


def ffn_neuron_bytes(mlp) -> int:
    """Bytes indexed by neuron: gate/up (fc1) rows with their biases, and down (fc2) columns."""
    ins = [mlp.gate_up.weight, mlp.gate_up.bias] if hasattr(mlp, "gate_up") else [mlp.fc1.weight, mlp.fc1.bias]
    out = mlp.down.weight if hasattr(mlp, "down") else mlp.fc2.weight
    return sum(t.numel() * t.element_size() for t in (*ins, out) if t is not None)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batch, context", [(1, 16), (2, 7)])
def test_accounted_bytes_equal_built_tensors(case, batch, context):
    model_cls, cfg = CASES[case]
    model = model_cls(cfg, dtype=torch.float32, device="cpu")
    cache = model.new_cache(batch, context)
    plan = plan_memory(cfg, dtype=torch.float32, device="cpu", context=context, batch=batch)
    assert plan.device_bytes["kv_cache"] == cache.nbytes
    assert plan.weight_bytes + plan.device_bytes["kv_cache"] == built_bytes(model, cache)
    # The fixed part plus every neuron is the whole model, once (single device, no predictors).
    extras = sum(plan.device_bytes[k] for k in ("kv_cache", "scratch", "predictors", "context_reserve"))
    assert plan.fixed_bytes - extras + plan.ffn_bytes == plan.weight_bytes
    assert plan.device_bytes["context_reserve"] == 0 and plan.host_bytes == {}
    for layer, n, nb in zip(model.layers, plan.neurons, plan.neuron_bytes):
        assert n == cfg.intermediate_size
        assert n * nb == ffn_neuron_bytes(layer.mlp)


def test_neuron_bytes_per_family():
    d = LLAMA["hidden_size"]
    assert plan_memory(CASES["llama-tied"][1], dtype="float16").neuron_bytes == (3 * d * 2,) * 3
    assert plan_memory(CASES["qwen2-biases"][1], dtype="bf16").neuron_bytes == ((3 * d + 2) * 2,) * 3
    assert plan_memory(CASES["opt-tied"][1], dtype="float32").neuron_bytes == ((2 * OPT["hidden_size"] + 1) * 4,) * 2


def test_tied_head_counted_once_and_embedding_on_host():
    tied, untied = CASES["llama-tied"][1], CASES["llama-untied"][1]
    table = LLAMA["vocab_size"] * LLAMA["hidden_size"] * 2
    a = plan_memory(tied, dtype="float16")
    assert a.device_bytes["embeddings"] == table and a.device_bytes["head"] == 0
    b = plan_memory(untied, dtype="float16")
    assert b.device_bytes["embeddings"] == table and b.device_bytes["head"] == table
    c = plan_memory(untied, dtype="float16", embed_on_host=True)  # the table moves to CPU RAM
    assert c.device_bytes["embeddings"] == 0 and c.host_bytes == {"embeddings": table}
    assert c.weight_bytes == b.weight_bytes and c.fixed_bytes == b.fixed_bytes - table
    d = plan_memory(tied, dtype="float16", embed_on_host=True)  # the head still needs it on the device
    assert d.device_bytes["embeddings"] == table and d.host_bytes == {"embeddings": table}
    assert d.weight_bytes == a.weight_bytes + table


def test_kv_scratch_reserve_predictors():
    cfg = CASES["llama-untied"][1]
    plan = plan_memory(cfg, dtype="float16", kv_dtype="float32", context=100, batch=3, predictor_bytes=1000)
    assert plan.device_bytes["kv_cache"] == 2 * 3 * 3 * 2 * 100 * 8 * 4
    assert plan.device_bytes["context_reserve"] == DEFAULT_CONTEXT_RESERVE
    assert plan.device_bytes["predictors"] == 3000
    assert plan.device_bytes["scratch"] == 3 * 97 * 4 + 6 * 3 * 1 * max(48, 160, (6 + 4) * 8) * 2
    assert plan_memory(cfg, context_reserve=5).device_bytes["context_reserve"] == 5
    assert plan_memory(cfg, predictor_bytes=[1, 2, 3]).device_bytes["predictors"] == 6
    with pytest.raises(ValueError, match="3 layers"):
        plan_memory(cfg, predictor_bytes=[1, 2])


def test_hf_dict_config_and_check_fits():
    hf = {"model_type": "llama", "vocab_size": 97, "hidden_size": 48, "intermediate_size": 80,
          "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2}
    plan = plan_memory(hf, context=64)
    assert plan.neurons == (80, 80, 80)
    plan.check_fits(plan.fixed_bytes)
    with pytest.raises(BudgetError) as e:
        plan.check_fits(plan.fixed_bytes - 1000)
    msg = str(e.value)
    assert f"({plan.fixed_bytes - 1000} bytes)" in msg and f"({plan.fixed_bytes} bytes: " in msg
    assert "shortfall" in msg and "kv cache" in msg and "context of 64 tokens" in msg
    assert "shorter context" in msg and "device='cpu'" in msg


@pytest.mark.parametrize("name, role", [
    ("model.embed_tokens.weight", "embeddings"), ("model.decoder.embed_positions.weight", "positions"),
    ("lm_head.weight", "head"), ("model.layers.3.input_layernorm.weight", "norms"),
    ("model.decoder.layers.0.self_attn_layer_norm.bias", "norms"),
    ("model.layers.1.self_attn.q_proj.bias", "attention"),
    ("model.layers.0.mlp.gate_proj.weight", "ffn_in"), ("model.decoder.layers.2.fc2.bias", "ffn_out"),
    ("model.decoder.project_out.weight", "projections"), ("some.unknown.tensor", "other")])
def test_classify(name, role):
    assert classify_tensor(name) == role
