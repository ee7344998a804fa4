"""One-token CPU decode ops: RMSNorm, attention with RoPE and the KV-cache write, and the whole
attention half of a LLaMA block in one call.

At batch 1 on the CPU a layer's norms, RoPE, cache writes and attention are ~15 torch ops of a few µs of
work and 5-40 µs of dispatch each: measured 4-5 ms of a 23 ms SmolLM2 token. Each op here is one numba
call; :func:`attention_block` is norm → qkv → attention → o → residual in one, its two products through
offload.cpu.matvec (any storage format). The references are the torch paths they replace
(models.common.RMSNorm, apply_rope + cached_attention, models.llama.Attention); tests compare them.

Shapes (one sequence, one new token at position ``pos``): h query heads, kvh key/value heads (h % kvh == 0,
GQA), hd head dim (even); one layer's cache is k, v [kvh, max_len, hd], float32 or uint16 holding fp16 bits
(an fp16 KV cache: read through offload.cpu.widen.as_f32, written through narrow_like).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from offload.cpu.matvec import MIN_BYTES_PER_THREAD, matvec
from offload.cpu.widen import as_f32, f32_from_bits, narrow_like


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
                kc[head - h, pos, j], kc[head - h, pos, half + j] = narrow_like(ra, kc), narrow_like(rb, kc)
    vbase = (h + kvh) * hd
    for g in range(kvh):
        for j in range(hd):
            vc[g, pos, j] = narrow_like(qkv[vbase + g * hd + j], vc)


# exp_f32: Cody-Waite reduction x = n·ln2 + r (ln2 in two parts), a degree-6 polynomial for e^r on
# [-ln2/2, ln2/2] (Cephes' expf coefficients) and 2^n from the exponent bits. Branch-free, so the loop over
# positions vectorizes; math.exp is a libm call per element (without SVML), over half of the attention's
# time at 170 positions. Relative error ~2e-7 for x in [-87, 0] (softmax arguments are ≤ 0); below -87
# the result is e^-87 instead of smaller (≤ 2e-38, nothing beside the 1 of the maximum).
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def exp_f32(x):
    """e^x for float32 x ≤ 0 (see above; tests: tests/test_cpu_decode.py)."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * _LOG2E + np.float32(0.5))  # float32 (math.floor would give an int64)
    r = x - n * _LN2_HI - n * _LN2_LO
    y = np.float32(1.9875691500e-4)
    y = y * r + np.float32(1.3981999507e-3)
    y = y * r + np.float32(8.3334519073e-3)
    y = y * r + np.float32(4.1665795894e-2)
    y = y * r + np.float32(1.6666665459e-1)
    y = y * r + np.float32(5.0000001201e-1)
    y = y * r * r + r + np.float32(1.0)
    return y * f32_from_bits((np.int32(n) + 127) << 23)


@njit(nogil=True, fastmath=True, cache=True)
def head_scores(q, k, n, scale, p):
    """p[t] = q·k[t]·scale for t < n; q [hd], k [max_len, hd]. Four positions per pass over q: four
    independent sums instead of one chain per position."""
    hd = q.shape[0]
    t = 0
    while t + 4 <= n:
        s0 = s1 = s2 = s3 = np.float32(0.0)
        for j in range(hd):
            qj = q[j]
            s0 += qj * as_f32(k[t, j])
            s1 += qj * as_f32(k[t + 1, j])
            s2 += qj * as_f32(k[t + 2, j])
            s3 += qj * as_f32(k[t + 3, j])
        p[t], p[t + 1], p[t + 2], p[t + 3] = s0 * scale, s1 * scale, s2 * scale, s3 * scale
        t += 4
    while t < n:
        s = np.float32(0.0)
        for j in range(hd):
            s += q[j] * as_f32(k[t, j])
        p[t] = s * scale
        t += 1


@njit(nogil=True, fastmath=True, cache=True)
def softmax_weights(p, n):
    """p[:n] = exp(p − max p) in place; returns their sum (exp_f32: the loop vectorizes)."""
    m = p[0]
    for t in range(1, n):
        m = max(m, p[t])
    total = np.float32(0.0)
    for t in range(n):
        e = exp_f32(p[t] - m)
        p[t] = e
        total += e
    return total


