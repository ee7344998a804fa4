"""Compiled gather-dot kernel for the cold FFN (numba, ``nogil``, one thread per call).

One call computes a chunk ``idx[lo:hi]`` of the active cold neurons of one layer and accumulates
their contribution into a per-thread partial output ``acc`` [b, d]:

    for p in lo..hi-1:  i = idx[p]
        a_t   = act(W[i, 0] · x_t, W[i, 1] · x_t)        for every token t (b of them)
        acc_t += a_t * W[i, m-1]                          (skipped where a_t == 0)

``W`` is the row-column bundled layout [n, m, d] (m = 3: gate row, up row, down column; m = 2
for ``relu_fc``: fc1 row, fc2 column), so one neuron is one contiguous 48 KiB read at d = 4096
and every byte is read exactly once per call (rows stay in L1/L2 across the b tokens).

The kernel is serial and releases the GIL; :mod:`offload.cpu.cold` splits ``idx`` across its own
blocking helper threads (offload.cpu.team, ``pool="team"``). Only CPU-only decode uses
``parallel=True``/``prange`` (:func:`cold_parallel`, ``pool="numba"``): numba's OpenMP layer busy-waits
~12 ms of CPU after every parallel region (measured here), which on a 2-core machine would steal a core
from the thread driving the GPU after every layer, but costs nothing when the CPU does all the work.

Weights are float32, or uint16 holding fp16 bits (offload.cpu.widen.as_f32 widens them in registers).
Activation codes are models.ffn_kind.FFNKind codes.

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
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from offload.cpu.widen import as_f32
from offload.models.ffn_kind import FFNKind

SWIGLU, RELU, DRELU, RELU_FC = (k.code for k in (FFNKind.SWIGLU, FFNKind.RELU, FFNKind.DRELU, FFNKind.RELU_FC))
# cold_chunk prefetches up to this many bytes of each row of the next active neuron (into L1)
PREFETCH_ROW_BYTES = 2048
# ... and the rows of the active neuron at least this many bytes further on (into L2)
L2_AHEAD_BYTES = 4096
# per-thread status words in ctl[2 + tid]
NOT_STARTED, WORKING, FINISHED = 0, 1, 2


@intrinsic
def fetch_add(typingctx, arr, i, v):
    """Atomic (seq_cst) ``old = arr[i]; arr[i] += v; return old`` on an int64 array."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        return None
    sig = types.int64(arr, types.intp, types.int64)

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


def _element_pointer_and_prefetch(context, builder, arr_type, arr, start):
    """Codegen shared by the prefetch intrinsics: (i8* of flat element ``start``, llvm.prefetch)."""
    ary = context.make_array(arr_type)(context, builder, arr)
    i8p = ir.IntType(8).as_pointer()
    itemsize = context.get_abi_sizeof(context.get_data_type(arr_type.dtype))
    ptr = builder.gep(builder.bitcast(ary.data, i8p), [builder.mul(start, ir.Constant(start.type, itemsize))])
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
    return ptr, fn


def _prefetch_args(ptr, locality):
    i32 = ir.IntType(32)
    return [ptr, ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1)]  # read, data


def _prefetch_intrinsic(locality: int, doc: str):
    """A ``(arr, start, nbytes)`` prefetch intrinsic: one llvm.prefetch of ``locality`` (3: every cache
    level, ``prefetcht0``; 2: L2 and out, ``prefetcht1``) per 64-byte line of ``nbytes`` of ``arr``'s
    data from flat element ``start`` on. A prefetch never faults."""
    def typer(typingctx, arr, start, nbytes):
        if not isinstance(arr, types.Array):
            return None
        sig = types.void(arr, types.intp, types.intp)

        def codegen(context, builder, sig, args):
            base, fn = _element_pointer_and_prefetch(context, builder, sig.args[0], args[0], args[1])
            step = ir.Constant(args[2].type, 64)
            with cgutils.for_range_slice(builder, ir.Constant(args[2].type, 0), args[2], step) as (off, _):
                builder.call(fn, _prefetch_args(builder.gep(base, [off]), locality))
            return context.get_dummy_value()

        return sig, codegen
    typer.__doc__ = doc
    return intrinsic(typer)


