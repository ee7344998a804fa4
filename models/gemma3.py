"""Gemma 3 text models (Gemma3ForCausalLM, and the text part of a ``gemma3`` GGUF).

What differs from the LLaMA family (models/llama.py), after transformers' modeling_gemma3.py:
* the embedding is scaled by √hidden_size (in the model's dtype), the head is tied;
* RMSNorm computes x·(1 + w) in fp32 (checkpoints store w centred on 0), four per block: input,
  post-attention, pre-feedforward, post-feedforward; each half is x + post_norm(f(pre_norm(x)));
* q and k are RMS-normed per head (q_norm, k_norm) before RoPE, and scores scaled by
  query_pre_attn_scalar^-½ instead of head_dim^-½;
* ``layer_types``: sliding-window layers (a query sees the last ``sliding_window`` positions) use the
  local rope θ (rope_local_base_freq), full-attention layers the global θ and any rope scaling;
* the FFN is gated GELU (tanh approximation): FFNKind.GEGLU, which only the torch paths compute
  (models.ffn_kind), so a Gemma model runs dense;
* optional tanh soft-capping of the final logits. ``attn_logit_softcapping`` (Gemma 2's score cap) is
  read but, as in transformers' Gemma3Attention and llama.cpp's gemma3, not applied.

Shapes: b batch, t tokens, d hidden, n FFN neurons, h / kvh query / key-value heads, hd head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from offload.errors import UnsupportedModelError
from offload.models.common import (DecoderConfig, DecoderLM, KVCache, Linear, RMSNorm, RopeCache, apply_rope,
                                   cached_attention, fused_block_sources, rope_inv_freq)
from offload.models.ffn_kind import FFNKind
from offload.models.llama import GatedFFN

MODEL_TYPES = ("gemma3_text",)
SLIDING, FULL = "sliding_attention", "full_attention"
KIND_OF_HIDDEN_ACTIVATION = {"gelu_pytorch_tanh": FFNKind.GEGLU}


@dataclass(frozen=True)
class Gemma3Config(DecoderConfig):
    layer_types: tuple[str, ...]
    sliding_window: int | None = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # full-attention layers
    rope_scaling: dict | None = None  # full-attention layers
    rope_local_theta: float = 10_000.0  # sliding-window layers
    rope_local_scaling: dict | None = None
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None  # not applied (module docstring)
    final_logit_softcapping: float | None = None
    attention_bias: bool = False
    ffn_kind: FFNKind = FFNKind.GEGLU
    tie_word_embeddings: bool = True
    model_type: str = "gemma3_text"

    @classmethod
    def from_hf(cls, cfg: dict) -> "Gemma3Config":
        """From a HF config.json dict (Gemma3TextConfig); unknown keys are ignored. Both transformers 4's rope
        keys (rope_theta, rope_local_base_freq, rope_scaling for the global layers; sliding_window_pattern)
        and transformers 5's (rope_parameters per layer type; layer_types) are understood."""
        model_type = cfg.get("model_type", "gemma3_text")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in KIND_OF_HIDDEN_ACTIVATION:
            raise UnsupportedModelError(f"hidden_activation {act!r} is not supported for {model_type}; supported: "
                                        f"{sorted(KIND_OF_HIDDEN_ACTIVATION)}")
        if cfg.get("use_bidirectional_attention"):
            raise UnsupportedModelError(f"{model_type} with use_bidirectional_attention=true (an encoder) is not "
                                        "supported; offload runs causal decoders")
        layers = cfg["num_hidden_layers"]
        rope = dict(cfg.get("rope_parameters") or {})
        if FULL not in rope and SLIDING not in rope:  # one flat dict: the global layers'
            rope = {FULL: rope} if rope else {}
        full, local = dict(rope.get(FULL) or {}), dict(rope.get(SLIDING) or {})
        layer_types = cfg.get("layer_types")
        if not layer_types:
            pattern = int(cfg.get("sliding_window_pattern") or 6)
            layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
        bad = sorted(set(layer_types) - {SLIDING, FULL})
        if bad or len(layer_types) != layers:
            raise UnsupportedModelError(f"{model_type}: layer_types must list {layers} of {SLIDING!r} / {FULL!r}, "
                                        f"got {bad or len(layer_types)}")
        return cls(
            **cls.hf_common(cfg, max_position_embeddings=131_072),
            layer_types=tuple(layer_types),
            sliding_window=cfg.get("sliding_window", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(full.get("rope_theta", cfg.get("rope_theta", 1_000_000.0))),
            rope_scaling=_scaling(cfg.get("rope_scaling") or full),
            rope_local_theta=float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))),
            rope_local_scaling=_scaling(local),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", 256)),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping"),
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            attention_bias=bool(cfg.get("attention_bias", False)),
            ffn_kind=KIND_OF_HIDDEN_ACTIVATION[act],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            model_type=model_type,
        )


def _scaling(params: dict) -> dict | None:
    """A rope dict → the scaling models.common.rope_inv_freq takes (None for the default rope)."""
    kind = params.get("rope_type", params.get("type", "default"))
    return None if kind == "default" else {k: v for k, v in params.items() if k != "rope_theta"}


