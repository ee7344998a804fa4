"""Top-k neuron selection for the predictors: each token's k largest scores, as the sorted union over a
batch (numba; a radix select, O(n) per row)."""
from __future__ import annotations

import numpy as np
from numba import njit


def _np(t) -> np.ndarray:
    return t.detach().numpy() if hasattr(t, "detach") else np.asarray(t)


@njit(nogil=True, cache=True, inline="always")
def _order_key(v):
    """uint32 key of float bits ``v`` whose unsigned order is the floats' order."""
    return ~v if v & np.uint32(0x80000000) else v | np.uint32(0x80000000)


@njit(nogil=True, cache=True)
def kth_key(s, k, keys, cand, hist):
    """(key of the k-th largest of s, how many entries equal to it are among the k) for 1 <= k < n; keys
    [n] gets every entry's order key. Radix select: a histogram of the top 11 key bits over all n, then
    11 and 10 bits over the candidates left. hist int32 [4, 2048] (scratch).

    The first pass counts into four histograms in turn: scores bunch into a few buckets, and one
    histogram makes each increment wait for the previous one to the same bucket (SmolLM2's 1536
    shadow scores: 13.0 → 9.2 µs a row)."""
    n = s.shape[0]
    bits = s.view(np.uint32)
    hist[:] = 0
    n4 = n - n % 4
    for i in range(0, n4, 4):
        for q in range(4):
            key = _order_key(bits[i + q])
            keys[i + q] = key
            hist[q, key >> np.uint32(21)] += 1
    for i in range(n4, n):
        key = _order_key(bits[i])
        keys[i] = key
        hist[0, key >> np.uint32(21)] += 1
    need = k
    j = 2047
    while True:
        c = hist[0, j] + hist[1, j] + hist[2, j] + hist[3, j]
        if c >= need:
            break
        need -= c
        j -= 1
    prefix = np.uint32(j) << np.uint32(21)
    m = 0
    for i in range(n):
        if keys[i] >> np.uint32(21) == np.uint32(j):
            cand[m] = keys[i]
            m += 1
    h = hist[0]
    for shift, nb in ((10, 2048), (0, 1024)):
        h[:nb] = 0
        for i in range(m):
            h[(cand[i] >> np.uint32(shift)) & np.uint32(nb - 1)] += 1
        j = nb - 1
        while h[j] < need:
            need -= h[j]
            j -= 1
        prefix |= np.uint32(j) << np.uint32(shift)
        m2 = 0
        for i in range(m):
            if (cand[i] >> np.uint32(shift)) & np.uint32(nb - 1) == np.uint32(j):
                cand[m2] = cand[i]
                m2 += 1
        m = m2
    return prefix, need


@njit(nogil=True, cache=True, inline="always")
def _taken(key, prefix, need):
    """(whether the entry with order key ``key`` is among the k largest, the ties still to take) given
    kth_key's (prefix, need): keys above the k-th are taken, and the first ``need`` equal to it.
    Branch-free: at k ≈ n/2 whether a score is taken is a coin flip, and a branch on it mispredicts
    about every other time (SmolLM2's 1536 shadow scores, one row, AMD EPYC Zen 3: 16 → 12 µs)."""
    tie = key == prefix
    take = (key > prefix) | (tie & (need > 0))
    return take, need - (tie & take)


@njit(nogil=True, cache=True)
def topk_row(s, k, mask, keys, cand, hist):
    """mask[i] |= s[i] is among the k largest of s (1 <= k < n; ties at the k-th value: lowest
    indices first). Scratch as :func:`kth_key`."""
    prefix, need = kth_key(s, k, keys, cand, hist)
    for i in range(s.shape[0]):
        take, need = _taken(keys[i], prefix, need)
        mask[i] |= take


@njit(nogil=True, cache=True)
def topk_union(s, k):
    b, n = s.shape
    keys = np.empty(n, np.uint32)
    cand = np.empty(n, np.uint32)
    hist = np.empty((4, 2048), np.int32)
    if b == 1:  # one token (decode): the ids straight from the keys, no mask
        prefix, need = kth_key(s[0], k, keys, cand, hist)
        out = np.empty(n + 1, np.int64)  # every id is written, the count moves only for those taken
        m = 0
        for i in range(n):
            take, need = _taken(keys[i], prefix, need)
            out[m] = i
            m += take
        return out[:k]
    mask = np.zeros(n, np.bool_)
    for t in range(b):
        topk_row(s[t], k, mask, keys, cand, hist)
    return np.flatnonzero(mask).astype(np.int64)


def topk_indices(scores, k: int) -> np.ndarray:
    """Sorted int64 union over the batch of each row's k largest scores ([n] or [b, n] scores).

    A radix select in numba (O(n) per row, three passes over the row) and a mask for the union (one
    row: the ids directly).
    Against np.argpartition per row + np.sort/np.unique, alternating in one process at k = n/2 (noisy
    machine): n = 1536: 25 vs 42 µs (b = 1), 87 vs 480 µs (b = 8); n = 11008: 54 vs 103 µs,
    0.70 vs 3.2 ms. Ties at the k-th value take the lowest indices; scores are compared as float32
    (NaN above +inf, -0.0 below +0.0). k <= 0 gives no index, k >= n all of them."""
    s = _np(scores)
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2:
        raise ValueError(f"scores must be [n] or [b, n], got shape {s.shape}")
    n = s.shape[1]
    k = int(k)
    if k <= 0 or n == 0 or s.shape[0] == 0:
        return np.empty(0, np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    return topk_union(np.ascontiguousarray(s, dtype=np.float32), k)
