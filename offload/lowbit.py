"""Low-bit GEMV on the CPU for the quantized shadow predictor (numba + explicit LLVM vector IR).

The shadow predictor (offload/predict/shadow.py, DESIGN.md §4) scores neuron i of a gated FFN by
``|act(g̃_i, ũ_i)|`` with ``g̃ = Q(W_gate)·x`` and ``ũ = Q(W_up)·x`` from low-bit copies of the gate
and up rows. Dequantizing to fp32 and running BLAS reads 8× (int4) the packed bytes, so it is slower
than the dense gate+up it should save. These kernels read the packed weights once.

API (NumPy arrays or CPU torch tensors in, NumPy float32 out)::

    sh = Int4Shadow(q_gate, s_gate, q_up, s_up, kind="swiglu", threads=1)   # prepare once per layer
    scores = sh.scores(x)                      # x [d] or [b, d] -> [b, n] float32
    idx = topk_indices(scores, k)              # sorted int64 union of each token's top-k
    Int8Shadow(q_gate, s_gate, q_up, s_up, ...)        # the int8 format, same interface
    shadow_from_predictor(pred)                # Int4Shadow / Int8Shadow from a ShadowPredictor
    shadow_scores_int4(x, q_gate, s_gate, q_up, s_up, kind)   # one-shot (prepares every call)
    shadow_scores_int8(...)
    Int4Matrix(packed, scales).matvec(x)       # plain int4 GEMV y = Q(W)·x, [b, n]
    int4_gemv(x, packed, scales)               # one-shot

Input formats are offload.predict.quant's (int4: packed uint8 [n, d_pad/2], fp16 scales
[n, d_pad/32], groups of 32 columns, w = scale·(nibble − 8); int8: int8 [n, d], fp16 scale per row).
kind: "swiglu" |silu(g)·u|, "relu" |relu(g)·u|, "drelu" relu(g)·relu(u). Optional gate/up biases.

How it computes (int4):

* x is quantized per token to int8 with one fp32 scale per group of 32 columns (the weights' groups),
  llama.cpp's Q8 activations. Measured on SmolLM2's real FFN inputs (30 layers × 512 validation
  tokens, top-k at density 0.5): recall of the oracle top-k 0.9368 with fp32 x, 0.9365 with int8 x
  (int16 x: 0.9368). The int4 weights' own error dwarfs it. For int8 *weights* int8 x did cost
  (0.9938 → 0.9910), so Int8Shadow quantizes x to int16 (exact to ~1e-5): 0.9938.
* Inner product per group in integers, exactly: ``vpmaddubsw`` (u8 nibble × s8 x, pairs → i16), the
  8 partial i16 vectors of a group summed in i16 (|sum| ≤ 8·2·15·127 = 30480, no overflow, no
  saturation), ``vpmaddwd`` by 1 → i32, minus 8·Σxq (the nibble offset), then one int→fp32
  conversion and one FMA by (weight scale × x scale) per group. int8: ``vpmaddwd`` of sign-extended
  weights with int16 x, i32 per group, one FMA per group, the row scale once at the end.
* Lanes over rows, not along the row: the prepared layout stores a block of 8 rows × 32 columns (one
  group) as 128 contiguous bytes followed by the block's 8 fp16 scales (144 bytes = 0.5625 B per
  weight, the size of the packed input: the prepared copy replaces it). A 32-byte chunk holds 4
  columns of each of the 8 rows in its low nibbles and 4 others in its high nibbles, so one
  ``vpmaddubsw`` with a broadcast of 4 x bytes gives partial sums whose lane m belongs to row m:
  no horizontal reductions, the 8 results of a block come out as one vector, and the per-group
  scales of the 8 rows are one 16-byte load + ``vcvtph2ps``. For the shadow, the gate and the up
  group of the same 8 neurons are adjacent ([pair, group, gate | up, 144 B]): the whole layer is
  one sequential stream, read with a software prefetch 4 KB ahead (SmolLM2's streamed layer went
  from ~125 µs with gate and up as two streams to ~70 µs). The activation (a vectorized exp) and
  |·| run in registers and 8 scores are stored: no g̃/ũ arrays in memory.
* The kernels are written as LLVM vector IR through numba ``@intrinsic`` (codegen below), because
  numba's auto-vectorizer turned every plain-Python formulation of the nibble unpacking into
  scalar or gather code (0.4–1.1 GB/s, see "tried" below). On x86 with AVX2 the IR calls the
  ``vpmaddubsw``/``vpmaddwd`` intrinsics; elsewhere the same maths in generic IR (correct, ~4× slower).
* Batches: tokens are processed 1–4 at a time per block (the weights of a block are unpacked once
  and stay in registers / L1 for the others); blocks outer, so the matrix streams from DRAM once
  per call whatever b is.
* Threads: ``threads=1`` (the default) runs on the caller's thread; more split the neurons into
  contiguous ranges run on offload.cold.ffn's blocking helper threads (no spinning after the call;
  numba's ``parallel=True`` busy-waits ~12 ms of CPU after each call on this machine). Measured on
  this 2-core machine while other jobs kept both cores busy, 2 threads were slower than 1 for
  SmolLM2 (a ~70 µs call: the helper's wake-up and the contended core cost more than half the
  work) and no better at 7B; on an idle machine the 7B shape should gain (one core streams
  ~15 GB/s through this kernel, two could approach the DRAM bandwidth): re-measure there.
* Each call quantizes x (in every thread, ~1.5 µs at d = 576, ~6 µs at d = 4096 per token) and has
  ~6 µs of fixed Python/numba overhead.

Measured: ``python benchmarks/shadow_scores.py`` (table in its docstring).

Tried and rejected (fp32 int4 gate+up at 11008 × 4096 unless stated, one thread):
* numba loops over the packed bytes (per-group inner loop of 16 bytes, float or int arithmetic,
  2-D, 3-D or flat indexing): LLVM vectorized across groups with gathers or fell back to int64
  scalar code (numba widens int32 arithmetic to int64): 0.4–1.1 GB/s.
* IR, lanes along the row (original layout, per-row horizontal sum): int16 x and ``vpmaddwd``, a
  per-group broadcast scale: 9–10 GB/s in cache, 6–9 GB/s from DRAM; 2 rows at once was slower.
* IR, lanes over rows with int16 x and ``vpmaddwd`` (exact x): 10.5 GB/s in cache (instruction
  bound: 2 ``vpmaddwd`` + 2 broadcasts + 2 adds per 16 bytes), 8.7 GB/s from DRAM. The int8-x
  ``vpmaddubsw`` kernel halves the instructions: ~19-25 GB/s in cache.
* Tokens 1-2 per pass only (vs up to 4): SmolLM2 b = 4 142 vs 127 µs, b = 8 273 vs 242 µs.
* Software prefetch 1, 2, 8 KB ahead: within noise of 4 KB.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, config
from numba.extending import intrinsic

__all__ = [
    "GROUP",
    "KINDS",
    "Int4Matrix",
    "Int4Shadow",
    "Int8Shadow",
    "int4_gemv",
    "shadow_from_predictor",
    "shadow_scores_int4",
    "shadow_scores_int8",
    "topk_indices",
]

KINDS = ("swiglu", "relu", "drelu")  # index = kernel code
GROUP = 32  # columns per int4 scale group (offload.predict.quant's default; the only one supported)
BLK = 8  # rows per block (lanes of one fp32 vector)
I4_BYTES = 144  # bytes per (8-row block, group): 128 nibble bytes + 8 fp16 scales
I8_BYTES = 256  # bytes per (8-row block, group) of int8 weights

# ---------------------------------------------------------------------------------------------
# LLVM IR helpers

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F16, _F32 = ir.HalfType(), ir.FloatType()
_CONTRACT = ("contract",)


def _use_x86_intrinsics() -> bool:
    """Call the AVX2 integer dot-product intrinsics only when numba compiles for this host and the
    host has AVX2 (NUMBA_CPU_NAME=generic, e.g. for a portable cache, gets the generic IR)."""
    if os.environ.get("OFFLOAD_LOWBIT_GENERIC"):
        return False
    if config.CPU_NAME not in (None, "host") or config.CPU_FEATURES:
        return False
    try:
        import llvmlite.binding as ll

        feats = ll.get_host_cpu_features()
        return bool(feats.get("avx2", False))
    except Exception:  # pragma: no cover - llvmlite without feature query
        return False


_X86 = _use_x86_intrinsics()
# numba's cache key does not see the env switch above: the forced-generic build is cached only when
# asked to (with a NUMBA_CACHE_DIR of its own, as tests/test_lowbit.py does)
_CACHE = not os.environ.get("OFFLOAD_LOWBIT_GENERIC") or bool(os.environ.get("OFFLOAD_LOWBIT_GENERIC_CACHE"))


def _vt(t, n):
    return ir.VectorType(t, n)


def _const(t, v):
    return ir.Constant(t, v)


def _csplat(t, n, v):
    return ir.Constant(_vt(t, n), [v] * n)


def _splat(b, val, n):
    vt = _vt(val.type, n)
    v = b.insert_element(ir.Constant(vt, ir.Undefined), val, _const(_I32, 0))
    return b.shuffle_vector(v, v, ir.Constant(_vt(_I32, n), [0] * n))


def _idx(*v):
    return [_const(_I64, x) if isinstance(x, int) else x for x in v]


def _vload(b, ptr, vt):
    return b.load(b.bitcast(ptr, vt.as_pointer()), align=1)


def _call(b, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    fn = cgutils.get_or_insert_function(b.module, fnty, name)
    return b.call(fn, args)


def _even_odd_add(b, v, n_out):
    ev = b.shuffle_vector(v, v, ir.Constant(_vt(_I32, n_out), list(range(0, 2 * n_out, 2))))
    od = b.shuffle_vector(v, v, ir.Constant(_vt(_I32, n_out), list(range(1, 2 * n_out, 2))))
    return b.add(ev, od)


def _maddubs(b, a_u8, x_s8):
    """<32 x i8> unsigned a (0..15 here), signed x -> <16 x i16> a[2p]x[2p] + a[2p+1]x[2p+1]
    (vpmaddubsw; its saturation never triggers with 4-bit a)."""
    if _X86:
        return _call(b, "llvm.x86.avx2.pmadd.ub.sw", _vt(_I16, 16), [a_u8, x_s8])
    m = b.mul(b.zext(a_u8, _vt(_I16, 32)), b.sext(x_s8, _vt(_I16, 32)))
    return _even_odd_add(b, m, 16)


def _maddwd(b, a16, x16):
    """<16 x i16> a, x -> <8 x i32> a[2p]x[2p] + a[2p+1]x[2p+1] (vpmaddwd)."""
    if _X86:
        return _call(b, "llvm.x86.avx2.pmadd.wd", _vt(_I32, 8), [a16, x16])
    m = b.mul(b.sext(a16, _vt(_I32, 16)), b.sext(x16, _vt(_I32, 16)))
    return _even_odd_add(b, m, 8)


def _tree_add(b, vals):
    while len(vals) > 1:
        nxt = [b.add(vals[i], vals[i + 1]) for i in range(0, len(vals) - 1, 2)]
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals = nxt
    return vals[0]


def _fma(b, acc, a, c):
    return b.fadd(acc, b.fmul(a, c, flags=_CONTRACT), flags=_CONTRACT)


def _exp8(b, x):
    """exp of <8 x float> (Cephes expf: range reduction by ln 2, degree-6 polynomial, 2^n by
    exponent bits; ~1 ulp on [-87, 88], inputs clamped there)."""
    v8 = _vt(_F32, 8)
    x = b.select(b.fcmp_ordered(">", x, _csplat(_F32, 8, 88.0)), _csplat(_F32, 8, 88.0), x)
    x = b.select(b.fcmp_ordered("<", x, _csplat(_F32, 8, -87.0)), _csplat(_F32, 8, -87.0), x)
    fx = b.fadd(b.fmul(x, _csplat(_F32, 8, 1.44269504088896341)), _csplat(_F32, 8, 0.5))
    fx = _call(b, "llvm.floor.v8f32", v8, [fx])
    r = b.fsub(x, b.fmul(fx, _csplat(_F32, 8, 0.693359375)))
    r = b.fsub(r, b.fmul(fx, _csplat(_F32, 8, -2.12194440e-4)))
    p = _csplat(_F32, 8, 1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = b.fadd(b.fmul(p, r), _csplat(_F32, 8, c))
    p = b.fadd(b.fadd(b.fmul(p, b.fmul(r, r)), r), _csplat(_F32, 8, 1.0))
    n = b.fptosi(fx, _vt(_I32, 8))
    pow2n = b.bitcast(b.shl(b.add(n, _csplat(_I32, 8, 127)), _csplat(_I32, 8, 23)), v8)
    return b.fmul(p, pow2n)


def _activation(b, kind, g, u):
    """score vector: kind 0 |silu(g)·u|, 1 |relu(g)·u|, 2 relu(g)·relu(u) (kind is a runtime i64)."""
    v8 = _vt(_F32, 8)
    zero = _csplat(_F32, 8, 0.0)
    fabs = lambda v: _call(b, "llvm.fabs.v8f32", v8, [v])  # noqa: E731
    relu_g = b.select(b.fcmp_ordered(">", g, zero), g, zero)
    relu_u = b.select(b.fcmp_ordered(">", u, zero), u, zero)
    e = _exp8(b, b.fsub(zero, g))
    swiglu = fabs(b.fdiv(b.fmul(g, u), b.fadd(e, _csplat(_F32, 8, 1.0))))
    relu = fabs(b.fmul(relu_g, u))
    drelu = b.fmul(relu_g, relu_u)
    out = b.select(b.icmp_signed("==", kind, _const(_I64, 0)), swiglu, relu)
    return b.select(b.icmp_signed("==", kind, _const(_I64, 2)), drelu, out)


def _group_loop(b, G, init, body):
    """for g in range(G): vals = body(g, vals); returns the final vals (list of SSA values)."""
    fn = b.function
    pre = b.block
    head = fn.append_basic_block("lowbit.head")
    loop = fn.append_basic_block("lowbit.body")
    done = fn.append_basic_block("lowbit.done")
    b.branch(head)
    b.position_at_end(head)
    g = b.phi(_I64)
    phis = [b.phi(v.type) for v in init]
    g.add_incoming(_const(_I64, 0), pre)
    for p, v in zip(phis, init):
        p.add_incoming(v, pre)
    b.cbranch(b.icmp_signed("<", g, G), loop, done)
    b.position_at_end(loop)
    new = body(g, phis)
    latch = b.block
    g.add_incoming(b.add(g, _const(_I64, 1)), latch)
    for p, v in zip(phis, new):
        p.add_incoming(v, latch)
    b.branch(head)
    b.position_at_end(done)
    return phis


def _store8(b, vec, out_row_ptr, col0, ncols):
    """out_row_ptr[col0 : col0 + 8] = vec, only the lanes with col0 + lane < ncols."""
    full = b.icmp_signed("<=", b.add(col0, _const(_I64, BLK)), ncols)
    with b.if_else(full) as (then, otherwise):
        with then:
            b.store(vec, b.bitcast(b.gep(out_row_ptr, [col0]), _vt(_F32, 8).as_pointer()), align=4)
        with otherwise:
            for lane in range(BLK):
                col = b.add(col0, _const(_I64, lane))
                with b.if_then(b.icmp_signed("<", col, ncols)):
                    b.store(b.extract_element(vec, _const(_I32, lane)), b.gep(out_row_ptr, [col]))


PREFETCH_AHEAD = 4096  # bytes: software prefetch distance along the weight stream


def _prefetch(b, ptr, nbytes):
    """Prefetch the cache lines of [ptr, ptr + nbytes) + PREFETCH_AHEAD (read, all levels). Measured
    (one thread, noisy machine, medians): SmolLM2's ~1 MB int4 layer streamed 88-105 → 66-70 µs,
    7B's 50 MB 3.7-5.4 → 3.6-4.4 ms; 1, 2, 4 and 8 KB ahead were within noise of each other."""
    fnty = ir.FunctionType(ir.VoidType(), [ptr.type, _I32, _I32, _I32])
    fn = cgutils.get_or_insert_function(b.module, fnty, "llvm.prefetch.p0")
    for off in range(0, nbytes, 64):
        b.call(fn, [b.gep(ptr, _idx(PREFETCH_AHEAD + off)), _const(_I32, 0), _const(_I32, 3), _const(_I32, 1)])


def _is_c_array(a, dtype, ndim):
    return isinstance(a, types.Array) and a.dtype == dtype and a.ndim == ndim and a.layout == "C"


# ---------------------------------------------------------------------------------------------
# int4 weights × int8 x: group partial sums of one 8-row block for T tokens


def _i4_block_group(b, gp, xq, xc, T):
    """gp: i8* to the block's group (144 bytes); xq[t]: i32* to token t's 8 x-quads of the group;
    xc[t]: i32 correction 8·Σxq. Returns ([<8 x i32>] per token, <8 x float> weight scales)."""
    parts = [[] for _ in range(T)]
    xl = [[b.bitcast(_splat(b, b.load(b.gep(xq[t], _idx(c)), align=4), 8), _vt(_I8, 32)) for c in range(4)]
          for t in range(T)]
    xh = [[b.bitcast(_splat(b, b.load(b.gep(xq[t], _idx(4 + c)), align=4), 8), _vt(_I8, 32)) for c in range(4)]
          for t in range(T)]
    for c in range(4):
        v = _vload(b, b.gep(gp, _idx(32 * c)), _vt(_I8, 32))
        lo = b.and_(v, _csplat(_I8, 32, 15))
        hi = b.and_(b.lshr(v, _csplat(_I8, 32, 4)), _csplat(_I8, 32, 15))
        for t in range(T):
            parts[t].append(_maddubs(b, lo, xl[t][c]))
            parts[t].append(_maddubs(b, hi, xh[t][c]))
    sums = []
    for t in range(T):
        s = _maddwd(b, _tree_add(b, parts[t]), _csplat(_I16, 16, 1))
        sums.append(b.sub(s, _splat(b, xc[t], 8)))
    scales = b.fpext(_vload(b, b.gep(gp, _idx(128)), _vt(_F16, 8)), _vt(_F32, 8))
    return sums, scales


