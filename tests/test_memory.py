"""Memory accounting: bytes accounted from the config equal the bytes of the tensors actually built."""
import numpy as np
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


# --------------------------------------------------------------------------------------------------
# Packed 4-bit hot rows (hot_format): the plan counts the tensors apply_placement builds
# --------------------------------------------------------------------------------------------------
PACKABLE = {  # widths in groups of 32 (the K type: 256) so that every layout applies
    "llama": (llama.LlamaModel, llama.LlamaConfig(**{**LLAMA, "hidden_size": 64, "intermediate_size": 96,
                                                     "head_dim": 16, "num_attention_heads": 4})),
    "opt": (opt.OPTModel, opt.OPTConfig(**{**OPT, "ffn_dim": 96}, tie_word_embeddings=True)),
}


def random_model(model_cls, cfg, seed=0):
    model = model_cls(cfg, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    return model


def hot_sets(plan):
    """Some neurons hot in the first layer, none in the second, all in the last."""
    rng = np.random.default_rng(0)
    n = plan.neurons
    return [np.sort(rng.choice(n[0], n[0] // 3, replace=False)), np.arange(0)] + [np.arange(k) for k in n[2:]]


@pytest.mark.parametrize("case", sorted(PACKABLE))
@pytest.mark.parametrize("hot_dtype", [torch.float32, torch.float16])
def test_packed_plan_equals_built_tensors(case, hot_dtype):
    from offload.hybrid import apply_placement

    model_cls, cfg = PACKABLE[case]
    model = random_model(model_cls, cfg)
    plan = plan_memory(cfg, dtype=hot_dtype, device="cpu", hot_format="int4")
    dense_plan = plan_memory(cfg, dtype=hot_dtype, device="cpu")
    assert plan.fixed_bytes == dense_plan.fixed_bytes and plan.hot_format == "int4"
    hot = hot_sets(plan)
    apply_placement(model, hot, None, device="cpu", hot_dtype=hot_dtype, hot_format="int4")
    for layer, h, nb, table in zip(model.layers, hot, plan.neuron_bytes, plan.layer_bytes):
        assert layer.mlp.hot_nbytes == len(h) * nb + (table if len(h) else 0)
    # all hot: every layer's rows and table
    everything = random_model(model_cls, cfg)
    apply_placement(everything, [np.arange(k) for k in plan.neurons], None, device="cpu", hot_dtype=hot_dtype,
                    hot_format="int4")
    assert sum(layer.mlp.hot_nbytes for layer in everything.layers) == plan.ffn_bytes
    # ~3.4× fewer bytes a neuron than at fp16 (d = 32..64 here: the group scales weigh a bit more)
    assert plan_memory(cfg, dtype="float16").neuron_bytes[0] / plan.neuron_bytes[0] > 2.5
    model.hybrid_worker.close()
    everything.hybrid_worker.close()


def test_report_plan_for_a_gguf_packed_model_equals_built():
    """The report's placement for a model whose FFNs are GGUF blocks (Q4_K gate/up; Q4_0 down, and a Q6_K
    down that the hot side quantizes to int4): per-layer layouts from packed_hot_layouts, and the bytes the
    report counts on the GPU are the bytes of the hot tensors built."""
    from offload.hybrid import apply_placement
    from offload.packed_hot import packed_hot_layouts
    from offload.place.report import build_report
    from test_hybrid_packed import gguf_ffn_model

    model = gguf_ffn_model()
    layouts = packed_hot_layouts(model)
    cfg = model.config
    base = plan_memory(cfg, dtype="float16", context=16)
    rng = np.random.default_rng(3)
    freqs = [rng.random(512) ** 3 for _ in range(2)]
    held: list = []
    r = build_report(cfg, budget=base.fixed_bytes + 300_000, frequencies=freqs, context=16, cpu_bw=1e10,
                     gpu="H100 SXM", hot_format=layouts, placement_out=held)
    plan, placement, _ = held
    assert r["hot_format"] == "int4" and plan.layer_bytes[0] != plan.layer_bytes[1]
    assert 0 < r["placement"]["hot_neurons"] < 1024
    apply_placement(model, placement.hot, None, device="cpu", hot_format="int4")
    built = [layer.mlp.hot_nbytes for layer in model.layers]
    assert sum(built) == r["memory"]["gpu_hot_ffn_bytes"] == placement.hot_bytes
    assert [row["gpu_mib"] * 2**20 for row in r["layers"]] == pytest.approx(built, abs=1e-6)
    assert r["memory"]["gpu_total_bytes"] <= r["budget_bytes"]
    model.hybrid_worker.close()


def test_hot_format_checks():
    cfg = CASES["llama-untied"][1]  # d = 48: not in groups of 32
    with pytest.raises(ValueError, match="multiple of 32 columns, got 48"):
        plan_memory(cfg, hot_format="int4")
    cfg = PACKABLE["llama"][1]
    with pytest.raises(ValueError, match="expected one of int4, q4_0"):
        plan_memory(cfg, hot_format="int8")
    with pytest.raises(ValueError, match="2 per-layer"):
        plan_memory(cfg, hot_format=[("q4_0", "q4_0")] * 2)
    with pytest.raises(ValueError, match="multiple of 256"):
        plan_memory(cfg, hot_format="q4_k")
    by_layer = plan_memory(cfg, hot_format=[("q4_0", "q4_1"), ("int4", "int4"), ("q4_1", "q4_0")])
    d, n = 64, 96
    assert by_layer.neuron_bytes == (2 * (32 + 4) + 36, 2 * (32 + 8) + 36, 2 * (32 + 8) + 36)
    assert by_layer.layer_bytes == (n * d // 8, n * d // 8, n * d // 16)
