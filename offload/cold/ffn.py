"""The CPU side of a hybrid FFN layer: the cold neurons, computed with NumPy/numba.

Shapes (HF conventions, one layer, ``n`` cold neurons, model width ``d``)::

    gate [n, d]  up [n, d]  down [d, n]        neuron i = gate[i], up[i], down[:, i]
    x [d] or [b, d]  ->  y = sum_{i in idx} down[:, i] * act_i(x)   [d] or [b, d]

    swiglu   act_i = silu(gate[i]·x) * (up[i]·x)              LLaMA/Mistral/Qwen2/SmolLM
    relu     act_i = relu(gate[i]·x) * (up[i]·x)              ReluLLaMA, ProSparse
    drelu    act_i = relu(gate[i]·x) * relu(up[i]·x)          TurboSparse/Bamboo
    relu_fc  act_i = relu(fc1[i]·x + b1[i])   (gate=fc1, up=None, down=fc2, bias=b1)   OPT
             the fc2 bias is *not* added here: the caller adds it once per layer.

Layout: row-column bundling ("LLM in a Flash"): ``W[n, m, d]`` holds gate row, up row and down
column of neuron i back to back (m = 3; m = 2 for relu_fc), so an active neuron is one contiguous
read of ``m·d·4`` bytes (48 KiB at d = 4096) and the whole sparse FFN is a single pass over the
active bytes. Dense prefill (:meth:`ColdFFN.forward_dense`) runs BLAS on strided views of the same
array (no second copy of the weights).

Sparse kernel: a fused gather-dot in numba (:mod:`offload.cold._numba`, ``nogil``), run on the
calling thread plus ``threads-1`` helper threads that block on a lock between calls (no spinning),
each on a contiguous slice of ``idx`` with its own partial output, summed at the end.

What was tried (fp32, d=4096, n=11008, SwiGLU, 2 threads, same run as dense BLAS; ratio =
effective bandwidth of the sparse call / bandwidth of dense ``gate@x, up@x, down@h`` (19-28 ms,
20-30 GB/s here, noisy machine)):

    | method                                         |  5 %  | 10 %  | 20 %  | 30 %  | 50 %  |
    |------------------------------------------------|-------|-------|-------|-------|-------|
    | naive G[idx]@x, U[idx]@x, D[:, idx]@h          | 0.04  | 0.04  | 0.05  | 0.04  | 0.04  |
    | G[idx]@x, U[idx]@x, h@D.T[idx] (down transposed)| 0.31 | 0.24  | 0.24  | 0.13  | 0.13  |
    | bundle B[idx] (one gather), 3 BLAS calls       | 0.24  | 0.12  | 0.14  | 0.14  | 0.14  |
    | bundle, np.take blocks of 32 into buffer + BLAS| 0.17  | 0.18  | 0.20  | 0.20  | 0.19  |
    | bundle, np.take blocks of 8                    | 0.15  | 0.16  | 0.16  | 0.17  | 0.16  |
    | numba fused, 1 thread                          | 0.6-0.8 (14-18 GB/s: one core's limit)        |
    | numba fused, prange (OpenMP layer), 2 threads  | 24-34 GB/s alone, but ~12 ms of busy-wait CPU |
    |                                                | after every call                              |
    | numba fused, own 2 threads (this module)       | 24-32 GB/s alone, 0.1 ms CPU after a call     |

The figures of the final kernel against dense, with the exact command, are in
``benchmarks/cold_ffn.py``'s output (see its docstring). If numba is not installed the blocked
NumPy path (``backend="numpy"``) is used; it is correct but ~5x slower.
"""
from __future__ import annotations

import os
import threading
from typing import Optional, Sequence

import numpy as np

KINDS = ("swiglu", "relu", "drelu", "relu_fc")  # index = kernel code in _numba

# the sparse call is split over threads only when each gets at least this many bytes of rows
MIN_BYTES_PER_THREAD = 512 * 1024

__all__ = ["KINDS", "ColdFFN", "reference_forward", "numba_available"]


def numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _default_threads() -> int:
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        ncpu = os.cpu_count() or 1
    return max(1, min(ncpu, 8))


# ---------------------------------------------------------------------------------------------
# reference: plain dense NumPy on the gathered rows (float64), obviously right


def reference_forward(x, idx, gate, up, down, act: str = "swiglu", bias=None) -> np.ndarray:
    """``sum_{i in idx} down[:, i] * act_i(x)`` in float64, returned as float32.

    Same argument conventions as :class:`ColdFFN` (HF shapes; ``up=None`` and ``bias=b1`` for
    relu_fc). Only for tests and checks: it copies every gathered row.
    """
    if act not in KINDS:
        raise ValueError(f"unknown activation {act!r}; expected one of {KINDS}")
    x = np.asarray(x, dtype=np.float64)
    idx = np.asarray(idx, dtype=np.intp).reshape(-1)
    g = x @ np.asarray(gate, np.float64)[idx].T  # [..., k]
    if act == "relu_fc":
        h = np.maximum(g + np.asarray(bias, np.float64)[idx], 0.0)
    else:
        u = x @ np.asarray(up, np.float64)[idx].T
        if act == "swiglu":
            h = g / (1.0 + np.exp(-g)) * u
        elif act == "relu":
            h = np.maximum(g, 0.0) * u
        else:
            h = np.maximum(g, 0.0) * np.maximum(u, 0.0)
    return (h @ np.asarray(down, np.float64)[:, idx].T).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# fork-join over blocking helper threads


class _Helper:
    """One daemon thread that runs one job at a time; handoff through two plain locks."""

    def __init__(self, name: str):
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._job = None
        self._ret = None
        self._err: Optional[BaseException] = None
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _loop(self):
        while True:
            self._go.acquire()
            fn, args = self._job
            self._job = None
            try:
                self._ret = fn(*args)
            except BaseException as e:  # handed to the caller in join()
                self._err = e
            self._done.release()

    def start(self, fn, args):
        self._job = (fn, args)
        self._go.release()

    def join(self):
        # Never leave a running job behind (its output buffer belongs to the caller, and the
        # next start() would pair with this job's done signal). A KeyboardInterrupt arriving
        # here is held until the helper finishes (one chunk: milliseconds), then re-raised.
        interrupt = None
        while True:
            try:
                self._done.acquire()
                break
            except BaseException as e:
                interrupt = e
        err, self._err = self._err, None
        ret, self._ret = self._ret, None
        if interrupt is not None:
            raise interrupt
        if err is not None:
            raise err
        return ret


class _Team:
    """Runs ``fn(*args_list[0])`` inline and ``fn(*args_list[j])`` on helper j-1, waits for all,
    returns the list of results (re-raises the first exception)."""

    def __init__(self, threads: int):
        self.threads = threads
        self._lock = threading.Lock()
        self._helpers = [_Helper(f"offload-cold-{j}") for j in range(1, threads)]

    def run(self, fn, args_list: Sequence[tuple]):
        if len(args_list) > self.threads:
            raise ValueError("more chunks than threads")
        with self._lock:
            used = self._helpers[: len(args_list) - 1]
            for h, args in zip(used, args_list[1:]):
                h.start(fn, args)
            try:
                first = fn(*args_list[0])
            finally:
                rets, err = [], None
                for h in used:  # join every helper, even after an error
                    try:
                        rets.append(h.join())
                    except BaseException as e:
                        err = err or e
            if err is not None:
                raise err
            return [first] + rets


_teams: dict[int, _Team] = {}
_teams_lock = threading.Lock()


def _team(threads: int) -> _Team:
    with _teams_lock:
        t = _teams.get(threads)
        if t is None:
            t = _teams[threads] = _Team(threads)
        return t


# ---------------------------------------------------------------------------------------------


