"""Pieces shared by the architecture files: RMSNorm, RoPE tables, the preallocated KV cache, attention,
and the base classes of the modules the engine swaps (FFNs and attention)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from offload.errors import UnsupportedModelError


def empty_param(shape, dtype, device) -> nn.Parameter:
    """An uninitialised, frozen parameter (weights are loaded, never trained)."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x·Wᵀ + b. weight [out_features, in_features], bias [out_features] or None."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = empty_param((out_features, in_features), dtype, device)
        self.bias = empty_param((out_features,), dtype, device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a float tensor [out, in] (here: the parameter itself, no copy)."""
        return self.weight

    @property
    def nbytes(self) -> int:
        """Bytes a one-token product reads (the weight)."""
        return self.weight.numel() * self.weight.element_size()

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.weight.dtype}")


class Embedding(nn.Module):
    """Token embeddings: ``weight`` [vocab, d]; ``forward(ids) → [..., d]`` in the table's dtype."""

    def __init__(self, vocab: int, d: int, dtype=torch.float32, device=None):
        super().__init__()
        self.vocab, self.d = vocab, d
        self.weight = empty_param((vocab, d), dtype, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, d={self.d}, dtype={self.weight.dtype}"


class FFNModule(nn.Module):
    """Base of every module that sits at ``layers[i].mlp``: the dense FFNs, and the swaps the engine
    makes (sparse, hybrid, tapped). ``forward(x [..., d]) → [..., d]``."""

    def residual(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """x + self(norm(x)): the FFN half of a pre-norm block. A swap may do it in one call."""
        return x + self(norm(x))


class RMSNorm(nn.Module):
    """x / rms(x) · w. ``unit_offset`` (Gemma): x / rms(x) · (1 + w), computed in fp32 and cast back to x's
    dtype (the checkpoint stores w, centred on 0)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unit_offset:  # transformers' Gemma3RMSNorm, op for op
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (xf * (1.0 + self.weight.float())).type_as(x)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op (bit-identical to the lines below in fp32, ~20 µs less per call at decode).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Computed in fp32 like transformers, cast back to the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale, for the rope types LLaMA-family configs use."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling.get("original_max_position_embeddings", max_position_embeddings))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled), 1.0
    raise UnsupportedModelError(
        f"rope_scaling type {rope_type!r} is not supported; supported: default, linear, llama3"
    )


def rope_tables(inv_freq: torch.Tensor, scale: float, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [length, head_dim] (half-rotation layout, as HF LLaMA)."""
    pos = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


class RopeCache:
    """cos, sin tables of one rope (``rope_inv_freq``'s inverse frequencies and scale), grown on demand and
    kept per device: ``rope(start, t, dtype, device)`` → cos, sin [t, head_dim] for positions start..start+t."""

    def __init__(self, inv_freq: torch.Tensor, scale: float):
        self.inv_freq, self.scale = inv_freq, scale
        self.tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, start: int, t: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + t
        cos, sin = self.tables.get(device, (None, None))
        if cos is None or cos.shape[0] < end:
            length = max(end, 256, 0 if cos is None else cos.shape[0])
            cos, sin = (tab.to(device) for tab in rope_tables(self.inv_freq, self.scale, length))
            self.tables[device] = cos, sin
        return cos[start:end].to(dtype), sin[start:end].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, h, t, hd]; cos, sin [t, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass(frozen=True)
class DecoderConfig:
    """What a decoder family's config dataclass starts with (HF names): the sizes, and (keyword-only) the
    special token ids and ``extra``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    bos_token_id: int | None = field(default=None, kw_only=True)
    eos_token_id: int | list[int] | None = field(default=None, kw_only=True)
    extra: dict = field(default_factory=dict, compare=False, repr=False, kw_only=True)

    @staticmethod
    def hf_common(cfg: dict, max_position_embeddings: int) -> dict:
        """Those fields from a HF config.json dict (kv heads default to the heads, head_dim to d / heads;
        ``max_position_embeddings`` when the dict has none)."""
        heads = cfg["num_attention_heads"]
        return dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                    intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
                    num_attention_heads=heads, num_key_value_heads=cfg.get("num_key_value_heads") or heads,
                    head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                    max_position_embeddings=cfg.get("max_position_embeddings", max_position_embeddings),
                    bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))

    def head_tensors(self) -> dict[str, tuple[int, ...]]:
        """expected_tensors of the embedding, the final norm and an untied head (HF names → shapes); the
        subclass has ``tie_word_embeddings``."""
        shapes = {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
                  "model.norm.weight": (self.hidden_size,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes


class DecoderLM(nn.Module):
    """What the decoders share around their blocks: ``embed`` (the token table), ``layers``, the final
    ``norm``, ``lm_head`` (with tied embeddings the embedding's parameter: one tensor), ``config``,
    ``dtype`` (of activations and the KV cache; weights may be stored otherwise: offload.formats)."""

    def __init__(self, cfg, dtype: torch.dtype, device, layers, norm: nn.Module):
        super().__init__()
        self.config = cfg
        self.dtype = dtype
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size, dtype, device)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype, device)
        self.tie_weights()

    @property
    def device(self) -> torch.device:
        """Where the model takes its input ids (the final norm's device: the head's side)."""
        return self.norm.weight.device

    def tie_weights(self) -> None:
        """With tied embeddings, make the head's weight the embedding's parameter again (after loading
        replaced it)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def parameter_sources(self) -> dict[str, tuple[str, ...]]:
        """Each parameter (its path in this module) → the checkpoint tensors (HF names) it is made of,
        concatenated along dim 0 when several (fused q/k/v and gate/up). A weight comes before its bias."""
        src = {"embed.weight": ("model.embed_tokens.weight",), "norm.weight": ("model.norm.weight",)}
        if not self.config.tie_word_embeddings:
            src["lm_head.weight"] = ("lm_head.weight",)
        for i in range(len(self.layers)):
            src.update(self.block_sources(f"layers.{i}.", f"model.layers.{i}."))
        return src

    def block_sources(self, p: str, m: str) -> dict[str, tuple[str, ...]]:
        """parameter_sources of the block at path ``p`` here ("layers.3.") and HF prefix ``m``."""
        raise NotImplementedError


def fused_block_sources(p: str, m: str, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> dict[str, tuple[str, ...]]:
    """parameter_sources of a block's fused attention (attn.qkv: q, k, v rows; attn.o) and gated FFN
    (mlp.gate_up: gate, up rows; mlp.down) from HF's separate projections; p, m as DecoderLM.block_sources."""
    a, f = m + "self_attn.", m + "mlp."
    src = {p + "attn.qkv.weight": (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
           p + "attn.o.weight": (a + "o_proj.weight",)}
    if qkv_bias:
        src[p + "attn.qkv.bias"] = (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias")
    if o_bias:
        src[p + "attn.o.bias"] = (a + "o_proj.bias",)
    src[p + "mlp.gate_up.weight"] = (f + "gate_proj.weight", f + "up_proj.weight")
    src[p + "mlp.down.weight"] = (f + "down_proj.weight",)
    if mlp_bias:
        src[p + "mlp.gate_up.bias"] = (f + "gate_proj.bias", f + "up_proj.bias")
        src[p + "mlp.down.bias"] = (f + "down_proj.bias",)
    return src


@dataclass
class KVCache:
    """Preallocated keys and values for every layer: k, v [layers, batch, kv_heads, max_len, head_dim],
    or (layers split across devices, offload.layer_split) lists of per-layer [batch, kv_heads, max_len,
    head_dim] tensors, each on its layer's device. ``k[layer]`` is one layer's either way."""

    k: torch.Tensor | list[torch.Tensor]
    v: torch.Tensor | list[torch.Tensor]

    @classmethod
    def allocate(cls, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> "KVCache":
        shape = (layers, batch, kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @classmethod
    def allocate_per_layer(cls, homes: list[tuple[torch.device, torch.dtype]], batch: int, kv_heads: int,
                           max_len: int, head_dim: int) -> "KVCache":
        """One [batch, kv_heads, max_len, head_dim] pair per layer at its (device, dtype) home."""
        def make(device, dtype):
            return torch.zeros((batch, kv_heads, max_len, head_dim), dtype=dtype, device=device)
        return cls([make(*h) for h in homes], [make(*h) for h in homes])

    @property
    def max_len(self) -> int:
        return self.k[0].shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None,
                     layer: int, start: int, scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Causal attention of q [b, h, t, hd] at positions start..start+t over all keys so far.

    k, v [b, kvh, t, hd] are the new keys and values; with a cache they are written at
    start..start+t and attention reads 0..start+t. ``window`` (sliding-window layers): a query at
    position p sees only the keys at p − window < j ≤ p. Returns [b, h, t, hd]. A cache of another
    dtype than q (an fp16 KV cache under fp32 compute) stores the keys and values rounded to its dtype
    and they are read back widened to q's.
    """
    t = q.shape[2]
    if cache is not None:
        end = start + t
        cache.k[layer][:, :, start:end] = k
        cache.v[layer][:, :, start:end] = v
        k, v = cache.k[layer][:, :, :end].to(q.dtype), cache.v[layer][:, :, :end].to(q.dtype)
    if window is not None and k.shape[2] - t - window + 1 > 0:  # keys no query of these sees: not read
        first = k.shape[2] - t - window + 1
        k, v = k[:, :, first:], v[:, :, first:]
    total = k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if t == 1:
        # One query sees every key left: no mask.
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if total == t and (window is None or window >= t):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_visible(t, total, window, q.device), scale=scale,
                                          enable_gqa=gqa)


def _visible(t: int, total: int, window: int | None, device) -> torch.Tensor:
    """Bool [t, total]: whether query i (the i-th of the last t positions of ``total``) sees key j."""
    q_pos = torch.arange(total - t, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask

