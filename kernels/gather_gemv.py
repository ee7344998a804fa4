"""Fused row-gather GEMV: the first half of a sparse FFN, over the predicted-active hot rows only.

For a batch of ``b`` tokens (1..8, decode) and ``k`` active neurons ``idx`` of a layer with ``n``
neurons and model width ``d``::

    x    [b, d]   FFN input (after the norm), fp16 / bf16 / fp32
    W1   [n, d]   gate_proj.weight (LLaMA) or fc1.weight (OPT); row i = neuron i
    W2   [n, d]   up_proj.weight (absent for "relu_fc")
    b1   [n]      optional bias on the W1 side (OPT's fc1.bias)
    idx  [k]      int32 neuron indices (the union of the batch's active sets; sorted is kinder
                  to DRAM pages and caches, but any order works)

    g = x · W1[idx]ᵀ (+ b1[idx])        [b, k]
    u = x · W2[idx]ᵀ                    [b, k]
    h = act(g, u)                       [b, k]  float32

    "swiglu":  silu(g) * u      (LLaMA, Mistral, Qwen2, SmolLM)
    "relu":    relu(g) * u      (ReluLLaMA / ProSparse: hidden_act="relu" on a gated FFN)
    "drelu":   relu(g) * relu(u) (TurboSparse / Bamboo dReLU)
    "relu_fc": relu(g)          (OPT: fc1 with bias, no up projection; pass w2=None)

``h`` is always float32: it is tiny (b·k·4 bytes) next to the weights, and sparse_down reads it
straight back, so keeping full precision costs nothing measurable and removes one rounding step.

Padding: an index outside ``[0, n)`` (e.g. -1) is an inactive slot: its column of ``h`` is 0 and
no weight is read for it. A caller that needs static shapes (CUDA graphs, torch.compile without
recompiles) can therefore pass a fixed-capacity ``idx`` padded with -1. Indices are never
checked against ``n`` on the host: that would need a device sync.

Three ways to compute it (see ``resolve_backend``):

* ``gather_gemv_triton``: the Triton launcher (compiled on CUDA; on CPU tensors only when Triton
  runs in its interpreter, i.e. ``TRITON_INTERPRET=1`` was set before triton was imported).
* ``gather_gemv_reference``: plain torch, obviously right, any device; also the CPU hot path.
* ``torch.ops.offload.gather_gemv``: the registered operator (what ``gather_gemv(backend="auto")``
  calls); the dispatcher picks the CUDA or the CPU kernel by the tensors' device.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
import triton.testing

from offload.models.ffn_kind import FFNKind
from offload.models.ffn_kind import activation as ffn_activation

from .launch import (BACKENDS, MAX_BATCH, check_float, check_idx, check_last_dim_contiguous, check_no_grad,
                     check_same_device, check_tensor, check_token_rows, interpreter_active, launch,
                     require_triton_device, resolve_backend)

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "MAX_BATCH",
    "check_activation",
    "gather_gemv",
    "gather_gemv_reference",
    "gather_gemv_triton",
    "interpreter_active",
    "resolve_backend",
]

ACTIVATIONS = tuple(k.value for k in FFNKind if k.kernels)  # the ACTIVATION constexpr: models.ffn_kind's names


def check_activation(activation: str) -> None:
    """ValueError unless ``activation`` is one of ACTIVATIONS (UnsupportedModelError naming a kind that the
    kernels do not compute: models.ffn_kind)."""
    if activation in tuple(k.value for k in FFNKind):
        FFNKind(activation).check_kernels("the Triton hot-row kernels")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_gather_gemv_args(x, w1, idx, w2=None, b1=None, activation: str = "swiglu") -> None:
    """Raise ValueError/TypeError, naming the argument, unless the inputs are supported."""
    check_activation(activation)
    b, d = check_token_rows("x", x)
    check_tensor("w1", w1, 2)
    check_float("w1", w1)
    if w1.shape[1] != d:
        raise ValueError(f"w1 must have shape [n, d={d}] (one row per neuron, d = x.shape[1]), "
                         f"got {tuple(w1.shape)}")
    check_last_dim_contiguous("w1", w1)
    check_same_device("w1", w1, x.device)
    n = w1.shape[0]
    if activation == "relu_fc":
        if w2 is not None:
            raise ValueError("w2 must be None for activation 'relu_fc' (h = relu(x·w1ᵀ + b1))")
    else:
        if w2 is None:
            raise ValueError(f"w2 (up_proj rows, shape [n, d]) is required for activation "
                             f"{activation!r}")
        check_tensor("w2", w2, 2)
        check_float("w2", w2)
        if tuple(w2.shape) != tuple(w1.shape):
            raise ValueError(f"w2 must have the shape of w1 {tuple(w1.shape)}, got {tuple(w2.shape)}")
        check_last_dim_contiguous("w2", w2)
        check_same_device("w2", w2, x.device)
    if b1 is not None:
        check_tensor("b1", b1, 1)
        check_float("b1", b1)
        if b1.shape[0] != n:
            raise ValueError(f"b1 must have shape [n={n}] (one bias per neuron), got {tuple(b1.shape)}")
        check_last_dim_contiguous("b1", b1)
        check_same_device("b1", b1, x.device)
    check_idx(idx, x.device)
    check_no_grad("gather_gemv", x=x, w1=w1, w2=w2, b1=b1)


# --------------------------------------------------------------------------------------------------
# The kernel, and the pieces the other hot-side kernels share
# --------------------------------------------------------------------------------------------------
@triton.jit
def active_rows(idx_ptr, offs_k, in_k, N):
    """(rows, valid) of the index slots offs_k: rows int64 (0 where not valid, so addresses stay in
    bounds), valid = in_k and the index lies in [0, N); padding slots (e.g. -1) are not valid."""
    rows = tl.load(idx_ptr + offs_k, mask=in_k, other=-1).to(tl.int64)
    valid = in_k & (rows >= 0) & (rows < N)
    return tl.where(valid, rows, 0), valid


@triton.jit
def program_slots(idx_ptr, K, N, BLOCK_K: tl.constexpr):
    """The BLOCK_K index slots of this program (axis 0): (offs_k, in_k, rows, valid) as in active_rows."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = offs_k < K
    rows, valid = active_rows(idx_ptr, offs_k, in_k, N)
    return offs_k, in_k, rows, valid