class ColdFFN:
    """Cold neurons of one FFN layer, computed on the CPU.

    Args:
        gate: [n, d] gate_proj rows (fc1 rows for ``relu_fc``).
        up: [n, d] up_proj rows, or ``None`` for ``relu_fc``.
        down: [d, n] down_proj columns (fc2 columns for ``relu_fc``).
        act: one of :data:`KINDS`.
        bias: [n] fc1 bias, required for ``relu_fc`` and refused otherwise.
        threads: threads per call (the caller's plus helpers); default min(CPUs, 8).
        backend: ``"numba"`` (fused kernel), ``"numpy"`` (blocked gather + BLAS, slow), or
            ``"auto"`` (numba when installed).

    The weights are copied once into the bundled fp32 layout ``W[n, m, d]``; the arguments can be
    freed afterwards. Indices given to :meth:`forward` are local (0..n-1).
    """

    def __init__(self, gate, up, down, *, act: str = "swiglu", bias=None,
                 threads: Optional[int] = None, backend: str = "auto"):
        if act not in KINDS:
            raise ValueError(f"unknown activation {act!r}; expected one of {KINDS}")
        gate = np.asarray(gate)
        down = np.asarray(down)
        if gate.ndim != 2:
            raise ValueError(f"gate must be [n, d], got shape {gate.shape}")
        n, d = gate.shape
        if down.shape != (d, n):
            raise ValueError(f"down must be [d, n] = {(d, n)}, got {down.shape}")
        if act == "relu_fc":
            if up is not None:
                raise ValueError("relu_fc takes fc1 as gate, fc2 as down and up=None")
            if bias is None:
                raise ValueError("relu_fc needs bias (the fc1 bias b1, shape [n])")
            bias = np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
            if bias.shape != (n,):
                raise ValueError(f"bias must be [n] = ({n},), got {bias.shape}")
            m = 2
        else:
            if up is None:
                raise ValueError(f"{act} needs up")
            up = np.asarray(up)
            if up.shape != (n, d):
                raise ValueError(f"up must be [n, d] = {(n, d)}, got {up.shape}")
            if bias is not None:
                raise ValueError(f"bias is only for relu_fc, not {act}")
            m = 3
        if backend == "auto":
            backend = "numba" if numba_available() else "numpy"
        if backend not in ("numba", "numpy"):
            raise ValueError(f"backend must be 'auto', 'numba' or 'numpy', got {backend!r}")
        if backend == "numba":
            from . import _numba  # import (and load the cached kernel) only when used

            self._kernel = _numba.cold_chunk
        self.backend = backend
        self.act = act
        self._code = KINDS.index(act)
        self.n, self.d, self.m = n, d, m
        self.threads = int(threads) if threads else _default_threads()
        if self.threads < 1:
            raise ValueError("threads must be >= 1")

        W = np.empty((n, m, d), dtype=np.float32)
        W[:, 0] = gate
        if m == 3:
            W[:, 1] = up
        W[:, m - 1] = down.T
        self.W = W
        self.bias = bias if bias is not None else np.zeros(0, np.float32)

    # views in HF shapes (no copies)
    @property
    def gate(self) -> np.ndarray:
        return self.W[:, 0]

    @property
    def up(self) -> Optional[np.ndarray]:
        return self.W[:, 1] if self.m == 3 else None

    @property
    def down(self) -> np.ndarray:
        return self.W[:, self.m - 1].T

    @property
    def bytes_per_neuron(self) -> int:
        return self.m * self.d * 4

    @property
    def nbytes(self) -> int:
        return self.W.nbytes + self.bias.nbytes

    def __repr__(self):
        return (f"ColdFFN(act={self.act!r}, n={self.n}, d={self.d}, threads={self.threads}, "
                f"backend={self.backend!r}, {self.nbytes / 2**20:.1f} MiB)")

    # -----------------------------------------------------------------------------------------

    def _x2d(self, x) -> tuple[np.ndarray, bool]:
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.flags.c_contiguous):
            x = np.ascontiguousarray(x, dtype=np.float32)
        vec = x.ndim == 1
        if vec:
            x = x.reshape(1, -1)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"x must be [{self.d}] or [b, {self.d}], got {x.shape}")
        return x, vec

    def forward(self, x, idx) -> np.ndarray:
        """Sparse forward: ``sum_{i in idx} down[:, i] * act_i(x)``.

        x: float [d] or [b, d] (b small, 1..8 is what it is tuned for; for b > 1, ``idx`` is the
        union over the batch and every token computes all of it). idx: ints in [0, n), any order
        (sorted is best for memory locality), may be empty; an index out of range raises
        IndexError. Returns float32 [d] / [b, d].
        """
        x2, vec = self._x2d(x)
        if not (isinstance(idx, np.ndarray) and idx.dtype == np.int64 and idx.ndim == 1
                and idx.flags.c_contiguous):
            idx = np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)
        if idx.shape[0] == 0:
            out = np.zeros((x2.shape[0], self.d), np.float32)
        elif self.backend == "numba":
            out = self._forward_numba(x2, idx)
        else:
            if idx.view(np.uint64).max() >= self.n:  # negatives wrap to huge unsigned values
                raise IndexError(f"neuron index out of range [0, {self.n})")
            out = self._forward_numpy(x2, idx)
        return out[0] if vec else out

    __call__ = forward

    def _forward_numba(self, x2, idx):
        k = idx.shape[0]
        b, d = x2.shape
        # split only when each thread gets enough bytes to pay for the fork-join (~20-50 µs)
        nt = max(1, min(self.threads, k * self.bytes_per_neuron // MIN_BYTES_PER_THREAD))
        parts = np.zeros((nt, b, d), np.float32)
        scratch = np.empty((nt, b), np.float32)
        kern, W, bias, code = self._kernel, self.W, self.bias, self._code
        if nt == 1:
            bad = kern(W, x2, idx, 0, k, code, bias, parts[0], scratch[0])
        else:
            bounds = [k * j // nt for j in range(nt + 1)]
            bad = sum(_team(nt).run(kern, [
                (W, x2, idx, bounds[j], bounds[j + 1], code, bias, parts[j], scratch[j])
                for j in range(nt)]))
        if bad:
            raise IndexError(f"{bad} neuron indices out of range [0, {self.n})")
        out = parts[0]
        for j in range(1, nt):
            out += parts[j]
        return out

    def _forward_numpy(self, x2, idx, block: int = 32):
        # blocked gather into a small buffer + BLAS per block (the fallback; see module table)
        b, d = x2.shape
        m = self.m
        out = np.zeros((b, d), np.float32)
        buf = np.empty((min(block, idx.shape[0]), m, d), np.float32)
        xt = x2.T
        for s in range(0, idx.shape[0], block):
            bi = idx[s:s + block]
            blk = buf[: bi.shape[0]]
            np.take(self.W, bi, axis=0, out=blk)
            h = self._act(blk[:, 0] @ xt, (blk[:, 1] @ xt) if m == 3 else None,
                          self.bias[bi] if m == 2 else None)  # [kb, b]
            out += h.T @ blk[:, m - 1]
        return out

    def _act(self, g, u, bias):
        if self.act == "swiglu":
            with np.errstate(over="ignore"):
                return g / (1.0 + np.exp(-g)) * u
        if self.act == "relu":
            return np.maximum(g, 0.0) * u
        if self.act == "drelu":
            return np.maximum(g, 0.0) * np.maximum(u, 0.0)
        return np.maximum(g + bias[:, None], 0.0)  # g [k, b], bias [k]

    def forward_dense(self, x) -> np.ndarray:
        """All neurons, BLAS (prefill): x [t, d] or [d] -> float32 [t, d] / [d]."""
        x = np.asarray(x)
        vec = x.ndim == 1
        x2 = np.ascontiguousarray(x.reshape(1, -1) if vec else x, dtype=np.float32)
        if x2.ndim != 2 or x2.shape[1] != self.d:
            raise ValueError(f"x must be [{self.d}] or [t, {self.d}], got {x.shape}")
        m = self.m
        g = x2 @ self.W[:, 0].T  # [t, n]
        if m == 3:
            h = self._act(g, x2 @ self.W[:, 1].T, None)
        else:
            h = np.maximum(g + self.bias, 0.0)
        out = h @ self.W[:, m - 1]  # [t, d]
        return out[0] if vec else out
