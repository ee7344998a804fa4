"""The integer dot-product GEMV's vector code (offload.cpu.intdot), as LLVM IR through numba ``@intrinsic``.

One call of :func:`quad_block` computes the outputs of one block of 16 rows of a matrix in row quads
(offload.formats.quads: a 32-bit lane = 4 columns of one row, a 64-byte vector = that quad of 16 rows)
for T = 1..4 tokens, over a list of groups, from x quantized to int8 per group (offload.cpu.intdot):

    per group g:  p[r] = Σ_c (q[r, c] − h)·xq[c]            exact, in int32 lanes (one per row); h = 2^(bits−1)
                  acc[r] += S[g, r]·xs_g·p[r]                 symmetric types (zero point h)
                  acc[r] += S[g, r]·(xs_g·p[r] + h·Σx_g)      affine types, and accm[r] += M[g, r]·Σx_g
                                                              (Σx_g: the exact fp32 sum of the group's x)

The instruction set is chosen when numba compiles (offload.cpu.ir.ISA):

* avx512vnni: ``vpdpbusd`` on 512 bits, a block is one vector (16 lanes): per quad one ``vpdpbusd`` of
  the codes (u8) with the quad's 4 x bytes broadcast to every lane (s8), in two alternating chains.
* avxvnni: the same on 256 bits (VEX ``vpdpbusd``), a block in two halves of 8 rows.
* avx2: ``vpmaddubsw`` (u8 × s8, pairs summed into i16) then ``vpmaddwd`` by 1 (pairs into i32). Its i16
  sums saturate: a pair is at most 2·(2^bits − 1)·127, so 8 (4-bit), 4 (5-bit) or 2 (6-bit) products
  are summed in i16 before widening; 8-bit codes use llama.cpp's sign trick, w = q − 128 (signed):
  ``vpmaddubsw(|w|, sign(w)·x)`` stays within 2·128·127, and 128·Σxq comes back in the correction.
* generic: the same integer products in plain vector IR (any LLVM target; correct, slower).

Codes are unpacked in registers with 32-bit shifts and byte masks (bits that cross bytes in a shift
land outside the mask): 4-bit, a mask for the low nibbles and a shift and mask for the high ones;
5/6-bit, the high bits of a quad shifted to bit 4 (and 5) of each byte, masked and or-ed in.
"""
from __future__ import annotations

from numba import types
from numba.extending import intrinsic

from offload.cpu.ir import (CONTRACT, F16, F32, I1, I8, I32, I64, ISA, array_data, call, const, counted_loop, csplat,
                            even_odd_add, fma, idx, is_c_array, maddubs, maddwd, splat, store_lanes, stream_prefetch,
                            tree_add, vload, vt)
from offload.formats.quads import BLOCK, HAS_M, HAS_SC, group_bytes

LANES = 8 if ISA in ("avxvnni", "avx2") else 16  # rows per vector; a 256-bit ISA takes a block in two halves
MAX_TOKENS = 4  # tokens per pass over a block (its codes are unpacked once for all of them)


def _mask(v, byte):
    return csplat(I32, v.type.count, int.from_bytes(bytes([byte]) * 4, "little"))


def _shift(b, v, s):
    """v << s (s > 0), v >> −s (s < 0), on 32-bit lanes."""
    n = v.type.count
    if s > 0:
        return b.shl(v, csplat(I32, n, s))
    return b.lshr(v, csplat(I32, n, -s)) if s < 0 else v


