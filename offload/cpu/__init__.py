"""The CPU backend: numba kernels and the pool they run on.

    pool.py         the thread pool (numba's), started once, explicitly; the thread count policy
    matvec.py       y = W·x for one token whatever the storage format (dispatch on the operand's type)
    gemv.py         fp32 / fp16 row-major GEMV          packed_gemv.py   packed quantized GEMV
    attention.py    one-token RMSNorm, RoPE + attention, the attention half of a block
    ffn_block.py    the FFN half of a block             decode.py        the fused-block module swaps
    cold.py         the cold FFN over selected neurons (cold_kernels.py: its numba kernels)
    cold_step.py    all-cold FFN step in one call       shadow.py, lowbit_ir.py, topk.py  predictor scores
    quad_rows.py    rows of a row-quad matrix dequantized (a quantized token table's lookup)
    team.py, worker.py  helper threads that sleep between calls (hybrid runs driving a GPU)

Compiled code is cached on disk (numba ``cache=True``), under a folder named by a hash of this package's
and offload.formats' sources (and models/ffn_kind.py, whose kind codes the cold kernels compile in): numba checks only the timestamp of the file that holds a function, not
of the functions it calls from other files, so after an upgrade a cached kernel could run stale code
(or fail to load a module that no longer exists). ``NUMBA_CACHE_DIR``, when set, is the parent folder. The
folder in use is touched on import and its siblings unused for 30 days are removed
(offload.cache.prune_versions).

A numba function made by a factory (one per kernel mode or storage kind) needs a name of its own
(:func:`own_name`): numba names a compiled function's symbol by its qualified name, its argument types
and a counter that restarts in every process, so two processes that compile two modes' kernels in the
same order give them the same symbol. Each goes to the cache under its own key, but a later process that
loads both links one symbol to one body: the other mode's callers run the wrong kernel (wrong numbers or
a crash; numba/numba#10486). tests/test_numba_cache.py reproduces it.
"""
from __future__ import annotations

import hashlib
import os
import pathlib


def _use_versioned_numba_cache() -> None:
    from numba.core import config

    from offload.cache import cache_root, prune_versions

    import offload.models.ffn_kind as ffn_kind  # the kind codes the cold kernels compile in

    here = pathlib.Path(__file__).parent
    sources = sorted(here.glob("*.py")) + sorted((here.parent / "formats").glob("*.py")) + [
        pathlib.Path(ffn_kind.__file__)]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(cache_root(), "numba")
    config.CACHE_DIR = os.path.join(base, digest)
    prune_versions(base, digest)


def own_name(suffix: str):
    """Decorator, under ``@njit``, for a function a factory makes once per mode: appends ``_<suffix>`` to its
    ``__name__`` and ``__qualname__``, so that its compiled symbol (and cache file) differs from every
    other mode's whichever process compiled it (module docstring)."""
    def rename(fn):
        fn.__name__ = f"{fn.__name__}_{suffix}"
        fn.__qualname__ = f"{fn.__qualname__}_{suffix}"
        return fn
    return rename


_use_versioned_numba_cache()
