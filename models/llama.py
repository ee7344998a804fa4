"""LLaMA family: LLaMA 1–3.x, Mistral, Qwen2, SmolLM; SwiGLU, ReLU (ReluLLaMA, ProSparse) and dReLU FFNs.

Shapes: b batch, t tokens, d hidden, n FFN neurons, h / kvh query / key-value heads, hd head dim.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from offload.errors import UnsupportedModelError
from offload.models.common import (KVCache, RMSNorm, _cpu_ops, _half, apply_rope, cached_attention, empty_param, linear,
                                   one_token_cpu_decode, param_loader, rope_inv_freq, rope_tables)

MODEL_TYPES = ("llama", "mistral", "qwen2")
# hidden_act → how the FFN combines gate g and up u before down_proj.
FFN_KINDS = {"silu": "swiglu", "swish": "swiglu", "relu": "relu", "drelu": "drelu"}
FFN_CODES = {"swiglu": 0, "relu": 1, "drelu": 2}  # offload.cpu_ops.gated_ffn_block's activation codes


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    ffn_kind: str = "swiglu"  # "swiglu" | "relu" | "drelu"
    attention_bias: bool = False  # bias on q, k, v (Qwen2 always; LLaMA when attention_bias=true)
    attention_out_bias: bool = False  # bias on o_proj (LLaMA attention_bias=true only)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict) -> "LlamaConfig":
        """From a HF config.json dict; unknown keys are ignored. Both the transformers 4 rope keys
        (rope_theta, rope_scaling) and the transformers 5 one (rope_parameters) are understood."""
        model_type = cfg.get("model_type", "llama")
        act = cfg.get("hidden_act", "silu")
        if act not in FFN_KINDS:
            raise UnsupportedModelError(
                f"hidden_act {act!r} is not supported for {model_type}; supported: {sorted(FFN_KINDS)}")
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        qwen = model_type == "qwen2"
        bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=dict(scaling) if scaling else None,
            ffn_kind=FFN_KINDS[act],
            attention_bias=qwen or bias,
            attention_out_bias=bias and not qwen,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            model_type=model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )


def expected_tensors(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, HF names → shapes."""
    d, n, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
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


