"""Column-sparse down projection: the second half of a sparse FFN, over the active hot neurons only.

    h    [b, k]   activations of the k active neurons (gather_gemv's output; any float dtype)
    W3t  [n, d]   down_proj.weight TRANSPOSED, row-major: row i = neuron i's down column, contiguous
    idx  [k]      int32 neuron indices, the same ones that produced h

    y = h · W3t[idx]        [b, d]  float32        (y[t] = Σ_j h[t, j] · W3t[idx[j]])

Only the k active rows of W3t are read. Entries of idx outside [0, n) are padding and are skipped
(their h column is ignored), as in gather_gemv; repeated indices are summed. The output is float32
so the caller can add the cold (CPU) part and any bias before rounding once.

Reduction strategy: deterministic split-K. The k rows are cut into SPLIT contiguous chunks of
ROWS_PER_SPLIT rows; program (j, s) sums chunk s for columns block j and writes fp32 partials
[SPLIT, b, d]; a second small kernel sums the SPLIT partials in a fixed order. Unlike TEAL's
atomics (fp16 atomics in TEAL; fp32 would be needed for accuracy) the result does not depend on
scheduling, so runs are bit-reproducible, which keeps hot+cold numerics testable and greedy
decoding stable. The price is one extra launch and SPLIT·b·d·4 bytes of partials (≤ 64·8·4096·4 =
8 MiB; 1 MiB at batch 1), written and at once re-read, so they should stay in the H100's 50 MB
L2 (not yet measured), while the weights read are k·d·2 bytes (9 MB at k = 1100, d = 4096,
fp16). Atomics would need a zeroed output (a memset launch) as well, so they would save no
launch. When SPLIT == 1 (k ≤ 64) the partial *is* the output and the second kernel is skipped.

Three ways to compute it, as for gather_gemv (see ``resolve_backend``): ``sparse_down_triton``,
``sparse_down_reference`` and the operator ``torch.ops.offload.sparse_down`` (``backend="auto"``).
``ffn_hot_forward`` chains both halves.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .gather_gemv import (active_rows, autotune_bench, check_gather_gemv_args, gather_gemv_reference,
                          gather_gemv_triton, tile_configs)
from .launch import (BACKENDS, check_float, check_idx, check_last_dim_contiguous, check_no_grad, check_same_device,
                     check_tensor, check_token_rows, device_guard, launch, require_triton_device, resolve_backend)

__all__ = [
    "ffn_hot_forward",
    "sparse_down",
    "sparse_down_reference",
    "sparse_down_triton",
    "split_plan",
    "sum_splits",
]


def _check_w3t(w3t, device: torch.device) -> None:
    check_tensor("w3t", w3t, 2)
    check_float("w3t", w3t)
    check_last_dim_contiguous("w3t", w3t)
    check_same_device("w3t", w3t, device)


def check_sparse_down_args(h, w3t, idx) -> None:
    """Raise ValueError/TypeError, naming the argument, unless the inputs are supported."""
    check_token_rows("h", h)
    _check_w3t(w3t, h.device)
    check_idx(idx, h.device)
    if h.shape[1] != idx.shape[0]:
        raise ValueError(f"h must have one column per index: shape [b, k={idx.shape[0]}], "
                         f"got {tuple(h.shape)}")
    check_no_grad("sparse_down", h=h, w3t=w3t)


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["K_BUCKET"])
def _sparse_down_kernel(
    h_ptr, w_ptr, idx_ptr, out_ptr,
    B, K, N, D, ROWS_PER_SPLIT,
    stride_hb, stride_wn, stride_os, stride_ob,
    K_BUCKET,  # next_power_of_2(K): autotune key only
    BATCH_PAD: tl.constexpr,  # next_power_of_2(B), <= 8
    BLOCK_K: tl.constexpr,  # gathered rows per loop step
    BLOCK_D: tl.constexpr,  # output columns per program
):
    """out[s, :, cols] = Σ_{j in chunk s} h[:, j] · W3t[idx[j], cols]  (fp32 partial sums).

    Shapes: h [B, K] (row stride stride_hb), W3t [N, D] (row stride stride_wn), idx [K] int32,
    out [SPLIT, B, D] fp32 (strides stride_os, stride_ob, 1). Grid: (cdiv(D, BLOCK_D), SPLIT);
    program (j, s) covers columns [j*BLOCK_D, (j+1)*BLOCK_D) and rows idx[s*ROWS_PER_SPLIT :
    (s+1)*ROWS_PER_SPLIT]. Each step loads a [BLOCK_K, BLOCK_D] tile (BLOCK_K gathered rows, each a
    contiguous segment) and h[:, BLOCK_K], and accumulates h * w elementwise in fp32 into
    [BATCH_PAD, BLOCK_K, BLOCK_D]; the sum over the rows runs once after the loop.
    Slots with idx outside [0, N) read nothing.
    """
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    offs_b = tl.arange(0, BATCH_PAD)
    in_b = offs_b < B

    k_start = pid_s * ROWS_PER_SPLIT
    k_end = tl.minimum(k_start + ROWS_PER_SPLIT, K)
    # Elementwise accumulator, reduced over the BLOCK_K rows once after the loop (no cross-thread
    # reduction inside the loop).
    acc = tl.zeros([BATCH_PAD, BLOCK_K, BLOCK_D], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < k_end
        rows, valid = active_rows(idx_ptr, offs_k, in_k, N)
        w = tl.load(w_ptr + rows[:, None] * stride_wn + offs_d[None, :],
                    mask=valid[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        hv = tl.load(h_ptr + offs_b[:, None] * stride_hb + offs_k[None, :],
                     mask=in_b[:, None] & valid[None, :], other=0.0).to(tl.float32)
        acc += hv[:, :, None] * w[None, :, :]
    tl.store(out_ptr + pid_s * stride_os + offs_b[:, None] * stride_ob + offs_d[None, :],
             tl.sum(acc, axis=1),
             mask=in_b[:, None] & in_d[None, :])


@triton.jit
def sum_splits_kernel(part_ptr, y_ptr, NUMEL, SPLIT, BLOCK: tl.constexpr):
    """y[i] = Σ_s part[s, i] in order s = 0..SPLIT-1 (part [SPLIT, NUMEL], y [NUMEL], fp32).

    Grid: (cdiv(NUMEL, BLOCK),). The fixed order makes the split-K sum deterministic.
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * NUMEL + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc, mask=mask)


