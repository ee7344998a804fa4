"""The FFN half of a LLaMA block for one token in one numba call: norm, gate·up, activation, down,
residual, the two products through offload.cpu.matvec (any storage format).

Reference: models.llama.GatedFFN's torch path and models.ffn_kind.activation (tests compare them).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from offload.cpu.attention import rms_norm_row
from offload.cpu.matvec import matvec


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def gated_activation(g, u, kind):
    """h from gate g and up u for FFNKind codes 0 swiglu, 1 relu, 2 drelu (float32 scalars)."""
    zero = np.float32(0.0)
    if kind == 0:
        return g / (np.float32(1.0) + np.float32(math.exp(-g))) * u
    if kind == 1:
        return max(g, zero) * u
    return max(g, zero) * max(u, zero)


@njit(nogil=True, fastmath=True, cache=True)
def gated_ffn_block(x, norm_w, eps, Wgu, Wd, n, kind, threads, out):
    """out = x + down · act(gate · xn, up · xn), xn = rms_norm(x)·norm_w, for one token.

    x, norm_w, out float32 [d]; Wgu [2n, d] (gate rows, then up rows) and Wd [d, n]: operands of any
    storage format; kind: an FFNKind code of a gated FFN (0..2)."""
    d = x.shape[0]
    xn = np.empty(d, np.float32)
    rms_norm_row(x, norm_w, eps, xn)
    gu = np.empty(2 * n, np.float32)
    matvec(Wgu, xn, gu, threads)
    h = np.empty(n, np.float32)
    for i in range(n):
        h[i] = gated_activation(gu[i], gu[n + i], kind)
    y = np.empty(d, np.float32)
    matvec(Wd, h, y, threads)
    for j in range(d):
        out[j] = x[j] + y[j]