def _i4_token_ptrs(b, ctx, sig, XQ, XS, XC, t0, T, G):
    XQa = ctx.make_array(sig[0])(ctx, b, XQ)
    XSa = ctx.make_array(sig[1])(ctx, b, XS)
    XCa = ctx.make_array(sig[2])(ctx, b, XC)
    toks = [b.add(t0, _const(_I64, t)) for t in range(T)]
    xq32 = b.bitcast(XQa.data, _I32.as_pointer())
    xq = [b.gep(xq32, [b.mul(tk, b.mul(G, _const(_I64, GROUP // 4)))]) for tk in toks]
    xs = [b.gep(XSa.data, [b.mul(tk, G)]) for tk in toks]
    xc = [b.gep(XCa.data, [b.mul(tk, G)]) for tk in toks]
    return toks, xq, xs, xc


def _make_i4_shadow(T):
    """k(W, p, XQ, XS, XC, t0, B, kind, out): scores of neurons 8p..8p+7 for tokens t0..t0+T-1.

    W uint8 [nbp, G, 288]: for block pair p and group g, the 144-byte group of the gate rows of
    neurons 8p..8p+7, then that of their up rows (see pack_int4_blocks; one sequential stream),
    XQ int8 [b, 32G], XS float32 [b, G], XC int32 [b, G], B float32 [nbp, 16] (gate, up biases),
    out float32 [b, n] (columns ≥ n are not written)."""

    @intrinsic
    def kernel(typingctx, W, p, XQ, XS, XC, t0, B, kind, out):
        if not (_is_c_array(W, types.uint8, 3) and _is_c_array(XQ, types.int8, 2)
                and _is_c_array(XS, types.float32, 2) and _is_c_array(XC, types.int32, 2)
                and _is_c_array(B, types.float32, 2) and _is_c_array(out, types.float32, 2)):
            return None
        sig = types.none(W, p, XQ, XS, XC, t0, B, kind, out)

        def codegen(ctx, b, sig, args):
            Wv, pv, XQv, XSv, XCv, t0v, Bv, kindv, outv = args
            Wa = ctx.make_array(sig.args[0])(ctx, b, Wv)
            Ba = ctx.make_array(sig.args[6])(ctx, b, Bv)
            Oa = ctx.make_array(sig.args[8])(ctx, b, outv)
            G = cgutils.unpack_tuple(b, Wa.shape)[1]
            ncols = cgutils.unpack_tuple(b, Oa.shape)[1]
            toks, xq, xs, xc = _i4_token_ptrs(b, ctx, (sig.args[2], sig.args[3], sig.args[4]), XQv, XSv, XCv,
                                              t0v, T, G)
            pair = b.gep(Wa.data, [b.mul(pv, b.mul(G, _const(_I64, 2 * I4_BYTES)))])
            zero = _csplat(_F32, 8, 0.0)

            def body(g, accs):
                gp = b.gep(pair, [b.mul(g, _const(_I64, 2 * I4_BYTES))])
                _prefetch(b, gp, 2 * I4_BYTES)
                xqg = [b.gep(xq[t], [b.mul(g, _const(_I64, GROUP // 4))]) for t in range(T)]
                xcg = [b.load(b.gep(xc[t], [g])) for t in range(T)]
                xsg = [_splat(b, b.load(b.gep(xs[t], [g])), 8) for t in range(T)]
                new = []
                for r in range(2):  # gate block, then up block of the same group
                    sums, sc = _i4_block_group(b, b.gep(gp, _idx(r * I4_BYTES)), xqg, xcg, T)
                    for t in range(T):
                        cs = b.fmul(sc, xsg[t])
                        new.append(_fma(b, accs[r * T + t], b.sitofp(sums[t], _vt(_F32, 8)), cs))
                return new

            accs = _group_loop(b, G, [zero] * (2 * T), body)
            bias = b.bitcast(b.gep(Ba.data, [b.mul(pv, _const(_I64, 16))]), _F32.as_pointer())
            bg = _vload(b, bias, _vt(_F32, 8))
            bu = _vload(b, b.gep(bias, _idx(8)), _vt(_F32, 8))
            col0 = b.mul(pv, _const(_I64, BLK))
            for t in range(T):
                gv = b.fadd(accs[t], bg)
                uv = b.fadd(accs[T + t], bu)
                score = _activation(b, kindv, gv, uv)
                row = b.gep(Oa.data, [b.mul(toks[t], ncols)])
                _store8(b, score, row, col0, ncols)
            return ctx.get_dummy_value()

        return sig, codegen

    return kernel


def _make_i4_gemv(T):
    """k(W, blk, XQ, XS, XC, t0, out): out[t0+t, 8·blk : 8·blk+8] = rows of block blk (raw y)."""

    @intrinsic
    def kernel(typingctx, W, blk, XQ, XS, XC, t0, out):
        if not (_is_c_array(W, types.uint8, 3) and _is_c_array(XQ, types.int8, 2)
                and _is_c_array(XS, types.float32, 2) and _is_c_array(XC, types.int32, 2)
                and _is_c_array(out, types.float32, 2)):
            return None
        sig = types.none(W, blk, XQ, XS, XC, t0, out)

        def codegen(ctx, b, sig, args):
            Wv, kv, XQv, XSv, XCv, t0v, outv = args
            Wa = ctx.make_array(sig.args[0])(ctx, b, Wv)
            Oa = ctx.make_array(sig.args[6])(ctx, b, outv)
            G = cgutils.unpack_tuple(b, Wa.shape)[1]
            ncols = cgutils.unpack_tuple(b, Oa.shape)[1]
            toks, xq, xs, xc = _i4_token_ptrs(b, ctx, (sig.args[2], sig.args[3], sig.args[4]), XQv, XSv, XCv,
                                              t0v, T, G)
            base = b.gep(Wa.data, [b.mul(kv, b.mul(G, _const(_I64, I4_BYTES)))])

            def body(g, accs):
                xqg = [b.gep(xq[t], [b.mul(g, _const(_I64, GROUP // 4))]) for t in range(T)]
                xcg = [b.load(b.gep(xc[t], [g])) for t in range(T)]
                gp = b.gep(base, [b.mul(g, _const(_I64, I4_BYTES))])
                _prefetch(b, gp, I4_BYTES)
                sums, sc = _i4_block_group(b, gp, xqg, xcg, T)
                new = []
                for t in range(T):
                    cs = b.fmul(sc, _splat(b, b.load(b.gep(xs[t], [g])), 8))
                    new.append(_fma(b, accs[t], b.sitofp(sums[t], _vt(_F32, 8)), cs))
                return new

            accs = _group_loop(b, G, [_csplat(_F32, 8, 0.0)] * T, body)
            col0 = b.mul(kv, _const(_I64, BLK))
            for t in range(T):
                _store8(b, accs[t], b.gep(Oa.data, [b.mul(toks[t], ncols)]), col0, ncols)
            return ctx.get_dummy_value()

        return sig, codegen

    return kernel


# ---------------------------------------------------------------------------------------------
# int8 weights × int16 x


def _make_i8_shadow(T):
    """k(W, S, p, XQ, XS, t0, B, kind, out): as the int4 shadow kernel, for int8 weights.

    W int8 [nbp, G, 512]: per block pair and group the 256 bytes of the 8 gate rows then those of
    the 8 up rows (pack_int8_blocks: chunk j holds columns 2j, 2j+1 of the 8 rows),
    S float32 [2·nbp, 8] row scales (gate block, up block, ...), XQ int16 [b, 32G],
    XS float32 [b, G]."""

    @intrinsic
    def kernel(typingctx, W, S, p, XQ, XS, t0, B, kind, out):
        if not (_is_c_array(W, types.int8, 3) and _is_c_array(S, types.float32, 2)
                and _is_c_array(XQ, types.int16, 2) and _is_c_array(XS, types.float32, 2)
                and _is_c_array(B, types.float32, 2) and _is_c_array(out, types.float32, 2)):
            return None
        sig = types.none(W, S, p, XQ, XS, t0, B, kind, out)

        def codegen(ctx, b, sig, args):
            Wv, Sv, pv, XQv, XSv, t0v, Bv, kindv, outv = args
            Wa = ctx.make_array(sig.args[0])(ctx, b, Wv)
            Sa = ctx.make_array(sig.args[1])(ctx, b, Sv)
            XQa = ctx.make_array(sig.args[3])(ctx, b, XQv)
            XSa = ctx.make_array(sig.args[4])(ctx, b, XSv)
            Ba = ctx.make_array(sig.args[6])(ctx, b, Bv)
            Oa = ctx.make_array(sig.args[8])(ctx, b, outv)
            G = cgutils.unpack_tuple(b, Wa.shape)[1]
            ncols = cgutils.unpack_tuple(b, Oa.shape)[1]
            toks = [b.add(t0v, _const(_I64, t)) for t in range(T)]
            xq32 = b.bitcast(XQa.data, _I32.as_pointer())
            xq = [b.gep(xq32, [b.mul(tk, b.mul(G, _const(_I64, GROUP // 2)))]) for tk in toks]
            xs = [b.gep(XSa.data, [b.mul(tk, G)]) for tk in toks]
            pair = b.gep(Wa.data, [b.mul(pv, b.mul(G, _const(_I64, 2 * I8_BYTES)))])

            def body(g, accs):
                gpair = b.gep(pair, [b.mul(g, _const(_I64, 2 * I8_BYTES))])
                _prefetch(b, gpair, 2 * I8_BYTES)
                xg = [b.gep(xq[t], [b.mul(g, _const(_I64, GROUP // 2))]) for t in range(T)]
                xpairs = [[b.bitcast(_splat(b, b.load(b.gep(xg[t], _idx(j)), align=4), 8), _vt(_I16, 16))
                           for j in range(GROUP // 2)] for t in range(T)]
                xsg = [_splat(b, b.load(b.gep(xs[t], [g])), 8) for t in range(T)]
                new = []
                for r in range(2):  # gate block, then up block of the same group
                    gp = b.gep(gpair, _idx(r * I8_BYTES))
                    parts = [[] for _ in range(T)]
                    for j in range(GROUP // 2):
                        v = b.sext(_vload(b, b.gep(gp, _idx(16 * j)), _vt(_I8, 16)), _vt(_I16, 16))
                        for t in range(T):
                            parts[t].append(_maddwd(b, v, xpairs[t][j]))
                    for t in range(T):
                        s = b.sitofp(_tree_add(b, parts[t]), _vt(_F32, 8))
                        new.append(_fma(b, accs[r * T + t], s, xsg[t]))
                return new

            accs = _group_loop(b, G, [_csplat(_F32, 8, 0.0)] * (2 * T), body)
            srow = b.gep(Sa.data, [b.mul(b.mul(pv, _const(_I64, 2)), _const(_I64, BLK))])
            sg = _vload(b, srow, _vt(_F32, 8))
            su = _vload(b, b.gep(srow, _idx(BLK)), _vt(_F32, 8))
            bias = b.gep(Ba.data, [b.mul(pv, _const(_I64, 16))])
            bg = _vload(b, bias, _vt(_F32, 8))
            bu = _vload(b, b.gep(bias, _idx(8)), _vt(_F32, 8))
            col0 = b.mul(pv, _const(_I64, BLK))
            for t in range(T):
                gv = b.fadd(b.fmul(accs[t], sg), bg)
                uv = b.fadd(b.fmul(accs[T + t], su), bu)
                score = _activation(b, kindv, gv, uv)
                _store8(b, score, b.gep(Oa.data, [b.mul(toks[t], ncols)]), col0, ncols)
            return ctx.get_dummy_value()

        return sig, codegen

    return kernel


_i4s1, _i4s2, _i4s3, _i4s4 = (_make_i4_shadow(t) for t in (1, 2, 3, 4))
_i4g1, _i4g2, _i4g3, _i4g4 = (_make_i4_gemv(t) for t in (1, 2, 3, 4))
_i8s1, _i8s2, _i8s3, _i8s4 = (_make_i8_shadow(t) for t in (1, 2, 3, 4))


# ---------------------------------------------------------------------------------------------
# numba drivers (one call per thread: quantize x, then a contiguous range of blocks)


@njit(nogil=True, cache=_CACHE, fastmath={"nnan", "ninf", "nsz"})
def _quantize_x(x, qmax, XQ, XS, XC):
    """Per token and group of 32 columns: s = max|x|/qmax, q = floor(x·(qmax/max|x|) + 0.5) (0 for
    an all-zero group); XC = 8·Σq (the int4 nibble offset). Columns past x's width are zero.
    (No 'contract'/'reassoc' fast-math: the rounding is the reference's, bit for bit.)"""
    b, d = x.shape
    G = XS.shape[1]
    buf = np.empty(GROUP, np.float32)
    for t in range(b):
        for g in range(G):
            lo = g * GROUP
            m = min(GROUP, d - lo)
            for j in range(m):
                buf[j] = x[t, lo + j]
            for j in range(m, GROUP):
                buf[j] = np.float32(0.0)
            amax = np.float32(0.0)
            for j in range(GROUP):
                amax = max(amax, abs(buf[j]))
            if amax > 0:
                inv = np.float32(qmax) / amax
                XS[t, g] = amax / np.float32(qmax)
            else:
                inv = np.float32(0.0)
                XS[t, g] = np.float32(0.0)
            c = np.int32(0)
            for j in range(GROUP):
                q = np.int32(np.floor(buf[j] * inv + np.float32(0.5)))
                XQ[t, lo + j] = q
                c += q
            XC[t, g] = 8 * c


@njit(nogil=True, cache=_CACHE)
def _i4_shadow_run(x, W, B, kind, lo, hi, out):
    b = x.shape[0]
    G = W.shape[1]
    XQ = np.empty((b, G * GROUP), np.int8)
    XS = np.empty((b, G), np.float32)
    XC = np.empty((b, G), np.int32)
    _quantize_x(x, 127, XQ, XS, XC)
    for p in range(lo, hi):
        t0 = 0
        while t0 < b:
            r = b - t0
            if r >= 4:
                _i4s4(W, p, XQ, XS, XC, t0, B, kind, out)
                t0 += 4
            elif r == 3:
                _i4s3(W, p, XQ, XS, XC, t0, B, kind, out)
                t0 += 3
            elif r == 2:
                _i4s2(W, p, XQ, XS, XC, t0, B, kind, out)
                t0 += 2
            else:
                _i4s1(W, p, XQ, XS, XC, t0, B, kind, out)
                t0 += 1


@njit(nogil=True, cache=_CACHE, parallel=True)
def _i4_shadow_parallel(x, W, B, kind, parts, out):
    """_i4_shadow_run over ``parts`` contiguous block ranges on numba's pool (CPU-only decode)."""
    blocks = W.shape[0]
    for c in prange(parts):
        _i4_shadow_run(x, W, B, kind, blocks * c // parts, blocks * (c + 1) // parts, out)


@njit(nogil=True, cache=_CACHE)
def _i4_gemv_run(x, W, lo, hi, out):
    b = x.shape[0]
    G = W.shape[1]
    XQ = np.empty((b, G * GROUP), np.int8)
    XS = np.empty((b, G), np.float32)
    XC = np.empty((b, G), np.int32)
    _quantize_x(x, 127, XQ, XS, XC)
    for k in range(lo, hi):
        t0 = 0
        while t0 < b:
            r = b - t0
            if r >= 4:
                _i4g4(W, k, XQ, XS, XC, t0, out)
                t0 += 4
            elif r == 3:
                _i4g3(W, k, XQ, XS, XC, t0, out)
                t0 += 3
            elif r == 2:
                _i4g2(W, k, XQ, XS, XC, t0, out)
                t0 += 2
            else:
                _i4g1(W, k, XQ, XS, XC, t0, out)
                t0 += 1


@njit(nogil=True, cache=_CACHE)
def _i8_shadow_run(x, W, S, B, kind, lo, hi, out):
    b = x.shape[0]
    G = W.shape[1]
    XQ = np.empty((b, G * GROUP), np.int16)
    XS = np.empty((b, G), np.float32)
    XC = np.empty((b, G), np.int32)
    _quantize_x(x, 32767, XQ, XS, XC)
    for p in range(lo, hi):
        t0 = 0
        while t0 < b:
            r = b - t0
            if r >= 4:
                _i8s4(W, S, p, XQ, XS, t0, B, kind, out)
                t0 += 4
            elif r == 3:
                _i8s3(W, S, p, XQ, XS, t0, B, kind, out)
                t0 += 3
            elif r == 2:
                _i8s2(W, S, p, XQ, XS, t0, B, kind, out)
                t0 += 2
            else:
                _i8s1(W, S, p, XQ, XS, t0, B, kind, out)
                t0 += 1


# ---------------------------------------------------------------------------------------------
# layouts


def _np(t, name: str) -> np.ndarray:
    """A NumPy view of a CPU torch tensor (zero-copy; bfloat16, which NumPy lacks, as float32) or
    np.asarray of anything else."""
    if hasattr(t, "detach") and hasattr(t, "numpy"):
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got {t.device}")
        t = t.detach()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def _pad_rows(a: np.ndarray, rows: int, fill) -> np.ndarray:
    if a.shape[0] == rows:
        return a
    out = np.full((rows,) + a.shape[1:], fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


def pack_int4_blocks(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The kernel layout of int4 rows: uint8 [rows/8, G, 144] (rows a multiple of 8).

    Block k, group g: bytes 32c + 4m + j (c < 4, m < 8 rows, j < 4) hold row 8k+m's column
    32g + 4c + j in the low nibble and column 32g + 16 + 4c + j in the high nibble (nibble = q + 8,
    as in the input); bytes 128..143 are the 8 rows' fp16 scales of group g."""
    rows, H = packed.shape
    G = scales.shape[1]
    nblk = rows // BLK
    q = np.empty((rows, 2 * H), np.uint8)
    q[:, 0::2] = packed & 15
    q[:, 1::2] = packed >> 4
    q = q.reshape(nblk, BLK, G, 2, 4, 4).transpose(0, 2, 4, 1, 5, 3)  # blk, g, c, m, j, half
    W = np.empty((nblk, G, I4_BYTES), np.uint8)
    W[:, :, :128] = (q[..., 0] | (q[..., 1] << 4)).reshape(nblk, G, 128)
    s = np.ascontiguousarray(scales.astype(np.float16, copy=False).reshape(nblk, BLK, G).transpose(0, 2, 1))
    W[:, :, 128:] = s.view(np.uint8).reshape(nblk, G, 16)
    return W


def pack_int8_blocks(q: np.ndarray, G: int) -> np.ndarray:
    """The kernel layout of int8 rows [rows, d] (rows a multiple of 8): int8 [rows/8, G, 256];
    block k, group g: bytes 16j + 2m + e = row 8k+m, column 32g + 2j + e (zero past d)."""
    rows, d = q.shape
    nblk = rows // BLK
    qp = np.zeros((rows, G * GROUP), np.int8)
    qp[:, :d] = q
    W = qp.reshape(nblk, BLK, G, GROUP // 2, 2).transpose(0, 2, 3, 1, 4)  # blk, g, j, m, e
    return np.ascontiguousarray(W).reshape(nblk, G, I8_BYTES)


def _check_x(x, d: int) -> np.ndarray:
    xa = _np(x, "x")
    if xa.ndim == 1:
        xa = xa[None, :]
    if xa.ndim != 2:
        raise ValueError(f"x must be [d] or [b, d], got shape {xa.shape}")
    if xa.shape[1] != d:
        raise ValueError(f"x must have d={d} columns (the weights' width), got shape {xa.shape}")
    if xa.shape[0] < 1:
        raise ValueError("x has no rows")
    if not np.issubdtype(xa.dtype, np.floating):
        raise TypeError(f"x must be floating point, got {xa.dtype}")
    return np.ascontiguousarray(xa, dtype=np.float32)  # must be finite (NaN/inf: undefined scores)


def _resolve_d(d: Optional[int], d_pad: int, group: int) -> int:
    if d is None:
        return d_pad
    d = int(d)
    if not d_pad - group < d <= d_pad:
        raise ValueError(f"d={d} does not match the packed width (rows padded to {d_pad} columns)")
    return d


def _check_kind(kind: str) -> int:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r} (relu_fc/OPT has no gate to shadow)")
    return KINDS.index(kind)


def _biases(n: int, n_pad: int, gate_bias, up_bias) -> np.ndarray:
    """float32 [n_pad/8, 16]: per block pair the 8 gate biases then the 8 up biases."""
    if (gate_bias is None) != (up_bias is None):
        raise ValueError("give both gate_bias and up_bias or neither")
    B = np.zeros((n_pad // BLK, 2, BLK), np.float32)
    if gate_bias is not None:
        for j, (name, v) in enumerate((("gate_bias", gate_bias), ("up_bias", up_bias))):
            v = _np(v, name).astype(np.float32).reshape(-1)
            if v.shape != (n,):
                raise ValueError(f"{name} must have shape [n={n}], got {v.shape}")
            B[:, j] = _pad_rows(v, n_pad, 0).reshape(-1, BLK)
    return B.reshape(-1, 2 * BLK)


def _threads(threads: Optional[int]) -> int:
    t = 1 if threads is None else int(threads)
    if t < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return t


def _ranges(total: int, parts: int) -> list[tuple[int, int]]:
    parts = max(1, min(parts, total))
    bounds = [total * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def _run_split(fn, nunits: int, threads: int, make_args) -> None:
    """fn(*make_args(lo, hi)) over [0, nunits) split into `threads` contiguous ranges; helpers from
    offload.cold.ffn's team (blocking, no spinning)."""
    ranges = _ranges(nunits, threads)
    if len(ranges) == 1:
        fn(*make_args(*ranges[0]))
        return
    from offload.cold.ffn import _team

    _team(len(ranges)).run(fn, [make_args(lo, hi) for lo, hi in ranges])


def _check_int4(name: str, packed: np.ndarray, scales: np.ndarray) -> tuple[int, int]:
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise TypeError(f"{name}: packed int4 must be uint8 [n, d_pad/2], got {packed.dtype} {packed.shape}")
    if scales.ndim != 2 or scales.shape[0] != packed.shape[0] or not np.issubdtype(scales.dtype, np.floating):
        raise ValueError(f"{name}: scales must be float [n={packed.shape[0]}, groups], got {scales.dtype} "
                         f"{scales.shape}")
    d_pad = 2 * packed.shape[1]
    G = scales.shape[1]
    if G == 0 or d_pad != G * GROUP:
        group = d_pad / G if G else float("nan")
        raise ValueError(f"{name}: the kernels need groups of {GROUP} columns, got {d_pad} columns in {G} groups "
                         f"(group {group:g})")
    return d_pad, G


# ---------------------------------------------------------------------------------------------
# public classes


class Int4Shadow:
    """int4 shadow of one layer's gate and up rows, prepared once; ``scores(x)`` per token batch.

    Args: q_gate/q_up uint8 [n, d_pad/2] and s_gate/s_up fp16 [n, d_pad/32] (quantize_int4's
    output; NumPy arrays or CPU tensors), d (x's width; default d_pad), kind, optional gate/up
    biases [n], threads (1 = the caller's thread only), pool (``"team"``: helper threads that sleep
    between calls; ``"numba"``: numba's parallel pool, whose workers spin between calls, for CPU-only
    decode).

    The prepared copy (``self.W``, 0.5625 bytes per weight like the input) does not reference the
    inputs, which may be freed.
    """

    bits = 4

    def __init__(self, q_gate, s_gate, q_up, s_up, d: Optional[int] = None, kind: str = "swiglu",
                 gate_bias=None, up_bias=None, threads: Optional[int] = 1, pool: str = "team"):
        qg, sg, qu, su = (_np(q_gate, "q_gate"), _np(s_gate, "s_gate"), _np(q_up, "q_up"), _np(s_up, "s_up"))
        if pool not in ("team", "numba"):
            raise ValueError(f"pool must be 'team' or 'numba', got {pool!r}")
        self.pool = pool
        d_pad, G = _check_int4("gate", qg, sg)
        if qu.shape != qg.shape or su.shape != sg.shape:
            raise ValueError(f"up must have the gate's shapes {qg.shape}, {sg.shape}; got {qu.shape}, {su.shape}")
        _check_int4("up", qu, su)
        self.kind = kind
        self.code = _check_kind(kind)
        self.n = n = qg.shape[0]
        self.d_pad, self.groups = d_pad, G
        self.d = _resolve_d(d, d_pad, GROUP)
        self.threads = _threads(threads)
        n_pad = -(-n // BLK) * BLK
        nbp = n_pad // BLK
        pad = lambda a, fill: _pad_rows(a, n_pad, fill)  # noqa: E731
        # rows ordered gate block 0, up block 0, gate block 1, ...; padded rows: q = 8 (zero), scale 0
        rows_q = np.stack([pad(qg, 0x88).reshape(nbp, BLK, -1), pad(qu, 0x88).reshape(nbp, BLK, -1)], 1)
        rows_s = np.stack([pad(sg, 0).reshape(nbp, BLK, -1), pad(su, 0).reshape(nbp, BLK, -1)], 1)
        W = pack_int4_blocks(rows_q.reshape(2 * n_pad, -1), rows_s.reshape(2 * n_pad, -1))
        # [pair, group, gate|up, 144]: one sequential stream per call
        self.W = np.ascontiguousarray(W.reshape(nbp, 2, G, I4_BYTES).transpose(0, 2, 1, 3)).reshape(
            nbp, G, 2 * I4_BYTES)
        self.B = _biases(n, n_pad, gate_bias, up_bias)
        self.blocks = nbp

    @property
    def nbytes(self) -> int:
        """Bytes one call streams (the prepared weights and scales)."""
        return self.W.nbytes

    def scores(self, x, out: Optional[np.ndarray] = None) -> np.ndarray:
        """[b, n] float32 scores for x [d] or [b, d]."""
        xa = _check_x(x, self.d)
        out = _out(out, (xa.shape[0], self.n))
        if self.pool == "numba" and self.threads > 1:
            _i4_shadow_parallel(xa, self.W, self.B, self.code, min(self.threads, self.blocks), out)
        else:
            _run_split(_i4_shadow_run, self.blocks, self.threads,
                       lambda lo, hi: (xa, self.W, self.B, self.code, lo, hi, out))
        return out


class Int8Shadow:
    """int8 shadow (one fp16 scale per row; quantize_int8's output q int8 [n, d], scales [n]).

    Same interface as :class:`Int4Shadow`; x is quantized to int16 per group of 32 (exact to ~1e-5
    relative), since int8 x measurably lowered this format's recall."""

    bits = 8

    def __init__(self, q_gate, s_gate, q_up, s_up, d: Optional[int] = None, kind: str = "swiglu",
                 gate_bias=None, up_bias=None, threads: Optional[int] = 1):
        qg, sg, qu, su = (_np(q_gate, "q_gate"), _np(s_gate, "s_gate"), _np(q_up, "q_up"), _np(s_up, "s_up"))
        for name, q, s in (("gate", qg, sg), ("up", qu, su)):
            if q.dtype != np.int8 or q.ndim != 2:
                raise TypeError(f"{name}: int8 weights must be int8 [n, d], got {q.dtype} {q.shape}")
            if s.reshape(-1).shape != (q.shape[0],) or not np.issubdtype(s.dtype, np.floating):
                raise ValueError(f"{name}: scales must be float [n={q.shape[0]}], got {s.dtype} {s.shape}")
        if qu.shape != qg.shape:
            raise ValueError(f"up must have the gate's shape {qg.shape}, got {qu.shape}")
        self.kind = kind
        self.code = _check_kind(kind)
        self.n, width = qg.shape
        n = self.n
        if d is not None and int(d) != width:
            raise ValueError(f"d={d} does not match the int8 rows' width {width}")
        self.d = width
        self.groups = G = -(-width // GROUP)
        self.d_pad = G * GROUP
        self.threads = _threads(threads)
        n_pad = -(-n // BLK) * BLK
        nbp = n_pad // BLK
        rows_q = np.stack([_pad_rows(qg, n_pad, 0).reshape(nbp, BLK, -1),
                           _pad_rows(qu, n_pad, 0).reshape(nbp, BLK, -1)], 1)
        rows_s = np.stack([_pad_rows(sg.reshape(-1).astype(np.float32), n_pad, 0).reshape(nbp, BLK),
                           _pad_rows(su.reshape(-1).astype(np.float32), n_pad, 0).reshape(nbp, BLK)], 1)
        W = pack_int8_blocks(rows_q.reshape(2 * n_pad, width), G)
        self.W = np.ascontiguousarray(W.reshape(nbp, 2, G, I8_BYTES).transpose(0, 2, 1, 3)).reshape(
            nbp, G, 2 * I8_BYTES)
        self.S = np.ascontiguousarray(rows_s.reshape(2 * nbp, BLK))
        self.B = _biases(n, n_pad, gate_bias, up_bias)
        self.blocks = nbp

    @property
    def nbytes(self) -> int:
        return self.W.nbytes + self.S.nbytes

    def scores(self, x, out: Optional[np.ndarray] = None) -> np.ndarray:
        xa = _check_x(x, self.d)
        out = _out(out, (xa.shape[0], self.n))
        _run_split(_i8_shadow_run, self.blocks, self.threads,
                   lambda lo, hi: (xa, self.W, self.S, self.B, self.code, lo, hi, out))
        return out


class Int4Matrix:
    """Plain int4 GEMV ``y = Q(W)·x`` (y [b, n] float32) over quantize_int4's output, prepared once."""

    def __init__(self, packed, scales, d: Optional[int] = None, threads: Optional[int] = 1):
        q, s = _np(packed, "packed"), _np(scales, "scales")
        self.d_pad, self.groups = _check_int4("W", q, s)
        self.d = _resolve_d(d, self.d_pad, GROUP)
        self.n = n = q.shape[0]
        self.threads = _threads(threads)
        n_pad = -(-n // BLK) * BLK
        self.W = pack_int4_blocks(_pad_rows(q, n_pad, 0x88), _pad_rows(s, n_pad, 0))
        self.blocks = n_pad // BLK

    @property
    def nbytes(self) -> int:
        return self.W.nbytes

    def matvec(self, x, out: Optional[np.ndarray] = None) -> np.ndarray:
        xa = _check_x(x, self.d)
        out = _out(out, (xa.shape[0], self.n))
        _run_split(_i4_gemv_run, self.blocks, self.threads, lambda lo, hi: (xa, self.W, lo, hi, out))
        return out


def _out(out, shape) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == shape
            and out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
    return out


# ---------------------------------------------------------------------------------------------
# one-shot functions and helpers


def shadow_scores_int4(x, q_gate, s_gate, q_up, s_up, kind: str = "swiglu", d: Optional[int] = None,
                       gate_bias=None, up_bias=None, threads: Optional[int] = 1) -> np.ndarray:
    """scores [b, n] of x [b, d] (or [d]) from quantize_int4 gate/up; prepares the layout on every
    call (a pass over the weights): build an :class:`Int4Shadow` once for repeated calls."""
    xa = _np(x, "x")
    if d is None:
        d = xa.shape[-1]
    return Int4Shadow(q_gate, s_gate, q_up, s_up, d, kind, gate_bias, up_bias, threads).scores(xa)


def shadow_scores_int8(x, q_gate, s_gate, q_up, s_up, kind: str = "swiglu", gate_bias=None, up_bias=None,
                       threads: Optional[int] = 1) -> np.ndarray:
    """As :func:`shadow_scores_int4` for quantize_int8's format."""
    return Int8Shadow(q_gate, s_gate, q_up, s_up, None, kind, gate_bias, up_bias, threads).scores(x)


def int4_gemv(x, packed, scales, d: Optional[int] = None, threads: Optional[int] = 1) -> np.ndarray:
    """y [b, n] = x · Q(W)ᵀ; prepares the layout on every call (use :class:`Int4Matrix` to reuse)."""
    xa = _np(x, "x")
    if d is None:
        d = xa.shape[-1]
    return Int4Matrix(packed, scales, d, threads).matvec(xa)


def shadow_from_predictor(pred, threads: Optional[int] = 1, pool: str = "team"):
    """Int4Shadow or Int8Shadow from an offload.predict.shadow.ShadowPredictor (duck-typed: kind, d,
    bits, group, q_gate, s_gate, q_up, s_up, gate_bias, up_bias). ``pool`` applies to int4 only."""
    if getattr(pred, "group", GROUP) != GROUP and pred.bits == 4:
        raise ValueError(f"the int4 kernel needs groups of {GROUP}, the predictor has {pred.group}")
    cls = {4: Int4Shadow, 8: Int8Shadow}.get(int(pred.bits))
    if cls is None:
        raise ValueError(f"bits={pred.bits}: expected 4 or 8")
    args = (pred.q_gate, pred.s_gate, pred.q_up, pred.s_up, pred.d, pred.kind,
            getattr(pred, "gate_bias", None), getattr(pred, "up_bias", None), threads)
    return cls(*args, pool=pool) if cls is Int4Shadow else cls(*args)


@njit(nogil=True, cache=_CACHE)
def _topk_row(s, k, mask, keys, cand, hist):
    """mask[i] |= s[i] is among the k largest of s (1 <= k < n; ties at the k-th value: lowest
    indices first). Radix select on the float bits mapped to order-preserving uint32 keys: a
    histogram of the top 11 bits over all n, then 11 and 10 bits over the candidates left."""
    n = s.shape[0]
    bits = s.view(np.uint32)
    hist[:] = 0
    for i in range(n):
        v = bits[i]
        key = ~v if v & np.uint32(0x80000000) else v | np.uint32(0x80000000)
        keys[i] = key
        hist[key >> np.uint32(21)] += 1
    need = k
    j = 2047
    while hist[j] < need:
        need -= hist[j]
        j -= 1
    prefix = np.uint32(j) << np.uint32(21)
    m = 0
    for i in range(n):
        if keys[i] >> np.uint32(21) == np.uint32(j):
            cand[m] = keys[i]
            m += 1
    for shift, nb in ((10, 2048), (0, 1024)):
        hist[:nb] = 0
        for i in range(m):
            hist[(cand[i] >> np.uint32(shift)) & np.uint32(nb - 1)] += 1
        j = nb - 1
        while hist[j] < need:
            need -= hist[j]
            j -= 1
        prefix |= np.uint32(j) << np.uint32(shift)
        m2 = 0
        for i in range(m):
            if (cand[i] >> np.uint32(shift)) & np.uint32(nb - 1) == np.uint32(j):
                cand[m2] = cand[i]
                m2 += 1
        m = m2
    for i in range(n):  # prefix is now the k-th largest key
        key = keys[i]
        if key > prefix:
            mask[i] = True
        elif key == prefix and need > 0:
            mask[i] = True
            need -= 1


@njit(nogil=True, cache=_CACHE)
def _topk_union(s, k):
    b, n = s.shape
    mask = np.zeros(n, np.bool_)
    keys = np.empty(n, np.uint32)
    cand = np.empty(n, np.uint32)
    hist = np.empty(2048, np.int64)
    for t in range(b):
        _topk_row(s[t], k, mask, keys, cand, hist)
    return np.flatnonzero(mask).astype(np.int64)


def topk_indices(scores, k: int) -> np.ndarray:
    """Sorted int64 union over the batch of each row's k largest scores ([n] or [b, n] scores).

    A radix select in numba (O(n) per row, three passes over the row) and a mask for the union.
    Against np.argpartition per row + np.sort/np.unique, alternating in one process at k = n/2 (noisy
    machine): n = 1536: 25 vs 42 µs (b = 1), 87 vs 480 µs (b = 8); n = 11008: 54 vs 103 µs,
    0.70 vs 3.2 ms. Ties at the k-th value take the lowest indices; scores are compared as float32
    (NaN above +inf, -0.0 below +0.0). k <= 0 gives no index, k >= n all of them."""
    s = _np(scores, "scores")
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
    return _topk_union(np.ascontiguousarray(s, dtype=np.float32), k)
