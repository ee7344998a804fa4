"""One-token GEMV over row-major fp32 or fp16 weights: plain numba loops.

``rows(W, x, y)``: y[i] = W[i]·x for every row of W [n, d] (float32, or uint16 holding fp16 bits),
x float32 [d], y float32 [n]. ``rows_parallel(W, x, y, parts)`` splits the rows into ``parts``
contiguous ranges over one prange region.

Why plain loops: LLVM vectorizes ``s += w[j]·x[j]`` (fastmath allows the reassociation) on every x86
target; a hand-tuned variant (four rows per pass, software prefetch) ran at 4.2 GB/s on a Zen 4 where
this loop ran at 24.5 (benchmarks/cpu_kernels.py compares them on the machine at hand). Loops run over
``range(slice.shape[0])``: a ``range(lo, hi)`` with a runtime ``lo`` makes numba's negative-index
wraparound a select per element, which LLVM turns into gathers.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from offload.cpu.widen import as_f32


@njit(nogil=True, fastmath=True, cache=True)
def rows(W, x, y):
    """y[i] = W[i]·x, i over the rows of W (the caller passes row slices of the matrix and of y)."""
    for i in range(W.shape[0]):
        w = W[i]
        s = np.float32(0.0)
        for j in range(w.shape[0]):
            s += as_f32(w[j]) * x[j]
        y[i] = s


@njit(nogil=True, fastmath=True, cache=True, parallel=True)
def rows_parallel(W, x, y, parts):
    """:func:`rows` over ``parts`` contiguous row ranges, one per pool thread."""
    n = W.shape[0]
    for p in prange(parts):
        lo = n * p // parts
        hi = n * (p + 1) // parts
        rows(W[lo:hi], x, y[lo:hi])
