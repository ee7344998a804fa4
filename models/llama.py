"""LLaMA family: LLaMA 1–3.x, Mistral, Qwen2, SmolLM; SwiGLU, ReLU (ReluLLaMA, ProSparse) and dReLU FFNs.

Shapes: b batch, t tokens, d hidden, n FFN neurons, h / kvh query / key-value heads, hd head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from offload.errors import UnsupportedModelError
from offload.models.common import (DecoderLM, DecoderConfig, FFNModule, KVCache, Linear, RMSNorm, RopeCache,
                                   apply_rope, cached_attention, fused_block_sources, rope_inv_freq)
from offload.models.ffn_kind import GATED_KIND_OF_HIDDEN_ACT, FFNKind, activation

MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class LlamaConfig(DecoderConfig):
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    ffn_kind: FFNKind = FFNKind.SWIGLU  # swiglu | relu | drelu
    attention_bias: bool = False  # bias on q, k, v (Qwen2 always; LLaMA when attention_bias=true)
    attention_out_bias: bool = False  # bias on o_proj (LLaMA attention_bias=true only)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        """From a HF config.json dict; unknown keys are ignored. Both the transformers 4 rope keys
        (rope_theta, rope_scaling) and the transformers 5 one (rope_parameters) are understood."""
        model_type = cfg.get("model_type", "llama")
        act = cfg.get("hidden_act", "silu")
        if act not in GATED_KIND_OF_HIDDEN_ACT:
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported for {model_type}; supported: "
                                        f"{sorted(GATED_KIND_OF_HIDDEN_ACT)}")
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        qwen = model_type == "qwen2"
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            **cls.hf_common(cfg, max_position_embeddings=2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=dict(scaling) if scaling else None,
            ffn_kind=GATED_KIND_OF_HIDDEN_ACT[act],
            attention_bias=qwen or bias,
            attention_out_bias=bias and not qwen,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            model_type=model_type,
        )


def expected_tensors(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, HF names → shapes."""
    d, n, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = cfg.head_tensors()
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q_out, d),
            p + "self_attn.k_proj.weight": (kv_out, d),
            p + "self_attn.v_proj.weight": (kv_out, d),
            p + "self_attn.o_proj.weight": (d, q_out),
            p + "mlp.gate_proj.weight": (n, d),
            p + "mlp.up_proj.weight": (n, d),
            p + "mlp.down_proj.weight": (d, n),
        })
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                           p + "self_attn.v_proj.bias": (kv_out,)})
        if cfg.attention_out_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if cfg.mlp_bias:
            shapes.update({p + "mlp.gate_proj.bias": (n,), p + "mlp.up_proj.bias": (n,),
                           p + "mlp.down_proj.bias": (d,)})
    return shapes


# Tensors a checkpoint may hold that we do not need (tied heads saved anyway, old rotary buffers).
def ignorable_tensor(name: str, cfg: LlamaConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


class GatedFFN(FFNModule):
    """down(act(gate(x)) ⊙ up(x)). Neuron i is row i of gate and up and column i of down.

    gate_up: a Linear [2n ← d] holding the gate rows then the up rows (one product at decode); down [d ← n].
    """

    def __init__(self, d: int, n: int, kind: FFNKind, bias: bool, dtype=torch.float32, device=None):
        super().__init__()
        kind = FFNKind.of(kind)
        if not kind.gated:
            raise UnsupportedModelError(f"FFN kind {kind.value!r} has no gate; GatedFFN takes swiglu, relu, drelu")
        self.kind, self.n = kind, n
        self.gate_up = Linear(d, 2 * n, bias, dtype, device)
        self.down = Linear(n, d, bias, dtype, device)

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-neuron activations [..., n]: the value each neuron contributes, times its down column."""
        g, u = self.gate_up(x).split(self.n, dim=-1)
        return activation(self.kind, g, u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.intermediate(x))


class Attention(nn.Module):
    """Causal self-attention with RoPE and GQA. qkv: a Linear [(h + 2·kvh)·hd ← d] (q rows, then k, then
    v); o [d ← h·hd]."""

    def __init__(self, cfg: LlamaConfig, dtype, device):
        super().__init__()
        self.h, self.kvh, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_out = (self.h + 2 * self.kvh) * self.hd
        self.qkv = Linear(cfg.hidden_size, qkv_out, cfg.attention_bias, dtype, device)
        self.o = Linear(self.h * self.hd, cfg.hidden_size, cfg.attention_out_bias, dtype, device)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, start: int):
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, self.h + 2 * self.kvh, self.hd).transpose(1, 2)
        # RoPE on the q and k heads together (one set of ops instead of two): [b, h + kvh, t, hd].
        qk = apply_rope(qkv[:, : self.h + self.kvh], cos, sin)
        q, k, v = qk[:, : self.h], qk[:, self.h:], qkv[:, self.h + self.kvh:]
        out = cached_attention(q, k, v, cache, layer, start)
        return self.o(out.transpose(1, 2).reshape(b, t, self.h * self.hd))

    def residual(self, x, norm: RMSNorm, cos, sin, cache: KVCache | None, layer: int, start: int):
        """x + self(norm(x)): the attention half of a block (offload.cpu's decode swap does it in one call)."""
        return x + self(norm(x), cos, sin, cache, layer, start)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, dtype, device):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, dtype, device)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedFFN(cfg.hidden_size, cfg.intermediate_size, cfg.ffn_kind, cfg.mlp_bias, dtype, device)

    def forward(self, x, cos, sin, cache, layer, start):
        x = self.attn.residual(x, self.attn_norm, cos, sin, cache, layer, start)
        return self.mlp.residual(x, self.ffn_norm)