class GatedFFN(nn.Module):
    """down(act(gate(x)) ⊙ up(x)). Neuron i is row i of gate and up and column i of down.

    gate_up [2n, d] holds gate rows then up rows (one matmul at decode); down [d, n].
    """

    def __init__(self, d: int, n: int, kind: str, bias: bool, dtype=torch.float32, device=None):
        super().__init__()
        if kind not in ("swiglu", "relu", "drelu"):
            raise UnsupportedModelError(f"FFN kind {kind!r}; supported: swiglu, relu, drelu")
        self.kind, self.n = kind, n
        self.gate_up = empty_param((2 * n, d), dtype, device)
        self.down = empty_param((d, n), dtype, device)
        self.gate_up_bias = empty_param((2 * n,), dtype, device) if bias else None
        self.down_bias = empty_param((d,), dtype, device) if bias else None

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """Per-neuron activations [..., n]: the value each neuron contributes, times its down column."""
        g, u = linear(x, self.gate_up, self.gate_up_bias).split(self.n, dim=-1)
        if self.kind == "swiglu":
            return F.silu(g) * u
        if self.kind == "relu":
            return F.relu(g) * u
        return F.relu(g) * F.relu(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.intermediate(x), self.down, self.down_bias)

    def decode_block(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor | None:
        """x + self(norm(x)) for one fp32 CPU token with fp16-stored weights and no biases, as one
        numba call (offload.cpu_ops.gated_ffn_block); None otherwise."""
        if self.gate_up.dtype != torch.float16 or self.gate_up_bias is not None or norm.weight.dtype != torch.float32:
            return None
        out = np.empty(x.shape[-1], np.float32)
        _cpu_ops().gated_ffn_block(x.numpy().reshape(-1), norm.weight.numpy(), norm.eps,
                                   self.gate_up.numpy().view(np.uint16), self.down.numpy().view(np.uint16),
                                   FFN_CODES[self.kind], _half().pool_threads(), out)
        return torch.from_numpy(out).view(x.shape)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, dtype, device):
        super().__init__()
        self.h, self.kvh, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_out = (self.h + 2 * self.kvh) * self.hd
        self.qkv = empty_param((qkv_out, cfg.hidden_size), dtype, device)  # q rows, then k, then v
        self.qkv_bias = empty_param((qkv_out,), dtype, device) if cfg.attention_bias else None
        self.o = empty_param((cfg.hidden_size, self.h * self.hd), dtype, device)
        self.o_bias = empty_param((cfg.hidden_size,), dtype, device) if cfg.attention_out_bias else None

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, start: int):
        b, t, _ = x.shape
        if cache is not None and one_token_cpu_decode(x) and cache.k[layer].dtype == torch.float32:
            # One numba call for RoPE, the cache write and attention (offload.cpu_ops.attend_one).
            qkv = linear(x, self.qkv, self.qkv_bias).reshape(-1).numpy()
            out = np.empty(self.h * self.hd, np.float32)
            _cpu_ops().attend_one(qkv, cos[0].numpy(), sin[0].numpy(), cache.k[layer][0].numpy(),
                                  cache.v[layer][0].numpy(), start, self.h, self.kvh, out)
            return linear(torch.from_numpy(out).view(1, 1, -1), self.o, self.o_bias)
        qkv = linear(x, self.qkv, self.qkv_bias).view(b, t, self.h + 2 * self.kvh, self.hd).transpose(1, 2)
        # RoPE on the q and k heads together (one set of ops instead of two): [b, h + kvh, t, hd].
        qk = apply_rope(qkv[:, : self.h + self.kvh], cos, sin)
        q, k, v = qk[:, : self.h], qk[:, self.h:], qkv[:, self.h + self.kvh:]
        out = cached_attention(q, k, v, cache, layer, start)
        return linear(out.transpose(1, 2).reshape(b, t, self.h * self.hd), self.o, self.o_bias)


    def decode_block(self, x, norm: RMSNorm, cos, sin, cache: KVCache, layer: int, start: int) -> torch.Tensor:
        """x + self(norm(x)) for one fp32 CPU token with fp16-stored weights, as one numba call
        (offload.cpu_ops.attention_block); tested against the torch path in tests/test_cpu_ops.py."""
        out = np.empty(x.shape[-1], np.float32)
        none = _NO_BIAS
        _cpu_ops().attention_block(
            x.numpy().reshape(-1), norm.weight.numpy(), norm.eps, self.qkv.numpy().view(np.uint16),
            none if self.qkv_bias is None else self.qkv_bias.numpy(), cos[0].numpy(), sin[0].numpy(),
            cache.k[layer][0].numpy(), cache.v[layer][0].numpy(), start, self.h, self.kvh,
            self.o.numpy().view(np.uint16), none if self.o_bias is None else self.o_bias.numpy(),
            _half().pool_threads(), out)
        return torch.from_numpy(out).view(x.shape)


_NO_BIAS = np.zeros(0, np.float32)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, dtype, device):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, dtype, device)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedFFN(cfg.hidden_size, cfg.intermediate_size, cfg.ffn_kind, cfg.mlp_bias, dtype, device)

    def forward(self, x, cos, sin, cache, layer, start):
        if (cache is not None and self.attn.qkv.dtype == torch.float16 and one_token_cpu_decode(x)
                and cache.k[layer].dtype == torch.float32):
            # fp16-stored weights in CPU decode (offload.half): norm, attention and residual in one call
            x = self.attn.decode_block(x, self.attn_norm, cos, sin, cache, layer, start)
        else:
            x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, start)
        if one_token_cpu_decode(x):
            # One CPU token: an FFN may compute norm, FFN and residual in one call (GatedFFN with fp16
            # weights, the all-cold HybridFFN); None means it does not apply here.
            y = self.mlp.decode_block(x, self.ffn_norm) if hasattr(self.mlp, "decode_block") else None
            if y is not None:
                return y
        return x + self.mlp(self.ffn_norm(x))


