"""Column-sparse down projection over packed 4-bit hot neurons: sparse_down (sparse_down.py) reading nibbles.

The hot neurons' down columns as offload.formats.packed_rows.Q4Down (neuron-major codes, the layer's
scale table over (group of 32 neurons, output row); layout and dequantization there)::

    h      [b, k]          activations of the k active neurons (gather_gemv_q4's output), any float dtype
    codes  uint8 [n, d/2]  hot neuron j's down column: byte c = outputs 2c (low nibble) and 2c+1 (high)
    group  int32 [n]       hot neuron j's group (its global id // 32): the row of the scale table
    d, m   fp16 [G/sub, d] S and M of (group, output row); m [0, d] for symmetric layouts
    sc, mc int8 [G, d]     the K types' multipliers, else [0, d]
    idx    [k]             int32 positions in the hot neurons; outside [0, n): padding, skipped

    y = h · W3t[idx]        [b, d] float32      (W3t[j] = hot neuron j's dequantized down column)

Repeated indices are summed. As in sparse_down.py the k rows are cut into split-K chunks whose fp32
partials are summed in a fixed order (sparse_down.sum_splits), so runs are bit-reproducible.

Cost (not yet timed on a GPU): DRAM reads the codes once (0.5 byte per neuron and output) and the
layer's scale table (n·d/8 bytes for q4_1: 5.6 MB at LLaMA-7B, L2-resident) about once, since up to 32
neurons share each row of it; but every program loads the scales per (neuron, output) from cache, 4–8
bytes against the code's half byte. If that bounds the kernel, factor them out of the sum per group:
Σ_j h_j·(S_g·q_j + M_g) = S_g·Σ_j h_j·q_j + M_g·Σ_j h_j over the active neurons j of group g (sorted ids
keep a group's neurons adjacent).

Backends as in sparse_down.py: ``sparse_down_q4_triton``, ``sparse_down_q4_reference`` and the operator
``torch.ops.offload.sparse_down_q4`` (``backend="auto"``); ``sparse_down_q4`` takes a Q4Down and
``ffn_hot_forward_q4`` chains both halves.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from offload.formats.packed_rows import GROUP, Q4Down, Q4Rows, dequantize_down, layout_from

from .gather_gemv import active_rows, autotune_bench, tile_configs
from .gather_gemv_q4 import (check_gather_gemv_q4_args, check_q4_scales, gather_gemv_q4_reference,
                             gather_gemv_q4_triton, q4_scales, q4_weights)
from .launch import (BACKENDS, check_idx, check_no_grad, check_same_device, check_tensor, check_token_rows, launch,
                     require_triton_device, resolve_backend)
from .sparse_down import sparse_down_reference, split_plan, sum_splits

__all__ = ["ffn_hot_forward_q4", "sparse_down_q4", "sparse_down_q4_reference", "sparse_down_q4_triton"]


def check_sparse_down_q4_args(h, codes, group, d, m, sc, mc, idx, sub: int = 1, zero: int = 0) -> None:
    """Raise ValueError/TypeError, naming the argument, unless the inputs are supported. The group ids are
    not checked against the table: that would need a device sync."""
    check_token_rows("h", h)
    check_tensor("codes", codes, 2)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be torch.uint8 (two 4-bit codes per byte), got {codes.dtype}")
    if not codes.is_contiguous():
        raise ValueError("codes must be contiguous; call .contiguous()")
    check_same_device("codes", codes, h.device)
    n, out = codes.shape[0], 2 * codes.shape[1]
    check_tensor("group", group, 1)
    if group.dtype != torch.int32 or group.shape[0] != n or not group.is_contiguous():
        raise ValueError(f"group must be a contiguous int32 [n={n}] tensor (each hot neuron's group of {GROUP}), "
                         f"got {group.dtype} {list(group.shape)}")
    check_same_device("group", group, h.device)
    check_tensor("d", d, 2)
    table = d.shape[0]
    check_q4_scales("sparse_down_q4", (table, out), (table * sub, out), 0, d, m, sc, mc, sub, zero, h.device)
    check_idx(idx, h.device)
    if h.shape[1] != idx.shape[0]:
        raise ValueError(f"h must have one column per index: shape [b, k={idx.shape[0]}], got {tuple(h.shape)}")
    check_no_grad("sparse_down_q4", h=h, d=d, m=m)


# --------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["K_BUCKET"])
def _sparse_down_q4_kernel(
    h_ptr, q_ptr, grp_ptr, d_ptr, m_ptr, sc_ptr, mc_ptr, idx_ptr, out_ptr,
    B, K, N, D, ROWS_PER_SPLIT,
    stride_hb, stride_os, stride_ob,
    K_BUCKET,  # next_power_of_2(K): autotune key only
    HAS_M: tl.constexpr,  # affine layout (m given)
    HAS_SC: tl.constexpr,  # K-type multipliers
    ZERO: tl.constexpr,  # symmetric zero point
    SUB: tl.constexpr,  # groups per d entry
    BATCH_PAD: tl.constexpr,  # next_power_of_2(B), <= 8
    BLOCK_K: tl.constexpr,  # gathered neurons per loop step
    BLOCK_H: tl.constexpr,  # packed bytes (2·BLOCK_H output columns) per program
):
    """out[s, :, cols] = Σ_{j in chunk s} h[:, j] · W3t[idx[j], cols]  (fp32 partial sums).

    Shapes: h [B, K] (row stride stride_hb), codes [N, D/2] uint8, group [N] int32, d and m [G/SUB, D],
    sc and mc [G, D] (contiguous), idx [K] int32, out [SPLIT, B, D] fp32 (strides stride_os, stride_ob, 1).
    Grid: (cdiv(D/2, BLOCK_H), SPLIT); program (j, s) covers output columns 2·[j·BLOCK_H, (j+1)·BLOCK_H)
    and rows idx[s·ROWS_PER_SPLIT : (s+1)·ROWS_PER_SPLIT]. Each step loads a [BLOCK_K, BLOCK_H] byte tile
    (each gathered neuron one contiguous segment) and, per neuron, the scale-table row of its group at the
    tile's even and odd columns, dequantizes both nibbles in fp32 registers and accumulates h·w
    elementwise into two [BATCH_PAD, BLOCK_K, BLOCK_H] tiles (even, odd outputs), reduced over the
    neurons once after the loop. Slots with idx outside [0, N) read nothing.
    """
    pid_h = tl.program_id(0)
    pid_s = tl.program_id(1)
    H = D // 2
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs_h < H
    col = 2 * offs_h
    offs_b = tl.arange(0, BATCH_PAD)
    in_b = offs_b < B

    k_start = pid_s * ROWS_PER_SPLIT
    k_end = tl.minimum(k_start + ROWS_PER_SPLIT, K)
    acc_e = tl.zeros([BATCH_PAD, BLOCK_K, BLOCK_H], dtype=tl.float32)
    acc_o = tl.zeros([BATCH_PAD, BLOCK_K, BLOCK_H], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < k_end
        rows, valid = active_rows(idx_ptr, offs_k, in_k, N)
        g = tl.load(grp_ptr + rows, mask=valid, other=0).to(tl.int64)
        mask = valid[:, None] & in_h[None, :]
        byte = tl.load(q_ptr + rows[:, None] * H + offs_h[None, :], mask=mask, other=0).to(tl.int32)
        d_off = (g // SUB)[:, None] * D + col[None, :]
        g_off = g[:, None] * D + col[None, :]
        S, M = q4_scales(d_ptr, m_ptr, sc_ptr, mc_ptr, d_off, g_off, mask, HAS_M, HAS_SC)
        w_even = q4_weights(byte & 15, S, M, HAS_M, ZERO)
        S, M = q4_scales(d_ptr, m_ptr, sc_ptr, mc_ptr, d_off + 1, g_off + 1, mask, HAS_M, HAS_SC)
        w_odd = q4_weights(byte >> 4, S, M, HAS_M, ZERO)
        hv = tl.load(h_ptr + offs_b[:, None] * stride_hb + offs_k[None, :],
                     mask=in_b[:, None] & valid[None, :], other=0.0).to(tl.float32)
        acc_e += hv[:, :, None] * w_even[None, :, :]
        acc_o += hv[:, :, None] * w_odd[None, :, :]
    out = out_ptr + pid_s * stride_os + offs_b[:, None] * stride_ob + col[None, :]
    out_mask = in_b[:, None] & in_h[None, :]
    tl.store(out, tl.sum(acc_e, axis=1), mask=out_mask)
    tl.store(out + 1, tl.sum(acc_o, axis=1), mask=out_mask)


# Block sizes: as in sparse_down.py (split-K plan split_plan, shared), counting bytes for BLOCK_H.
# Interpreter: one fixed config; tests may change it. CUDA: autotuned; not yet timed on a GPU.
INTERPRETER_CONFIG = {"BLOCK_K": 32, "BLOCK_H": 32}
tuned_kernels: dict = {}


def _tuned_kernel(batch_pad: int):
    if batch_pad not in tuned_kernels:
        tuned_kernels[batch_pad] = triton.autotune(
            configs=tile_configs(batch_pad, "BLOCK_H", (32, 64, 128), "BLOCK_K", (8, 16, 32, 64)),
            key=["D", "K_BUCKET", "HAS_M", "HAS_SC", "SUB"], do_bench=autotune_bench,
            cache_results=True)(_sparse_down_q4_kernel)
    return tuned_kernels[batch_pad]


def sparse_down_q4_triton(h: torch.Tensor, codes: torch.Tensor, group: torch.Tensor, d: torch.Tensor,
                          m: torch.Tensor, sc: torch.Tensor, mc: torch.Tensor, idx: torch.Tensor, sub: int = 1,
                          zero: int = 0) -> torch.Tensor:
    """Launch the Triton kernels: y [b, d] float32 = h · W3t[idx]. Raises on unsupported inputs; no sync."""
    check_sparse_down_q4_args(h, codes, group, d, m, sc, mc, idx, sub, zero)
    require_triton_device(h.device, "sparse_down_q4")
    b, k = h.shape
    n, out = codes.shape[0], 2 * codes.shape[1]
    if k == 0 or out == 0:
        return torch.zeros((b, out), device=h.device, dtype=torch.float32)
    rows, splits = split_plan(k)
    y = torch.empty((b, out), device=h.device, dtype=torch.float32)
    part = y.unsqueeze(0) if splits == 1 else torch.empty((splits, b, out), device=h.device, dtype=torch.float32)
    args = (h, codes, group, d, m if m.numel() else d, sc if sc.numel() else codes, mc if mc.numel() else codes,
            idx, part, b, k, n, out, rows, h.stride(0), part.stride(0), part.stride(1), triton.next_power_of_2(k))
    meta = dict(HAS_M=m.shape[0] > 0, HAS_SC=sc.shape[0] > 0, ZERO=zero, SUB=sub,
                BATCH_PAD=triton.next_power_of_2(b), enable_fp_fusion=True)
    launch(_sparse_down_q4_kernel, lambda: _tuned_kernel(meta["BATCH_PAD"]),
           lambda c: (triton.cdiv(out // 2, c["BLOCK_H"]), splits), args, meta, INTERPRETER_CONFIG, h.device)
    sum_splits(part, y, h.device)
    return y


def sparse_down_q4_reference(h: torch.Tensor, codes: torch.Tensor, group: torch.Tensor, d: torch.Tensor,
                             m: torch.Tensor, sc: torch.Tensor, mc: torch.Tensor, idx: torch.Tensor, sub: int = 1,
                             zero: int = 0) -> torch.Tensor:
    """Plain torch: dequantize the gathered neurons' columns (offload.formats.packed_rows.dequantize_down),
    then sparse_down_reference over them. y [b, d] float32, any device."""
    n = codes.shape[0]
    valid = (idx >= 0) & (idx < n)
    down = Q4Down(layout_from(sub, zero, sc.shape[0] > 0), codes, group, d, m, sc, mc)
    w = dequantize_down(down.select(torch.where(valid, idx, 0).long()))  # [k, d]
    local = torch.where(valid, torch.arange(idx.shape[0], device=idx.device, dtype=torch.int32), -1)
    return sparse_down_reference(h, w, local)


# --------------------------------------------------------------------------------------------------
# torch.ops.offload.sparse_down_q4 (registered like offload::gather_gemv; see the note there)
# --------------------------------------------------------------------------------------------------
_lib = torch.library.Library("offload", "FRAGMENT")
_lib.define("sparse_down_q4(Tensor h, Tensor codes, Tensor group, Tensor d, Tensor m, Tensor sc, Tensor mc, "
            "Tensor idx, int sub=1, int zero=0) -> Tensor")


def _sparse_down_q4_cuda(h, codes, group, d, m, sc, mc, idx, sub=1, zero=0):
    return sparse_down_q4_triton(h, codes, group, d, m, sc, mc, idx, sub, zero)


def _sparse_down_q4_cpu(h, codes, group, d, m, sc, mc, idx, sub=1, zero=0):
    if resolve_backend(h.device) == "triton":
        return sparse_down_q4_triton(h, codes, group, d, m, sc, mc, idx, sub, zero)
    check_sparse_down_q4_args(h, codes, group, d, m, sc, mc, idx, sub, zero)
    return sparse_down_q4_reference(h, codes, group, d, m, sc, mc, idx, sub, zero)


def _sparse_down_q4_fake(h, codes, group, d, m, sc, mc, idx, sub=1, zero=0):
    check_sparse_down_q4_args(h, codes, group, d, m, sc, mc, idx, sub, zero)
    return h.new_empty((h.shape[0], 2 * codes.shape[1]), dtype=torch.float32)


_lib.impl("sparse_down_q4", _sparse_down_q4_cuda, "CUDA")
_lib.impl("sparse_down_q4", _sparse_down_q4_cpu, "CPU")
torch.library.register_fake("offload::sparse_down_q4", _sparse_down_q4_fake, lib=_lib)


def _down_args(down: Q4Down) -> tuple:
    return down.codes, down.group, down.d, down.m, down.sc, down.mc


def sparse_down_q4(h: torch.Tensor, down: Q4Down, idx: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """y [b, d] float32 = h · W3t[idx] over packed down columns (module docstring).

    backend: "auto" → ``torch.ops.offload.sparse_down_q4``, "triton" the launcher, "torch" the reference."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    args = (h, *_down_args(down), idx, down.layout.sub, down.layout.zero)
    check_sparse_down_q4_args(*args)
    if backend == "auto":
        return torch.ops.offload.sparse_down_q4(*args)
    return (sparse_down_q4_triton if backend == "triton" else sparse_down_q4_reference)(*args)