prefetch_bytes = _prefetch_intrinsic(3, """``prefetch_bytes(arr, start, nbytes)``: ask every cache level for
``nbytes`` of ``arr``'s data from flat element ``start`` on. Rows picked by a sparse index defeat the
hardware prefetcher, so the kernels request the next row themselves.""")
prefetch_bytes_to_l2 = _prefetch_intrinsic(2, """``prefetch_bytes_to_l2(arr, start, nbytes)``: as prefetch_bytes,
into L2 (not L1): for requests further ahead, which in L1 would evict lines still in use.""")


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _dot(a, b):
    s = np.float32(0.0)
    for j in range(a.shape[0]):
        s += as_f32(a[j]) * b[j]
    return s


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _dot2(a, c, b):
    """(a·b, c·b) in one pass over b (two independent streams)."""
    s = np.float32(0.0)
    t = np.float32(0.0)
    for j in range(b.shape[0]):
        s += as_f32(a[j]) * b[j]
        t += as_f32(c[j]) * b[j]
    return s, t


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _dot_x4(a, x, t):
    """(a·x[t], a·x[t+1], a·x[t+2], a·x[t+3]): one pass over a for four tokens."""
    x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for j in range(a.shape[0]):
        v = as_f32(a[j])
        s0 += v * x0[j]
        s1 += v * x1[j]
        s2 += v * x2[j]
        s3 += v * x3[j]
    return s0, s1, s2, s3


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _dot2_x4(a, c, x, t):
    """a·x[t..t+3] and c·x[t..t+3] in one pass (x loads shared by both rows)."""
    x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]
    s0 = s1 = s2 = s3 = r0 = r1 = r2 = r3 = np.float32(0.0)
    for j in range(a.shape[0]):
        v = as_f32(a[j])
        w = as_f32(c[j])
        y = x0[j]
        s0 += v * y
        r0 += w * y
        y = x1[j]
        s1 += v * y
        r1 += w * y
        y = x2[j]
        s2 += v * y
        r2 += w * y
        y = x3[j]
        s3 += v * y
        r3 += w * y
    return s0, s1, s2, s3, r0, r1, r2, r3


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _dot2_rows(a, c, x, out_a, out_c):
    """out_a[t] = a·x[t], out_c[t] = c·x[t] for every token in one pass over a and c per 4."""
    b = x.shape[0]
    t = 0
    while t + 4 <= b:
        (out_a[t], out_a[t + 1], out_a[t + 2], out_a[t + 3],
         out_c[t], out_c[t + 1], out_c[t + 2], out_c[t + 3]) = _dot2_x4(a, c, x, t)
        t += 4
    while t < b:
        out_a[t], out_c[t] = _dot2(a, c, x[t])
        t += 1


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _dot_rows(a, x, out):
    """out[t] = a·x[t] for every token, four tokens per pass over a."""
    b = x.shape[0]
    t = 0
    while t + 4 <= b:
        out[t], out[t + 1], out[t + 2], out[t + 3] = _dot_x4(a, x, t)
        t += 4
    while t < b:
        out[t] = _dot(a, x[t])
        t += 1


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _axpy4(acc, d0, d1, d2, d3, h0, h1, h2, h3):
    """acc += h0*d0 + h1*d1 + h2*d2 + h3*d3: one load/store of acc for four neurons."""
    for j in range(acc.shape[0]):
        acc[j] += (h0 * as_f32(d0[j]) + h1 * as_f32(d1[j]) + h2 * as_f32(d2[j])
                   + h3 * as_f32(d3[j]))


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _flush(W, pend, npend, h, acc):
    """Add the down columns of the ``npend`` pending neurons ``pend``, weighted by ``h``."""
    b = acc.shape[0]
    dc = W.shape[1] - 1
    if npend == 4:
        d0, d1, d2, d3 = W[pend[0], dc], W[pend[1], dc], W[pend[2], dc], W[pend[3], dc]
        for t in range(b):
            _axpy4(acc[t], d0, d1, d2, d3, h[0, t], h[1, t], h[2, t], h[3, t])
    else:
        for q in range(npend):
            dr = W[pend[q], dc]
            for t in range(b):
                ht = h[q, t]
                if ht != 0:
                    a_t = acc[t]
                    for j in range(dr.shape[0]):
                        a_t[j] += ht * as_f32(dr[j])


