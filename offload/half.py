"""16-bit weights on the CPU: stored as fp16, computed in fp32.

At batch 1 a decode step reads every weight once, so the bytes stored are the time spent. fp32
copies of 16-bit (or, like the embedded SmolLM2 GGUF, 4-bit) checkpoint weights double those
bytes and add no precision the checkpoint had. :func:`store_weights_fp16` is a transform applied
to a dense model: every weight matrix becomes an fp16 tensor; norms, biases and activations stay
fp32. ``offload.models.common.linear`` then computes one-token products with :func:`gemv`, which
converts the fp16 weights to fp32 in registers (F16C ``vcvtph2ps``) and accumulates in fp32, and
longer inputs (prompts) with ``F.linear`` on an fp32 copy made per call. The cold FFN keeps the
same fp16 bits (``ColdFFN(dtype=np.float16)``).

numba has no float16 type, so the kernels take the fp16 bits as uint16 and ``offload.cold._numba.as_f32`` (an
LLVM ``fpext half → float``) widens them; the same kernels compiled for float32 arrays read them
unchanged.

Example::

    m = OffloadedModel.from_pretrained(weights="float16")   # or store_weights_fp16(m.model)

Measured on the 2-core EPYC VM, SmolLM2's 120 layer matrices (attention and FFN, 106 MB in fp16,
read from DRAM in turn, best of 7): 7.9 ms on numba's 2 threads (26.8 GB/s) against NumPy/OpenBLAS
fp32 13.3 ms (31.9 GB/s over twice the bytes). One thread: 11.7 GB/s without the software
prefetch of gemv_rows, 15.2 with it. Helper threads that sleep between calls (the cold FFN's team)
gained nothing at these sizes: each wake-up costs about as much as a layer's GEMV.
"""
from __future__ import annotations

import numpy as np
import torch
import numba
from numba import njit, prange

from offload.cold._numba import _prefetch_line, as_f32

# a GEMV is split over threads only when each gets at least this many weight bytes
MIN_BYTES_PER_THREAD = 256 * 1024
# gemv_rows prefetches the rows this far ahead, one cache line of each per 32 columns
# (measured 1 thread, fp16 SmolLM2 layer matrices from DRAM: 11.7 GB/s without, 15.3 with)
PREFETCH_ROWS = 8


@njit(nogil=True, fastmath=True, cache=True)
def gemv_rows(W, x, y, lo, hi):
    """y[i] = W[i] · x for rows lo..hi-1, four rows per pass over x (x loads shared).

    W uint16 (fp16 bits) or float32 [n, d], C-contiguous; x float32 [d]; y float32 [n]."""
    d = x.shape[0]
    n = W.shape[0]
    i = lo
    while i + 4 <= hi:
        a, b, c, e = W[i], W[i + 1], W[i + 2], W[i + 3]
        s0 = s1 = s2 = s3 = np.float32(0.0)
        far = i + PREFETCH_ROWS
        ahead = far + 4 <= n
        for j0 in range(0, d, 32):
            if ahead:  # one cache line (32 fp16) of each of the rows PREFETCH_ROWS ahead
                _prefetch_line(W, far * d + j0)
                _prefetch_line(W, (far + 1) * d + j0)
                _prefetch_line(W, (far + 2) * d + j0)
                _prefetch_line(W, (far + 3) * d + j0)
            for j in range(j0, min(j0 + 32, d)):
                xj = x[j]
                s0 += as_f32(a[j]) * xj
                s1 += as_f32(b[j]) * xj
                s2 += as_f32(c[j]) * xj
                s3 += as_f32(e[j]) * xj
        y[i], y[i + 1], y[i + 2], y[i + 3] = s0, s1, s2, s3
        i += 4
    while i < hi:
        r = W[i]
        s = np.float32(0.0)
        for j in range(d):
            s += as_f32(r[j]) * x[j]
        y[i] = s
        i += 1


@njit(nogil=True, fastmath=True, cache=True, parallel=True)
def gemv_parallel(W, x, y, parts):
    """gemv_rows over ``parts`` contiguous row ranges, one per thread of numba's pool."""
    n = W.shape[0]
    step = ((n + parts - 1) // parts + 3) // 4 * 4
    for c in prange(parts):
        lo = c * step
        gemv_rows(W, x, y, lo, min(n, lo + step))


def fp16_bits(weight: torch.Tensor) -> np.ndarray:
    """The uint16 view of a contiguous CPU fp16 tensor (no copy)."""
    return weight.detach().numpy().view(np.uint16)


def gemv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight @ x`` for an fp16 (or fp32) CPU weight [n, d] and one fp32 vector x [d] → fp32 [n].

    Rows are split over numba's thread pool (OpenMP: its workers spin for a while after each call,
    like OpenBLAS's, so hand-offs cost microseconds) when each thread gets MIN_BYTES_PER_THREAD.
    Meant for CPU-only decode, where nothing else needs the other cores between calls."""
    W = fp16_bits(weight) if weight.dtype == torch.float16 else weight.detach().numpy()
    xv = x.detach().reshape(-1).numpy()
    y = np.empty(W.shape[0], np.float32)
    parts = max(1, min(pool_threads(), W.nbytes // MIN_BYTES_PER_THREAD))
    if parts == 1:
        gemv_rows(W, xv, y, 0, W.shape[0])
    else:
        gemv_parallel(W, xv, y, parts)
    return torch.from_numpy(y)


_pool_threads: list[int] = []


def pool_threads() -> int:
    """Threads of numba's pool (NUMBA_NUM_THREADS, default the CPU count), read once: numba's own
    getter launches its pool from Python on every call (~15 µs, 60 times a SmolLM2 token).

    The first call also starts the pool. Compiled code that calls a parallel kernel (offload.cpu_ops,
    offload.cold.fused) does not start it, and such a call before the pool is up segfaults: those
    modules call this when they are imported."""
    if not _pool_threads:
        _pool_threads.append(numba.get_num_threads())
    return _pool_threads[0]


def store_weights_fp16(model: torch.nn.Module) -> torch.nn.Module:
    """Transform a dense CPU fp32 model in place: every 2-D parameter (weight matrices and
    embeddings) becomes fp16; 1-D ones (norms, biases) and activations stay fp32. Returns the
    model. Refused for a model that is not fp32 on the CPU (on a GPU, load it in fp16 instead)."""
    params = list(model.named_parameters())
    bad = [n for n, p in params if p.device.type != "cpu" or p.dtype != torch.float32]
    if bad:
        raise ValueError(f"store_weights_fp16 needs an fp32 CPU model; {bad[0]} is "
                         f"{dict(params)[bad[0]].dtype} on {dict(params)[bad[0]].device}")
    for name, p in params:
        if p.dim() == 2:
            p.data = p.data.to(torch.float16)
    warmup()
    return model


def warmup() -> None:
    """Compile (or load from numba's cache) the fp16 kernels before the first token needs them."""
    W = np.zeros((5, 8), np.uint16)
    x = np.zeros(8, np.float32)
    y = np.zeros(5, np.float32)
    gemv_rows(W, x, y, 0, 5)
    gemv_parallel(W, x, y, 2)
