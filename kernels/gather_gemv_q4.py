"""Fused row-gather GEMV over packed 4-bit hot rows: gather_gemv (gather_gemv.py) reading nibbles.

For a batch of ``b`` tokens (1..8) and ``k`` active hot neurons ``idx`` of a layer's ``h`` hot rows
stored as offload.formats.packed_rows.Q4Rows (layout, bytes and dequantization there)::

    x      [b, d]          FFN input, fp16 / bf16 / fp32
    codes  uint8 [P, h, d/2]   P = 2: gate (p = 0) and up (p = 1) rows; P = 1: OPT's fc1 ("relu_fc")
    d      fp16 [P, h, G/sub]  G = d/32 groups per row
    m      fp16 [P, h, G/sub]  affine layouts (w = S·q + M); [P, h, 0] for symmetric ones (w = S·(q − zero))
    sc, mc int8 [P, h, G]      the K types' multipliers (S = d·sc, M = m·mc); else [P, h, 0]
    b1     [h]             optional bias on the W1 side (OPT's fc1.bias)
    idx    [k]             int32 positions in the hot rows; outside [0, h) (e.g. -1): padding, h = 0

    h = act(x · W1[idx]ᵀ (+ b1[idx]), x · W2[idx]ᵀ)     [b, k] float32

with W1, W2 the dequantized rows and act as in gather_gemv.py (models.ffn_kind). Weights are dequantized
in fp32 registers from the bytes, read once: 0.5625–0.625 bytes a weight instead of fp16's 2.

Backends as in gather_gemv.py (see ``resolve_backend``): ``gather_gemv_q4_triton`` (the launcher),
``gather_gemv_q4_reference`` (dequantize the gathered rows, then gather_gemv_reference) and the operator
``torch.ops.offload.gather_gemv_q4`` (``backend="auto"``). ``gather_gemv_q4`` takes a Q4Rows.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from offload.formats.packed_rows import GROUP, Q4Rows, dequantize_rows, layout_from

from .gather_gemv import (activate, autotune_bench, check_activation, gather_gemv_reference, program_slots,
                          tile_configs, x_pairs)
from .launch import (BACKENDS, check_float, check_idx, check_no_grad, check_same_device, check_tensor,
                     check_token_rows, launch, require_triton_device, resolve_backend)

__all__ = ["check_q4_scales", "gather_gemv_q4", "gather_gemv_q4_reference", "gather_gemv_q4_triton", "q4_scales",
           "q4_weights"]


def check_q4_scales(where: str, shape_d: tuple, shape_g: tuple, axis: int, d, m, sc, mc, sub: int, zero: int,
                    device: torch.device) -> None:
    """The scale tensors of a packed 4-bit operand: d (and m) float of ``shape_d``, sc (and mc) int8 of
    ``shape_g`` (groups along ``axis``, ``sub`` groups per d entry), contiguous; an absent m, sc or mc has
    0 along ``axis``. m is present iff zero == 0 (affine), mc iff both m and sc are."""
    if sub < 1 or shape_g[axis] != shape_d[axis] * sub:
        raise ValueError(f"{where}: sub={sub} must be ≥ 1 and divide the {shape_g[axis]} groups of {GROUP}")
    if not 0 <= zero <= 15:
        raise ValueError(f"{where}: zero must lie in 0..15, got {zero}")
    for name, t, shape in (("d", d, shape_d), ("m", m, shape_d), ("sc", sc, shape_g), ("mc", mc, shape_g)):
        check_tensor(name, t, len(shape))
        if name in ("d", "m"):
            check_float(name, t)
        elif t.dtype != torch.int8:
            raise TypeError(f"{name} must be torch.int8 (the K types' 6-bit multipliers), got {t.dtype}")
        absent = list(shape)
        absent[axis] = 0
        if tuple(t.shape) != tuple(shape) and (name == "d" or tuple(t.shape) != tuple(absent)):
            raise ValueError(f"{name} must have shape {list(shape)}" + ("" if name == "d" else f" (or {absent}: "
                             "absent)") + f", got {list(t.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous()")
        check_same_device(name, t, device)
    has_m, has_sc = m.shape[axis] > 0, sc.shape[axis] > 0
    if has_m != (zero == 0):
        raise ValueError(f"{where}: m must be given with zero=0 (affine: w = S·q + M) and absent with zero > 0 "
                         f"(symmetric: w = S·(q − zero)); got m of shape {list(m.shape)} and zero={zero}")
    if (mc.shape[axis] > 0) != (has_sc and has_m):
        raise ValueError(f"{where}: mc must be given exactly when both sc and m are")


def check_gather_gemv_q4_args(x, codes, d, m, sc, mc, idx, b1=None, activation: str = "swiglu", sub: int = 1,
                              zero: int = 0) -> None:
    """Raise ValueError/TypeError, naming the argument, unless the inputs are supported."""
    check_activation(activation)
    b, dx = check_token_rows("x", x)
    check_tensor("codes", codes, 3)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be torch.uint8 (two 4-bit codes per byte), got {codes.dtype}")
    projections = 1 if activation == "relu_fc" else 2
    if codes.shape[0] != projections or 2 * codes.shape[2] != dx or dx % GROUP:
        raise ValueError(f"codes must have shape [P={projections}, h, d/2={dx // 2}] for activation {activation!r} "
                         f"(gate and up rows, or fc1 alone) with d = x.shape[1] a multiple of {GROUP}, "
                         f"got {tuple(codes.shape)}")
    if not codes.is_contiguous():
        raise ValueError("codes must be contiguous; call .contiguous()")
    check_same_device("codes", codes, x.device)
    n, groups = codes.shape[1], dx // GROUP
    check_q4_scales("gather_gemv_q4", (projections, n, groups // max(sub, 1)), (projections, n, groups), -1,
                    d, m, sc, mc, sub, zero, x.device)
    if b1 is not None:
        check_tensor("b1", b1, 1)
        check_float("b1", b1)
        if b1.shape[0] != n or not b1.is_contiguous():
            raise ValueError(f"b1 must be a contiguous [h={n}] tensor (one bias per hot row), got {tuple(b1.shape)}")
        check_same_device("b1", b1, x.device)
    check_idx(idx, x.device)
    check_no_grad("gather_gemv_q4", x=x, d=d, m=m, b1=b1)


# --------------------------------------------------------------------------------------------------
# The kernel and its dequantization helpers (shared with sparse_down_q4)
# --------------------------------------------------------------------------------------------------
@triton.jit
def q4_scales(d_ptr, m_ptr, sc_ptr, mc_ptr, d_off, g_off, mask, HAS_M: tl.constexpr, HAS_SC: tl.constexpr):
    """(S, M) fp32 tiles: S = d[d_off] (· sc[g_off]), M = m[d_off] (· mc[g_off]); M is unused (S) when
    the layout is symmetric. The products of an fp16 and a 6-bit integer are exact in fp32."""
    S = tl.load(d_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_SC:
        S = S * tl.load(sc_ptr + g_off, mask=mask, other=0).to(tl.float32)
    M = S
    if HAS_M:
        M = tl.load(m_ptr + d_off, mask=mask, other=0.0).to(tl.float32)
        if HAS_SC:
            M = M * tl.load(mc_ptr + g_off, mask=mask, other=0).to(tl.float32)
    return S, M


@triton.jit
def q4_weights(nibble, S, M, HAS_M: tl.constexpr, ZERO: tl.constexpr):
    """w = S·q + M (affine) or S·(q − ZERO) (symmetric) in fp32. S·q is exact, so a fused multiply-add
    rounds as the two-step reference does: the kernels see the reference's weights bit for bit."""
    q = nibble.to(tl.float32)
    if HAS_M:
        w = S * q + M
    else:
        w = S * (q - ZERO)
    return w