@triton.jit
def x_pairs(x_ptr, offs_b, in_b, offs_h, D, stride_xb):
    """The even and odd columns (2h, 2h+1 for h in offs_h) of the tokens offs_b of x [B, D], fp32
    [BATCH_PAD, BLOCK_H] each, 0 outside: what one byte of two 4-bit weights multiplies."""
    col = 2 * offs_h
    ptr = x_ptr + offs_b[:, None] * stride_xb + col[None, :]
    xe = tl.load(ptr, mask=in_b[:, None] & (col < D)[None, :], other=0.0).to(tl.float32)
    xo = tl.load(ptr + 1, mask=in_b[:, None] & (col + 1 < D)[None, :], other=0.0).to(tl.float32)
    return xe, xo


@triton.jit
def activate(g, u, ACTIVATION: tl.constexpr):
    """act(g, u) elementwise in fp32 (models.ffn_kind's kinds); u is unused for "relu_fc"."""
    if ACTIVATION == "swiglu":
        h = g * tl.sigmoid(g) * u
    elif ACTIVATION == "relu":
        h = tl.maximum(g, 0.0) * u
    elif ACTIVATION == "drelu":
        h = tl.maximum(g, 0.0) * tl.maximum(u, 0.0)
    else:  # "relu_fc"
        h = tl.maximum(g, 0.0)
    return h


