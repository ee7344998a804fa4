"""The hybrid FFN: hot neurons on the device (Triton kernels), cold neurons in CPU RAM (NumPy/numba).

``apply_placement(model, placement_hot, selectors, device=...)`` is a transform: it replaces each
``layers[i].mlp`` with a :class:`HybridFFN` built from the dense FFN's weights and moves the rest of
the model (embeddings, attention, norms, head) to ``device``. Nothing is monkeypatched; the dense
module's weights are copied into the two sides and then released.

Per decode step (≤ 8 tokens) and layer::

    idx = select(x)                         predicted-active neurons (global ids, union over the batch)
    cold part → worker thread: ColdFFN.forward(x, cold_local(idx))      CPU, overlapped
    hot part  → ffn_hot_forward(x, hot_local(idx))                       device, meanwhile
    y = hot + cold (+ down bias once)

Prompts (x [b, t > 1, d]) and batches over 8 tokens take the dense paths on both sides (all neurons).

CPU only (device='cpu'): with no hot neuron there is nothing to overlap, so the cold part runs on the
caller; with fp16 weights (offload.half) every CPU kernel shares numba's pool
(:func:`uses_spinning_pool`), and one token with an int4 shadow selector takes one numba call for
scores, top-k and the cold kernel (offload.cold.fused).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from offload.cold.ffn import BLOCK_BYTES, ColdFFN
from offload.cold.worker import ColdWorker
from offload.errors import UnsupportedModelError
from offload.kernels.sparse_down import ffn_hot_forward
from offload.models.common import RMSNorm
from offload.sparse import activation, ffn_weights

DECODE_MAX_TOKENS = 8  # the hot kernels' batch limit; larger batches take the dense paths

_NO_NORM = np.zeros(0, np.float32)
Selector = Callable[[torch.Tensor], torch.Tensor]  # x [b, d] → sorted global neuron ids (int64)


@dataclass
class HybridStats:
    """Counters over decode steps since the last reset (all layers summed)."""

    decode_calls: int = 0  # layer calls on the sparse path
    active_hot: int = 0  # predicted-active neurons computed on the device
    active_cold: int = 0  # … and on the CPU
    bytes_hot: int = 0  # weight bytes those neurons read, device side
    bytes_cold: int = 0  # … CPU side
    cold_wait_seconds: float = 0.0  # time the caller waited for the CPU part (decode calls)
    cold_seconds: float = 0.0  # time of the cold part's decode calls (on the worker or the caller)
    prefill_calls: int = 0

    @property
    def gpu_share(self) -> float:
        total = self.active_hot + self.active_cold
        return self.active_hot / total if total else 0.0

    def reset(self) -> None:
        for name, value in HybridStats().__dict__.items():
            setattr(self, name, value)


@dataclass
class _Done:
    """A finished result with the worker future's interface."""

    value: object

    def result(self):
        return self.value


@dataclass
class _Timed:
    fn: Callable
    stats: HybridStats = field(repr=False)

    def __call__(self, *args):
        t0 = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.stats.cold_seconds += time.perf_counter() - t0


def _ffn_sides(mlp: nn.Module):
    """(kind, w1 [n,d], w2 [n,d] | None, b1 [n] | None, down [d,n], down bias [d] | None) in the hot
    kernels' terms: w1 is the gate (fc1 for OPT, with its bias b1), w2 the up projection."""
    w = ffn_weights(mlp)
    if w.kind == "relu_fc":  # OPT
        return w.kind, w.up, None, w.up_bias, w.down, w.down_bias
    if w.gate_bias is not None:
        raise UnsupportedModelError("hybrid FFN with mlp_bias=true (gate/up biases) is not supported yet")
    return w.kind, w.gate, w.up, None, w.down, w.down_bias


