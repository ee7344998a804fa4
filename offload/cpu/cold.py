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

Sparse kernel: a fused gather-dot in numba (:mod:`offload.cpu.cold_kernels`, ``nogil``): per active
neuron, gate and up dot products for all tokens in one pass over the two rows, the activation,
then the down column added into a per-thread partial output (four live neurons at a time). Calls
of at least ``2 * MIN_BYTES_PER_THREAD`` bytes run on the calling thread plus ``threads - 1``
helper threads that sleep on a lock between calls (nothing spins: the GPU-driving thread keeps
its core). Threads claim blocks of ``BLOCK_BYTES`` from an atomic counter, so a helper that is
slow to wake (a busy machine) just does less, and the caller never waits for one that has not
started. Consequence: split calls are not bitwise reproducible (the summation order depends on
which thread took which block); they agree to ~1e-6 relative.

What was tried (fp32, d=4096, n=11008, SwiGLU, batch 1, 2 threads; ratio = effective bandwidth of
the sparse call / bandwidth of dense ``down @ (silu(gate @ x) * (up @ x))`` in the same run, which
took 19-22 ms = 25-28 GB/s on a quiet moment of this 2-vCPU EPYC VM):

    | method                                          |  5 %  | 10 %  | 20 %  | 30 %  | 50 %  |
    |-------------------------------------------------|-------|-------|-------|-------|-------|
    | naive G[idx]@x, U[idx]@x, D[:, idx]@h (HF)      | 0.04  | 0.04  | 0.05  | 0.04  | 0.04  |
    | same with down stored transposed, DT[idx]       | 0.31  | 0.24  | 0.24  | 0.13  | 0.13  |
    | bundle B[idx] (one gather), then 3 BLAS calls   | 0.24  | 0.12  | 0.14  | 0.14  | 0.14  |
    | bundle, np.take 32 rows into a buffer + BLAS    | 0.17  | 0.18  | 0.20  | 0.20  | 0.19  |
    | bundle, np.take 8 rows into a buffer + BLAS     | 0.15  | 0.16  | 0.16  | 0.17  | 0.16  |

    numba fused gather-dot on the bundle, alone (no BLAS call in between):
    | 1 thread                          | 14-19 GB/s; OpenBLAS gemv on 1 thread: 15-17 GB/s     |
    | prange, OpenMP layer, 2 threads   | 26-33 GB/s, but each call leaves ~12 ms of busy-wait  |
    |                                   | CPU behind (libgomp spin): rejected                   |
    | own 2 threads (this module)       | 24-30 GB/s, 0.1 ms of CPU after a call                |

So pure NumPy stays below 0.31 (every variant copies the rows before BLAS reads them again),
and the compiled single pass reaches dense bandwidth. Final kernel against dense in one run,
``python benchmarks/cold_ffn.py`` on a quiet moment (dense 14.9 ms = 36.5 GB/s):

    | density          |  5 %  | 10 %  | 20 %  | 30 %  | 50 %  |
    | sparse ms        | 0.89  | 1.61  | 3.15  | 4.48  | 7.44  |
    | ratio            | 0.84  | 0.92  | 0.94  | 0.97  | 1.00  |
    | naive gather     | 0.25  | 0.26  | 0.15  | 0.14  | 0.16  |

Three interactions seen on 2 cores: OpenBLAS's idle workers busy-wait ~65 ms after each BLAS call
(a sparse call right after a large matvec gets one core: ratio 0.58-0.80 with ``--settle 0``),
numba's OpenMP pool does the same for ~12 ms (hence no ``prange``), and the scheduler's wake-up
placement of the helper thread (see offload.cpu.team.Team: without the fix, small calls after an idle
gap ran at 20-22 GB/s instead of 27-30).

Batch: b = 8 at 10 % density on one thread took 15.6 ms with a dot product per token; running
four tokens per pass and gate/up fused (loads per FMA 1.5 -> 0.75) brought it to 6.9 ms (b = 1:
2.9 ms).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from offload.cpu import cold_kernels
from offload.cpu.pool import default_threads
from offload.cpu.team import team
from offload.formats.arena import weight_array
from offload.models.ffn_kind import FFNKind