def decode_quads(b, gp, bits, group, h):
    """The codes of one block and group (gp: i8* to them) for rows 8h.. of the block (h = 0 for a
    16-lane vector): a <LANES x i32> per quad, each byte a code (module docstring of offload.formats.quads)."""
    L = LANES
    half = 4 * L * h  # byte offset of rows 8h.. within each 64-byte vector
    nq = group // 4

    def load(off):
        return vload(b, b.gep(gp, idx(off + half)), vt(I32, L))
    if bits == 8:
        return [load(64 * k) for k in range(nq)]
    quads = []
    for i in range(nq // 2):
        v = load(64 * i)
        quads += [b.and_(v, _mask(v, 0x0F)), b.and_(_shift(b, v, -4), _mask(v, 0x0F))]
    ext = 8 * group  # bytes of the nibble vectors
    if bits == 5:
        hv = load(ext)
        return [b.or_(q, b.and_(_shift(b, hv, 4 - k), _mask(hv, 0x10))) for k, q in enumerate(quads)]
    if bits == 6:
        hv = [load(ext + 64 * v) for v in range(group // 16)]
        return [b.or_(q, b.and_(_shift(b, hv[k // 4], 4 - 2 * (k % 4)), _mask(q, 0x30))) for k, q in enumerate(quads)]
    return quads


def _bytes(b, v):
    return b.bitcast(v, vt(I8, 4 * v.type.count))


def dot_quads(b, quads, xb, bits, init):
    """<LANES x i32>: lane r = init[r] + Σ_k Σ_j codes_k[r, j]·x_k[j] (x_k: the quad's 4 int8 x values
    broadcast to every lane, as <LANES x i32>); with avx2 and 8-bit codes Σ (q − 128)·x (x_offset)."""
    L = LANES
    if ISA in ("avx512vnni", "avxvnni"):
        name = "llvm.x86.avx512.vpdpbusd.%d" % (32 * L)
        chains = [init, csplat(I32, L, 0)]  # two chains: half the dependent latency
        for k, (q, x) in enumerate(zip(quads, xb)):
            chains[k % 2] = call(b, name, vt(I32, L), [chains[k % 2], q, x])
        return b.add(chains[0], chains[1])
    if ISA == "avx2":
        if bits == 8:  # sign trick: w = q − 128, |w|·(sign(w)·x), |pairs| ≤ 2·128·127
            prods = []
            for q, x in zip(quads, xb):
                w = b.xor(_bytes(b, q), csplat(I8, 32, 0x80))
                aw = call(b, "llvm.abs.v32i8", vt(I8, 32), [w, const(I1, 0)])
                prods.append(maddubs(b, aw, call(b, "llvm.x86.avx2.psign.b", vt(I8, 32), [_bytes(b, x), w])))
            per = 1
        else:
            prods = [maddubs(b, _bytes(b, q), _bytes(b, x)) for q, x in zip(quads, xb)]
            per = {4: 8, 5: 4, 6: 2}[bits]  # i16 sums that cannot saturate
        ones = b.bitcast(csplat(I32, 8, 0x00010001), prods[0].type)
        return tree_add(b, [init] + [maddwd(b, tree_add(b, prods[i:i + per]), ones) for i in range(0, len(prods), per)])
    wide = vt(I32, 4 * L)
    prods = [b.mul(b.zext(_bytes(b, q), wide), b.sext(_bytes(b, x), wide)) for q, x in zip(quads, xb)]
    return b.add(init, even_odd_add(b, even_odd_add(b, tree_add(b, prods), 2 * L), L))


def correction(bits: int) -> int:
    """k such that Σ (q − h)·xq = dot_quads(init = −k·Σxq), h = 2^(bits−1): the symmetric types' zero point,
    and the centre the affine types' codes are taken from (offload.cpu.intdot), less the 128 that avx2's
    signed 8-bit trick already subtracts."""
    return (1 << (bits - 1)) - (128 if ISA == "avx2" and bits == 8 else 0)


def _literal(t):
    return t.literal_value if isinstance(t, types.IntegerLiteral) else None


@intrinsic
def quad_block(typingctx, bits, group, flags, T, codes, d, m, sc, mc, dmap, groups, XQ, XS, XC, XM, blk, t0, Y):
    """Y[t0 + t, 16·blk + r] = row r of block blk times token t0 + t, t < T, over the groups ``groups``.

    bits, group, flags (HAS_SC | HAS_M), T: compile-time constants. codes uint8 [NB, G, ·], d, m uint16
    [NB, ·, 16], sc, mc int8 [NB, ·, 16] (absent ones: any [·, ·, 16] array, not read), dmap int32 [G],
    groups int64 [n], XQ int8 [b, G·group], XS float32 [b, G] (x scales), XC int32 [b, G] (−correction(bits)·Σxq),
    XM float32 [b, G] (Σx), Y float32 [b, R] (lanes past R not written)."""
    lits = [_literal(a) for a in (bits, group, flags, T)]
    if None in lits or not (is_c_array(codes, types.uint8, 3) and is_c_array(d, types.uint16, 3)
                            and is_c_array(m, types.uint16, 3) and is_c_array(sc, types.int8, 3)
                            and is_c_array(mc, types.int8, 3) and is_c_array(dmap, types.int32, 1)
                            and is_c_array(groups, types.int64, 1) and is_c_array(XQ, types.int8, 2)
                            and is_c_array(XS, types.float32, 2) and is_c_array(XC, types.int32, 2)
                            and is_c_array(XM, types.float32, 2) and is_c_array(Y, types.float32, 2)):
        return None
    nbits, ngroup, nflags, nT = lits
    sig = types.none(bits, group, flags, T, codes, d, m, sc, mc, dmap, groups, XQ, XS, XC, XM, blk, t0, Y)

    def codegen(ctx, b, sig, args):
        arrays = {}
        for name, i in (("codes", 4), ("d", 5), ("m", 6), ("sc", 7), ("mc", 8), ("dmap", 9), ("groups", 10),
                        ("XQ", 11), ("XS", 12), ("XC", 13), ("XM", 14), ("Y", 17)):
            arrays[name] = array_data(ctx, b, sig.args[i], args[i])
        blkv, t0v = args[15], args[16]
        cp, (_, G, GB) = arrays["codes"]
        Gd = arrays["d"][1][1]
        R = arrays["Y"][1][1]
        Cp = arrays["XQ"][1][1]
        Gx = arrays["XS"][1][1]
        L, H = LANES, BLOCK // LANES
        has_m, has_sc = bool(nflags & HAS_M), bool(nflags & HAS_SC)
        corr = correction(nbits)
        h_code = float(1 << (nbits - 1))
        base = b.gep(cp, [b.mul(blkv, b.mul(G, GB))])
        toks = [b.add(t0v, const(I64, t)) for t in range(nT)]
        xq = [b.gep(b.bitcast(arrays["XQ"][0], I32.as_pointer()), [b.mul(tk, b.udiv(Cp, const(I64, 4)))])
              for tk in toks]
        per_tok = {k: [b.gep(arrays[k][0], [b.mul(tk, Gx)]) for tk in toks] for k in ("XS", "XC", "XM")}
        zero = csplat(F32, L, 0.0)
        n_acc = nT * H * (2 if has_m else 1)

        def lane_vec(name, row, h, elt):
            """The 16-lane row ``row`` of a [NB, ·, 16] scale array, lanes 8h.. (L of them), as floats."""
            p = b.gep(arrays[name][0], [b.add(b.mul(row, const(I64, BLOCK)), const(I64, h * L))])
            v = vload(b, p, vt(elt, L))
            return b.fpext(v, vt(F32, L)) if elt is F16 else b.sitofp(v, vt(F32, L))

        def body(k, accs):
            g = b.load(b.gep(arrays["groups"][0], [k]))
            gp = b.gep(base, [b.mul(g, GB)])
            stream_prefetch(b, gp, group_bytes(nbits, ngroup))  # +10-30 % from DRAM against none
            gd = b.sext(b.load(b.gep(arrays["dmap"][0], [g])), I64)
            drow = b.add(b.mul(blkv, Gd), gd)
            grow = b.add(b.mul(blkv, G), g)
            xb = [[splat(b, b.load(b.gep(xq[t], [b.add(b.mul(g, const(I64, ngroup // 4)), const(I64, q))]),
                                   align=4), L) for q in range(ngroup // 4)] for t in range(nT)]
            xs = [b.load(b.gep(per_tok["XS"][t], [g])) for t in range(nT)]
            new = list(accs)
            for h in range(H):
                S = lane_vec("d", drow, h, F16)
                if has_sc:
                    S = b.fmul(S, lane_vec("sc", grow, h, I8))
                if has_m:
                    M = lane_vec("m", drow, h, F16)
                    if has_sc:
                        M = b.fmul(M, lane_vec("mc", grow, h, I8))
                quads = decode_quads(b, gp, nbits, ngroup, h)
                for t in range(nT):
                    init = splat(b, b.load(b.gep(per_tok["XC"][t], [g])), L) if corr else csplat(I32, L, 0)
                    p = dot_quads(b, quads, xb[t], nbits, init)
                    a = t * H + h
                    px = b.fmul(b.sitofp(p, vt(F32, L)), splat(b, xs[t], L))  # xs·Σ(q − h)·xq
                    if has_m:  # affine: S·(xs·Σ(q − h)·xq + h·Σx) + M·Σx
                        xm = b.load(b.gep(per_tok["XM"][t], [g]))
                        px = b.fadd(px, splat(b, b.fmul(xm, const(F32, h_code)), L), flags=CONTRACT)
                        new[nT * H + a] = fma(b, accs[nT * H + a], M, splat(b, xm, L))
                    new[a] = fma(b, accs[a], S, px)
            return new

        accs = counted_loop(b, arrays["groups"][1][0], [zero] * n_acc, body)
        for t in range(nT):
            row = b.gep(arrays["Y"][0], [b.mul(toks[t], R)])
            for h in range(H):
                y = accs[t * H + h]
                if has_m:
                    y = b.fadd(y, accs[nT * H + t * H + h])
                store_lanes(b, y, row, b.add(b.mul(blkv, const(I64, BLOCK)), const(I64, h * L)), R)
        return ctx.get_dummy_value()

    return sig, codegen