class HybridFFN(nn.Module):
    """One FFN layer split into hot rows on ``device`` and cold rows on the CPU.

    hot_ids: global ids of the hot neurons (the rest are cold). select: the layer's predictor, or None
    to compute every neuron (then the result equals the dense FFN). Shapes: x [b, t, d] → [b, t, d].
    """

    def __init__(self, mlp: nn.Module, hot_ids: Sequence[int] | np.ndarray, select: Selector | None, *,
                 device: torch.device | str, hot_dtype: torch.dtype, worker: ColdWorker, stats: HybridStats,
                 backend: str = "auto", cold_threads: int | None = None, cold_pool: str = "team"):
        super().__init__()
        kind, w1, w2, b1, down, out_bias = _ffn_sides(mlp)
        n, d = w1.shape
        hot = np.unique(np.asarray(hot_ids, dtype=np.int64))
        if hot.size and (hot[0] < 0 or hot[-1] >= n):
            raise ValueError(f"hot neuron ids must lie in [0, {n}), got {hot[0]}..{hot[-1]}")
        cold = np.setdiff1d(np.arange(n), hot)
        self.kind, self.n, self.d = kind, n, d
        self.device, self.backend = torch.device(device), backend
        self.select, self.worker, self.stats = select, worker, stats
        # Position of each global neuron on its side (-1: on the other side).
        self.hot_pos = np.full(n, -1, dtype=np.int64)
        self.hot_pos[hot] = np.arange(hot.size)
        self.cold_pos = np.full(n, -1, dtype=np.int64)
        self.cold_pos[cold] = np.arange(cold.size)
        self.n_hot, self.n_cold = int(hot.size), int(cold.size)

        hot_t = torch.from_numpy(hot)
        to_dev = dict(device=self.device, dtype=hot_dtype)
        self.w1 = w1[hot_t].to(**to_dev).contiguous()  # [h, d]
        self.w2 = w2[hot_t].to(**to_dev).contiguous() if w2 is not None else None
        self.b1 = b1[hot_t].to(**to_dev).contiguous() if b1 is not None else None
        self.w3t = down[:, hot_t].T.to(**to_dev).contiguous()  # [h, d]: down columns as rows
        self.out_bias = out_bias.to(device=self.device, dtype=torch.float32) if out_bias is not None else None
        self.hot_bytes_per_neuron = (3 if w2 is not None else 2) * d * self.w1.element_size() + \
            (self.b1.element_size() if b1 is not None else 0)

        # Cold rows keep 16-bit storage when the dense weights have it (offload.half; half the
        # bytes per neuron, fp32 accumulation in the kernel), else fp32. The fc1 bias stays fp32.
        cold_t = torch.from_numpy(cold)
        cold_dtype = torch.float16 if w1.dtype in (torch.float16, torch.bfloat16) else torch.float32
        host = lambda t, dt=cold_dtype: t.detach().to("cpu", dt).numpy()  # noqa: E731
        self.cold = ColdFFN(host(w1[cold_t]), None if w2 is None else host(w2[cold_t]), host(down[:, cold_t]),
                            act=kind, bias=None if b1 is None else host(b1[cold_t], torch.float32),
                            threads=cold_threads, dtype=host(w1[:0]).dtype, pool=cold_pool) if cold.size else None
        self.cold_bytes_per_neuron = (3 if w2 is not None else 2) * d * cold_dtype.itemsize + \
            (4 if b1 is not None else 0)
        self._fused = self._fused_decode_args()
        if self._fused is not None:  # compile or load the kernel now, not during the first decode step
            _fused_kernel()(np.zeros((1, d), np.float32), _NO_NORM, 0.0, *self._fused)

    def _fused_decode_args(self):
        """Arguments of offload.cold.fused.shadow_topk_cold when this layer can use it (every neuron
        cold, CPU only, an int4 shadow selector, the cold kernel on numba's pool), else None."""
        from offload.lowbit import Int4Shadow

        shadow, k, cold = getattr(self.select, "shadow", None), getattr(self.select, "k", 0), self.cold
        if (self.n_hot or cold is None or self.device.type != "cpu" or cold.pool != "numba"
                or cold.backend != "numba" or not isinstance(shadow, Int4Shadow) or shadow.pool != "numba"
                or not 0 < k < self.n):
            return None
        block = max(1, BLOCK_BYTES // cold.bytes_per_neuron)
        parts = np.zeros((cold.threads, 1, self.d), np.float32)  # per-thread outputs, zeroed by the kernel
        scratch = np.empty((cold.threads, 5, 1), np.float32)
        return (shadow.W, shadow.B, shadow.code, shadow.n, k, cold._Wk, block, cold._code, cold.bias, parts, scratch)

    def decode_block(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor | None:
        """x + self(norm(x)) for one fp32 CPU token in one numba call (RMSNorm, scores, top-k, cold
        kernel, residual), when this layer takes the all-cold path; else None (the caller goes the
        usual way). Called by models.llama.Block."""
        if self._fused is None or not isinstance(norm, RMSNorm) or norm.weight.dtype != torch.float32:
            return None
        return self._decode_fused(x, norm.weight.detach().numpy(), norm.eps)

    def _decode_fused(self, x: torch.Tensor, norm_w: np.ndarray = _NO_NORM, eps: float = 0.0) -> torch.Tensor:
        """One fp32 CPU token, every neuron cold: scores, top-k and the cold kernel in one numba call
        (with ``norm_w``: the norm before and the residual after too)."""
        t0 = time.perf_counter()
        out, count, bad = _fused_kernel()(x.detach().numpy().reshape(1, self.d), norm_w, eps, *self._fused)
        st = self.stats
        st.cold_seconds += time.perf_counter() - t0
        if bad:
            raise IndexError(f"{bad} neuron indices out of range [0, {self.n_cold})")
        st.decode_calls += 1
        st.active_cold += count
        st.bytes_cold += count * self.cold_bytes_per_neuron
        y = torch.from_numpy(out).view(x.shape)
        return y if self.out_bias is None else y + self.out_bias

    # -- the two sides -------------------------------------------------------------------------------
    def _hot(self, x2: torch.Tensor, hot_local: torch.Tensor) -> torch.Tensor:
        """The selected hot rows (hot_local: int32 [k ≥ 1] on the device) → [t, d] fp32."""
        return ffn_hot_forward(x2.to(self.w1.dtype), hot_local.to(torch.int32), w1=self.w1, w3t=self.w3t,
                               w2=self.w2, b1=self.b1, activation=self.kind, backend=self.backend)

    def _hot_dense(self, x2: torch.Tensor) -> torch.Tensor:
        """Every hot row (n_hot ≥ 1) → [t, d] fp32."""
        xh = x2.to(self.w1.dtype)
        g = torch.nn.functional.linear(xh, self.w1, self.b1).float()
        u = torch.nn.functional.linear(xh, self.w2).float() if self.w2 is not None else None
        return self._act(g, u) @ self.w3t.float()

    def _act(self, g: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """offload.sparse.activation in the hot kernels' terms (for OPT, g is fc1's output and u None)."""
        return activation(self.kind, None, g) if u is None else activation(self.kind, g, u)

    def _cold_dense_torch(self, x: torch.Tensor) -> torch.Tensor:
        """Every cold neuron with torch matmuls over the bundled rows (views, no copy): x [t, d] fp32."""
        W = torch.from_numpy(self.cold.W).float()  # [n_cold, m, d] (a copy only for fp16 storage)
        if self.kind == "relu_fc":
            h = self._act(x @ W[:, 0].T + torch.from_numpy(self.cold.bias), None)
        else:
            h = self._act(x @ W[:, 0].T, x @ W[:, 1].T)
        return h @ W[:, -1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None and x.numel() == self.d and x.dtype == torch.float32 and x.device.type == "cpu":
            return self._decode_fused(x)  # the common CPU-only decode step, with the least Python
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        x_cpu = x2.detach() if x2.device.type == "cpu" and x2.dtype == torch.float32 else x2.detach().to("cpu", torch.float32)
        x_np = x_cpu.numpy()
        prefill = (x.dim() == 3 and shape[1] > 1) or x2.shape[0] > DECODE_MAX_TOKENS  # a prompt: x [b, t>1, d]
        if prefill or self.select is None:
            self.stats.prefill_calls += prefill
            if self.cold is not None and self.device.type == "cpu":
                # Nothing to overlap with, and torch's thread pool is already running the prompt's
                # other matmuls: computing here avoids a second (OpenBLAS) pool spinning against it.
                fut = _Done(self._cold_dense_torch(x_cpu))
            else:
                fut = self.worker.submit(self.cold.forward_dense, x_np) if self.cold else None  # not in stats
            y = self._hot_dense(x2) if self.n_hot else None
        else:
            ids = getattr(self.select, "ids", None)  # a NumPy entry point saves torch round trips
            active = ids(x_np) if ids is not None else self.select(x2).cpu().numpy()  # sorted global ids
            if self.n_hot == 0:  # every neuron is cold: local ids are the global ones
                hot_local, cold_local = active[:0], active
            else:
                hot_local = self.hot_pos[active]
                hot_local = hot_local[hot_local >= 0]
                cold_local = self.cold_pos[active]
                cold_local = cold_local[cold_local >= 0]
            st = self.stats
            st.decode_calls += 1
            st.active_hot += hot_local.size
            st.active_cold += cold_local.size
            st.bytes_hot += hot_local.size * self.hot_bytes_per_neuron
            st.bytes_cold += cold_local.size * self.cold_bytes_per_neuron
            fut = y = None
            if hot_local.size == 0 and cold_local.size and self.device.type == "cpu":
                # Nothing to overlap with: run the cold part here, no thread hand-off.
                t0 = time.perf_counter()
                y = torch.from_numpy(self.cold.forward(x_np, cold_local))
                st.cold_seconds += time.perf_counter() - t0
            elif cold_local.size:
                fut = self.worker.submit(_Timed(self.cold.forward, self.stats), x_np, cold_local)
            if hot_local.size:
                y = self._hot(x2, torch.from_numpy(hot_local.astype(np.int32)).to(self.device))
        if fut is not None:
            t0 = time.perf_counter()
            cold_y = torch.from_numpy(np.asarray(fut.result(), dtype=np.float32).reshape(x2.shape))
            if not prefill:
                self.stats.cold_wait_seconds += time.perf_counter() - t0
            cold_y = cold_y.to(self.device) if self.device.type != "cpu" else cold_y
            y = cold_y if y is None else y + cold_y
        if y is None:
            y = torch.zeros(x2.shape, dtype=torch.float32, device=self.device)
        if self.out_bias is not None:
            y = y + self.out_bias
        return y.to(x.dtype).reshape(shape)


_fused_module: list = []


def _fused_kernel():
    """offload.cold.fused.shadow_topk_cold; the module is imported on first use (it compiles numba code)."""
    if not _fused_module:
        from offload.cold import fused

        _fused_module.append(fused)
    return _fused_module[0].shadow_topk_cold


def uses_spinning_pool(model: nn.Module, device: torch.device | str) -> bool:
    """Whether the CPU kernels of a hybrid ``model`` on ``device`` should run on numba's pool.

    True when everything runs on the CPU with fp16 weights (offload.half): the attention GEMVs then
    run on numba's pool, and the cold kernel and the predictor join it (its workers spin between
    calls, which costs nothing when no other thread needs the cores, and one pool cannot spin
    against another). Otherwise (a GPU to drive, or fp32 attention on OpenBLAS's own spinning pool)
    the kernels use helper threads that sleep."""
    return torch.device(device).type == "cpu" and ffn_weights(model.layers[0].mlp).down.dtype == torch.float16


def apply_placement(model: nn.Module, hot_ids: Sequence[np.ndarray], selectors: Sequence[Selector | None] | None,
                    *, device: torch.device | str = "cpu", hot_dtype: torch.dtype | None = None,
                    backend: str = "auto", cold_threads: int | None = None,
                    worker: ColdWorker | None = None) -> HybridStats:
    """Replace every ``layers[i].mlp`` of ``model`` with a HybridFFN (in place) and move the rest of
    the model to ``device``. hot_ids[i]: layer i's hot neuron ids; selectors[i]: its predictor (None:
    all neurons). Returns the stats object the layers update."""
    layers = model.layers
    if len(hot_ids) != len(layers):
        raise ValueError(f"placement has {len(hot_ids)} layers, the model {len(layers)}")
    selectors = list(selectors) if selectors is not None else [None] * len(layers)
    device = torch.device(device)
    hot_dtype = hot_dtype or model.dtype
    cold_pool = "numba" if uses_spinning_pool(model, device) else "team"
    if cold_threads is None and device.type == "cpu" and cold_pool == "team":
        # All on the CPU in fp32, the cold kernel runs on the caller's thread (nothing to overlap with),
        # and a second kernel thread would compete with OpenBLAS's spinning workers from the attention
        # GEMVs: SmolLM2 all-cold decode measured 25.9 tok/s with 1 thread against 23.1 with 2.
        cold_threads = 1
    worker = worker or ColdWorker()
    stats = HybridStats()
    for i, layer in enumerate(layers):
        dense = layer.mlp
        layer.mlp = HybridFFN(dense, hot_ids[i], selectors[i], device=device, hot_dtype=hot_dtype,
                              worker=worker, stats=stats, backend=backend, cold_threads=cold_threads,
                              cold_pool=cold_pool)
        del dense  # its weights now live on the two sides
    if device.type == "cpu":
        model.to(device)  # embeddings, attention, norms, head (HybridFFN keeps plain tensors, not parameters)
    else:
        # On an accelerator the non-FFN part takes the hot side's dtype, as the placement's memory plan
        # counts it (an fp32 attention and head under an fp16 plan would take twice the bytes budgeted).
        model.to(device=device, dtype=hot_dtype)
        model.dtype = hot_dtype  # activations and the KV cache follow
    model.hybrid_worker = worker
    return stats
