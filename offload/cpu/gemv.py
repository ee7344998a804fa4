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

from offload.cpu.cold_kernels import prefetch_bytes, prefetch_bytes_to_l2
from offload.cpu.widen import as_f32

# rows at least this long are computed four per pass (see gemv_rows)
FOUR_ROWS_FROM = 2048
# short fp16 rows also bring the row at least this many bytes ahead into L2 (see gemv_rows)
FP16_L2_AHEAD = 4096


@njit(nogil=True, fastmath=True, cache=True)
def gemv_rows(W, x, y, lo, hi):
    """y[lo:hi] = W[lo:hi] · x; W float32 or uint16 (fp16 bits) [R, C] C-contiguous, x float32 [C].

    Rows of at least FOUR_ROWS_FROM columns go four per pass, sharing the loads of x (4096
    columns: 15 GB/s against 12 one row at a time, fp32 and fp16 alike); shorter rows one at a
    time (576 fp16 columns: 7.5 GB/s against 6.2 four at a time).

    Short fp16 rows prefetch: the next row into L1, and the row FP16_L2_AHEAD bytes ahead into L2. A
    core widening fp16 does twice the instructions per byte of fp32 and keeps fewer lines in flight
    from DRAM (Intel Xeon VM, one thread, 3072×576 from DRAM: 8.6 → 10.2 GB/s with the next row,
    against fp32's 12.2). SmolLM2's 121 fp16 matrices of a decode step in turn (269 MB, huge pages, 2
    threads, 12 alternating runs, two processes): no prefetch 11.7-14.3 ms, the next row 10.0-10.9,
    plus 4-6 KB ahead into L2 8.8-9.1; 6 KB ahead into L1 alone was slower than the next row (10.7-11.2:
    it evicts lines still being read). fp32 rows gained from none of these (17.2-17.6 ms without, up to
    19.4 with). SmolLM2 dense fp16 decode (generate, 128 tokens) went 77-79 → 91-95 tok/s."""
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
    far = max(2, FP16_L2_AHEAD // (2 * x.shape[0]))  # rows ahead for the L2 prefetch
    while i < hi:
        if W.itemsize == 2 and i + 1 < hi:  # fp16: ask for rows ahead now (see the docstring)
            prefetch_bytes(W, (i + 1) * x.shape[0], 2 * x.shape[0])
            if i + far < hi:
                prefetch_bytes_to_l2(W, (i + far) * x.shape[0], 2 * x.shape[0])
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
