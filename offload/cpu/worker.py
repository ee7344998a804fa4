"""One persistent background thread for the cold FFN, so the caller can drive the GPU meanwhile.

    worker = ColdWorker()
    fut = worker.submit(cold.forward, x_cpu, idx)     # starts on the worker thread
    y_hot = hybrid_hot_part(x_gpu)                    # GPU work, overlapped
    y = y_hot + torch.from_numpy(fut.result()).to(y_hot.device)  # waits; re-raises its error
    worker.close()                                    # idempotent; also a context manager

Design for a round trip that is on the critical path 30+ times per token: a ``queue.SimpleQueue``
(C) carries jobs, each future is a plain ``threading.Lock`` held until the job finishes (the
cheapest wake-up CPython has), the thread is a daemon so a stuck job never blocks exit, and the
caller waits in slices of :data:`WAIT_SLICE_S` so Ctrl-C always gets through (on POSIX a SIGINT
on the main thread interrupts the wait at once; the slices cover a signal taken by another
thread). An interrupted wait leaves the job running; its result is simply dropped, and the worker
stays usable.

Measured here (2 vCPUs, CPython 3.11, no-op job, ``submit(...).result()`` 3000 times, ``python
benchmarks/cold_ffn.py --worker-only``; five runs, some with other jobs on the machine): this
class median 18-39 µs (min 9-17 µs), ``ThreadPoolExecutor(max_workers=1)`` median 19-64 µs (min
17-30 µs), a direct call 0.2-0.4 µs. Most of it is the two thread wake-ups (futex + scheduler)
and GIL handoffs, not Python: at 30 layers per token, ~1 ms per token.
"""
from __future__ import annotations

import queue
import threading
import time
import weakref
from typing import Any, Callable, Optional

__all__ = ["ColdFuture", "ColdWorker", "WAIT_SLICE_S"]

WAIT_SLICE_S = 0.1
_PENDING = object()


class ColdFuture:
    """Result of :meth:`ColdWorker.submit`."""

    __slots__ = ("_lock", "_value", "_exc", "__weakref__")

    def __init__(self):
        self._lock = threading.Lock()
        self._lock.acquire()  # released by the worker when the job is finished
        self._value: Any = _PENDING
        self._exc: Optional[BaseException] = None

    def done(self) -> bool:
        return self._value is not _PENDING or self._exc is not None

    def _wait(self, timeout: Optional[float]) -> bool:
        if self.done():
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            s = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
            if s <= 0:
                return self.done()
            if self._lock.acquire(timeout=s):
                self._lock.release()  # stays "done" for later result() calls
                return True

    def result(self, timeout: Optional[float] = None) -> Any:
        """The job's return value; re-raises its exception (the worker's frames stay in the
        traceback). Raises ``TimeoutError`` if not finished within ``timeout`` seconds."""
        if not self._wait(timeout):
            raise TimeoutError(f"cold job not finished after {timeout} s")
        if self._exc is not None:
            raise self._exc
        return self._value

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        if not self._wait(timeout):
            raise TimeoutError(f"cold job not finished after {timeout} s")
        return self._exc


def _run(q: "queue.SimpleQueue"):
    # no reference to the ColdWorker here, so dropping it closes the thread (weakref.finalize)
    while True:
        item = q.get()
        if item is None:
            return
        fut, fn, args, kwargs = item
        try:
            value = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller by result()
            fut._exc = e
        else:
            fut._value = value
        del item, fn, args, kwargs
        fut._lock.release()
        del fut


class ColdWorker:
    """Runs submitted callables one at a time, in order, on one persistent daemon thread."""

    def __init__(self, name: str = "offload-cold-worker"):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=_run, args=(self._q,), name=name, daemon=True)
        self._thread.start()
        self._closed = False
        self._close_lock = threading.Lock()
        self._finalizer = weakref.finalize(self, self._q.put, None)

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, fn: Callable, *args, **kwargs) -> ColdFuture:
        """Queue ``fn(*args, **kwargs)`` on the worker thread; returns at once."""
        if self._closed:
            raise RuntimeError("ColdWorker is closed")
        if not self._thread.is_alive():
            raise RuntimeError("ColdWorker's thread is not running (a forked child? make a new one)")
        fut = ColdFuture()
        self._q.put((fut, fn, args, kwargs))
        return fut

    def close(self, wait: bool = True, timeout: Optional[float] = None) -> None:
        """Stop after the jobs already submitted. Idempotent. ``wait``: join the thread (in
        interruptible slices; ``timeout`` bounds the wait, the thread is a daemon anyway)."""
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._finalizer()  # puts the stop sentinel, once
        if wait and self._thread is not threading.current_thread():
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._thread.is_alive():
                s = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S,
                                                             deadline - time.monotonic())
                if s <= 0:
                    break
                self._thread.join(s)

    def __enter__(self) -> "ColdWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self):
        return f"ColdWorker({self._thread.name!r}, {'closed' if self._closed else 'open'})"