def layer_home(layer: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a block computes: its norm weight's device and dtype (storage formats that keep 16-bit or
    packed weights under fp32 activations keep fp32 norms)."""
    w = layer.attn_norm.weight
    return w.device, w.dtype


class LlamaLayers(nn.ModuleList):
    """The blocks, run in order: ``forward(x [b, t, d], rope, cache, start) → x`` after the last block.
    Blocks may live on different devices and dtypes (offload.layer_split): x moves to each block's
    home on the way, with RoPE tables made there. A ModuleList: parameter names stay ``layers.<i>.…``.
    Decode transforms swap it for a subclass (offload.cpu.decode runs each block of a CPU token in one
    call)."""

    def forward(self, x: torch.Tensor, rope, cache: KVCache | None, start: int) -> torch.Tensor:
        home = (x.device, x.dtype)
        cos, sin = rope(start, x.shape[1], x.dtype, x.device)
        for i, layer in enumerate(self):
            w = layer.attn_norm.weight
            if w.device != home[0] or w.dtype != home[1]:
                x = x.to(w.device, w.dtype)
                home = (w.device, w.dtype)
                cos, sin = rope(start, x.shape[1], x.dtype, x.device)
            x = layer(x, cos, sin, cache, i, start)
        return x


class LlamaModel(DecoderLM):
    """The dense decoder. ``forward(ids [b, t], cache, start) → logits [b, t, V]``."""

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(cfg, dtype, device, (Block(cfg, dtype, device) for _ in range(cfg.num_hidden_layers)),
                         RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
        self.rope = RopeCache(*rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                             cfg.max_position_embeddings))
        self.layers = LlamaLayers(self.layers)
        self.kv_dtype: torch.dtype | None = None  # the KV cache's dtype; None: the layers' (offload.cpu.decode)

    def block_sources(self, p: str, m: str) -> dict[str, tuple[str, ...]]:
        c = self.config
        return {p + "attn_norm.weight": (m + "input_layernorm.weight",),
                p + "ffn_norm.weight": (m + "post_attention_layernorm.weight",),
                **fused_block_sources(p, m, c.attention_bias, c.attention_out_bias, c.mlp_bias)}

    def new_cache(self, batch: int, max_len: int, device=None) -> KVCache:
        c = self.config
        homes = [layer_home(layer) for layer in self.layers]
        if device is None and len(set(homes)) > 1:  # layers split across devices (offload.layer_split)
            return KVCache.allocate_per_layer(homes, batch, c.num_key_value_heads, max_len, c.head_dim)
        home_device, home_dtype = homes[0]
        return KVCache.allocate(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim,
                                self.kv_dtype or home_dtype, device or home_device)

    def hidden_states(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Final-norm hidden states [b, t, d]. Layers may live on different devices and dtypes
        (offload.layer_split): x moves to each layer's home on the way."""
        x = self.layers(self.embed(ids).to(self.dtype), self.rope, cache, start)
        w = self.norm.weight
        return self.norm(x if (w.device, w.dtype) == (x.device, x.dtype) else x.to(w.device, w.dtype))

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        x = self.hidden_states(ids, cache, start)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)
