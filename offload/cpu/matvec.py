"""``matvec(W, x, y, threads)``: y = W·x for one token, whatever the weight's storage format.

A storage format (offload.formats) hands the CPU kernels an *operand*: a float32 [n, d] array, a uint16
[n, d] array (fp16 bits), a quantized matrix (a named tuple: row quads, offload.cpu.intdot's integer
dot products on x quantized to int8; or column planes, offload.cpu.packed_gemv's fp32 x), or a
tuple of operands stacked by rows (fused q/k/v whose parts are stored in different formats). :func:`matvec` is a numba function overloaded on
the operand's type, so the same call works from Python (:func:`matvec_into`) and from inside other
compiled kernels (the fused decode blocks in offload.cpu.attention and offload.cpu.ffn_block), which
are then compiled once per combination of formats.

threads: 1 runs on the caller; more splits the rows over the pool (offload.cpu.pool) when each part gets
at least MIN_BYTES_PER_THREAD (a hand-off costs a few µs: a 576×576 fp16 matrix is ~20 µs of work);
column planes count 2 bytes a weight whatever their width, since their unpacking, not memory, bounds them.
"""
from __future__ import annotations

import numpy as np
from numba import literal_unroll, njit, types
from numba.extending import overload

from offload.cpu import gemv, intdot, packed_gemv

MIN_BYTES_PER_THREAD = 128 * 1024


def matvec(W, x, y, threads):
    """y [n] = W·x [d] (float32), W an operand of any storage format. Callable from numba code only;
    Python calls :func:`matvec_into`."""
    raise NotImplementedError("matvec is a numba function; call matvec_into from Python")


@njit(inline="always")
def _parts(nbytes, threads):
    return max(1, min(threads, nbytes // MIN_BYTES_PER_THREAD))


_PLANES_PRODUCTS: dict = {}


def _planes_product(mode: int):
    """The compiled y = W[:, cols]·x[cols] over a column-plane operand whose unpacking is ``mode``
    (offload.cpu.packed_gemv.KERNELS): one thread, or a parallel region sized by the weights it reads."""
    if mode not in _PLANES_PRODUCTS:
        _, parallel = packed_gemv.KERNELS[mode]

        @njit(inline="always")
        def product(W, x, y, cols, threads):
            X, Y = x.reshape(1, x.shape[0]), y.reshape(1, y.shape[0])
            T = W.planes.shape[0]
            # sized by the weights (as fp16 bytes), not the bytes: unpacking bits for fp32 x is compute-bound
            # (a Q5_0 576×576 matrix, 207 KB, ran 0.64× the plain loop's 2-thread speed on one thread)
            parts = min(T, _parts(2 * W.rows * cols.shape[0], threads))
            if parts <= 1:  # t0 typed int64, as the parallel kernel's: a literal 0 compiles gemv_tiles again
                packed_gemv.gemv_tiles(mode, W.planes, W.d, W.m, W.sc, W.mc, W.flags, W.gmap, W.dmap, cols,
                                       W.zero, X, Y, np.int64(0), T)
            else:
                parallel(W.planes, W.d, W.m, W.sc, W.mc, W.flags, W.gmap, W.dmap, cols, W.zero, X, Y, parts)
        _PLANES_PRODUCTS[mode] = product
    return _PLANES_PRODUCTS[mode]


@overload(matvec, jit_options={"nogil": True, "fastmath": True, "cache": True})
def _matvec_impl(W, x, y, threads):
    if isinstance(W, types.Array) and W.ndim == 2 and W.dtype in (types.float32, types.uint16):
        def impl(W, x, y, threads):
            parts = _parts(W.shape[0] * W.shape[1] * W.itemsize, threads)
            if parts == 1:
                gemv.gemv_rows(W, x, y, 0, W.shape[0])
            else:
                gemv.gemv_rows_parallel(W, x, y, parts)
        return impl
    if isinstance(W, types.BaseNamedTuple) and W.instance_class.__name__ in _PACKED_MODES:
        planes = _planes_product(_PACKED_MODES[W.instance_class.__name__])

        def impl(W, x, y, threads):  # column planes: every input column
            planes(W, x, y, W.cols, threads)
        return impl
    if isinstance(W, types.BaseNamedTuple) and W.instance_class in intdot.QUAD_KINDS:
        serial, parallel = intdot.kernels(*intdot.QUAD_KINDS[W.instance_class], 1)

        def impl(W, x, y, threads):  # row quads: x quantized to int8 per group, integer dot products
            X, Y = x.reshape(1, x.shape[0]), y.reshape(1, y.shape[0])
            parts = min(W.codes.shape[0], _parts(W.codes.size, threads))
            if parts <= 1:
                serial(W.codes, W.d, W.m, W.sc, W.mc, W.dmap, W.groups, W.xmap, W.direct, X, Y)
            else:
                parallel(W.codes, W.d, W.m, W.sc, W.mc, W.dmap, W.groups, W.xmap, W.direct, X, Y, parts)
        return impl
    if isinstance(W, types.BaseTuple) and not isinstance(W, types.BaseNamedTuple):
        def impl(W, x, y, threads):  # parts stacked by rows, each in its own format
            r0 = 0
            for part in literal_unroll(W):
                n = rows_of(part)
                matvec(part, x, y[r0:r0 + n], threads)
                r0 += n
        return impl
    return None


def matvec_cols(W, x, y, cols, threads):
    """y [n] = W·x reading only the input columns ``cols`` (sorted int64; x is taken as zero elsewhere):
    a packed operand's column planes of those columns only (a sparse FFN down over selected neurons,
    TEAL-style input sparsity). Numba code only; packed operands only."""
    raise NotImplementedError("matvec_cols is a numba function")


@overload(matvec_cols, jit_options={"nogil": True, "fastmath": True, "cache": True})
def _matvec_cols_impl(W, x, y, cols, threads):
    if isinstance(W, types.BaseNamedTuple) and W.instance_class.__name__ in _PACKED_MODES:
        planes = _planes_product(_PACKED_MODES[W.instance_class.__name__])

        def impl(W, x, y, cols, threads):
            planes(W, x, y, cols, threads)
        return impl
    return None


def rows_of(W):
    """Output rows of an operand (callable from numba code)."""
    raise NotImplementedError


@overload(rows_of, jit_options={"nogil": True, "cache": True})
def _rows_of_impl(W):
    if isinstance(W, types.Array):
        return lambda W: W.shape[0]
    if isinstance(W, types.BaseNamedTuple):
        return lambda W: W.rows
    return None


# the packed operand classes (offload.formats.quantized) by name → the code width their kernel unpacks
_PACKED_MODES = {"Packed4": 4, "Packed5": 5, "Packed6": 6, "Packed8": 8}


@njit(nogil=True, cache=True)
def matvec_into(W, x, y, threads):
    """y = W·x from Python: W an operand (see module docstring), x float32 [d], y float32 [n] (written)."""
    matvec(W, x, y, threads)
