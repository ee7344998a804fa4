"""One-token GEMV over row-major fp32 or fp16 matrices on the CPU (numba, plain loops).

    gemv(W, x, y, threads)      # y [R] float32 = W [R, C] · x [C] float32

W is float32, or uint16 holding fp16 bits (numba has no float16 type; offload.cpu.widen.as_f32 widens
them in registers, ``vcvtph2ps`` with F16C). Accumulation is fp32. Long rows go four per pass,
sharing the loads of x; the loops are plain and LLVM vectorizes them (checked in
tests/test_packed_gemv.py::test_hot_loops_vectorized for the host and for an AVX2 target).

threads: 1 runs on the caller's thread with no parallel region at all (numba's workers spin after
a region, which hurts when another process holds a core); more run one ``prange`` region of
``threads`` contiguous row ranges. Which thread count to use is the caller's policy.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from offload.cpu.cold_kernels import prefetch_bytes
from offload.cpu.widen import as_f32

# rows at least this long are computed four per pass (see gemv_rows)
FOUR_ROWS_FROM = 2048


@njit(nogil=True, fastmath=True, cache=True)
def gemv_rows(W, x, y, lo, hi):
    """y[lo:hi] = W[lo:hi] · x; W float32 or uint16 (fp16 bits) [R, C] C-contiguous, x float32 [C].

    Rows of at least FOUR_ROWS_FROM columns go four per pass, sharing the loads of x (4096
    columns: 15 GB/s against 12 one row at a time, fp32 and fp16 alike); shorter rows one at a
    time (576 fp16 columns: 7.5 GB/s against 6.2 four at a time). Short fp16 rows prefetch the next row:
    one core widening fp16 from DRAM stalls on it (Intel Xeon VM, one thread, 3072×576 from DRAM:
    8.6 → 10.2 GB/s, against fp32's 12.2; for fp32 rows it did not help)."""
    # whole-array indexing, no row slices: a slice costs two atomic reference-count updates,
    # ~20 % of a 576-column fp16 row
    i = lo
    while i + 4 <= hi and x.shape[0] >= FOUR_ROWS_FROM:
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for j in range(x.shape[0]):
            xj = x[j]
            s0 += as_f32(W[i, j]) * xj
            s1 += as_f32(W[i + 1, j]) * xj
            s2 += as_f32(W[i + 2, j]) * xj
            s3 += as_f32(W[i + 3, j]) * xj
        y[i], y[i + 1], y[i + 2], y[i + 3] = s0, s1, s2, s3
        i += 4
    while i < hi:
        if W.itemsize == 2 and i + 1 < hi:  # fp16: ask for the next row now (see the docstring)
            prefetch_bytes(W, (i + 1) * x.shape[0], 2 * x.shape[0])
        s = np.float32(0.0)
        for j in range(x.shape[0]):
            s += as_f32(W[i, j]) * x[j]
        y[i] = s
        i += 1


@njit(nogil=True, fastmath=True, cache=True, parallel=True)
def gemv_rows_parallel(W, x, y, parts):
    """gemv_rows over ``parts`` contiguous row ranges, one prange region."""
    for i in prange(parts):
        gemv_rows(W, x, y, W.shape[0] * i // parts, W.shape[0] * (i + 1) // parts)


def as_weight_array(W: np.ndarray) -> np.ndarray:
    """The array the kernels take: float32 as is, float16 as its uint16 bits (no copy)."""
    if W.dtype == np.float16:
        return W.view(np.uint16)
    if W.dtype not in (np.float32, np.uint16):
        raise TypeError(f"gemv needs float32 or float16 (uint16 bits) weights, got {W.dtype}")
    return W


def gemv(W: np.ndarray, x: np.ndarray, y: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """y [R] float32 = W [R, C] · x [C]; W float32, float16 or uint16 (fp16 bits), C-contiguous."""
    W = as_weight_array(W)
    if not W.flags.c_contiguous:
        raise ValueError("gemv needs a C-contiguous weight matrix")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if y is None:
        y = np.empty(W.shape[0], np.float32)
    if threads <= 1:
        gemv_rows(W, x, y, 0, W.shape[0])
    else:
        gemv_rows_parallel(W, x, y, threads)
    return y


@njit(nogil=True, cache=True, parallel=True)
def touch_pool(a):
    """a[i] = i over numba's pool: offload.cpu.pool runs it once to start the pool."""
    for i in prange(a.shape[0]):
        a[i] = i
