"""Pieces shared by the architecture files: RMSNorm, RoPE tables, the preallocated KV cache, attention."""
from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from offload.errors import UnsupportedModelError


_decode_gemv = {"numpy": False}


@contextlib.contextmanager
def cpu_decode_mode():
    """Batch-1 decode on the CPU: one-token matmuls go through NumPy's BLAS (OpenBLAS), and torch's
    own ops run on one thread meanwhile.

    Why (measured on the 2-core dev machine, SmolLM2 fp32, same run): torch's MKL GEMV reaches ~11 GB/s
    on these AMD cores whatever its thread count (20 tok/s); OpenBLAS with 2 threads reaches ~2x that
    (28 tok/s). The two thread pools must not overlap: with torch on 2 threads as well, the OpenBLAS
    workers spin against torch's and decode drops to ~4 tok/s. Restores both settings on exit."""
    threads = torch.get_num_threads()
    previous = _decode_gemv["numpy"]
    torch.set_num_threads(1)
    _decode_gemv["numpy"] = True
    try:
        yield
    finally:
        _decode_gemv["numpy"] = previous
        torch.set_num_threads(threads)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, but one token (x [..., d] with one row) on the CPU takes a matrix-vector path:
    NumPy's BLAS inside :func:`cpu_decode_mode`, else torch.mv (~1.5x faster than the
    matrix-matrix path F.linear takes at batch 1).

    A weight stored in fp16 under fp32 activations (:func:`offload.half.store_weights_fp16`):
    one token goes through the fp16 GEMV kernel (fp32 accumulation), more tokens through F.linear
    on an fp32 copy of the weight made for the call."""
    if weight.dtype != x.dtype and weight.dtype == torch.float16 and x.dtype == torch.float32:
        if x.numel() != x.shape[-1] or x.device.type != "cpu":
            return F.linear(x, weight.float(), bias)
        y = _half().gemv(weight, x)
    elif x.numel() == x.shape[-1] and x.device.type == "cpu":
        if _decode_gemv["numpy"] and weight.dtype == torch.float32 and x.dtype == torch.float32:
            y = torch.from_numpy(weight.numpy() @ x.reshape(-1).numpy())
        else:
            y = torch.mv(weight, x.reshape(-1))
    else:
        return F.linear(x, weight, bias)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def warm_cpu_decode() -> None:
    """Compile or load (numba's cache) the one-token CPU kernels, so that the first decode step does not
    pay for it: ~0.1-0.3 s a kernel from the cache, ~10 s the first time on a machine."""
    _cpu_ops().warmup()


def one_token_cpu_decode(x: torch.Tensor) -> bool:
    """Inside :func:`cpu_decode_mode`, is x one fp32 CPU token (the numba one-token ops apply)?"""
    return _decode_gemv["numpy"] and x.numel() == x.shape[-1] and x.dtype == torch.float32 and x.device.type == "cpu"


_lazy: dict = {}  # numba-backed modules, imported on first use (numba's import costs ~0.7 s)


def _offload_module(name: str):
    mod = _lazy.get(name)
    if mod is None:
        mod = _lazy[name] = importlib.import_module(f"offload.{name}")
    return mod


def _cpu_ops():
    return _offload_module("cpu_ops")


def _half():
    return _offload_module("half")


def empty_param(shape, dtype, device) -> nn.Parameter:
    """An uninitialised, frozen parameter (weights are loaded, never trained)."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def param_loader(get, dtype: torch.dtype, device):
    """``put(module, attr, *hf_names)``: set ``module.attr`` to the named checkpoint tensors, concatenated
    along dim 0 when several (fused q/k/v, gate/up), converted to ``dtype`` on ``device``."""
    device = "cpu" if torch.device(device).type == "meta" else device

    def put(module: nn.Module, attr: str, *names: str) -> None:
        tensors = [get(n) for n in names]
        value = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        setattr(module, attr, nn.Parameter(value.to(device=device, dtype=dtype).contiguous(), requires_grad=False))

    return put


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if one_token_cpu_decode(x) and self.weight.dtype == torch.float32:
            # One numba call (offload.cpu_ops) instead of torch's op dispatch: measured 17-40 µs a call.
            out = np.empty(x.shape[-1], np.float32)
            _cpu_ops().rms_norm_row(x.numpy().reshape(-1), self.weight.numpy(), self.eps, out)
            return torch.from_numpy(out).view(x.shape)
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
