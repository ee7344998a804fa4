"""LLVM IR helpers for the kernels written through numba ``@intrinsic`` (offload.cpu.lowbit_ir,
offload.cpu.intdot_ir), and the instruction set those kernels are compiled for.

Why IR: numba's auto-vectorizer turns plain-Python formulations of packed integer dot products into
scalar or gather code; explicit vector IR calls the x86 integer dot-product instructions and does not
depend on what the vectorizer decides.

ISA: the features of numba's target, read as numba reads them: ``NUMBA_CPU_FEATURES`` when set (added
to what ``NUMBA_CPU_NAME`` implies: ``NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=`` is a real AVX2
target), else the host's features (the CPU name alone keeps the host's instruction set). A CPU name
missing from :data:`CPU_NAME_FEATURES` implies nothing (the generic IR). ``OFFLOAD_GENERIC_IR=1``
forces the generic IR (tests); numba's cache key does not see that switch, so such a build is cached
only with ``OFFLOAD_GENERIC_IR_CACHE=1`` (and a ``NUMBA_CACHE_DIR`` of its own).
"""
from __future__ import annotations

import os

from llvmlite import ir
from numba import types
from numba.core import cgutils, config

I1, I8, I16, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F16, F32 = ir.HalfType(), ir.FloatType()
CONTRACT = ("contract",)

_AVX2 = ("avx2", "fma", "f16c")
_AVX512_VNNI = _AVX2 + ("avx512f", "avx512bw", "avx512vl", "avx512vnni")
# what a CPU name implies when NUMBA_CPU_FEATURES is given (LLVM's names; the ones these kernels care about)
CPU_NAME_FEATURES = {
    **{n: _AVX2 for n in ("haswell", "broadwell", "skylake", "znver1", "znver2", "znver3")},
    **{n: _AVX2 + ("avxvnni",) for n in ("alderlake", "raptorlake", "meteorlake", "arrowlake", "gracemont",
                                          "sierraforest", "grandridge")},
    **{n: _AVX2 + ("avx512f", "avx512bw", "avx512vl") for n in ("skylake-avx512", "cannonlake")},
    **{n: _AVX512_VNNI for n in ("cascadelake", "cooperlake", "icelake-client", "icelake-server", "tigerlake",
                                 "rocketlake", "znver4", "znver5")},
    **{n: _AVX512_VNNI + ("avxvnni",) for n in ("sapphirerapids", "emeraldrapids", "graniterapids")},
}


def target_features() -> frozenset:
    """The x86 features numba compiles for (see the module docstring)."""
    import llvmlite.binding as ll

    def parse(s):
        on = {f[1:] for f in s.split(",") if f.startswith("+")}
        return on, {f[1:] for f in s.split(",") if f.startswith("-")}
    if config.CPU_FEATURES is None:
        try:
            return frozenset(parse(ll.get_host_cpu_features().flatten())[0])
        except Exception:  # pragma: no cover - llvmlite without a feature query
            return frozenset()
    name = config.CPU_NAME or "host"
    implied = set(parse(ll.get_host_cpu_features().flatten())[0]) if name == "host" else set(
        CPU_NAME_FEATURES.get(name, ()))
    on, off = parse(config.CPU_FEATURES)
    return frozenset((implied | on) - off)


def target_isa() -> str:
    """"avx512vnni" (512-bit vpdpbusd), "avxvnni" (256-bit vpdpbusd), "avx2" (vpmaddubsw + vpmaddwd)
    or "generic" (plain vector IR)."""
    if os.environ.get("OFFLOAD_GENERIC_IR"):
        return "generic"
    f = target_features()
    if {"avx512f", "avx512vnni"} <= f:
        return "avx512vnni"
    if {"avx2", "avxvnni"} <= f or {"avx2", "avx512vl", "avx512vnni"} <= f:
        return "avxvnni"
    return "avx2" if "avx2" in f else "generic"


ISA = target_isa()
HAS_AVX2 = ISA != "generic"
CACHE = not os.environ.get("OFFLOAD_GENERIC_IR") or bool(os.environ.get("OFFLOAD_GENERIC_IR_CACHE"))


# ---------------------------------------------------------------------------------------------
# values and memory


def vt(t, n):
    return ir.VectorType(t, n)


def const(t, v):
    return ir.Constant(t, v)


def csplat(t, n, v):
    return ir.Constant(vt(t, n), [v] * n)


def splat(b, val, n):
    v = b.insert_element(ir.Constant(vt(val.type, n), ir.Undefined), val, const(I32, 0))
    return b.shuffle_vector(v, v, ir.Constant(vt(I32, n), [0] * n))


def idx(*v):
    return [const(I64, x) if isinstance(x, int) else x for x in v]


def vload(b, ptr, t):
    return b.load(b.bitcast(ptr, t.as_pointer()), align=1)


def call(b, name, ret, args):
    fnty = ir.FunctionType(ret, [a.type for a in args])
    fn = cgutils.get_or_insert_function(b.module, fnty, name)
    return b.call(fn, args)


def is_c_array(a, dtype, ndim):
    return isinstance(a, types.Array) and a.dtype == dtype and a.ndim == ndim and a.layout == "C"


def array_data(ctx, b, ty, val):
    """(data pointer, [shape values]) of a numba array argument."""
    a = ctx.make_array(ty)(ctx, b, val)
    return a.data, cgutils.unpack_tuple(b, a.shape)


PREFETCH_AHEAD = 4096  # bytes: software prefetch distance along a weight stream


