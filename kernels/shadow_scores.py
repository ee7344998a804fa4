"""Shadow-predictor scores from packed low-bit gate/up rows: the GPU side of offload.cpu.shadow.

The quantized shadow of a gated FFN (offload/predict/shadow.py) scores every neuron
of a layer from low-bit copies of its gate and up rows; the top-k scores pick the neurons computed
exactly. For a batch of ``b`` tokens (decode, 1..8), ``n`` neurons, model width ``d``::

    x       [b, d]          FFN input, fp16 / bf16 / fp32
    int4 (offload.predict.quant.quantize_int4, groups of ``group`` columns, symmetric):
    q_gate  [n, d_pad/2]    uint8, two nibbles per byte: byte j of a row holds column 2j in its low
    q_up    [n, d_pad/2]    nibble and 2j+1 in its high nibble, each as q + 8 ∈ [0, 15]
    s_gate  [n, d_pad/group] fp16 (or any float) scale per row and group: w = scale · (nibble − 8)
    s_up    [n, d_pad/group]
    int8 (quantize_int8): q_gate/q_up int8 [n, d], s_gate/s_up [n] one scale per row: w = scale · q
    gate_bias, up_bias [n]  optional

    g̃ = x · Q(W_gate)ᵀ (+ gate_bias)     ũ = x · Q(W_up)ᵀ (+ up_bias)      [b, n]
    scores = |act(g̃, ũ)|                  [b, n] float32
    "swiglu": |silu(g̃)·ũ|   "relu": |relu(g̃)·ũ|   "drelu": relu(g̃)·relu(ũ)

d_pad = d rounded up to a multiple of ``group`` (the padding columns hold nibble 8, i.e. zero); any
even group size dividing d_pad works (the library's default is 32).

The kernels read the packed bytes once and dequantize in registers (fp32 accumulation): 0.5 + 2/group
bytes per weight for int4 (0.5625 at group 32, 1/7 of fp32), instead of the reference's dequantized
fp32 copy. On the CPU the fast path is ``offload.cpu.shadow.Int4Shadow`` (numba/LLVM, prepared layout);
here the CPU backends are Triton's interpreter (tests) and the torch reference.

Backends, as in gather_gemv.py (see ``resolve_backend``): ``shadow_scores_int4_triton`` (the
launcher), ``shadow_scores_int4_reference`` (plain torch, any device) and the registered operator
``torch.ops.offload.shadow_scores_int4`` (``backend="auto"``); the same for ``_int8``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from offload.models.ffn_kind import activation as ffn_activation

from .gather_gemv import autotune_bench, x_pairs
from .launch import (BACKENDS, check_float, check_last_dim_contiguous, check_no_grad, check_same_device, check_tensor,
                     check_token_rows, device_guard, require_triton_device, resolve_backend, use_fixed_config)

__all__ = [
    "KINDS",
    "check_shadow_args",
    "shadow_scores_int4",
    "shadow_scores_int4_reference",
    "shadow_scores_int4_triton",
    "shadow_scores_int8",
    "shadow_scores_int8_reference",
    "shadow_scores_int8_triton",
]

KINDS = ("swiglu", "relu", "drelu")
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------------
# Argument checks (metadata only: no device sync, also valid on fake tensors)
# --------------------------------------------------------------------------------------------------
def check_shadow_args(bits: int, x, q_gate, s_gate, q_up, s_up, gate_bias=None, up_bias=None,
                      kind: str = "swiglu") -> None:
    """Raise ValueError/TypeError, naming the argument, unless the inputs are supported."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r} (relu_fc/OPT has no gate to shadow)")
    b, d = check_token_rows("x", x)
    for name, q, s in (("q_gate", q_gate, s_gate), ("q_up", q_up, s_up)):
        sname = "s" + name[1:]
        check_tensor(name, q, 2)
        check_last_dim_contiguous(name, q)
        check_same_device(name, q, x.device)
        n = q.shape[0]
        if bits == 4:
            if q.dtype != torch.uint8:
                raise TypeError(f"{name} must be torch.uint8 (two int4 nibbles per byte), got {q.dtype}")
            check_tensor(sname, s, 2)
            d_pad = 2 * q.shape[1]
            groups = s.shape[1]
            if s.shape[0] != n or groups == 0 or d_pad % groups or (d_pad // groups) % 2:
                raise ValueError(f"{sname} must have shape [n={n}, d_pad/group] with an even group dividing "
                                 f"d_pad={d_pad}, got {tuple(s.shape)}")
            group = d_pad // groups
            if not d_pad - group < d <= d_pad:
                raise ValueError(f"x has d={d} columns but {name} holds rows of {d_pad} columns padded to "
                                 f"groups of {group}: expected {d_pad - group} < d <= {d_pad}")
        elif bits == 8:
            if q.dtype != torch.int8:
                raise TypeError(f"{name} must be torch.int8, got {q.dtype}")
            if q.shape[1] != d:
                raise ValueError(f"{name} must have shape [n, d={d}], got {tuple(q.shape)}")
            check_tensor(sname, s, 1)
            if s.shape[0] != n:
                raise ValueError(f"{sname} must have shape [n={n}] (one scale per row), got {tuple(s.shape)}")
        else:
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if s.dtype not in SCALE_DTYPES:
            raise TypeError(f"{sname} must be float16, bfloat16 or float32, got {s.dtype}")
        check_last_dim_contiguous(sname, s)
        check_same_device(sname, s, x.device)
    if tuple(q_up.shape) != tuple(q_gate.shape) or tuple(s_up.shape) != tuple(s_gate.shape):
        raise ValueError(f"q_up/s_up must have the shapes of q_gate/s_gate {tuple(q_gate.shape)}, "
                         f"{tuple(s_gate.shape)}; got {tuple(q_up.shape)}, {tuple(s_up.shape)}")
    if (gate_bias is None) != (up_bias is None):
        raise ValueError("gate_bias and up_bias must be given together (or neither)")
    if gate_bias is not None:
        n = q_gate.shape[0]
        for name, v in (("gate_bias", gate_bias), ("up_bias", up_bias)):
            check_tensor(name, v, 1)
            check_float(name, v)
            if v.shape[0] != n:
                raise ValueError(f"{name} must have shape [n={n}], got {tuple(v.shape)}")
            check_last_dim_contiguous(name, v)
            check_same_device(name, v, x.device)
    check_no_grad("shadow_scores", x=x, gate_bias=gate_bias, up_bias=up_bias)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _score(g, u, KIND: tl.constexpr):
    if KIND == "swiglu":
        s = tl.abs(g * tl.sigmoid(g) * u)
    elif KIND == "relu":
        s = tl.abs(tl.maximum(g, 0.0) * u)
    else:  # "drelu"
        s = tl.maximum(g, 0.0) * tl.maximum(u, 0.0)
    return s


@triton.jit
def _shadow_int4_kernel(
    x_ptr, qg_ptr, sg_ptr, qu_ptr, su_ptr, bg_ptr, bu_ptr, out_ptr,
    B, N, D, H, GROUP_BYTES,
    stride_xb, stride_qn, stride_sn, stride_ob,
    KIND: tl.constexpr,  # "swiglu" | "relu" | "drelu"
    HAS_BIAS: tl.constexpr,
    BATCH_PAD: tl.constexpr,  # next_power_of_2(B), <= 8
    BLOCK_N: tl.constexpr,  # neurons (rows of both matrices) per program
    BLOCK_H: tl.constexpr,  # packed bytes (2·BLOCK_H columns) per loop step
):
    """out[:, i] = |act(x·Q(Wg)[i]ᵀ (+bg[i]), x·Q(Wu)[i]ᵀ (+bu[i]))| for BLOCK_N consecutive i.

    Shapes: x [B, D] (row stride stride_xb, unit column stride); qg/qu [N, H] uint8 (H = D_pad/2
    bytes per row, row stride stride_qn); sg/su [N, D_pad/group] scales (row stride stride_sn);
    bg/bu [N]; out [B, N] fp32 (row stride stride_ob). Grid: (cdiv(N, BLOCK_N),).

    Byte j of a row holds columns 2j (low nibble) and 2j+1 (high nibble) of group j // GROUP_BYTES
    (GROUP_BYTES = group/2). Each step loads a [BLOCK_N, BLOCK_H] tile of packed bytes per matrix
    (contiguous along the row: coalesced), splits the nibbles, dequantizes w = scale·(nibble − 8) in
    fp32 registers, and accumulates x_even·w_lo + x_odd·w_hi elementwise into
    [BATCH_PAD, BLOCK_N, BLOCK_H] fp32 tiles, reduced over the row once after the loop; the
    activation runs in registers and each score is written once. Padding bytes (nibble 8) and
    masked columns contribute 0.
    """
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    rows = offs_n.to(tl.int64)
    offs_b = tl.arange(0, BATCH_PAD)
    in_b = offs_b < B

    acc_g = tl.zeros([BATCH_PAD, BLOCK_N, BLOCK_H], dtype=tl.float32)
    acc_u = tl.zeros([BATCH_PAD, BLOCK_N, BLOCK_H], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        in_h = offs_h < H
        xe, xo = x_pairs(x_ptr, offs_b, in_b, offs_h, D, stride_xb)
        w_mask = in_n[:, None] & in_h[None, :]
        grp = offs_h // GROUP_BYTES
        q_off = rows[:, None] * stride_qn + offs_h[None, :]
        s_off = rows[:, None] * stride_sn + grp[None, :]

        pg = tl.load(qg_ptr + q_off, mask=w_mask, other=0x88).to(tl.int32)
        sg = tl.load(sg_ptr + s_off, mask=w_mask, other=0.0).to(tl.float32)
        wlo = ((pg & 15) - 8).to(tl.float32) * sg
        whi = ((pg >> 4) - 8).to(tl.float32) * sg
        acc_g += xe[:, None, :] * wlo[None, :, :] + xo[:, None, :] * whi[None, :, :]

        pu = tl.load(qu_ptr + q_off, mask=w_mask, other=0x88).to(tl.int32)
        su = tl.load(su_ptr + s_off, mask=w_mask, other=0.0).to(tl.float32)
        wlo = ((pu & 15) - 8).to(tl.float32) * su
        whi = ((pu >> 4) - 8).to(tl.float32) * su
        acc_u += xe[:, None, :] * wlo[None, :, :] + xo[:, None, :] * whi[None, :, :]

    g = tl.sum(acc_g, axis=2)  # [BATCH_PAD, BLOCK_N]
    u = tl.sum(acc_u, axis=2)
    if HAS_BIAS:
        g += tl.load(bg_ptr + rows, mask=in_n, other=0.0).to(tl.float32)[None, :]
        u += tl.load(bu_ptr + rows, mask=in_n, other=0.0).to(tl.float32)[None, :]
    s = _score(g, u, KIND)
    tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :], s, mask=in_b[:, None] & in_n[None, :])