def ffn_hot_forward_q4(x: torch.Tensor, idx: torch.Tensor, *, rows: Q4Rows, down: Q4Down,
                       b1: Optional[torch.Tensor] = None, activation: str = "swiglu",
                       backend: str = "auto") -> torch.Tensor:
    """The hot half of a sparse FFN over packed 4-bit neurons: y [b, d] float32 =
    act(x·W1[idx]ᵀ (+b1), x·W2[idx]ᵀ) · W3t[idx]; ``rows`` and ``down`` hold the same hot neurons in the
    same order. The down bias is not added (add it once, after hot + cold). backend as in
    sparse_down.ffn_hot_forward: one choice for both halves."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    L = rows.layout
    gather = (x, rows.codes, rows.d, rows.m, rows.sc, rows.mc, idx, b1, activation, L.sub, L.zero)
    check_gather_gemv_q4_args(*gather)
    if down.rows != rows.rows or down.out_features != x.shape[1]:
        raise ValueError(f"down must hold the {rows.rows} hot neurons of rows with d={x.shape[1]} outputs, got "
                         f"{down.rows} neurons of {down.out_features} outputs")
    tail = (*_down_args(down), idx, down.layout.sub, down.layout.zero)
    if backend == "auto":
        h = torch.ops.offload.gather_gemv_q4(*gather)
        return torch.ops.offload.sparse_down_q4(h, *tail)
    if backend == "triton":
        return sparse_down_q4_triton(gather_gemv_q4_triton(*gather), *tail)
    return sparse_down_q4_reference(gather_gemv_q4_reference(*gather), *tail)
