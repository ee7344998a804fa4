"""Pieces shared by the architecture files: RMSNorm, RoPE tables, the preallocated KV cache, attention,
and the base classes of the modules the engine swaps (FFNs and attention)."""
from __future__ import annotations

import math
from dataclasses import dataclass

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
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, h, t, hd]; cos, sin [t, hd]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


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
                     layer: int, start: int, scale: float | None = None) -> torch.Tensor:
    """Causal attention of q [b, h, t, hd] at positions start..start+t over all keys so far.

    k, v [b, kvh, t, hd] are the new keys and values; with a cache they are written at
    start..start+t and attention reads 0..start+t. Returns [b, h, t, hd].
    """
    t = q.shape[2]
    if cache is not None:
        end = start + t
        cache.k[layer][:, :, start:end] = k
        cache.v[layer][:, :, start:end] = v
        k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
    total = k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if t == 1:
        # One query sees every cached key: no mask.
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    if total == t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    # Several new queries after a cached prefix: query i (absolute start+i) sees keys <= start+i.
    mask = torch.ones(t, total, dtype=torch.bool, device=q.device).tril(diagonal=total - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
