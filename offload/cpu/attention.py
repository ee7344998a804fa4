"""One-token CPU decode ops: RMSNorm, attention with RoPE and the KV-cache write, and the whole
attention half of a LLaMA block in one call.

At batch 1 on the CPU a layer's norms, RoPE, cache writes and attention are ~15 torch ops of a few µs of
work and 5-40 µs of dispatch each: measured 4-5 ms of a 23 ms SmolLM2 token. Each op here is one numba
call; :func:`attention_block` is norm → qkv → attention → o → residual in one, its two products through
offload.cpu.matvec (any storage format). The references are the torch paths they replace
(models.common.RMSNorm, apply_rope + cached_attention, models.llama.Attention); tests compare them.

Shapes (one sequence, one new token at position ``pos``): h query heads, kvh key/value heads (h % kvh == 0,
GQA), hd head dim (even); one layer's cache is k, v [kvh, max_len, hd].
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from offload.cpu.matvec import MIN_BYTES_PER_THREAD, matvec


@njit(nogil=True, fastmath=True, cache=True)
def rms_norm_row(x, w, eps, out):
    """out = x / sqrt(mean(x²) + eps) * w for one row x [d] (float32; sum of squares in float64)."""
    s = 0.0
    for j in range(x.shape[0]):
        v = np.float64(x[j])
        s += v * v
    r = np.float32(1.0 / math.sqrt(s / x.shape[0] + eps))
    for j in range(x.shape[0]):
        out[j] = x[j] * r * w[j]


@njit(nogil=True, fastmath=True, cache=True)
def rope_and_store(qkv, cos, sin, kc, vc, pos, h, kvh, q):
    """q [h, hd] = the token's query heads, rotated; k heads (rotated) and v heads written to the cache at
    ``pos``. Arguments as :func:`attend_one`."""
    hd = kc.shape[2]
    half = hd // 2
    for head in range(h + kvh):  # RoPE: x·cos + rotate_half(x)·sin, rotate_half(x) = [-x2, x1]
        base = head * hd
        for j in range(half):
            a = qkv[base + j]
            b = qkv[base + half + j]
            ra = a * cos[j] - b * sin[j]
            rb = b * cos[half + j] + a * sin[half + j]
            if head < h:
                q[head, j], q[head, half + j] = ra, rb
            else:
                kc[head - h, pos, j], kc[head - h, pos, half + j] = ra, rb
    vbase = (h + kvh) * hd
    for g in range(kvh):
        for j in range(hd):
            vc[g, pos, j] = qkv[vbase + g * hd + j]


@njit(nogil=True, fastmath=True, cache=True)
def attend_heads(q, kc, vc, n, h, kvh, lo, hi, out):
    """out[head·hd : (head + 1)·hd] = softmax(q[head]·kᵀ/√hd)·v over positions 0..n-1, heads lo..hi-1."""
    hd = kc.shape[2]
    scale = np.float32(1.0 / math.sqrt(hd))
    p = np.empty(n, np.float32)
    group = h // kvh
    for head in range(lo, hi):
        g = head // group
        m = -np.inf
        for t in range(n):
            s = np.float32(0.0)
            for j in range(hd):
                s += q[head, j] * kc[g, t, j]
            s *= scale
            p[t] = s
            m = max(m, s)
        total = np.float32(0.0)
        for t in range(n):
            e = np.float32(math.exp(p[t] - m))
            p[t] = e
            total += e
        inv = np.float32(1.0) / total
        o = out[head * hd: (head + 1) * hd]
        o[:] = 0.0
        for t in range(n):
            pt = p[t] * inv
            for j in range(hd):
                o[j] += pt * vc[g, t, j]


@njit(nogil=True, fastmath=True, cache=True, parallel=True)
def attend_heads_parallel(q, kc, vc, n, h, kvh, parts, out):
    """attend_heads over ``parts`` contiguous ranges of heads, one prange region."""
    for i in prange(parts):
        attend_heads(q, kc, vc, n, h, kvh, h * i // parts, h * (i + 1) // parts, out)


@njit(nogil=True, fastmath=True, cache=True)
def attend_one(qkv, cos, sin, kc, vc, pos, h, kvh, out, threads=1):
    """Attention of one new token at position ``pos`` over positions 0..pos.

    qkv  float32 [(h + 2·kvh)·hd]  the token's q heads, then k heads, then v heads (not yet rotated)
    cos, sin float32 [hd]           RoPE tables at ``pos`` (half-rotation layout, as HF LLaMA)
    kc, vc float32 [kvh, max_len, hd]  this layer's cache; k (rotated) and v are written at ``pos``
    out  float32 [h·hd]             softmax(q·kᵀ/√hd)·v per head, heads concatenated
    threads: heads split over the pool when the cache they read is long enough to pay for a parallel
    region (MIN_BYTES_PER_THREAD per part, as offload.cpu.matvec)
    """
    hd = kc.shape[2]
    q = np.empty((h, hd), np.float32)
    rope_and_store(qkv, cos, sin, kc, vc, pos, h, kvh, q)
    n = pos + 1
    parts = max(1, min(threads, h, 2 * h * n * hd * 4 // MIN_BYTES_PER_THREAD))  # K and V rows read per head
    if parts > 1:
        attend_heads_parallel(q, kc, vc, n, h, kvh, parts, out)
    else:
        attend_heads(q, kc, vc, n, h, kvh, 0, h, out)


@njit(nogil=True, fastmath=True, cache=True)
def attention_block(x, norm_w, eps, Wqkv, bqkv, cos, sin, kc, vc, pos, h, kvh, Wo, bo, threads, out):
    """out = x + Wo · attend(RoPE(Wqkv · rms_norm(x) + bqkv)) + bo for one token: the attention half of a
    LLaMA block in one call.

    x, norm_w, out float32 [d]; Wqkv [(h + 2·kvh)·hd, d] and Wo [d, h·hd] operands of any storage format
    (offload.cpu.matvec); bqkv [(h + 2·kvh)·hd] and bo [d] float32, or empty for none; the rest as
    :func:`attend_one`."""
    d = x.shape[0]
    xn = np.empty(d, np.float32)
    rms_norm_row(x, norm_w, eps, xn)
    qkv = np.empty(bqkv.shape[0] if bqkv.shape[0] else (h + 2 * kvh) * kc.shape[2], np.float32)
    matvec(Wqkv, xn, qkv, threads)
    if bqkv.shape[0]:
        qkv += bqkv
    a = np.empty(h * kc.shape[2], np.float32)
    attend_one(qkv, cos, sin, kc, vc, pos, h, kvh, a, threads)
    y = np.empty(d, np.float32)
    matvec(Wo, a, y, threads)
    for j in range(d):
        out[j] = x[j] + y[j]
    if bo.shape[0]:
        out += bo