# Split-K plan: each chunk has a multiple of MIN_ROWS_PER_SPLIT rows (so every BLOCK_K <= 64 tiles
# it exactly) and there are at most MAX_SPLITS chunks. At d = 4096 with BLOCK_D = 128 (32 column
# blocks) that is 288 programs at k = 550 (5 % of 11008), 576 at k = 1100 and 1856 at k = 11008:
# >= 2 per SM on an H100 (132 SMs), with >= 64 rows per program to amortise its partial write.
SPLIT_CONFIG = {"MIN_ROWS_PER_SPLIT": 64, "MAX_SPLITS": 64}
# Interpreter (CPU tests): fixed big blocks, since each program instance costs ~10 ms of Python.
INTERPRETER_CONFIG = {"BLOCK_K": 32, "BLOCK_D": 64}
_SUM_BLOCK = 1024


def sum_splits(part: torch.Tensor, y: torch.Tensor, device: torch.device) -> None:
    """y = the sum of the split-K partials part [SPLIT, b, d] in a fixed order (nothing when SPLIT is 1:
    part is then a view of y)."""
    if part.shape[0] > 1:
        with device_guard(device):
            sum_splits_kernel[(triton.cdiv(y.numel(), _SUM_BLOCK),)](
                part, y, y.numel(), part.shape[0], BLOCK=_SUM_BLOCK, num_warps=4, enable_fp_fusion=True)


def split_plan(k: int) -> tuple[int, int]:
    """(rows_per_split, splits) used for k active rows; splits == 0 when k == 0."""
    unit, max_splits = SPLIT_CONFIG["MIN_ROWS_PER_SPLIT"], SPLIT_CONFIG["MAX_SPLITS"]
    rows = max(unit, triton.cdiv(triton.cdiv(k, max_splits), unit) * unit)
    return rows, triton.cdiv(k, rows)


def _cuda_configs(batch_pad: int) -> list:
    # As for gather_gemv: >= 8 weight elements per thread per step (16-byte vector loads), the
    # [BATCH_PAD, BLOCK_K, BLOCK_D] fp32 accumulator <= 32 values per thread (64 at batch 8), and
    # BLOCK_D >= 64 (128-byte fp16 segments per gathered row, one cache line).
    return tile_configs(batch_pad, "BLOCK_D", (64, 128, 256), "BLOCK_K", (8, 16, 32, 64))


tuned_kernels: dict = {}


def _tuned_kernel(batch_pad: int):
    if batch_pad not in tuned_kernels:
        tuned_kernels[batch_pad] = triton.autotune(
            configs=_cuda_configs(batch_pad), key=["D", "K_BUCKET"],
            do_bench=autotune_bench, cache_results=True)(_sparse_down_kernel)
    return tuned_kernels[batch_pad]


