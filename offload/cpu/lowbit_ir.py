"""The low-bit shadow kernels' vector code, written as LLVM IR through numba ``@intrinsic``.

Used by offload.cpu.shadow (its docstring explains the layout and the arithmetic). Why IR rather than
plain loops: numba's auto-vectorizer turned every plain formulation of the row-major nibble unpacking
into scalar or gather code (0.4–1.1 GB/s); the IR calls the AVX2 ``vpmaddubsw``/``vpmaddwd`` integer
dot products on x86 with AVX2 and the same maths in generic IR elsewhere (correct, ~4× slower), so its
speed does not depend on what the vectorizer decides.

How the int4 kernels compute (x quantized to int8 per group of 32 by offload.cpu.shadow.quantize_x):

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
* The kernels are written as LLVM vector IR through numba ``@intrinsic`` (offload.cpu.lowbit_ir), because
  numba's auto-vectorizer turned every plain-Python formulation of the nibble unpacking into
  scalar or gather code (0.4–1.1 GB/s, see "tried" below). On x86 with AVX2 the IR calls the
  ``vpmaddubsw``/``vpmaddwd`` intrinsics; elsewhere the same maths in generic IR (correct, ~4× slower).

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

Public: the kernel instances ``i4_shadow_k[T]``, ``i4_gemv_k[T]``, ``i8_shadow_k[T]`` for T = 1..4 tokens
per pass, the layout constants, and ``CACHE`` (whether numba may cache code that uses them).
"""
from __future__ import annotations

import os

from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic

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


X86_INTRINSICS = _use_x86_intrinsics()
# numba's cache key does not see the env switch above: the forced-generic build is cached only when
# asked to (with a NUMBA_CACHE_DIR of its own, as tests/test_lowbit.py does)
CACHE = not os.environ.get("OFFLOAD_LOWBIT_GENERIC") or bool(os.environ.get("OFFLOAD_LOWBIT_GENERIC_CACHE"))


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
    if X86_INTRINSICS:
        return _call(b, "llvm.x86.avx2.pmadd.ub.sw", _vt(_I16, 16), [a_u8, x_s8])
    m = b.mul(b.zext(a_u8, _vt(_I16, 32)), b.sext(x_s8, _vt(_I16, 32)))
    return _even_odd_add(b, m, 16)


def _maddwd(b, a16, x16):
    """<16 x i16> a, x -> <8 x i32> a[2p]x[2p] + a[2p+1]x[2p+1] (vpmaddwd)."""
    if X86_INTRINSICS:
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


i4_shadow_k1, i4_shadow_k2, i4_shadow_k3, i4_shadow_k4 = (_make_i4_shadow(t) for t in (1, 2, 3, 4))
i4_gemv_k1, i4_gemv_k2, i4_gemv_k3, i4_gemv_k4 = (_make_i4_gemv(t) for t in (1, 2, 3, 4))
i8_shadow_k1, i8_shadow_k2, i8_shadow_k3, i8_shadow_k4 = (_make_i8_shadow(t) for t in (1, 2, 3, 4))
