"""``matvec(W, x, y, threads)``: y = W·x for one token, whatever the weight's storage format.

A storage format (offload.formats) hands the CPU kernels an *operand*: a float32 [n, d] array, a uint16
[n, d] array (fp16 bits), or a packed quantized matrix. :func:`matvec` is a numba function overloaded on
the operand's type, so the same call works from Python (:func:`matvec_into`) and from inside other
compiled kernels (the fused decode blocks in offload.cpu.attention and offload.cpu.ffn_block), which
are then compiled once per combination of formats.

threads: 1 runs on the caller; more splits the rows over the pool (offload.cpu.pool) when each part gets
at least MIN_BYTES_PER_THREAD (a hand-off costs a few µs: a 576×576 fp16 matrix is ~20 µs of work).
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from offload.cpu import dense_gemv

MIN_BYTES_PER_THREAD = 128 * 1024


def matvec(W, x, y, threads):
    """y [n] = W·x [d] (float32), W an operand of any storage format. Callable from numba code only;
    Python calls :func:`matvec_into`."""
    raise NotImplementedError("matvec is a numba function; call matvec_into from Python")


@njit(inline="always")
def _parts(nbytes, threads):
    return max(1, min(threads, nbytes // MIN_BYTES_PER_THREAD))


@overload(matvec, jit_options={"nogil": True, "fastmath": True, "cache": True})
def _matvec_impl(W, x, y, threads):
    if isinstance(W, types.Array) and W.ndim == 2 and W.dtype in (types.float32, types.uint16):
        def impl(W, x, y, threads):
            parts = _parts(W.shape[0] * W.shape[1] * W.itemsize, threads)
            if parts == 1:
                dense_gemv.rows(W, x, y)
            else:
                dense_gemv.rows_parallel(W, x, y, parts)
        return impl
    return None


@njit(nogil=True, cache=True)
def matvec_into(W, x, y, threads):
    """y = W·x from Python: W an operand (see module docstring), x float32 [d], y float32 [n] (written)."""
    matvec(W, x, y, threads)


def matvec_new(W, x: np.ndarray, threads: int) -> np.ndarray:
    """A new float32 [n] array holding W·x."""
    y = np.empty(W.shape[0], np.float32)
    matvec_into(W, x, y, threads)
    return y