@njit(nogil=True, fastmath=True, cache=True)
def weighted_values(p, v, n, inv, o):
    """o = inv · Σ_t p[t]·v[t] for t < n; v [max_len, hd], o [hd]. Four positions per pass over o."""
    hd = o.shape[0]
    o[:] = 0.0
    t = 0
    while t + 4 <= n:
        p0, p1, p2, p3 = p[t], p[t + 1], p[t + 2], p[t + 3]
        for j in range(hd):
            o[j] += (p0 * as_f32(v[t, j]) + p1 * as_f32(v[t + 1, j]) + p2 * as_f32(v[t + 2, j])
                     + p3 * as_f32(v[t + 3, j]))
        t += 4
    while t < n:
        pt = p[t]
        for j in range(hd):
            o[j] += pt * as_f32(v[t, j])
        t += 1
    for j in range(hd):
        o[j] *= inv


# q heads of one kv head computed together per pass over its K and V rows (see attend_kv_heads)
HEADS_PER_PASS = 3


@njit(nogil=True, fastmath=True, cache=True)
def group_scores(q, h0, c, k, n, scale, P):
    """P[r, t] = q[h0 + r]·k[t]·scale for r < c (1 ≤ c ≤ 3 heads sharing k) and t < n: each K row is loaded
    once for the c heads, two positions per pass (c = 1: :func:`head_scores`)."""
    if c == 1:
        head_scores(q[h0], k, n, scale, P[0])
        return
    hd = k.shape[1]
    qa, qb, qc = q[h0], q[h0 + 1], q[h0 + c - 1]  # c = 2: the third row repeats the second, discarded
    t = 0
    while t + 2 <= n:
        a0 = a1 = b0 = b1 = c0 = c1 = np.float32(0.0)
        for j in range(hd):
            k0 = as_f32(k[t, j])
            k1 = as_f32(k[t + 1, j])
            a0 += qa[j] * k0
            a1 += qa[j] * k1
            b0 += qb[j] * k0
            b1 += qb[j] * k1
            c0 += qc[j] * k0
            c1 += qc[j] * k1
        P[0, t], P[0, t + 1], P[1, t], P[1, t + 1] = a0 * scale, a1 * scale, b0 * scale, b1 * scale
        P[c - 1, t], P[c - 1, t + 1] = c0 * scale, c1 * scale
        t += 2
    while t < n:
        a0 = b0 = c0 = np.float32(0.0)
        for j in range(hd):
            k0 = as_f32(k[t, j])
            a0 += qa[j] * k0
            b0 += qb[j] * k0
            c0 += qc[j] * k0
        P[0, t], P[1, t], P[c - 1, t] = a0 * scale, b0 * scale, c0 * scale
        t += 1


@njit(nogil=True, fastmath=True, cache=True)
def group_values(P, c, v, n, inv, out, h0):
    """out[(h0 + r)·hd : (h0 + r + 1)·hd] = inv[r] · Σ_t P[r, t]·v[t] for r < c (1 ≤ c ≤ 3): each V row is
    loaded once for the c heads, two positions per pass (c = 1: :func:`weighted_values`)."""
    hd = v.shape[1]
    if c == 1:
        weighted_values(P[0], v, n, inv[0], out[h0 * hd:(h0 + 1) * hd])
        return
    oa, ob, oc = out[h0 * hd:(h0 + 1) * hd], out[(h0 + 1) * hd:(h0 + 2) * hd], out[(h0 + c - 1) * hd:(h0 + c) * hd]
    oa[:] = 0.0
    ob[:] = 0.0
    oc[:] = 0.0
    pc = P[c - 1]
    t = 0
    while t + 2 <= n:
        pa0, pa1, pb0, pb1, pc0, pc1 = P[0, t], P[0, t + 1], P[1, t], P[1, t + 1], pc[t], pc[t + 1]
        if c == 2:  # the third row repeats the second: keep it from adding twice
            pc0 = pc1 = np.float32(0.0)
        for j in range(hd):
            v0 = as_f32(v[t, j])
            v1 = as_f32(v[t + 1, j])
            oa[j] += pa0 * v0 + pa1 * v1
            ob[j] += pb0 * v0 + pb1 * v1
            oc[j] += pc0 * v0 + pc1 * v1
        t += 2
    while t < n:
        pa0, pb0, pc0 = P[0, t], P[1, t], pc[t] if c == 3 else np.float32(0.0)
        for j in range(hd):
            v0 = as_f32(v[t, j])
            oa[j] += pa0 * v0
            ob[j] += pb0 * v0
            oc[j] += pc0 * v0
        t += 1
    ia, ib, ic = inv[0], inv[1], inv[c - 1]
    for j in range(hd):
        oa[j] *= ia
        ob[j] *= ib
    if c == 3:
        for j in range(hd):
            oc[j] *= ic


