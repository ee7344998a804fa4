"""Element access shared by the CPU kernels: 16-bit weights widened to fp32 in registers.

numba has no float16 type, so fp16 weights reach the kernels as their uint16 bits and :func:`as_f32`
widens them (an LLVM ``fpext half → float``: F16C ``vcvtph2ps``, vectorized with the loop around it);
the same kernel compiled for float32 arrays reads them unchanged. :func:`f32_from_bits` is the reverse
kind of access: an int32's bits read as a float32 (numba has no scalar bit cast). :func:`narrow_like` is
the store side: a float32 rounded to an array's element type (fp16 bits for a uint16 array), as torch rounds.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def as_f32(typingctx, v):
    """float32 of a weight element: uint16 holds fp16 bits (widened exactly), float32 passes through."""
    if v == types.uint16:
        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(types.uint16), codegen
    if v == types.float32:
        def codegen(context, builder, sig, args):
            return args[0]
        return types.float32(types.float32), codegen
    return None


@intrinsic
def f32_from_bits(typingctx, v):
    """The float32 whose bits are the low 32 bits of the integer ``v`` (a bit cast; vectorizes with the
    loop around it). numba computes int32 arithmetic in int64, hence the truncation."""
    if isinstance(v, types.Integer):
        def codegen(context, builder, sig, args):
            bits = args[0]
            if bits.type.width > 32:
                bits = builder.trunc(bits, ir.IntType(32))
            return builder.bitcast(bits, ir.FloatType())
        return types.float32(v), codegen
    return None


@intrinsic
def narrow_like(typingctx, v, arr):
    """``v`` (float32) as an element of ``arr``: for a uint16 array the bits of fp16(v), rounded to nearest even
    as torch's ``.half()`` rounds (LLVM ``fptrunc``: F16C ``vcvtps2ph``); for a float32 array v itself."""
    if v != types.float32 or not isinstance(arr, types.Array):
        return None
    if arr.dtype == types.uint16:
        def codegen(context, builder, sig, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return types.uint16(types.float32, arr), codegen
    if arr.dtype == types.float32:
        def codegen(context, builder, sig, args):
            return args[0]
        return types.float32(types.float32, arr), codegen
    return None
