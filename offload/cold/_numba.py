"""Compiled gather-dot kernel for the cold FFN (numba, ``nogil``, one thread per call).

One call computes a contiguous chunk ``idx[lo:hi]`` of the active cold neurons of one layer and
accumulates their contribution into a per-thread partial output ``acc`` [b, d]:

    for p in lo..hi-1:  i = idx[p]
        a_t   = act(W[i, 0] · x_t, W[i, 1] · x_t)        for every token t (b of them)
        acc_t += a_t * W[i, m-1]                          (skipped where a_t == 0)

``W`` is the row-column bundled layout [n, m, d] (m = 3: gate row, up row, down column; m = 2
for ``relu_fc``: fc1 row, fc2 column), so one neuron is one contiguous 48 KiB read at d = 4096
and every byte is read exactly once per call (rows stay in L1/L2 across the b tokens).

The kernel is serial and releases the GIL; :mod:`offload.cold.ffn` splits ``idx`` across its own
blocking helper threads. It does *not* use ``parallel=True``/``prange``: numba's OpenMP layer
busy-waits ~12 ms of CPU after every parallel region (measured here), which on a 2-core machine
steals a core from the thread driving the GPU after every layer.

ReLU kinds skip reads that cannot contribute: ``relu`` reads the up row and down column only
when some token has gate > 0, ``drelu`` likewise and skips the down column when relu(up) is 0
for all tokens, ``relu_fc`` skips fc2 when relu(fc1 x + b1) == 0. A mispredicted (actually
inactive) neuron then costs one row, not three.

``cache=True`` keeps the compiled machine code in ``__pycache__`` beside this file (or numba's
user cache dir when that is read-only); one signature, one compile (~3 s cold, ~0.1 s cached).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

# activation codes; must match offload.cold.ffn.KINDS order
SWIGLU, RELU, DRELU, RELU_FC = 0, 1, 2, 3


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _dot(a, b):
    s = np.float32(0.0)
    for j in range(a.shape[0]):
        s += a[j] * b[j]
    return s


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _dot2(a, c, b):
    """(a·b, c·b) in one pass over b (two independent streams)."""
    s = np.float32(0.0)
    t = np.float32(0.0)
    for j in range(b.shape[0]):
        s += a[j] * b[j]
        t += c[j] * b[j]
    return s, t


@njit(nogil=True, fastmath=True, cache=True)
def cold_chunk(W, x, idx, lo, hi, kind, bias, acc, h):
    """Accumulate neurons ``idx[lo:hi]`` into ``acc``.

    W    float32 [n, m, d]  bundled rows (C-contiguous)
    x    float32 [b, d]     layer input, one row per token
    idx  int64   [k]        local neuron ids
    kind int                SWIGLU / RELU / DRELU / RELU_FC
    bias float32 [n]        fc1 bias for RELU_FC (any float32 [>=0] array otherwise)
    acc  float32 [b, d]     partial output, accumulated into (caller zeroes it)
    h    float32 [b]        scratch

    Returns the number of out-of-range entries of ``idx[lo:hi]`` (skipped; the caller raises).
    """
    b = x.shape[0]
    n = W.shape[0]
    m = W.shape[1]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    bad = 0
    for p in range(lo, hi):
        i = idx[p]
        if i < 0 or i >= n:
            bad += 1
            continue
        g_row = W[i, 0]
        live = False
        if kind == SWIGLU:
            u_row = W[i, 1]
            for t in range(b):
                g, u = _dot2(g_row, u_row, x[t])
                h[t] = g / (one + math.exp(-g)) * u
            live = True
        elif kind == RELU_FC:
            bi = bias[i]
            for t in range(b):
                a = _dot(g_row, x[t]) + bi
                if a > zero:
                    h[t] = a
                    live = True
                else:
                    h[t] = zero
        else:  # RELU: relu(g) * u ; DRELU: relu(g) * relu(u)
            for t in range(b):
                g = _dot(g_row, x[t])
                if g > zero:
                    h[t] = g
                    live = True
                else:
                    h[t] = zero
            if live:
                live = False
                u_row = W[i, 1]
                for t in range(b):
                    if h[t] != zero:
                        u = _dot(u_row, x[t])
                        if kind == DRELU and u < zero:
                            u = zero
                        h[t] *= u
                        if h[t] != zero:
                            live = True
        if live:
            d_row = W[i, m - 1]
            for t in range(b):
                ht = h[t]
                if ht != zero:
                    a_t = acc[t]
                    for j in range(d_row.shape[0]):
                        a_t[j] += ht * d_row[j]
    return bad
