"""Fork-join over helper threads that sleep between calls: the CPU kernels' pool when a GPU is being
driven (hybrid runs), where numba's spinning pool would take a core from the thread feeding the GPU.

``team(threads).run(fn, args_list)`` runs ``fn(*args_list[0])`` on the caller and the rest on helper
threads (``fn`` a nogil numba function, so they run in parallel). A helper that is slow to wake costs the
caller nothing when the work is claimed dynamically (see Team.run's ``idle``).
"""
from __future__ import annotations

import os
import threading
from typing import Optional, Sequence

# keep helper threads off the CPU the calling thread is on (see Team)
PLACE_HELPERS = True


class Helper:
    """One daemon thread that runs one job at a time; handoff through two plain locks (the
    cheapest wake-up CPython has; nothing spins while idle)."""

    def __init__(self, name: str):
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._job = None
        self._ret = None
        self._err: Optional[BaseException] = None
        self._pending = False  # started and not joined yet
        t = threading.Thread(target=self._loop, name=name, daemon=True)
        t.start()
        self.tid = t.native_id  # kernel thread id, for sched_setaffinity

    def _loop(self):
        while True:
            self._go.acquire()
            fn, args = self._job
            self._job = None
            try:
                self._ret = fn(*args)
            except BaseException as e:  # handed to the caller in join()
                self._err = e
            del fn, args
            self._done.release()

    def start(self, fn, args):
        if self._pending:  # a job the caller did not need to wait for; long finished, normally
            self.join()
        self._job = (fn, args)
        self._pending = True
        self._go.release()

    def join(self):
        # Never leave a running job behind unless told it cannot matter (see Team.run). A
        # KeyboardInterrupt arriving here is held until the helper finishes (milliseconds).
        interrupt = None
        while True:
            try:
                self._done.acquire()
                break
            except BaseException as e:
                interrupt = e
        self._pending = False
        err, self._err = self._err, None
        ret, self._ret = self._ret, None
        if interrupt is not None:
            raise interrupt
        if err is not None:
            raise err
        return ret


def _sched_getcpu():
    """Returns a function giving the CPU the calling thread runs on, or None if unavailable."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        import ctypes

        f = ctypes.CDLL(None, use_errno=True).sched_getcpu
    except (OSError, AttributeError):
        return None
    f.restype = ctypes.c_int
    f.argtypes = []
    return f if f() >= 0 else None


class Team:
    """Fork-join: ``fn(*args_list[0])`` runs inline, ``fn(*args_list[j])`` on helper j-1.

    ``run`` returns the list of results (re-raises the first exception). ``idle(j)``, checked
    after the inline part, may say that helper j never started and can no longer affect the
    result; such a helper is not waited for (it is joined before its next job instead), so a
    helper that is slow to wake costs the caller nothing.

    Placement: left alone, Linux woke the helper onto the caller's own CPU here (2-vCPU VM):
    the helper preempted the caller and did the whole job while the other CPU idled, so calls of
    a few ms ran at one core's bandwidth (22 GB/s instead of 30-32 at 550-1100 neurons of
    4096 x 11008). Before each dispatch the helpers' affinity is therefore set to the allowed
    CPUs minus the one the caller is on (a syscall only when that CPU changes). The caller
    itself is never pinned; a helper whose CPU is busy just claims fewer blocks.
    """

    def __init__(self, threads: int):
        self.threads = threads
        self._lock = threading.Lock()
        self._helpers = [Helper(f"offload-cold-{j}") for j in range(1, threads)]
        self._getcpu = _sched_getcpu()
        try:
            self._cpus = frozenset(os.sched_getaffinity(0)) if self._getcpu else frozenset()
        except OSError:
            self._cpus = frozenset()
        self._avoid = None  # the caller CPU the helpers were last moved off

    def _place_helpers(self):
        if not PLACE_HELPERS:
            if self._avoid is not None:  # switched off: give the helpers every CPU back
                self._avoid = None
                for h in self._helpers:
                    os.sched_setaffinity(h.tid, self._cpus)
            return
        cpu = self._getcpu()
        if cpu == self._avoid or cpu not in self._cpus:
            return
        others = self._cpus - {cpu}
        try:
            for h in self._helpers:
                os.sched_setaffinity(h.tid, others)
        except OSError:  # affinity changed under us, or not permitted: stop trying
            self._cpus = frozenset()
            return
        self._avoid = cpu

    def run(self, fn, args_list: Sequence[tuple], idle=None) -> list:
        if len(args_list) > self.threads:
            raise ValueError("more chunks than threads")
        with self._lock:
            if len(self._cpus) > 1:
                self._place_helpers()
            used = self._helpers[: len(args_list) - 1]
            for h, args in zip(used, args_list[1:]):
                h.start(fn, args)
            ok = False
            try:
                rets = [fn(*args_list[0])]
                ok = True
            finally:
                err = None
                for j, h in enumerate(used, 1):  # join every helper that may matter
                    if ok and idle is not None and idle(j):
                        rets.append(None)
                        continue
                    try:
                        r = h.join()
                    except BaseException as e:
                        err = err or e
                        r = None
                    if ok:
                        rets.append(r)
            if err is not None:
                raise err
            return rets


_teams: dict[int, Team] = {}
_teams_lock = threading.Lock()


def _forget_teams_after_fork():
    # a forked child has none of the parent's helper threads: start fresh ones on demand
    global _teams_lock
    _teams.clear()
    _teams_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_teams_after_fork)


def team(threads: int) -> Team:
    with _teams_lock:
        t = _teams.get(threads)
        if t is None:
            t = _teams[threads] = Team(threads)
        return t
