"""The CPU thread pool every decode kernel runs on: numba's, started once, explicitly.

Kernels take a thread count ``threads`` as an argument: 1 runs on the calling thread with no parallel
region at all; more splits the work into ``threads`` parts over one ``prange`` region of numba's pool.

Why explicit (:func:`start_pool`): compiled code that contains a call to a parallel kernel (every GEMV
dispatch does, and the fused decode blocks call those) does not start numba's pool itself, and running
it before the pool exists crashes the process, even when the parallel branch is not taken. The CPU
modules (offload.formats.cpu, ColdFFN on numba's pool, the hybrid) call :func:`start_pool` when they
are built; code calling the kernels directly calls it first.

Threads on a shared machine: a parallel region ends when its slowest thread ends. When another process
keeps a core busy, the thread the scheduler put behind it finishes a scheduler slice late, and every one
of the ~100 regions of a decode step waits for it: decode collapses (llama.cpp's does too). With
``threads=1`` there is no region to wait for, and decode keeps the speed of one core. The README's advice
for shared machines is ``--threads 1``; ``benchmarks/decode.py --busy-core`` measures both.
"""
from __future__ import annotations

import os

_started: list[int] = []  # [threads the pool was started with], once started


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """The thread count when none is given: every CPU this process may use."""
    return available_cpus()


def check_threads(threads: int | None) -> int:
    """``threads`` as a positive int (None: :func:`default_threads`); ValueError naming the value otherwise."""
    if threads is None:
        return default_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r}: expected an integer >= 1")
    return threads


def start_pool(threads: int | None = None) -> int:
    """Start numba's pool (once per process) and return the threads kernels may use: ``threads``
    capped at the pool's size. Safe to call many times; cheap after the first."""
    threads = check_threads(threads)
    import numba

    if not _started:
        _launch(numba)
        _started.append(numba.config.NUMBA_NUM_THREADS)
    return min(threads, _started[0])


def _launch(numba) -> None:
    """Run a trivial parallel kernel: this is what makes numba create its pool (and pick its threading
    layer) from Python, where it is safe. (A cached module-level kernel: compiling one at run time would
    cost an LLVM compilation's memory and time at every start.)"""
    import numpy as np

    from offload.cpu.gemv import touch_pool

    touch_pool(np.zeros(max(2, numba.config.NUMBA_NUM_THREADS), np.int64))


def threading_layer() -> str:
    """The threading layer numba chose (after :func:`start_pool`): "tbb", "omp" or "workqueue"."""
    start_pool(1)
    import numba

    return numba.threading_layer()