def prefetch(b, ptr, nbytes, ahead=PREFETCH_AHEAD, locality=3):
    """Prefetch the cache lines of [ptr, ptr + nbytes) + ``ahead`` (read; ``locality`` 3: every cache
    level, ``prefetcht0``; 2: L2 and out, ``prefetcht1``). Measured (one thread, noisy machine, medians):
    SmolLM2's ~1 MB int4 layer streamed 88-105 → 66-70 µs, 7B's 50 MB 3.7-5.4 → 3.6-4.4 ms; 1, 2, 4 and 8
    KB ahead were within noise of each other."""
    fnty = ir.FunctionType(ir.VoidType(), [ptr.type, I32, I32, I32])
    fn = cgutils.get_or_insert_function(b.module, fnty, "llvm.prefetch.p0")
    for off in range(0, nbytes, 64):
        b.call(fn, [b.gep(b.bitcast(ptr, I8.as_pointer()), idx(ahead + off)), const(I32, 0),
                    const(I32, locality), const(I32, 1)])


# stream_prefetch's distances: bytes ahead into L1, into L2
STREAM_L1_AHEAD, STREAM_L2_AHEAD = 1024, 6144


def stream_prefetch(b, ptr, nbytes):
    """Prefetch [ptr, ptr + nbytes) at STREAM_L1_AHEAD into L1 and at STREAM_L2_AHEAD into L2: more
    lines in flight than one prefetch 4 KB ahead into L1, without evicting lines still being read.
    Measured (Intel Xeon VM, 2 threads, each figure from one process): SmolLM2's all-cold FFN (the
    int4 shadow from DRAM) 1.10-1.15x → 1.06-1.09x the dense fp16 FFN's time; SmolLM2 Q4_1 as
    stored, int8 x (row quads), decode 217-226 → 226-238 tok/s."""
    prefetch(b, ptr, nbytes, ahead=STREAM_L1_AHEAD)
    prefetch(b, ptr, nbytes, ahead=STREAM_L2_AHEAD, locality=2)


def store_lanes(b, vec, row_ptr, col0, ncols):
    """row_ptr[col0 : col0 + n] = vec (n lanes), only the lanes with col0 + lane < ncols."""
    n = vec.type.count
    full = b.icmp_signed("<=", b.add(col0, const(I64, n)), ncols)
    with b.if_else(full) as (then, otherwise):
        with then:
            b.store(vec, b.bitcast(b.gep(row_ptr, [col0]), vec.type.as_pointer()), align=4)
        with otherwise:
            for lane in range(n):
                col = b.add(col0, const(I64, lane))
                with b.if_then(b.icmp_signed("<", col, ncols)):
                    b.store(b.extract_element(vec, const(I32, lane)), b.gep(row_ptr, [col]))


def counted_loop(b, n, init, body):
    """for i in range(n): vals = body(i, vals); returns the final vals (list of SSA values)."""
    fn = b.function
    pre = b.block
    head = fn.append_basic_block("loop.head")
    loop = fn.append_basic_block("loop.body")
    done = fn.append_basic_block("loop.done")
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(I64)
    phis = [b.phi(v.type) for v in init]
    i.add_incoming(const(I64, 0), pre)
    for p, v in zip(phis, init):
        p.add_incoming(v, pre)
    b.cbranch(b.icmp_signed("<", i, n), loop, done)
    b.position_at_end(loop)
    new = body(i, phis)
    latch = b.block
    i.add_incoming(b.add(i, const(I64, 1)), latch)
    for p, v in zip(phis, new):
        p.add_incoming(v, latch)
    b.branch(head)
    b.position_at_end(done)
    return phis


# ---------------------------------------------------------------------------------------------
# arithmetic


def tree_add(b, vals):
    while len(vals) > 1:
        nxt = [b.add(vals[i], vals[i + 1]) for i in range(0, len(vals) - 1, 2)]
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals = nxt
    return vals[0]


def fma(b, acc, a, c):
    return b.fadd(acc, b.fmul(a, c, flags=CONTRACT), flags=CONTRACT)


def even_odd_add(b, v, n_out):
    """<2n x iK> v → <n x iK> v[2p] + v[2p+1]."""
    ev = b.shuffle_vector(v, v, ir.Constant(vt(I32, n_out), list(range(0, 2 * n_out, 2))))
    od = b.shuffle_vector(v, v, ir.Constant(vt(I32, n_out), list(range(1, 2 * n_out, 2))))
    return b.add(ev, od)


def maddubs(b, a_u8, x_s8):
    """<32 x i8> unsigned a, signed x → <16 x i16> a[2p]x[2p] + a[2p+1]x[2p+1] (vpmaddubsw; it
    saturates to i16: callers keep |a[2p]x[2p] + a[2p+1]x[2p+1]| ≤ 32767)."""
    if HAS_AVX2:
        return call(b, "llvm.x86.avx2.pmadd.ub.sw", vt(I16, 16), [a_u8, x_s8])
    m = b.mul(b.zext(a_u8, vt(I16, 32)), b.sext(x_s8, vt(I16, 32)))
    return even_odd_add(b, m, 16)


def maddwd(b, a16, x16):
    """<16 x i16> a, x → <8 x i32> a[2p]x[2p] + a[2p+1]x[2p+1] (vpmaddwd)."""
    if HAS_AVX2:
        return call(b, "llvm.x86.avx2.pmadd.wd", vt(I32, 8), [a16, x16])
    m = b.mul(b.sext(a16, vt(I32, 16)), b.sext(x16, vt(I32, 16)))
    return even_odd_add(b, m, 8)
