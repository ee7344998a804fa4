"""One all-cold FFN layer of CPU-only decode in a single numba call: int4 shadow scores, the top-k,
and the cold kernel, on numba's pool.

The separate path (Int4Shadow.scores → topk_indices → ColdFFN.forward) makes three numba calls and
a dozen NumPy/torch conversions and checks per layer: measured ~75 µs of a 310 µs SmolLM2 layer
(2.3 ms of a 21 ms token). Here the predictor's prepared arrays and the bundled cold weights are
passed once per call; the parts are the same kernels (offload.cpu.shadow's ``i4_shadow_parallel``,
offload.cpu.topk's ``topk_union``, offload.cpu.cold_kernels' ``cold_parallel``, each parallel one
launched on numba's pool from this serial function), so results equal the separate path's.

Used by HybridFFN when every neuron is cold, the device is the CPU, one token is decoded, the
selector is an int4 shadow and the cold kernel runs on numba's pool (offload.hybrid). The pool must
be started (offload.cpu.pool.start_pool) before the first call.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from offload.cpu.attention import rms_norm_row
from offload.cpu.cold_kernels import cold_parallel
from offload.cpu.shadow import i4_shadow_parallel
from offload.cpu.topk import topk_union


@njit(nogil=True, fastmath=True, cache=True)
def shadow_topk_cold(x, norm_w, eps, SW, SB, skind, n, k, W, block, kind, bias, parts, scratch):
    """x float32 [1, d] → (output float32 [d], number of neurons computed, out-of-range count).

    norm_w float32 [d] (empty: none): the FFN reads rms_norm(x)·norm_w (eps) and the output is
    x + FFN(that), the FFN half of a LLaMA block; without it the output is FFN(x).

    SW, SB, skind: an Int4Shadow's prepared blocks, biases and kind code; n neurons; k per token.
    W, kind, bias: the ColdFFN's bundle (float32 or uint16 fp16 bits), kernel code and fc1 bias.
    parts [threads, 1, d] and scratch [threads, 5, 1] float32: one per pool thread (reused across calls:
    parts is zeroed here)."""
    nt = parts.shape[0]
    parts[:] = 0.0
    if norm_w.shape[0]:
        xn = np.empty_like(x)
        rms_norm_row(x[0], norm_w, eps, xn[0])
    else:
        xn = x
    scores = np.empty((1, n), np.float32)
    i4_shadow_parallel(xn, SW, SB, skind, min(nt, SW.shape[0]), scores)
    idx = topk_union(scores, k)
    bad = cold_parallel(W, xn, idx, np.zeros(2 + nt, np.int64), block, kind, bias, parts, scratch)
    out = parts[0, 0].copy()
    for t in range(1, nt):
        out += parts[t, 0]
    if norm_w.shape[0]:
        out += x[0]
    return out, idx.shape[0], bad