def sparse_down_triton(h: torch.Tensor, w3t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Launch the Triton kernels: y [b, d] float32 = h · W3t[idx]. Raises on unsupported inputs.

    No device sync: safe inside CUDA-graph capture once autotuning for the shape has run.
    """
    check_sparse_down_args(h, w3t, idx)
    require_triton_device(h.device, "sparse_down")
    b, k = h.shape
    n, d = w3t.shape
    if k == 0 or d == 0:
        return torch.zeros((b, d), device=h.device, dtype=torch.float32)
    rows, splits = split_plan(k)
    y = torch.empty((b, d), device=h.device, dtype=torch.float32)
    part = y.unsqueeze(0) if splits == 1 else torch.empty(
        (splits, b, d), device=h.device, dtype=torch.float32)
    args = (h, w3t, idx, part, b, k, n, d, rows,
            h.stride(0), w3t.stride(0), part.stride(0), part.stride(1),
            triton.next_power_of_2(k))
    meta = dict(BATCH_PAD=triton.next_power_of_2(b), enable_fp_fusion=True)
    launch(_sparse_down_kernel, lambda: _tuned_kernel(meta["BATCH_PAD"]),
           lambda c: (triton.cdiv(d, c["BLOCK_D"]), splits), args, meta, INTERPRETER_CONFIG, h.device)
    sum_splits(part, y, h.device)
    return y


def sparse_down_reference(h: torch.Tensor, w3t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The same maths in plain torch (fp32): y [b, d] = h · W3t[idx], padding slots dropped."""
    n = w3t.shape[0]
    valid = (idx >= 0) & (idx < n)
    rows = torch.where(valid, idx, 0).long()
    hf = torch.where(valid, h.float(), 0.0)
    return hf @ w3t.index_select(0, rows).float()


# --------------------------------------------------------------------------------------------------
# torch.library operator: torch.ops.offload.sparse_down (registered like offload::gather_gemv; see
# the note there)
# --------------------------------------------------------------------------------------------------
_lib = torch.library.Library("offload", "FRAGMENT")
_lib.define("sparse_down(Tensor h, Tensor w3t, Tensor idx) -> Tensor")


def _sparse_down_cuda(h, w3t, idx):
    return sparse_down_triton(h, w3t, idx)


def _sparse_down_cpu(h, w3t, idx):
    if resolve_backend(h.device) == "triton":
        return sparse_down_triton(h, w3t, idx)
    check_sparse_down_args(h, w3t, idx)
    return sparse_down_reference(h, w3t, idx)


def _sparse_down_fake(h, w3t, idx):
    check_sparse_down_args(h, w3t, idx)
    return h.new_empty((h.shape[0], w3t.shape[1]), dtype=torch.float32)


_lib.impl("sparse_down", _sparse_down_cuda, "CUDA")
_lib.impl("sparse_down", _sparse_down_cpu, "CPU")
torch.library.register_fake("offload::sparse_down", _sparse_down_fake, lib=_lib)


def sparse_down(h: torch.Tensor, w3t: torch.Tensor, idx: torch.Tensor, *,
                backend: str = "auto") -> torch.Tensor:
    """y [b, d] float32 = h · W3t[idx]; see the module docstring.

    backend: "auto" calls ``torch.ops.offload.sparse_down`` (device dispatch as documented in
    ``offload.kernels.gather_gemv.resolve_backend``), "triton" forces the Triton launcher, "torch"
    the reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_sparse_down_args(h, w3t, idx)
    if backend == "auto":
        return torch.ops.offload.sparse_down(h, w3t, idx)
    if backend == "triton":
        return sparse_down_triton(h, w3t, idx)
    return sparse_down_reference(h, w3t, idx)


def ffn_hot_forward(x: torch.Tensor, idx: torch.Tensor, *, w1: torch.Tensor, w3t: torch.Tensor,
                    w2: Optional[torch.Tensor] = None, b1: Optional[torch.Tensor] = None,
                    activation: str = "swiglu", backend: str = "auto") -> torch.Tensor:
    """The hot half of a sparse FFN: y [b, d] float32 = act(x·W1[idx]ᵀ (+b1), x·W2[idx]ᵀ) · W3t[idx].

    x [b, d]; w1, w2, w3t [n, d] (w3t = down_proj.weight.T.contiguous()); b1 [n]; idx int32 [k].
    The down-projection bias (OPT's fc2.bias) is not added here: add it once, after hot + cold.

    backend (one choice for both halves):
      "auto"   → torch.ops.offload.gather_gemv / sparse_down: Triton on CUDA; on CPU Triton's
                 interpreter when it is active (TRITON_INTERPRET=1 at import), else the torch
                 reference. This is the path for torch.compile and CUDA graphs.
      "triton" → the Triton launchers (CPU tensors need the interpreter, else ValueError).
      "torch"  → the torch references, on any device.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_gather_gemv_args(x, w1, idx, w2, b1, activation)
    _check_w3t(w3t, x.device)
    if tuple(w3t.shape) != tuple(w1.shape):
        raise ValueError(f"w3t must be down_proj.weight.T.contiguous(), shape [n, d] = "
                         f"{tuple(w1.shape)} like w1, got {tuple(w3t.shape)}")
    if backend == "auto":
        h = torch.ops.offload.gather_gemv(x, w1, idx, w2, b1, activation)
        return torch.ops.offload.sparse_down(h, w3t, idx)
    if backend == "triton":
        return sparse_down_triton(gather_gemv_triton(x, w1, idx, w2, b1, activation), w3t, idx)
    return sparse_down_reference(gather_gemv_reference(x, w1, idx, w2, b1, activation), w3t, idx)