@triton.jit
def _row_tile(q_ptr, d_ptr, m_ptr, sc_ptr, mc_ptr, row, offs_h, grp, H, G, GD, mask,
              HAS_M: tl.constexpr, HAS_SC: tl.constexpr, ZERO: tl.constexpr, SUB: tl.constexpr):
    """The dequantized (even, odd) columns of a [BLOCK_K, BLOCK_H] byte tile of packed rows ``row``."""
    byte = tl.load(q_ptr + row[:, None] * H + offs_h[None, :], mask=mask, other=0).to(tl.int32)
    S, M = q4_scales(d_ptr, m_ptr, sc_ptr, mc_ptr, row[:, None] * GD + (grp // SUB)[None, :],
                     row[:, None] * G + grp[None, :], mask, HAS_M, HAS_SC)
    return q4_weights(byte & 15, S, M, HAS_M, ZERO), q4_weights(byte >> 4, S, M, HAS_M, ZERO)


@triton.jit(do_not_specialize=["K_BUCKET"])
def _gather_gemv_q4_kernel(
    x_ptr, q_ptr, d_ptr, m_ptr, sc_ptr, mc_ptr, b1_ptr, idx_ptr, h_ptr,
    B, K, N, D,
    stride_xb, stride_hb,
    K_BUCKET,  # next_power_of_2(K): autotune key only
    ACTIVATION: tl.constexpr,  # "swiglu" | "relu" | "drelu" | "relu_fc"
    HAS_W2: tl.constexpr,  # P == 2
    HAS_B1: tl.constexpr,
    HAS_M: tl.constexpr,  # affine layout (m given)
    HAS_SC: tl.constexpr,  # K-type multipliers (sc, and mc when HAS_M)
    ZERO: tl.constexpr,  # symmetric zero point (HAS_M false)
    SUB: tl.constexpr,  # groups per d entry
    BATCH_PAD: tl.constexpr,  # next_power_of_2(B), <= 8
    BLOCK_K: tl.constexpr,  # active neurons (gathered rows) per program
    BLOCK_H: tl.constexpr,  # packed bytes (2·BLOCK_H columns of d) per loop step
):
    """h[:, j] = act(x · W1[idx[j]]ᵀ (+ b1[idx[j]]), x · W2[idx[j]]ᵀ) for BLOCK_K consecutive j.

    Shapes: x [B, D] (row stride stride_xb), codes [P, N, D/2] uint8, d and m [P, N, G/SUB], sc and mc
    [P, N, G] with G = D/32 (all contiguous; W_p = matrix p), b1 [N], idx [K] int32, h [B, K] fp32 (row
    stride stride_hb). Grid: (cdiv(K, BLOCK_K),). Byte c of a row holds columns 2c (low nibble) and
    2c+1 (high) of group c // 16.

    As gather_gemv's kernel, one program owns BLOCK_K outputs and runs their full dot products over D:
    per step it loads a [BLOCK_K, BLOCK_H] byte tile per matrix (each row one contiguous segment) and the
    scales of its groups, dequantizes both nibbles in fp32 registers (q4_weights) and accumulates
    x_even·w_lo + x_odd·w_hi elementwise into [BATCH_PAD, BLOCK_K, BLOCK_H] fp32, reduced over the row
    once after the loop. Slots with idx outside [0, N) read nothing and produce 0.
    """
    offs_k, in_k, rows, valid = program_slots(idx_ptr, K, N, BLOCK_K)
    offs_b = tl.arange(0, BATCH_PAD)
    in_b = offs_b < B
    H = D // 2
    G = D // 32
    GD = G // SUB

    acc1 = tl.zeros([BATCH_PAD, BLOCK_K, BLOCK_H], dtype=tl.float32)
    acc2 = tl.zeros([BATCH_PAD, BLOCK_K, BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        in_h = offs_h < H
        xe, xo = x_pairs(x_ptr, offs_b, in_b, offs_h, D, stride_xb)
        mask = valid[:, None] & in_h[None, :]
        grp = offs_h // 16  # 16 bytes = one group of 32 columns
        wlo, whi = _row_tile(q_ptr, d_ptr, m_ptr, sc_ptr, mc_ptr, rows, offs_h, grp, H, G, GD, mask,
                             HAS_M, HAS_SC, ZERO, SUB)
        acc1 += xe[:, None, :] * wlo[None, :, :] + xo[:, None, :] * whi[None, :, :]
        if HAS_W2:
            wlo, whi = _row_tile(q_ptr, d_ptr, m_ptr, sc_ptr, mc_ptr, rows + N, offs_h, grp, H, G, GD, mask,
                                 HAS_M, HAS_SC, ZERO, SUB)
            acc2 += xe[:, None, :] * wlo[None, :, :] + xo[:, None, :] * whi[None, :, :]

    g = tl.sum(acc1, axis=2)  # [BATCH_PAD, BLOCK_K]
    if HAS_B1:
        g += tl.load(b1_ptr + rows, mask=valid, other=0.0).to(tl.float32)[None, :]
    h = tl.where(valid[None, :], activate(g, tl.sum(acc2, axis=2), ACTIVATION), 0.0)
    tl.store(h_ptr + offs_b[:, None] * stride_hb + offs_k[None, :], h, mask=in_b[:, None] & in_k[None, :])


# Block sizes. Interpreter: one fixed config (each program costs ~10 ms of Python); tests may change it.
# CUDA: autotuned per (batch pad, d, k bucket, activation, bias, layout) over the tiles gather_gemv's
# rule allows, counting bytes (2 weights each): BLOCK_H ≥ 64 bytes keeps ≥ 64-byte segments per row.
# Not yet timed on a GPU (written without one).
INTERPRETER_CONFIG = {"BLOCK_K": 32, "BLOCK_H": 32}
tuned_kernels: dict = {}


def _tuned_kernel(batch_pad: int):
    if batch_pad not in tuned_kernels:
        tuned_kernels[batch_pad] = triton.autotune(
            configs=tile_configs(batch_pad, "BLOCK_K", (2, 4, 8, 16, 32), "BLOCK_H", (64, 128, 256)),
            key=["D", "K_BUCKET", "ACTIVATION", "HAS_B1", "HAS_M", "HAS_SC", "SUB"],
            do_bench=autotune_bench, cache_results=True)(_gather_gemv_q4_kernel)
    return tuned_kernels[batch_pad]


def gather_gemv_q4_triton(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, sc: torch.Tensor,
                          mc: torch.Tensor, idx: torch.Tensor, b1: Optional[torch.Tensor] = None,
                          activation: str = "swiglu", sub: int = 1, zero: int = 0) -> torch.Tensor:
    """Launch the Triton kernel: h [b, k] float32. Raises on unsupported inputs; no device sync."""
    check_gather_gemv_q4_args(x, codes, d, m, sc, mc, idx, b1, activation, sub, zero)
    require_triton_device(x.device, "gather_gemv_q4")
    b, dx = x.shape
    k = idx.shape[0]
    h = torch.empty((b, k), device=x.device, dtype=torch.float32)
    if k == 0:
        return h
    has_b1 = b1 is not None
    args = (x, codes, d, m if m.numel() else d, sc if sc.numel() else codes, mc if mc.numel() else codes,
            b1 if has_b1 else d, idx, h, b, k, codes.shape[1], dx, x.stride(0), h.stride(0), triton.next_power_of_2(k))
    meta = dict(ACTIVATION=activation, HAS_W2=codes.shape[0] == 2, HAS_B1=has_b1, HAS_M=m.shape[-1] > 0,
                HAS_SC=sc.shape[-1] > 0, ZERO=zero, SUB=sub, BATCH_PAD=triton.next_power_of_2(b),
                enable_fp_fusion=True)
    launch(_gather_gemv_q4_kernel, lambda: _tuned_kernel(meta["BATCH_PAD"]),
           lambda c: (triton.cdiv(k, c["BLOCK_K"]),), args, meta, INTERPRETER_CONFIG, x.device)
    return h


def gather_gemv_q4_reference(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, sc: torch.Tensor,
                             mc: torch.Tensor, idx: torch.Tensor, b1: Optional[torch.Tensor] = None,
                             activation: str = "swiglu", sub: int = 1, zero: int = 0) -> torch.Tensor:
    """Plain torch: dequantize the gathered rows (offload.formats.packed_rows.dequantize_rows), then
    gather_gemv_reference over them. h [b, k] float32, any device."""
    n = codes.shape[1]
    valid = (idx >= 0) & (idx < n)
    safe = torch.where(valid, idx, 0).long()
    w = dequantize_rows(Q4Rows(layout_from(sub, zero, sc.shape[-1] > 0), codes, d, m, sc, mc).select(safe))  # [P, k, d]
    local = torch.where(valid, torch.arange(idx.shape[0], device=idx.device, dtype=torch.int32), -1)
    bias = None if b1 is None else b1.index_select(0, safe)
    return gather_gemv_reference(x, w[0], local, w[1] if w.shape[0] == 2 else None, bias, activation)


# --------------------------------------------------------------------------------------------------
# torch.ops.offload.gather_gemv_q4 (registered like offload::gather_gemv; see the note there)
# --------------------------------------------------------------------------------------------------
_lib = torch.library.Library("offload", "FRAGMENT")
_lib.define("gather_gemv_q4(Tensor x, Tensor codes, Tensor d, Tensor m, Tensor sc, Tensor mc, Tensor idx, "
            "Tensor? b1=None, str activation=\"swiglu\", int sub=1, int zero=0) -> Tensor")


def _gather_gemv_q4_cuda(x, codes, d, m, sc, mc, idx, b1=None, activation="swiglu", sub=1, zero=0):
    return gather_gemv_q4_triton(x, codes, d, m, sc, mc, idx, b1, activation, sub, zero)


def _gather_gemv_q4_cpu(x, codes, d, m, sc, mc, idx, b1=None, activation="swiglu", sub=1, zero=0):
    if resolve_backend(x.device) == "triton":
        return gather_gemv_q4_triton(x, codes, d, m, sc, mc, idx, b1, activation, sub, zero)
    check_gather_gemv_q4_args(x, codes, d, m, sc, mc, idx, b1, activation, sub, zero)
    return gather_gemv_q4_reference(x, codes, d, m, sc, mc, idx, b1, activation, sub, zero)


def _gather_gemv_q4_fake(x, codes, d, m, sc, mc, idx, b1=None, activation="swiglu", sub=1, zero=0):
    check_gather_gemv_q4_args(x, codes, d, m, sc, mc, idx, b1, activation, sub, zero)
    return x.new_empty((x.shape[0], idx.shape[0]), dtype=torch.float32)


_lib.impl("gather_gemv_q4", _gather_gemv_q4_cuda, "CUDA")
_lib.impl("gather_gemv_q4", _gather_gemv_q4_cpu, "CPU")
torch.library.register_fake("offload::gather_gemv_q4", _gather_gemv_q4_fake, lib=_lib)


def gather_gemv_q4(x: torch.Tensor, rows: Q4Rows, idx: torch.Tensor, b1: Optional[torch.Tensor] = None,
                   activation: str = "swiglu", *, backend: str = "auto") -> torch.Tensor:
    """h [b, k] float32 = act(x·W1[idx]ᵀ (+b1[idx]), x·W2[idx]ᵀ) over packed rows (module docstring).

    backend: "auto" → ``torch.ops.offload.gather_gemv_q4`` (device dispatch, see ``resolve_backend``),
    "triton" the launcher, "torch" the reference; all check their inputs alike."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    L = rows.layout
    args = (x, rows.codes, rows.d, rows.m, rows.sc, rows.mc, idx, b1, activation, L.sub, L.zero)
    check_gather_gemv_q4_args(*args)
    if backend == "auto":
        return torch.ops.offload.gather_gemv_q4(*args)
    return (gather_gemv_q4_triton if backend == "triton" else gather_gemv_q4_reference)(*args)
