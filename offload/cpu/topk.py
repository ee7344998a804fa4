"""Top-k neuron selection for the predictors: each token's k largest scores, as the sorted union over a
batch (numba; O(n) per row: a bisection over the scores' values from the row's mean, or a radix select
where the k-th is far from the mean)."""
from __future__ import annotations

import numpy as np
from numba import njit


def _np(t) -> np.ndarray:
    return t.detach().numpy() if hasattr(t, "detach") else np.asarray(t)


@njit(nogil=True, cache=True, inline="always")
def _order_key(v):
    """uint32 key of float bits ``v`` whose unsigned order is the floats' order."""
    return ~v if v & np.uint32(0x80000000) else v | np.uint32(0x80000000)


# kth_key_bisect starts OCTAVES octaves either side of the row's mean (2**23 order keys make an octave of
# positive values) and halves the range until at most FEW keys are left inside it
OCTAVES, FEW = 4, 32


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _mean(s):
    """Mean of s, summed in any order (vectorized; not inlined, which would drop the fast-math flag)."""
    t = np.float32(0.0)
    for i in range(s.shape[0]):
        t += s[i]
    return t / np.float32(s.shape[0])


@njit(nogil=True, cache=True, inline="always")
def _count_at_least(keys, lowest):
    """How many keys are >= ``lowest`` (int64; vectorized: ~0.14 µs for 1536 keys)."""
    c = 0
    for i in range(keys.shape[0]):
        c += keys[i] >= np.uint32(lowest)
    return c


@njit(nogil=True, cache=True, inline="always")
def _count_equal(keys, key):
    """How many keys equal ``key`` (vectorized)."""
    c = 0
    for i in range(keys.shape[0]):
        c += keys[i] == key
    return c


@njit(nogil=True, cache=True)
def kth_key(s, k, keys, cand, hist):
    """(key of the k-th largest of s, how many entries equal to it are among the k) for 1 <= k < n; keys
    [n] gets every entry's order key. hist int32 [4, 2048] and cand uint32 [n]: scratch.

    :func:`kth_key_bisect`, or where the k-th lies outside its range (ReLU rows of zeros, odd rows)
    :func:`kth_key_radix`. AMD EPYC Zen 3, 1536 positive random scores, k = n/2: ~3.2 µs against the radix
    select's ~5.6; SmolLM2's real int4-shadow scores, a one-row topk_union: 4.4 µs a layer against 8.5 with
    the radix select and the tie loop alone (benchmarks/RESULTS.md)."""
    found, prefix, need = kth_key_bisect(s, k, keys, cand)
    if found:
        return prefix, need
    return kth_key_radix(s, k, keys, cand, hist)


@njit(nogil=True, cache=True)
def kth_key_bisect(s, k, keys, cand):
    """(found, key of the k-th largest, ties among the k) for 1 <= k < n by bisection over key values:
    from OCTAVES octaves either side of the row's mean, count the keys at or above the middle of the
    range that holds the k-th (one vectorized pass over the keys, in L1) and keep the half that holds
    it, until at most FEW keys are inside; then sort those. found is False (and the rest meaningless)
    when the k-th is outside the first range. keys [n] gets every entry's order key; cand [n] scratch."""
    n = s.shape[0]
    bits = s.view(np.uint32)
    for i in range(n):
        keys[i] = _order_key(bits[i])
    mean = np.empty(1, np.float32)
    mean[0] = abs(_mean(s))
    centre = np.int64(_order_key(mean.view(np.uint32)[0]))
    lo, hi = centre - (np.int64(OCTAVES) << 23), centre + (np.int64(OCTAVES) << 23)
    if lo < 0 or hi > 0xFFFFFFFF:  # an inf or NaN mean
        return False, np.uint32(0), 0
    at_lo, at_hi = _count_at_least(keys, lo), _count_at_least(keys, hi)
    if not at_lo >= k > at_hi:
        return False, np.uint32(0), 0
    while at_lo - at_hi > FEW and hi - lo > 1:  # the k-th is in [lo, hi): at_lo >= k > at_hi
        mid = (lo + hi) // 2
        c = _count_at_least(keys, mid)
        if c >= k:
            lo, at_lo = mid, c
        else:
            hi, at_hi = mid, c
    base, width = np.uint32(lo), np.uint32(hi - lo - 1)
    m = 0
    for i in range(n):  # the keys in [lo, hi), insertion-sorted; one branch, rarely taken
        key = keys[i]
        if key - base <= width:
            a = m
            while a > 0 and cand[a - 1] > key:
                cand[a] = cand[a - 1]
                a -= 1
            cand[a] = key
            m += 1
    rank = k - at_hi  # of the k-th among them, from the top
    prefix = cand[m - rank]
    need = rank
    for q in range(m - 1, -1, -1):  # keys above the k-th are taken before its ties
        if cand[q] == prefix:
            break
        need -= 1
    return True, prefix, need


@njit(nogil=True, cache=True)
def kth_key_radix(s, k, keys, cand, hist):
    """kth_key's result by a radix select: a histogram of the top 11 key bits over all n, then 11 and 10
    bits over the candidates left. hist int32 [4, 2048] (scratch).

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
    if need == _count_equal(keys, prefix):  # every tie at the k-th is taken (the usual case): vectorized
        for i in range(s.shape[0]):
            mask[i] |= keys[i] >= prefix
        return
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
        if need == _count_equal(keys, prefix):  # every tie at the k-th is taken (the usual case)
            for i in range(n):
                out[m] = i
                m += keys[i] >= prefix
            return out[:k]
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

    A select in numba (O(n) per row: :func:`kth_key`) and a mask for the union (one row: the ids
    directly).
    With the radix select alone, against np.argpartition per row + np.sort/np.unique, alternating in
    one process at k = n/2 (noisy machine): n = 1536: 25 vs 42 µs (b = 1), 87 vs 480 µs (b = 8);
    n = 11008: 54 vs 103 µs, 0.70 vs 3.2 ms. Ties at the k-th value take the lowest indices; scores are compared as float32
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