@njit(nogil=True, cache=True, inline="always")
def _prefetch_ahead(W, idx, p, hi):
    """Before computing neuron idx[p] of a range ending at ``hi``: ask for the rows of the next active
    neuron into L1 (a jump the hardware prefetcher cannot guess) and for those of the active neuron
    L2_AHEAD_BYTES further on into L2, so that more lines are in flight (as offload.cpu.gemv's fp16
    rows; measured at one token). Up to PREFETCH_ROW_BYTES of each row; out-of-range ids are skipped."""
    n, m, d = W.shape
    ahead = min(d * W.itemsize, PREFETCH_ROW_BYTES)
    far = max(2, L2_AHEAD_BYTES // (m * d * W.itemsize))  # neurons
    if p + 1 < hi:
        nxt = idx[p + 1]
        if 0 <= nxt < n:
            for r in range(m):
                prefetch_bytes(W, (nxt * m + r) * d, ahead)
    if p + far < hi:
        nxt = idx[p + far]
        if 0 <= nxt < n:
            for r in range(m):
                prefetch_bytes_to_l2(W, (nxt * m + r) * d, ahead)


@njit(nogil=True, fastmath=True, cache=True)
def cold_chunk(W, x, idx, lo, hi, kind, bias, acc, h):
    """Accumulate neurons ``idx[lo:hi]`` into ``acc`` (one thread, a fixed range).

    W    float32 or uint16 (fp16 bits) [n, m, d]  bundled rows (C-contiguous)
    x    float32 [b, d]     layer input, one row per token
    idx  int64   [k]        local neuron ids
    kind int                SWIGLU / RELU / DRELU / RELU_FC
    bias float32 [n]        fc1 bias for RELU_FC (any float32 [>=0] array otherwise)
    acc  float32 [b, d]     partial output, accumulated into (caller zeroes it)
    h    float32 [5, b]     scratch: activations of up to 4 pending neurons + one row of dots

    Neurons whose activation is non-zero for some token are queued, four at a time, and their
    down columns are added together (:func:`_axpy4`), so ``acc`` is read and written once per
    four neurons; dot products run four tokens per pass over a row (:func:`_dot_x4`; SwiGLU
    reads gate and up rows in the same pass, :func:`_dot2_x4`), which cuts L1/L2 loads per FMA
    from 1.5 to 0.75 and made b = 8 ~2x faster.
    Returns the number of out-of-range entries of ``idx[lo:hi]`` (skipped; the caller raises).
    One token (b = 1): :func:`cold_token`.
    """
    b = x.shape[0]
    if b == 1:
        return cold_token(W, x[0], idx, lo, hi, kind, bias, acc[0])
    n = W.shape[0]
    zero = np.float32(0.0)
    one = np.float32(1.0)
    bad = 0
    pend = np.empty(4, np.int64)
    npend = 0
    u = h[4]  # one row of dot products
    for p in range(lo, hi):
        i = idx[p]
        if i < 0 or i >= n:
            bad += 1
            continue
        _prefetch_ahead(W, idx, p, hi)
        hq = h[npend]
        live = False
        if kind == SWIGLU:
            _dot2_rows(W[i, 0], W[i, 1], x, hq, u)  # gate and up in one pass
            for t in range(b):
                g = hq[t]
                hq[t] = g / (one + math.exp(-g)) * u[t]
            live = True
        elif kind == RELU_FC:
            _dot_rows(W[i, 0], x, hq)  # fc1
            bi = bias[i]
            for t in range(b):
                a = hq[t] + bi
                hq[t] = a if a > zero else zero
                live = live or a > zero
        else:  # RELU: relu(g) * u ; DRELU: relu(g) * relu(u); up row read only if some g > 0
            _dot_rows(W[i, 0], x, hq)
            for t in range(b):
                if hq[t] > zero:
                    live = True
                else:
                    hq[t] = zero
            if live:
                _dot_rows(W[i, 1], x, u)
                live = False
                for t in range(b):
                    ut = u[t]
                    if kind == DRELU and ut < zero:
                        ut = zero
                    hq[t] *= ut
                    live = live or hq[t] != zero
        if live:
            pend[npend] = i
            npend += 1
            if npend == 4:
                _flush(W, pend, npend, h, acc)
                npend = 0
    _flush(W, pend, npend, h, acc)
    return bad


@njit(nogil=True, fastmath=True, cache=True)
def cold_token(W, x, idx, lo, hi, kind, bias, acc):
    """cold_chunk's one-token case: x [d] and acc [d] (accumulated into), the other arguments as
    cold_chunk's; returns the out-of-range count.

    Written over whole-array indices ``W[i, r, j]`` instead of row views: a view costs two atomic
    reference-count updates, and the general kernel takes about six per neuron (three rows, the
    pending list, the scratch rows)."""
    n, m, d = W.shape
    dc = m - 1
    zero = np.float32(0.0)
    one = np.float32(1.0)
    bad = 0
    pend = np.empty(4, np.int64)
    hp = np.empty(4, np.float32)
    npend = 0
    for p in range(lo, hi):
        i = idx[p]
        if i < 0 or i >= n:
            bad += 1
            continue
        _prefetch_ahead(W, idx, p, hi)
        g = zero
        if kind == SWIGLU:
            u = zero
            for j in range(d):
                xj = x[j]
                g += as_f32(W[i, 0, j]) * xj
                u += as_f32(W[i, 1, j]) * xj
            a = g / (one + np.float32(math.exp(-g))) * u
            live = True
        else:
            for j in range(d):
                g += as_f32(W[i, 0, j]) * x[j]
            if kind == RELU_FC:
                a = g + bias[i]
                live = a > zero
            elif g > zero:
                u = zero
                for j in range(d):
                    u += as_f32(W[i, 1, j]) * x[j]
                if kind == DRELU and u < zero:
                    u = zero
                a = g * u
                live = a != zero
            else:
                a = zero
                live = False
        if live:
            pend[npend] = i
            hp[npend] = a
            npend += 1
            if npend == 4:
                p0, p1, p2, p3 = pend[0], pend[1], pend[2], pend[3]
                h0, h1, h2, h3 = hp[0], hp[1], hp[2], hp[3]
                for j in range(d):
                    acc[j] += (h0 * as_f32(W[p0, dc, j]) + h1 * as_f32(W[p1, dc, j]) + h2 * as_f32(W[p2, dc, j])
                               + h3 * as_f32(W[p3, dc, j]))
                npend = 0
    for q in range(npend):
        pq, hq = pend[q], hp[q]
        for j in range(d):
            acc[j] += hq * as_f32(W[pq, dc, j])
    return bad


@njit(nogil=True, fastmath=True, cache=True)
def cold_run(W, x, idx, ctl, tid, block, kind, bias, acc, h):
    """One thread's share of a split call: claim blocks of ``block`` entries of ``idx`` from the
    shared counter ``ctl[0]`` until none are left, accumulating into this thread's ``acc``.

    ctl int64 [2 + threads]: ctl[0] next unclaimed position, ctl[2 + tid] this thread's status
    (NOT_STARTED -> WORKING -> FINISHED). A thread marks itself WORKING *before* its first
    claim, so once a thread has seen the counter run out, any thread it still sees NOT_STARTED
    can claim nothing and will never touch its ``acc``: the caller need not wait for it.
    Other arguments as :func:`cold_chunk`. Returns the number of out-of-range indices met.
    """
    k = idx.shape[0]
    fetch_add(ctl, 2 + tid, WORKING)
    bad = 0
    while True:
        lo = fetch_add(ctl, 0, block)
        if lo >= k:
            break
        bad += cold_chunk(W, x, idx, lo, min(lo + block, k), kind, bias, acc, h)
    fetch_add(ctl, 2 + tid, FINISHED - WORKING)
    return bad


@njit(nogil=True, fastmath=True, cache=True, parallel=True)
def cold_parallel(W, x, idx, ctl, block, kind, bias, parts, scratch):
    """cold_run on every thread of numba's pool (OpenMP; its workers spin between calls, so this is
    for CPU-only decode). Thread j accumulates into parts[j]. Returns the out-of-range count.

    One token (x [1, d]): cold_token over ``threads`` contiguous parts of ``idx`` instead (ctl, block
    and scratch unused). SmolLM2's fp16 all-cold layers, 30 in turn, each called from Python: 3.4 ms a
    token with cold_chunk's claims, 2.9-3.0 with a one-token kernel in fixed parts (same process, Intel
    Xeon VM)."""
    nt = parts.shape[0]
    bad = np.zeros(nt, np.int64)
    if x.shape[0] == 1:
        k = idx.shape[0]
        for tid in prange(nt):
            bad[tid] = cold_token(W, x[0], idx, k * tid // nt, k * (tid + 1) // nt, kind, bias, parts[tid, 0])
        return bad.sum()
    for tid in prange(nt):
        bad[tid] = cold_run(W, x, idx, ctl, tid, block, kind, bias, parts[tid], scratch[tid])
    return bad.sum()


def warmup(dtype=np.float32) -> None:
    """Compile (or load from the cache) both kernels for the signature they are used with
    (weights float32, or uint16 holding fp16 bits), so the first real call, on the critical path
    of a token, does not pay for it."""
    W = np.zeros((4, 3, 8), dtype)
    x = np.zeros((1, 8), np.float32)
    idx = np.arange(4, dtype=np.int64)
    bias = np.zeros(0, np.float32)
    acc = np.zeros((1, 8), np.float32)
    h = np.zeros((5, 1), np.float32)
    cold_chunk(W, x, idx, 0, 4, SWIGLU, bias, acc, h)
    cold_run(W, x, idx, np.zeros(3, np.int64), 0, 1, SWIGLU, bias, acc, h)
    cold_parallel(W, x, idx, np.zeros(4, np.int64), 1, SWIGLU, bias, np.zeros((2, 1, 8), np.float32),
                  np.zeros((2, 5, 1), np.float32))