# the sparse call is split over threads only when each gets at least this many bytes of rows
MIN_BYTES_PER_THREAD = 512 * 1024
# … with pool="numba" (workers spinning, hand-offs of microseconds)
MIN_BYTES_PER_THREAD_SPINNING = 64 * 1024
# split calls hand out work in blocks of about this many bytes of rows
BLOCK_BYTES = 192 * 1024


class ColdFFN:
    """Cold neurons of one FFN layer, computed on the CPU.

    Args:
        gate: [n, d] gate_proj rows (fc1 rows for ``relu_fc``).
        up: [n, d] up_proj rows, or ``None`` for ``relu_fc``.
        down: [d, n] down_proj columns (fc2 columns for ``relu_fc``).
        act: an FFNKind (or its name).
        bias: [n] fc1 bias, required for ``relu_fc`` and refused otherwise.
        threads: threads per call (the caller's plus helpers); default min(CPUs, 8).
        pool: ``"team"``: the caller plus helper threads that sleep between calls (nothing spins;
            for hybrid runs, where the caller drives the GPU meanwhile), or ``"numba"``: numba's
            parallel pool (OpenMP workers spin for a while after a call, so hand-offs cost
            microseconds; for CPU-only decode, where nothing else wants the cores).
        dtype: storage of the bundled weights, ``np.float32`` or ``np.float16`` (half the bytes
            per active neuron; the kernel widens to fp32 in registers and accumulates in fp32).

    The weights are copied once into the bundled layout ``W[n, m, d]`` (``dtype``); the arguments
    can be freed afterwards. Indices given to :meth:`forward` are local (0..n-1).
    """

    def __init__(self, gate, up, down, *, act: str = "swiglu", bias=None,
                 threads: Optional[int] = None, dtype=np.float32, pool: str = "team"):
        act = FFNKind.of(act)
        gate = np.asarray(gate)
        down = np.asarray(down)
        if gate.ndim != 2:
            raise ValueError(f"gate must be [n, d], got shape {gate.shape}")
        n, d = gate.shape
        if down.shape != (d, n):
            raise ValueError(f"down must be [d, n] = {(d, n)}, got {down.shape}")
        if not act.gated:
            if up is not None:
                raise ValueError("relu_fc takes fc1 as gate, fc2 as down and up=None")
            m = 2
        else:
            if up is None:
                raise ValueError(f"{act} needs up")
            up = np.asarray(up)
            if up.shape != (n, d):
                raise ValueError(f"up must be [n, d] = {(n, d)}, got {up.shape}")
            m = 3
        if np.dtype(dtype) not in (np.float32, np.float16):
            raise ValueError(f"dtype must be float32 or float16, got {np.dtype(dtype)}")
        W = weight_array((n, m, d), dtype)  # huge pages: the kernels stream it faster
        W[:, 0] = gate
        if m == 3:
            W[:, 1] = up
        W[:, m - 1] = down.T
        self._setup(W, act, bias, threads, pool)

    def _setup(self, W, act: FFNKind, bias, threads, pool="team"):
        n, m, d = W.shape
        if not act.gated:
            if bias is None:
                raise ValueError("relu_fc needs bias (the fc1 bias b1, shape [n])")
            bias = np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
            if bias.shape != (n,):
                raise ValueError(f"bias must be [n] = ({n},), got {bias.shape}")
        elif bias is not None:
            raise ValueError(f"bias is only for relu_fc, not {act}")
        if pool not in ("team", "numba"):
            raise ValueError(f"pool must be 'team' or 'numba', got {pool!r}")
        self.pool = pool
        if W.dtype not in (np.float32, np.float16):
            raise ValueError(f"bundled weights must be float32 or float16, got {W.dtype}")
        self.act = act.check_kernels("the cold FFN kernels (offload.cpu.cold)")
        self.code = act.code
        self.n, self.d, self.m = n, d, m
        self.threads = int(threads) if threads else default_threads()
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        self.W = W
        self.operand = W.view(np.uint16) if W.dtype == np.float16 else W  # what the kernels read
        self.bias = bias if bias is not None else np.zeros(0, np.float32)

    @classmethod
    def from_bundled(cls, W, *, act: str = "swiglu", bias=None, threads: Optional[int] = None,
                     pool: str = "team") -> "ColdFFN":
        """Wrap an already bundled ``W[n, m, d]`` (``self.W`` of another instance, or loaded
        from a file); no copy when it is float32 or float16 and C-contiguous."""
        W = np.asarray(W)
        W = np.ascontiguousarray(W, dtype=W.dtype if W.dtype in (np.float16, np.float32) else np.float32)
        act = FFNKind.of(act)
        m = 3 if act.gated else 2
        if W.ndim != 3 or W.shape[1] != m:
            raise ValueError(f"bundled weights for {act.value} must be [n, {m}, d], got {W.shape}")
        self = cls.__new__(cls)
        self._setup(W, act, bias, threads, pool)
        return self

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
        return self.m * self.d * self.W.itemsize

    @property
    def nbytes(self) -> int:
        return self.W.nbytes + self.bias.nbytes

    def __repr__(self):
        return (f"ColdFFN(act={self.act.value!r}, n={self.n}, d={self.d}, dtype={self.W.dtype}, "
                f"threads={self.threads}, pool={self.pool!r}, {self.nbytes / 2**20:.1f} MiB)")

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
        else:
            out = self._forward_numba(x2, idx)
        return out[0] if vec else out

    __call__ = forward

    def _forward_numba(self, x2, idx):
        k = idx.shape[0]
        b, d = x2.shape
        nbytes = k * self.bytes_per_neuron
        per_thread = MIN_BYTES_PER_THREAD if self.pool == "team" else MIN_BYTES_PER_THREAD_SPINNING
        nt = max(1, min(self.threads, nbytes // per_thread))
        parts = np.zeros((nt, b, d), np.float32)
        scratch = np.empty((nt, 5, b), np.float32)
        W, bias, code = self.operand, self.bias, self.code
        if nt == 1:
            bad = cold_kernels.cold_chunk(W, x2, idx, 0, k, code, bias, parts[0], scratch[0])
            if bad:
                raise IndexError(f"{bad} neuron indices out of range [0, {self.n})")
            return parts[0]
        # dynamic split: threads claim blocks of ~BLOCK_BYTES from a shared atomic counter
        block = max(1, BLOCK_BYTES // self.bytes_per_neuron)
        ctl = np.zeros(2 + nt, np.int64)
        if self.pool == "numba":
            bad = cold_kernels.cold_parallel(W, x2, idx, ctl, block, code, bias, parts, scratch)
            if bad:
                raise IndexError(f"{bad} neuron indices out of range [0, {self.n})")
            return parts.sum(0)
        rets = team(nt).run(
            cold_kernels.cold_run,
            [(W, x2, idx, ctl, j, block, code, bias, parts[j], scratch[j]) for j in range(nt)],
            idle=lambda j: ctl[2 + j] == cold_kernels.NOT_STARTED)
        bad = sum(r for r in rets if r)
        if bad:
            raise IndexError(f"{bad} neuron indices out of range [0, {self.n})")
        out = parts[0]
        for j in range(1, nt):
            if rets[j] is not None:  # helpers that never started left their part at zero
                out += parts[j]
        return out

    def _act(self, g, u, bias):
        """h from g [k, t] and u (NumPy, for forward_dense): models.ffn_kind.activation's maths."""
        if self.act is FFNKind.SWIGLU:
            with np.errstate(over="ignore"):
                return g / (1.0 + np.exp(-g)) * u
        if self.act is FFNKind.RELU:
            return np.maximum(g, 0.0) * u
        if self.act is FFNKind.DRELU:
            return np.maximum(g, 0.0) * np.maximum(u, 0.0)
        return np.maximum(g + bias, 0.0)

    def forward_dense(self, x) -> np.ndarray:
        """All neurons, BLAS (prefill): x [t, d] or [d] -> float32 [t, d] / [d]."""
        x = np.asarray(x)
        vec = x.ndim == 1
        x2 = np.ascontiguousarray(x.reshape(1, -1) if vec else x, dtype=np.float32)
        if x2.ndim != 2 or x2.shape[1] != self.d:
            raise ValueError(f"x must be [{self.d}] or [t, {self.d}], got {x.shape}")
        m = self.m
        W = self.W if self.W.dtype == np.float32 else self.W.astype(np.float32)  # a copy per prompt
        g = x2 @ W[:, 0].T  # [t, n]
        h = self._act(g, x2 @ W[:, 1].T if m == 3 else None, self.bias)
        out = h @ W[:, m - 1]  # [t, d]
        return out[0] if vec else out
