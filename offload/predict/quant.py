"""Low-bit copies of weight rows for shadow predictors, with torch reference dequantizers.

- int4, groups of ``group`` (32) consecutive columns per row, one fp16 scale per group, symmetric:
  w ≈ scale·q, q ∈ [-8, 7]. Stored packed, two nibbles per uint8 along the row: byte j of a row holds
  column 2j in its low nibble and column 2j+1 in its high nibble, each as q + 8 ∈ [0, 15].
  Rows are zero-padded to a multiple of ``group`` columns. The scale of each group is chosen among
  a few clipping ratios of max|w|/7 to minimise the group's squared error (``search=True``): free at
  run time, and it measured better than plain max-scaling (benchmarks/predictors.py).
- int8, one fp16 scale per row, symmetric: w ≈ scale·q, q ∈ [-127, 127].

Shapes: w [n, d]; int4: packed uint8 [n, d_pad/2], scales fp16 [n, d_pad/group]; int8: q int8
[n, d], scales fp16 [n].
"""
from __future__ import annotations

import torch

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _pad_cols(w: torch.Tensor, multiple: int) -> torch.Tensor:
    d = w.shape[1]
    pad = (-d) % multiple
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


def quantize_int4(w: torch.Tensor, group: int = 32, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [n, d_pad/2], scales fp16 [n, d_pad/group]) of w [n, d]."""
    if group < 2 or group % 2:
        raise ValueError(f"group={group}: expected an even group size >= 2")
    w = _pad_cols(w.detach().float(), group)
    n, dp = w.shape
    g = w.view(n, dp // group, group)
    amax = g.abs().amax(-1, keepdim=True)
    best_scale = (amax / 7).clamp_min(1e-12)
    if search:
        best_err = None
        for r in CLIP_RATIOS:
            scale = (amax * r / 7).half().float().clamp_min(1e-12)
            resid = torch.div(g, scale).round_().clamp_(-8, 7).mul_(scale).sub_(g)
            err = torch.linalg.vector_norm(resid, dim=-1, keepdim=True)
            if best_err is None:
                best_err, best_scale = err, scale
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_scale = torch.where(better, scale, best_scale)
    scale = best_scale.half().float().clamp_min(1e-12)
    q = ((g / scale).round().clamp(-8, 7) + 8).to(torch.uint8).view(n, dp)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    scales = scale.view(n, dp // group).half()
    return packed.contiguous(), scales.contiguous()


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, d: int) -> torch.Tensor:
    """w [n, d] (fp32) from quantize_int4's output."""
    n, half = packed.shape
    q = torch.empty(n, 2 * half, dtype=torch.int16, device=packed.device)
    q[:, 0::2] = (packed & 0xF).to(torch.int16)
    q[:, 1::2] = (packed >> 4).to(torch.int16)
    group = (2 * half) // scales.shape[1]
    w = (q.float() - 8).view(n, scales.shape[1], group) * scales.float().unsqueeze(-1)
    return w.view(n, 2 * half)[:, :d].contiguous()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [n, d], scales fp16 [n]) of w [n, d], per-row symmetric."""
    w = w.detach().float()
    scale = (w.abs().amax(-1) / 127).half().float().clamp_min(1e-12)
    q = (w / scale.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.half()


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float().unsqueeze(-1)


def quantize(w: torch.Tensor, bits: int, group: int = 32) -> dict[str, torch.Tensor]:
    """{"q": ..., "scales": ...} for bits 4 (packed, grouped) or 8 (per row)."""
    if bits == 4:
        q, s = quantize_int4(w, group)
    elif bits == 8:
        q, s = quantize_int8(w)
    else:
        raise ValueError(f"bits={bits}: expected 4 or 8")
    return {"q": q, "scales": s}


def dequantize(q: torch.Tensor, scales: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    if bits == 4:
        return dequantize_int4(q, scales, d)
    if bits == 8:
        return dequantize_int8(q, scales)
    raise ValueError(f"bits={bits}: expected 4 or 8")