@njit(nogil=True, fastmath=True, cache=True)
def attend_kv_heads(q, kc, vc, n, h, kvh, g0, g1, out):
    """out[head·hd : (head + 1)·hd] = softmax(q[head]·kᵀ/√hd)·v over positions 0..n-1 for every q head of kv
    heads g0..g1-1 (GQA: h // kvh q heads each).

    A kv head's q heads go HEADS_PER_PASS at a time through its K and V rows (:func:`group_scores`,
    :func:`group_values`), so each row is loaded once per pass instead of once per q head. SmolLM2 (9 q
    heads, 3 kv heads), 30 layers with a 3 MB weight stream between calls, one thread, AMD EPYC Zen 3: one
    head at a time 0.88 / 2.48 / 5.95 ms a token at 150 / 500 / 1000 positions, three at a time 0.71 / 1.95 /
    4.01. Scores, softmax and values stay separate functions (written in one body, LLVM vectorized them
    worse: 35 against 17 µs a layer)."""
    hd = kc.shape[2]
    scale = np.float32(1.0 / math.sqrt(hd))
    P = np.empty((HEADS_PER_PASS, n), np.float32)
    inv = np.empty(HEADS_PER_PASS, np.float32)
    group = h // kvh
    for g in range(g0, g1):
        h0 = g * group
        while h0 < (g + 1) * group:
            c = min(HEADS_PER_PASS, (g + 1) * group - h0)
            group_scores(q, h0, c, kc[g], n, scale, P)
            for r in range(c):
                inv[r] = np.float32(1.0) / softmax_weights(P[r], n)
            group_values(P, c, vc[g], n, inv, out, h0)
            h0 += c


@njit(nogil=True, fastmath=True, cache=True, parallel=True)
def attend_kv_heads_parallel(q, kc, vc, n, h, kvh, parts, out):
    """attend_kv_heads over ``parts`` contiguous ranges of kv heads, one prange region."""
    for i in prange(parts):
        attend_kv_heads(q, kc, vc, n, h, kvh, kvh * i // parts, kvh * (i + 1) // parts, out)


@njit(nogil=True, cache=True)
def attention_parts(h, kvh, n, hd, itemsize, threads):
    """How many parts (kv-head ranges, one thread each) attend_one splits n positions into: one per
    MIN_BYTES_PER_THREAD of the K and V rows read (once per pass of HEADS_PER_PASS q heads; ``itemsize``
    bytes an element: 4 for an fp32 cache, 2 for fp16), at most ``threads`` and ``kvh``."""
    passes = kvh * -(-(h // kvh) // HEADS_PER_PASS)
    return max(1, min(threads, kvh, 2 * passes * n * hd * itemsize // MIN_BYTES_PER_THREAD))


@njit(nogil=True, fastmath=True, cache=True)
def attend_one(qkv, cos, sin, kc, vc, pos, h, kvh, out, threads=1):
    """Attention of one new token at position ``pos`` over positions 0..pos.

    qkv  float32 [(h + 2·kvh)·hd]  the token's q heads, then k heads, then v heads (not yet rotated)
    cos, sin float32 [hd]           RoPE tables at ``pos`` (half-rotation layout, as HF LLaMA)
    kc, vc [kvh, max_len, hd]        this layer's cache (float32, or uint16 fp16 bits); k (rotated) and v
                                    are written at ``pos``
    out  float32 [h·hd]             softmax(q·kᵀ/√hd)·v per head, heads concatenated
    threads: kv heads split over the pool when the cache they read is long enough to pay for a parallel
    region (:func:`attention_parts`)
    """
    hd = kc.shape[2]
    q = np.empty((h, hd), np.float32)
    rope_and_store(qkv, cos, sin, kc, vc, pos, h, kvh, q)
    n = pos + 1
    parts = attention_parts(h, kvh, n, hd, kc.itemsize, threads)
    if parts > 1:
        attend_kv_heads_parallel(q, kc, vc, n, h, kvh, parts, out)
    else:
        attend_kv_heads(q, kc, vc, n, h, kvh, 0, kvh, out)


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
