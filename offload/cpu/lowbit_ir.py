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
  one sequential stream, read with software prefetches ahead (offload.cpu.ir.stream_prefetch;
  SmolLM2's streamed layer went from ~125 µs with gate and up as two streams to ~70 µs). The
  activation (a vectorized exp) and |·| run in registers and 8 scores are stored: no g̃/ũ arrays in
  memory.
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
* Software prefetch 1, 2, 8 KB ahead into L1: within noise of 4 KB (one thread, the layer alone).

Public: the kernel instances ``i4_shadow_k[T]``, ``i4_gemv_k[T]``, ``i8_shadow_k[T]`` for T = 1..4 tokens
per pass, the layout constants, and ``CACHE`` (whether numba may cache code that uses them). The shared
IR helpers and the ISA detection are offload.cpu.ir's.
"""
from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from offload.cpu.ir import (CACHE, F16, F32, I8, I16, I32, I64, call, const, counted_loop, csplat, fma, idx,
                            is_c_array, maddubs, maddwd, prefetch, splat, store_lanes, stream_prefetch, tree_add,
                            vload, vt)

GROUP = 32  # columns per int4 scale group (offload.predict.quant's default; the only one supported)
BLK = 8  # rows per block (lanes of one fp32 vector)
I4_BYTES = 144  # bytes per (8-row block, group): 128 nibble bytes + 8 fp16 scales
I8_BYTES = 256  # bytes per (8-row block, group) of int8 weights


def _exp8(b, x):
    """exp of <8 x float> (Cephes expf: range reduction by ln 2, degree-6 polynomial, 2^n by
    exponent bits; ~1 ulp on [-87, 88], inputs clamped there)."""
    v8 = vt(F32, 8)
    x = b.select(b.fcmp_ordered(">", x, csplat(F32, 8, 88.0)), csplat(F32, 8, 88.0), x)
    x = b.select(b.fcmp_ordered("<", x, csplat(F32, 8, -87.0)), csplat(F32, 8, -87.0), x)
    fx = b.fadd(b.fmul(x, csplat(F32, 8, 1.44269504088896341)), csplat(F32, 8, 0.5))
    fx = call(b, "llvm.floor.v8f32", v8, [fx])
    r = b.fsub(x, b.fmul(fx, csplat(F32, 8, 0.693359375)))
    r = b.fsub(r, b.fmul(fx, csplat(F32, 8, -2.12194440e-4)))
    p = csplat(F32, 8, 1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = b.fadd(b.fmul(p, r), csplat(F32, 8, c))
    p = b.fadd(b.fadd(b.fmul(p, b.fmul(r, r)), r), csplat(F32, 8, 1.0))
    n = b.fptosi(fx, vt(I32, 8))
    pow2n = b.bitcast(b.shl(b.add(n, csplat(I32, 8, 127)), csplat(I32, 8, 23)), v8)
    return b.fmul(p, pow2n)


def _activation(b, kind, g, u):
    """score vector: kind 0 |silu(g)·u|, 1 |relu(g)·u|, 2 relu(g)·relu(u) (kind is a runtime i64)."""
    v8 = vt(F32, 8)
    zero = csplat(F32, 8, 0.0)
    fabs = lambda v: call(b, "llvm.fabs.v8f32", v8, [v])  # noqa: E731
    relu_g = b.select(b.fcmp_ordered(">", g, zero), g, zero)
    relu_u = b.select(b.fcmp_ordered(">", u, zero), u, zero)
    e = _exp8(b, b.fsub(zero, g))
    swiglu = fabs(b.fdiv(b.fmul(g, u), b.fadd(e, csplat(F32, 8, 1.0))))
    relu = fabs(b.fmul(relu_g, u))
    drelu = b.fmul(relu_g, relu_u)
    out = b.select(b.icmp_signed("==", kind, const(I64, 0)), swiglu, relu)
    return b.select(b.icmp_signed("==", kind, const(I64, 2)), drelu, out)


# ---------------------------------------------------------------------------------------------
# int4 weights × int8 x: group partial sums of one 8-row block for T tokens


def _i4_block_group(b, gp, xq, xc, T):
    """gp: i8* to the block's group (144 bytes); xq[t]: i32* to token t's 8 x-quads of the group;
    xc[t]: i32 correction 8·Σxq. Returns ([<8 x i32>] per token, <8 x float> weight scales)."""
    parts = [[] for _ in range(T)]
    xl = [[b.bitcast(splat(b, b.load(b.gep(xq[t], idx(c)), align=4), 8), vt(I8, 32)) for c in range(4)]
          for t in range(T)]
    xh = [[b.bitcast(splat(b, b.load(b.gep(xq[t], idx(4 + c)), align=4), 8), vt(I8, 32)) for c in range(4)]
          for t in range(T)]
    for c in range(4):
        v = vload(b, b.gep(gp, idx(32 * c)), vt(I8, 32))
        lo = b.and_(v, csplat(I8, 32, 15))
        hi = b.and_(b.lshr(v, csplat(I8, 32, 4)), csplat(I8, 32, 15))
        for t in range(T):
            parts[t].append(maddubs(b, lo, xl[t][c]))
            parts[t].append(maddubs(b, hi, xh[t][c]))
    sums = []
    for t in range(T):
        s = maddwd(b, tree_add(b, parts[t]), csplat(I16, 16, 1))
        sums.append(b.sub(s, splat(b, xc[t], 8)))
    scales = b.fpext(vload(b, b.gep(gp, idx(128)), vt(F16, 8)), vt(F32, 8))
    return sums, scales


def _i4_token_ptrs(b, ctx, sig, XQ, XS, XC, t0, T, G):
    XQa = ctx.make_array(sig[0])(ctx, b, XQ)
    XSa = ctx.make_array(sig[1])(ctx, b, XS)
    XCa = ctx.make_array(sig[2])(ctx, b, XC)
    toks = [b.add(t0, const(I64, t)) for t in range(T)]
    xq32 = b.bitcast(XQa.data, I32.as_pointer())
    xq = [b.gep(xq32, [b.mul(tk, b.mul(G, const(I64, GROUP // 4)))]) for tk in toks]
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
        if not (is_c_array(W, types.uint8, 3) and is_c_array(XQ, types.int8, 2)
                and is_c_array(XS, types.float32, 2) and is_c_array(XC, types.int32, 2)
                and is_c_array(B, types.float32, 2) and is_c_array(out, types.float32, 2)):
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
            pair = b.gep(Wa.data, [b.mul(pv, b.mul(G, const(I64, 2 * I4_BYTES)))])
            zero = csplat(F32, 8, 0.0)

            def body(g, accs):
                gp = b.gep(pair, [b.mul(g, const(I64, 2 * I4_BYTES))])
                stream_prefetch(b, gp, 2 * I4_BYTES)
                xqg = [b.gep(xq[t], [b.mul(g, const(I64, GROUP // 4))]) for t in range(T)]
                xcg = [b.load(b.gep(xc[t], [g])) for t in range(T)]
                xsg = [splat(b, b.load(b.gep(xs[t], [g])), 8) for t in range(T)]
                new = []
                for r in range(2):  # gate block, then up block of the same group
                    sums, sc = _i4_block_group(b, b.gep(gp, idx(r * I4_BYTES)), xqg, xcg, T)
                    for t in range(T):
                        cs = b.fmul(sc, xsg[t])
                        new.append(fma(b, accs[r * T + t], b.sitofp(sums[t], vt(F32, 8)), cs))
                return new

            accs = counted_loop(b, G, [zero] * (2 * T), body)
            bias = b.bitcast(b.gep(Ba.data, [b.mul(pv, const(I64, 16))]), F32.as_pointer())
            bg = vload(b, bias, vt(F32, 8))
            bu = vload(b, b.gep(bias, idx(8)), vt(F32, 8))
            col0 = b.mul(pv, const(I64, BLK))
            for t in range(T):
                gv = b.fadd(accs[t], bg)
                uv = b.fadd(accs[T + t], bu)
                score = _activation(b, kindv, gv, uv)
                row = b.gep(Oa.data, [b.mul(toks[t], ncols)])
                store_lanes(b, score, row, col0, ncols)
            return ctx.get_dummy_value()

        return sig, codegen

    return kernel


def _make_i4_gemv(T):
    """k(W, blk, XQ, XS, XC, t0, out): out[t0+t, 8·blk : 8·blk+8] = rows of block blk (raw y)."""

    @intrinsic
    def kernel(typingctx, W, blk, XQ, XS, XC, t0, out):
        if not (is_c_array(W, types.uint8, 3) and is_c_array(XQ, types.int8, 2)
                and is_c_array(XS, types.float32, 2) and is_c_array(XC, types.int32, 2)
                and is_c_array(out, types.float32, 2)):
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
            base = b.gep(Wa.data, [b.mul(kv, b.mul(G, const(I64, I4_BYTES)))])

            def body(g, accs):
                xqg = [b.gep(xq[t], [b.mul(g, const(I64, GROUP // 4))]) for t in range(T)]
                xcg = [b.load(b.gep(xc[t], [g])) for t in range(T)]
                gp = b.gep(base, [b.mul(g, const(I64, I4_BYTES))])
                prefetch(b, gp, I4_BYTES)
                sums, sc = _i4_block_group(b, gp, xqg, xcg, T)
                new = []
                for t in range(T):
                    cs = b.fmul(sc, splat(b, b.load(b.gep(xs[t], [g])), 8))
                    new.append(fma(b, accs[t], b.sitofp(sums[t], vt(F32, 8)), cs))
                return new

            accs = counted_loop(b, G, [csplat(F32, 8, 0.0)] * T, body)
            col0 = b.mul(kv, const(I64, BLK))
            for t in range(T):
                store_lanes(b, accs[t], b.gep(Oa.data, [b.mul(toks[t], ncols)]), col0, ncols)
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
        if not (is_c_array(W, types.int8, 3) and is_c_array(S, types.float32, 2)
                and is_c_array(XQ, types.int16, 2) and is_c_array(XS, types.float32, 2)
                and is_c_array(B, types.float32, 2) and is_c_array(out, types.float32, 2)):
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
            toks = [b.add(t0v, const(I64, t)) for t in range(T)]
            xq32 = b.bitcast(XQa.data, I32.as_pointer())
            xq = [b.gep(xq32, [b.mul(tk, b.mul(G, const(I64, GROUP // 2)))]) for tk in toks]
            xs = [b.gep(XSa.data, [b.mul(tk, G)]) for tk in toks]
            pair = b.gep(Wa.data, [b.mul(pv, b.mul(G, const(I64, 2 * I8_BYTES)))])

            def body(g, accs):
                gpair = b.gep(pair, [b.mul(g, const(I64, 2 * I8_BYTES))])
                prefetch(b, gpair, 2 * I8_BYTES)
                xg = [b.gep(xq[t], [b.mul(g, const(I64, GROUP // 2))]) for t in range(T)]
                xpairs = [[b.bitcast(splat(b, b.load(b.gep(xg[t], idx(j)), align=4), 8), vt(I16, 16))
                           for j in range(GROUP // 2)] for t in range(T)]
                xsg = [splat(b, b.load(b.gep(xs[t], [g])), 8) for t in range(T)]
                new = []
                for r in range(2):  # gate block, then up block of the same group
                    gp = b.gep(gpair, idx(r * I8_BYTES))
                    parts = [[] for _ in range(T)]
                    for j in range(GROUP // 2):
                        v = b.sext(vload(b, b.gep(gp, idx(16 * j)), vt(I8, 16)), vt(I16, 16))
                        for t in range(T):
                            parts[t].append(maddwd(b, v, xpairs[t][j]))
                    for t in range(T):
                        s = b.sitofp(tree_add(b, parts[t]), vt(F32, 8))
                        new.append(fma(b, accs[r * T + t], s, xsg[t]))
                return new

            accs = counted_loop(b, G, [csplat(F32, 8, 0.0)] * (2 * T), body)
            srow = b.gep(Sa.data, [b.mul(b.mul(pv, const(I64, 2)), const(I64, BLK))])
            sg = vload(b, srow, vt(F32, 8))
            su = vload(b, b.gep(srow, idx(BLK)), vt(F32, 8))
            bias = b.gep(Ba.data, [b.mul(pv, const(I64, 16))])
            bg = vload(b, bias, vt(F32, 8))
            bu = vload(b, b.gep(bias, idx(8)), vt(F32, 8))
            col0 = b.mul(pv, const(I64, BLK))
            for t in range(T):
                gv = b.fadd(b.fmul(accs[t], sg), bg)
                uv = b.fadd(b.fmul(accs[T + t], su), bu)
                score = _activation(b, kindv, gv, uv)
                store_lanes(b, score, b.gep(Oa.data, [b.mul(toks[t], ncols)]), col0, ncols)
            return ctx.get_dummy_value()

        return sig, codegen

    return kernel


i4_shadow_k1, i4_shadow_k2, i4_shadow_k3, i4_shadow_k4 = (_make_i4_shadow(t) for t in (1, 2, 3, 4))
i4_gemv_k1, i4_gemv_k2, i4_gemv_k3, i4_gemv_k4 = (_make_i4_gemv(t) for t in (1, 2, 3, 4))
i8_shadow_k1, i8_shadow_k2, i8_shadow_k3, i8_shadow_k4 = (_make_i8_shadow(t) for t in (1, 2, 3, 4))