@triton.jit(do_not_specialize=["K_BUCKET"])
def _gather_gemv_kernel(
    x_ptr, w1_ptr, w2_ptr, b1_ptr, idx_ptr, h_ptr,
    B, K, N, D,
    stride_xb, stride_w1n, stride_w2n, stride_hb,
    K_BUCKET,  # next_power_of_2(K): autotune key only, so a new k does not re-tune
    ACTIVATION: tl.constexpr,  # "swiglu" | "relu" | "drelu" | "relu_fc"
    HAS_W2: tl.constexpr,
    HAS_B1: tl.constexpr,
    BATCH_PAD: tl.constexpr,  # next_power_of_2(B), <= 8
    BLOCK_K: tl.constexpr,  # active neurons (gathered rows) per program
    BLOCK_D: tl.constexpr,  # columns of d per loop step
):
    """h[:, j] = act(x · W1[idx[j]]ᵀ (+ b1[idx[j]]), x · W2[idx[j]]ᵀ) for BLOCK_K consecutive j.

    Shapes: x [B, D] (row stride stride_xb, unit column stride), W1/W2 [N, D] (row strides
    stride_w1n/stride_w2n, unit column stride), b1 [N], idx [K] int32, h [B, K] fp32 (row stride
    stride_hb). Grid: (cdiv(K, BLOCK_K),). Program p owns h[:, p*BLOCK_K : (p+1)*BLOCK_K] and runs
    the full dot products over D, so the non-linear activation is applied in registers and h is
    written once (no split over D, hence no partial sums in memory).

    Per step it loads a [BLOCK_K, BLOCK_D] tile of gathered rows (each row's BLOCK_D elements are
    contiguous, so every row is one coalesced segment) and the [BATCH_PAD, BLOCK_D] slice of x, and
    accumulates x * w elementwise in fp32 into [BATCH_PAD, BLOCK_K, BLOCK_D]; the sum over D runs
    once after the loop. No tensor cores: a batch of at most 8 is below their tile sizes and the
    kernel is bandwidth bound anyway. Slots with idx outside [0, N) read nothing and produce 0.
    """
    offs_k, in_k, rows, valid = program_slots(idx_ptr, K, N, BLOCK_K)
    offs_b = tl.arange(0, BATCH_PAD)
    in_b = offs_b < B

    # Elementwise fp32 accumulators over the whole tile; reduced over D once, after the loop, so
    # the loop body has no cross-thread reduction (shuffles / shared memory / barriers).
    acc1 = tl.zeros([BATCH_PAD, BLOCK_K, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BATCH_PAD, BLOCK_K, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        xv = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_d[None, :],
                     mask=in_b[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        w_mask = valid[:, None] & in_d[None, :]
        w1 = tl.load(w1_ptr + rows[:, None] * stride_w1n + offs_d[None, :],
                     mask=w_mask, other=0.0).to(tl.float32)
        acc1 += xv[:, None, :] * w1[None, :, :]
        if HAS_W2:
            w2 = tl.load(w2_ptr + rows[:, None] * stride_w2n + offs_d[None, :],
                         mask=w_mask, other=0.0).to(tl.float32)
            acc2 += xv[:, None, :] * w2[None, :, :]

    g = tl.sum(acc1, axis=2)  # [BATCH_PAD, BLOCK_K]
    if HAS_B1:
        g += tl.load(b1_ptr + rows, mask=valid, other=0.0).to(tl.float32)[None, :]
    h = tl.where(valid[None, :], activate(g, tl.sum(acc2, axis=2), ACTIVATION), 0.0)
    tl.store(h_ptr + offs_b[:, None] * stride_hb + offs_k[None, :], h,
             mask=in_b[:, None] & in_k[None, :])


# Block sizes.
# * Interpreter (CPU tests): one fixed config with big blocks, since each program instance costs
#   ~10 ms of Python. Tests may change INTERPRETER_CONFIG to exercise other tilings.
# * CUDA (H100 target): autotuned per (batch pad, d, k bucket, activation, dtypes). Candidates give
#   every thread >= 8 weight elements per step (one 16-byte vector load of fp16; checked in the
#   sm_90 PTX: ld.global.v4), keep the fp32 accumulator tile [BATCH_PAD, BLOCK_K, BLOCK_D] at
#   <= 32 values per thread (64 at batch 8, the least that still allows 16-byte loads), which
#   compiles for sm_90 without local-memory spills, use BLOCK_D >= 128 so each gathered row is read
#   in >= 256-byte segments, and include small BLOCK_K (2, 4) so that low densities (k ~ 550 at
#   5 % of 11008) still launch more programs than the H100's 132 SMs. The loads do not feed
#   tl.dot, so Triton does not software-pipeline them: latency is hidden by occupancy (many small
#   programs), which is why small tiles are in the list. Not yet timed on an H100 (the session
#   that wrote this had no GPU): benchmarks/kernels_gpu.py prints the configs the tuner picks.
INTERPRETER_CONFIG = {"BLOCK_K": 32, "BLOCK_D": 64}


def tile_configs(batch_pad: int, outer: str, outer_sizes, inner: str, inner_sizes) -> list:
    """Autotune configs over two tile sizes (``outer`` × ``inner``, in that order) and 2/4/8 warps that
    keep >= 8 weight elements per thread per step and the [batch_pad, tile] fp32 accumulator <= 32
    values per thread (64 at batch 8). Shared by the gather-GEMV and sparse-down kernels."""
    configs = []
    for a in outer_sizes:
        for b in inner_sizes:
            for num_warps in (2, 4, 8):
                w_per_thread = a * b // (32 * num_warps)
                if w_per_thread >= 8 and batch_pad * w_per_thread <= max(32, 8 * batch_pad):
                    configs.append(triton.Config({outer: a, inner: b}, num_warps=num_warps, num_stages=3))
    return configs


def _cuda_configs(batch_pad: int) -> list:
    return tile_configs(batch_pad, "BLOCK_K", (2, 4, 8, 16, 32), "BLOCK_D", (128, 256, 512))


def autotune_bench(kernel_call, quantiles):
    """Autotuner timing: the kernels take microseconds, so 20 ms of repetitions is plenty (Triton's
    default, 25 + 100 ms per config, would make the first call of each shape take seconds).
    Results are cached on disk (cache_results=True), keyed by the tuning key and dtypes."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


tuned_kernels: dict = {}


def _tuned_kernel(batch_pad: int):
    if batch_pad not in tuned_kernels:
        tuned_kernels[batch_pad] = triton.autotune(
            configs=_cuda_configs(batch_pad), key=["D", "K_BUCKET", "ACTIVATION", "HAS_B1"],
            do_bench=autotune_bench, cache_results=True)(_gather_gemv_kernel)
    return tuned_kernels[batch_pad]


def gather_gemv_triton(x: torch.Tensor, w1: torch.Tensor, idx: torch.Tensor,
                       w2: Optional[torch.Tensor] = None, b1: Optional[torch.Tensor] = None,
                       activation: str = "swiglu") -> torch.Tensor:
    """Launch the Triton kernel: h [b, k] float32. Raises on unsupported inputs (see module doc).

    No device sync: safe inside CUDA-graph capture once autotuning for the shape has run.
    """
    check_gather_gemv_args(x, w1, idx, w2, b1, activation)
    require_triton_device(x.device, "gather_gemv")
    b, d = x.shape
    n = w1.shape[0]
    k = idx.shape[0]
    h = torch.empty((b, k), device=x.device, dtype=torch.float32)
    if k == 0:
        return h
    has_w2, has_b1 = w2 is not None, b1 is not None
    args = (x, w1, w2 if has_w2 else w1, b1 if has_b1 else w1, idx, h,
            b, k, n, d,
            x.stride(0), w1.stride(0), (w2 if has_w2 else w1).stride(0), h.stride(0),
            triton.next_power_of_2(k))
    meta = dict(ACTIVATION=activation, HAS_W2=has_w2, HAS_B1=has_b1,
                BATCH_PAD=triton.next_power_of_2(b), enable_fp_fusion=True)
    launch(_gather_gemv_kernel, lambda: _tuned_kernel(meta["BATCH_PAD"]), lambda c: (triton.cdiv(k, c["BLOCK_K"]),),
           args, meta, INTERPRETER_CONFIG, x.device)
    return h


# --------------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------------
def gather_gemv_reference(x: torch.Tensor, w1: torch.Tensor, idx: torch.Tensor,
                          w2: Optional[torch.Tensor] = None, b1: Optional[torch.Tensor] = None,
                          activation: str = "swiglu") -> torch.Tensor:
    """The same maths in plain torch (fp32): gather the rows, matmul, activate. h [b, k] float32."""
    n = w1.shape[0]
    valid = (idx >= 0) & (idx < n)
    rows = torch.where(valid, idx, 0).long()
    xf = x.float()
    g = xf @ w1.index_select(0, rows).float().T
    if b1 is not None:
        g = g + b1.index_select(0, rows).float()
    check_activation(activation)
    if FFNKind(activation).gated:
        h = ffn_activation(activation, g, xf @ w2.index_select(0, rows).float().T)
    else:
        h = ffn_activation(activation, None, g)
    return torch.where(valid, h, 0.0)


# --------------------------------------------------------------------------------------------------
# torch.library operator: torch.ops.offload.gather_gemv
#
# Defined with torch.library.Library + one kernel per dispatch key + register_fake, rather than
# triton_op or custom_op:
# * the dispatcher's device dispatch *is* the backend rule of resolve_backend(): CUDA → Triton,
#   CPU → reference (or the Triton interpreter when it is active);
# * torch.compile treats the op as opaque (fake kernel for shapes) and calls the same kernels as
#   eager, so compiled and eager results agree by construction, and the CPU kernel may run Triton's
#   interpreter, which triton_op's trace-the-body fake/decomposition could not;
# * dispatch costs ~8 µs per call here against ~55 µs for custom_op's Python wrapper (measured on
#   this 2-core machine), which matters at decode when calls are not captured in a CUDA graph.
# The price: Inductor does not inline the Triton kernel (it calls the op), and there is no autograd
# formula (inference only; the argument checks refuse inputs that require grad).
# --------------------------------------------------------------------------------------------------
_lib = torch.library.Library("offload", "FRAGMENT")
_lib.define("gather_gemv(Tensor x, Tensor w1, Tensor idx, Tensor? w2=None, Tensor? b1=None, "
            "str activation=\"swiglu\") -> Tensor")


def _gather_gemv_cuda(x, w1, idx, w2=None, b1=None, activation="swiglu"):
    return gather_gemv_triton(x, w1, idx, w2, b1, activation)


def _gather_gemv_cpu(x, w1, idx, w2=None, b1=None, activation="swiglu"):
    if resolve_backend(x.device) == "triton":
        return gather_gemv_triton(x, w1, idx, w2, b1, activation)
    check_gather_gemv_args(x, w1, idx, w2, b1, activation)
    return gather_gemv_reference(x, w1, idx, w2, b1, activation)


def _gather_gemv_fake(x, w1, idx, w2=None, b1=None, activation="swiglu"):
    check_gather_gemv_args(x, w1, idx, w2, b1, activation)
    return x.new_empty((x.shape[0], idx.shape[0]), dtype=torch.float32)


_lib.impl("gather_gemv", _gather_gemv_cuda, "CUDA")
_lib.impl("gather_gemv", _gather_gemv_cpu, "CPU")
torch.library.register_fake("offload::gather_gemv", _gather_gemv_fake, lib=_lib)


def gather_gemv(x: torch.Tensor, w1: torch.Tensor, idx: torch.Tensor,
                w2: Optional[torch.Tensor] = None, b1: Optional[torch.Tensor] = None,
                activation: str = "swiglu", *, backend: str = "auto") -> torch.Tensor:
    """h [b, k] float32 = act(x·W1[idx]ᵀ (+b1[idx]), x·W2[idx]ᵀ); see the module docstring.

    backend: "auto" calls ``torch.ops.offload.gather_gemv`` (device dispatch as documented in
    ``resolve_backend``; this is what torch.compile / CUDA graphs should see), "triton" forces the
    Triton launcher, "torch" the reference. All three check their inputs the same way.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_gather_gemv_args(x, w1, idx, w2, b1, activation)
    if backend == "auto":
        return torch.ops.offload.gather_gemv(x, w1, idx, w2, b1, activation)
    if backend == "triton":
        return gather_gemv_triton(x, w1, idx, w2, b1, activation)
    return gather_gemv_reference(x, w1, idx, w2, b1, activation)