def layer_home(layer: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a block computes: its norm weight's device and dtype (fp16-stored matrices under fp32
    activations, offload.half, keep fp32 norms)."""
    w = layer.attn_norm.weight
    return w.device, w.dtype


class LlamaModel(nn.Module):
    """The dense decoder. ``forward(ids [b, t], cache, start) → logits [b, t, V]``."""

    def __init__(self, cfg: LlamaConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = cfg
        self.dtype = dtype  # of activations and the KV cache (weights may be stored in fp16: offload.half)
        self.embed = empty_param((cfg.vocab_size, cfg.hidden_size), dtype, device)
        self.layers = nn.ModuleList(Block(cfg, dtype, device) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else empty_param((cfg.vocab_size, cfg.hidden_size), dtype, device)
        inv_freq, scale = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        self._rope = (inv_freq, scale)
        self._rope_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # cos, sin per device

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head

    def new_cache(self, batch: int, max_len: int, device=None) -> KVCache:
        c = self.config
        homes = [layer_home(layer) for layer in self.layers]
        if device is None and len(set(homes)) > 1:  # layers split across devices (offload.layer_split)
            return KVCache.allocate_per_layer(homes, batch, c.num_key_value_heads, max_len, c.head_dim)
        home_device, home_dtype = homes[0]
        return KVCache.allocate(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim,
                                home_dtype, device or home_device)

    def _rope_for(self, start: int, t: int, dtype, device):
        end = start + t
        cos, sin = self._rope_tables.get(device, (None, None))
        if cos is None or cos.shape[0] < end:
            length = max(end, 256, 0 if cos is None else cos.shape[0])
            cos, sin = (tab.to(device) for tab in rope_tables(*self._rope, length))
            self._rope_tables[device] = cos, sin
        return cos[start:end].to(dtype), sin[start:end].to(dtype)

    def hidden_states(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """Final-norm hidden states [b, t, d]. Layers may live on different devices and dtypes
        (offload.layer_split): x moves to each layer's home on the way."""
        x = F.embedding(ids, self.embed).to(self.dtype)
        home = (x.device, x.dtype)
        cos, sin = self._rope_for(start, ids.shape[1], x.dtype, x.device)
        for i, layer in enumerate(self.layers):
            w = layer.attn_norm.weight
            if w.device != home[0] or w.dtype != home[1]:
                x = x.to(w.device, w.dtype)
                home = (w.device, w.dtype)
                cos, sin = self._rope_for(start, ids.shape[1], x.dtype, x.device)
            x = layer(x, cos, sin, cache, i, start)
        w = self.norm.weight
        return self.norm(x if (w.device, w.dtype) == home else x.to(w.device, w.dtype))

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        x = self.hidden_states(ids, cache, start)
        if last_only:
            x = x[:, -1:]
        return linear(x, self.head_weight)

    @torch.no_grad()
    def load_weights(self, get) -> None:
        """Fill the parameters from ``get(hf_name) → tensor`` (names already checked against
        expected_tensors). Fuses q/k/v and gate/up as it goes."""
        put = param_loader(get, self.embed.dtype, self.embed.device)

        put(self, "embed", "model.embed_tokens.weight")
        put(self.norm, "weight", "model.norm.weight")
        if self.lm_head is not None:
            put(self, "lm_head", "lm_head.weight")
        c = self.config
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            put(layer.attn_norm, "weight", p + "input_layernorm.weight")
            put(layer.ffn_norm, "weight", p + "post_attention_layernorm.weight")
            a = p + "self_attn."
            put(layer.attn, "qkv", a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight")
            put(layer.attn, "o", a + "o_proj.weight")
            if c.attention_bias:
                put(layer.attn, "qkv_bias", a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias")
            if c.attention_out_bias:
                put(layer.attn, "o_bias", a + "o_proj.bias")
            m = p + "mlp."
            put(layer.mlp, "gate_up", m + "gate_proj.weight", m + "up_proj.weight")
            put(layer.mlp, "down", m + "down_proj.weight")
            if c.mlp_bias:
                put(layer.mlp, "gate_up_bias", m + "gate_proj.bias", m + "up_proj.bias")
                put(layer.mlp, "down_bias", m + "down_proj.bias")