@triton.jit
def _shadow_int8_kernel(
    x_ptr, qg_ptr, sg_ptr, qu_ptr, su_ptr, bg_ptr, bu_ptr, out_ptr,
    B, N, D,
    stride_xb, stride_qn, stride_ob,
    KIND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BATCH_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """As _shadow_int4_kernel for int8 rows q [N, D] with one scale per row s [N]: the dot products
    x·q run on the integers converted to fp32, and the row scale multiplies the sum once."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    rows = offs_n.to(tl.int64)
    offs_b = tl.arange(0, BATCH_PAD)
    in_b = offs_b < B
    acc_g = tl.zeros([BATCH_PAD, BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc_u = tl.zeros([BATCH_PAD, BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        xv = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_d[None, :], mask=in_b[:, None] & in_d[None, :],
                     other=0.0).to(tl.float32)
        w_mask = in_n[:, None] & in_d[None, :]
        q_off = rows[:, None] * stride_qn + offs_d[None, :]
        wg = tl.load(qg_ptr + q_off, mask=w_mask, other=0).to(tl.float32)
        acc_g += xv[:, None, :] * wg[None, :, :]
        wu = tl.load(qu_ptr + q_off, mask=w_mask, other=0).to(tl.float32)
        acc_u += xv[:, None, :] * wu[None, :, :]
    g = tl.sum(acc_g, axis=2) * tl.load(sg_ptr + rows, mask=in_n, other=0.0).to(tl.float32)[None, :]
    u = tl.sum(acc_u, axis=2) * tl.load(su_ptr + rows, mask=in_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        g += tl.load(bg_ptr + rows, mask=in_n, other=0.0).to(tl.float32)[None, :]
        u += tl.load(bu_ptr + rows, mask=in_n, other=0.0).to(tl.float32)[None, :]
    s = _score(g, u, KIND)
    tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :], s, mask=in_b[:, None] & in_n[None, :])


# Block sizes.
# * Interpreter (CPU tests): one fixed config, big blocks (each program instance costs ~10 ms of
#   Python). Tests may change INTERPRETER_CONFIG* to exercise other tilings.
# * CUDA: autotuned per (batch pad, row width, kind, bias). The candidates keep the two fp32
#   accumulator tiles at <= 32 values per thread at batch 1 (2·BATCH_PAD·BLOCK_N·BLOCK_H /
#   (32·num_warps)), load >= 4 packed bytes per thread per step, and include small BLOCK_N so that
#   SmolLM2's n = 1536 still launches >= 96 programs. Not timed on a GPU yet (this was written
#   without one); benchmarks/shadow_scores.py covers the CPU side only.
INTERPRETER_CONFIG_INT4 = {"BLOCK_N": 16, "BLOCK_H": 32}
INTERPRETER_CONFIG_INT8 = {"BLOCK_N": 16, "BLOCK_D": 64}


def _cuda_configs(batch_pad: int, block_name: str, blocks) -> list:
    configs = []
    for block_n in (8, 16, 32, 64):
        for blk in blocks:
            for num_warps in (2, 4, 8):
                per_thread = block_n * blk // (32 * num_warps)
                if per_thread >= 4 and 2 * batch_pad * per_thread <= max(64, 16 * batch_pad):
                    configs.append(triton.Config({"BLOCK_N": block_n, block_name: blk}, num_warps=num_warps,
                                                 num_stages=3))
    return configs


_tuned: dict = {}


def _tuned_kernel(bits: int, batch_pad: int):
    key = (bits, batch_pad)
    if key not in _tuned:
        if bits == 4:
            _tuned[key] = triton.autotune(configs=_cuda_configs(batch_pad, "BLOCK_H", (32, 64, 128, 256)),
                                          key=["H", "GROUP_BYTES", "KIND", "HAS_BIAS"], do_bench=autotune_bench,
                                          cache_results=True)(_shadow_int4_kernel)
        else:
            _tuned[key] = triton.autotune(configs=_cuda_configs(batch_pad, "BLOCK_D", (64, 128, 256, 512)),
                                          key=["D", "KIND", "HAS_BIAS"], do_bench=autotune_bench,
                                          cache_results=True)(_shadow_int8_kernel)
    return _tuned[key]


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def shadow_scores_int4_triton(x: torch.Tensor, q_gate: torch.Tensor, s_gate: torch.Tensor, q_up: torch.Tensor,
                              s_up: torch.Tensor, gate_bias: Optional[torch.Tensor] = None,
                              up_bias: Optional[torch.Tensor] = None, kind: str = "swiglu") -> torch.Tensor:
    """Launch the int4 kernel: scores [b, n] float32. Raises on unsupported inputs (module doc)."""
    check_shadow_args(4, x, q_gate, s_gate, q_up, s_up, gate_bias, up_bias, kind)
    require_triton_device(x.device, "shadow_scores_int4")
    b, d = x.shape
    n, h = q_gate.shape
    out = torch.empty((b, n), device=x.device, dtype=torch.float32)
    if n == 0:
        return out
    group_bytes = h // s_gate.shape[1]
    if q_up.stride(0) != q_gate.stride(0) or s_up.stride(0) != s_gate.stride(0):  # one row stride each
        q_gate, q_up, s_gate, s_up = (t.contiguous() for t in (q_gate, q_up, s_gate, s_up))
    has_bias = gate_bias is not None
    args = (x, q_gate, s_gate, q_up, s_up, gate_bias if has_bias else s_gate, up_bias if has_bias else s_up, out,
            b, n, d, h, group_bytes, x.stride(0), q_gate.stride(0), s_gate.stride(0), out.stride(0))
    meta = dict(KIND=kind, HAS_BIAS=has_bias, BATCH_PAD=triton.next_power_of_2(b), enable_fp_fusion=True)
    with device_guard(x.device):
        if use_fixed_config(x.device):
            cfg = INTERPRETER_CONFIG_INT4
            _shadow_int4_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](*args, **meta, **cfg)
        else:
            _tuned_kernel(4, meta["BATCH_PAD"])[lambda m: (triton.cdiv(n, m["BLOCK_N"]),)](*args, **meta)
    return out


def shadow_scores_int8_triton(x: torch.Tensor, q_gate: torch.Tensor, s_gate: torch.Tensor, q_up: torch.Tensor,
                              s_up: torch.Tensor, gate_bias: Optional[torch.Tensor] = None,
                              up_bias: Optional[torch.Tensor] = None, kind: str = "swiglu") -> torch.Tensor:
    """Launch the int8 kernel: scores [b, n] float32."""
    check_shadow_args(8, x, q_gate, s_gate, q_up, s_up, gate_bias, up_bias, kind)
    require_triton_device(x.device, "shadow_scores_int8")
    b, d = x.shape
    n = q_gate.shape[0]
    out = torch.empty((b, n), device=x.device, dtype=torch.float32)
    if n == 0:
        return out
    if q_up.stride(0) != q_gate.stride(0):
        q_gate, q_up = q_gate.contiguous(), q_up.contiguous()
    has_bias = gate_bias is not None
    args = (x, q_gate, s_gate, q_up, s_up, gate_bias if has_bias else s_gate, up_bias if has_bias else s_up, out,
            b, n, d, x.stride(0), q_gate.stride(0), out.stride(0))
    meta = dict(KIND=kind, HAS_BIAS=has_bias, BATCH_PAD=triton.next_power_of_2(b), enable_fp_fusion=True)
    with device_guard(x.device):
        if use_fixed_config(x.device):
            cfg = INTERPRETER_CONFIG_INT8
            _shadow_int8_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](*args, **meta, **cfg)
        else:
            _tuned_kernel(8, meta["BATCH_PAD"])[lambda m: (triton.cdiv(n, m["BLOCK_N"]),)](*args, **meta)
    return out


# --------------------------------------------------------------------------------------------------
# Torch references
# --------------------------------------------------------------------------------------------------
def _dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, d: int) -> torch.Tensor:
    """w [n, d] fp32 (the maths of offload.predict.quant.dequantize_int4)."""
    n, h = packed.shape
    q = torch.stack(((packed & 0xF), (packed >> 4)), dim=-1).view(n, 2 * h).float() - 8
    group = (2 * h) // scales.shape[1]
    w = q.view(n, scales.shape[1], group) * scales.float().unsqueeze(-1)
    return w.view(n, 2 * h)[:, :d]


def _activation_score(g: torch.Tensor, u: torch.Tensor, kind: str) -> torch.Tensor:
    """|h| (h itself for drelu, never negative): models.ffn_kind.activation, the reference of every kernel."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return ffn_activation(kind, g, u).abs()


def _bias(v):
    return None if v is None else v.float()


def shadow_scores_int4_reference(x, q_gate, s_gate, q_up, s_up, gate_bias=None, up_bias=None,
                                 kind: str = "swiglu") -> torch.Tensor:
    """The same maths in plain torch: dequantize to fp32, two matmuls, activation. [b, n] float32."""
    d = x.shape[1]
    xf = x.float()
    g = torch.nn.functional.linear(xf, _dequantize_int4(q_gate, s_gate, d), _bias(gate_bias))
    u = torch.nn.functional.linear(xf, _dequantize_int4(q_up, s_up, d), _bias(up_bias))
    return _activation_score(g, u, kind)


def shadow_scores_int8_reference(x, q_gate, s_gate, q_up, s_up, gate_bias=None, up_bias=None,
                                 kind: str = "swiglu") -> torch.Tensor:
    xf = x.float()
    g = torch.nn.functional.linear(xf, q_gate.float() * s_gate.float()[:, None], _bias(gate_bias))
    u = torch.nn.functional.linear(xf, q_up.float() * s_up.float()[:, None], _bias(up_bias))
    return _activation_score(g, u, kind)


# --------------------------------------------------------------------------------------------------
# torch.library operators: torch.ops.offload.shadow_scores_int4 / _int8 (same scheme as gather_gemv:
# one kernel per dispatch key, CUDA → Triton, CPU → reference or the interpreter, a fake kernel for
# torch.compile; inference only)
# --------------------------------------------------------------------------------------------------
_lib = torch.library.Library("offload", "FRAGMENT")
_SCHEMA = ("(Tensor x, Tensor q_gate, Tensor s_gate, Tensor q_up, Tensor s_up, Tensor? gate_bias=None, "
           "Tensor? up_bias=None, str kind=\"swiglu\") -> Tensor")
_IMPLS = {4: (shadow_scores_int4_triton, shadow_scores_int4_reference),
          8: (shadow_scores_int8_triton, shadow_scores_int8_reference)}


def _register(bits: int) -> None:
    name = f"shadow_scores_int{bits}"
    triton_fn, reference_fn = _IMPLS[bits]
    _lib.define(name + _SCHEMA)

    def cuda(x, q_gate, s_gate, q_up, s_up, gate_bias=None, up_bias=None, kind="swiglu"):
        return triton_fn(x, q_gate, s_gate, q_up, s_up, gate_bias, up_bias, kind)

    def cpu(x, q_gate, s_gate, q_up, s_up, gate_bias=None, up_bias=None, kind="swiglu"):
        if resolve_backend(x.device) == "triton":
            return triton_fn(x, q_gate, s_gate, q_up, s_up, gate_bias, up_bias, kind)
        check_shadow_args(bits, x, q_gate, s_gate, q_up, s_up, gate_bias, up_bias, kind)
        return reference_fn(x, q_gate, s_gate, q_up, s_up, gate_bias, up_bias, kind)

    def fake(x, q_gate, s_gate, q_up, s_up, gate_bias=None, up_bias=None, kind="swiglu"):
        check_shadow_args(bits, x, q_gate, s_gate, q_up, s_up, gate_bias, up_bias, kind)
        return x.new_empty((x.shape[0], q_gate.shape[0]), dtype=torch.float32)

    _lib.impl(name, cuda, "CUDA")
    _lib.impl(name, cpu, "CPU")
    torch.library.register_fake(f"offload::{name}", fake, lib=_lib)


_register(4)
_register(8)


def _dispatch(bits: int, backend: str, args) -> torch.Tensor:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_shadow_args(bits, *args)
    if backend == "auto":
        return getattr(torch.ops.offload, f"shadow_scores_int{bits}")(*args)
    triton_fn, reference_fn = _IMPLS[bits]
    return (triton_fn if backend == "triton" else reference_fn)(*args)


def shadow_scores_int4(x: torch.Tensor, q_gate: torch.Tensor, s_gate: torch.Tensor, q_up: torch.Tensor,
                       s_up: torch.Tensor, gate_bias: Optional[torch.Tensor] = None,
                       up_bias: Optional[torch.Tensor] = None, kind: str = "swiglu", *,
                       backend: str = "auto") -> torch.Tensor:
    """scores [b, n] float32 = |act(x·Q(Wg)ᵀ (+bg), x·Q(Wu)ᵀ (+bu))| from packed int4 rows.

    backend: "auto" → ``torch.ops.offload.shadow_scores_int4`` (device dispatch, see
    ``resolve_backend``), "triton" the launcher, "torch" the reference; all check their inputs alike.
    """
    return _dispatch(4, backend, (x, q_gate, s_gate, q_up, s_up, gate_bias, up_bias, kind))


def shadow_scores_int8(x: torch.Tensor, q_gate: torch.Tensor, s_gate: torch.Tensor, q_up: torch.Tensor,
                       s_up: torch.Tensor, gate_bias: Optional[torch.Tensor] = None,
                       up_bias: Optional[torch.Tensor] = None, kind: str = "swiglu", *,
                       backend: str = "auto") -> torch.Tensor:
    """As :func:`shadow_scores_int4` for int8 rows with one scale per row."""
    return _dispatch(8, backend, (x, q_gate, s_gate, q_up, s_up, gate_bias, up_bias, kind))