def expected_tensors(cfg: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, HF names → shapes."""
    d, n, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = cfg.head_tensors()
    for i in range(cfg.num_hidden_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        shapes.update({p + norm + ".weight": (d,) for norm in _NORMS.values()})
        shapes.update({
            a + "q_proj.weight": (q_out, d), a + "k_proj.weight": (kv_out, d), a + "v_proj.weight": (kv_out, d),
            a + "o_proj.weight": (d, q_out), a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (n, d), p + "mlp.up_proj.weight": (n, d), p + "mlp.down_proj.weight": (d, n),
        })
        if cfg.attention_bias:
            shapes.update({a + "q_proj.bias": (q_out,), a + "k_proj.bias": (kv_out,), a + "v_proj.bias": (kv_out,),
                           a + "o_proj.bias": (d,)})
    return shapes


def ignorable_tensor(name: str, cfg: Gemma3Config) -> bool:
    """Tensors a checkpoint may hold that we do not need (a tied head saved anyway, rotary buffers)."""
    return "rotary_emb." in name or name.endswith("embed_scale") or \
        (cfg.tie_word_embeddings and name == "lm_head.weight")


# Block norm (its attribute here) → its HF name.
_NORMS = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
          "ffn_norm": "pre_feedforward_layernorm", "ffn_post_norm": "post_feedforward_layernorm"}


class Attention(nn.Module):
    """Causal self-attention with per-head q/k RMSNorm, RoPE, GQA and an optional sliding window.
    qkv: a Linear [(h + 2·kvh)·hd ← d] (q rows, then k, then v); o [d ← h·hd]."""

    def __init__(self, cfg: Gemma3Config, sliding: bool, dtype, device):
        super().__init__()
        self.h, self.kvh, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, (self.h + 2 * self.kvh) * self.hd, cfg.attention_bias, dtype, device)
        self.o = Linear(self.h * self.hd, cfg.hidden_size, cfg.attention_bias, dtype, device)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps, unit_offset=True)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps, unit_offset=True)
        self.window = cfg.sliding_window if sliding else None
        self.scale = cfg.query_pre_attn_scalar ** -0.5

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, start: int):
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, self.h + 2 * self.kvh, self.hd).transpose(1, 2)
        q = apply_rope(self.q_norm(qkv[:, : self.h]), cos, sin)
        k = apply_rope(self.k_norm(qkv[:, self.h: self.h + self.kvh]), cos, sin)
        out = cached_attention(q, k, qkv[:, self.h + self.kvh:], cache, layer, start, self.scale, self.window)
        return self.o(out.transpose(1, 2).reshape(b, t, self.h * self.hd))

    def extra_repr(self) -> str:
        return f"h={self.h}, kvh={self.kvh}, hd={self.hd}, window={self.window}"


class Block(nn.Module):
    """x + post_norm(attn(norm(x))), then x + post_norm(mlp(norm(x))). The FFN is called as a module
    (``mlp(x)``), never through ``FFNModule.residual`` (which would skip the post-norm)."""

    def __init__(self, cfg: Gemma3Config, layer_type: str, dtype, device):
        super().__init__()
        self.layer_type = layer_type
        for name in _NORMS:
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True))
        self.attn = Attention(cfg, layer_type == SLIDING and cfg.sliding_window is not None, dtype, device)
        self.mlp = GatedFFN(cfg.hidden_size, cfg.intermediate_size, cfg.ffn_kind, False, dtype, device)

    def forward(self, x, cos, sin, cache, layer, start):
        x = x + self.attn_post_norm(self.attn(self.attn_norm(x), cos, sin, cache, layer, start))
        return x + self.ffn_post_norm(self.mlp(self.ffn_norm(x)))


class Gemma3Model(DecoderLM):
    """The dense decoder. ``forward(ids [b, t], cache, start) → logits [b, t, V]``."""

    def __init__(self, cfg: Gemma3Config, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(cfg, dtype, device, (Block(cfg, kind, dtype, device) for kind in cfg.layer_types),
                         RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True))
        hd, ctx = cfg.head_dim, cfg.max_position_embeddings
        self.ropes = {FULL: RopeCache(*rope_inv_freq(hd, cfg.rope_theta, cfg.rope_scaling, ctx)),
                      SLIDING: RopeCache(*rope_inv_freq(hd, cfg.rope_local_theta, cfg.rope_local_scaling, ctx))}

    def block_sources(self, p: str, m: str) -> dict[str, tuple[str, ...]]:
        src = {p + name + ".weight": (m + hf + ".weight",) for name, hf in _NORMS.items()}
        src.update({p + f"attn.{qk}_norm.weight": (m + f"self_attn.{qk}_norm.weight",) for qk in "qk"})
        bias = self.config.attention_bias
        return {**src, **fused_block_sources(p, m, bias, bias, False)}

    def new_cache(self, batch: int, max_len: int, device=None) -> KVCache:
        """Keys and values of every position for every layer (sliding-window layers read only their window)."""
        c = self.config
        return KVCache.allocate(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim,
                                self.dtype, device or self.device)

    def hidden_states(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Final-norm hidden states [b, t, d]."""
        x = self.embed(ids).to(self.dtype)
        x = x * torch.tensor(self.config.hidden_size ** 0.5).to(x.dtype)  # fp32, then x's dtype: as transformers
        tables = {kind: rope(start, ids.shape[1], x.dtype, x.device) for kind, rope in self.ropes.items()}
        for i, layer in enumerate(self.layers):
            x = layer(x, *tables[layer.layer_type], cache, i, start)
        return self.norm(x)

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        x = self.hidden_states(ids, cache, start)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap
