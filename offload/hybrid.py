"""The hybrid FFN: hot neurons on the device, cold neurons in CPU RAM (numba).

``apply_placement(model, placement_hot, selectors, device=...)`` is a transform: it replaces each
``layers[i].mlp`` with a :class:`HybridFFN` built from the dense FFN's weights and moves the rest of
the model (embeddings, attention, norms, head) to ``device``. Nothing is monkeypatched; the dense
module's weights are copied into the two sides and then released.

Per decode step (≤ 8 tokens) and layer on a GPU, with no host synchronization before the hot kernels::

    ids = select.device_ids(x)                          device, −1-padded (offload.select)
    hot = hot_pos[ids], cold = cold_pos[ids]             device, −1 where on the other side
    launch the hot kernels on hot                        gather_gemv + sparse_down (Triton)
    copy [x | cold] to the host (side stream)            one device → host copy
    ColdFFN.forward(x, cold ≥ 0) on the worker thread    CPU, while the device works
    y = hot + cold result (one host → device copy) + down bias

Prompts (x [b, t > 1, d]) and batches over 8 tokens take the dense paths on both sides (all neurons).

Packed hot rows (``hot_format="int4"``, offload.packed_hot): the hot side holds 4-bit rows
(offload.formats.packed_rows; ~3.5× fewer bytes a neuron than fp16, so a budget holds ~3.5× more hot
neurons), read by the packed kernels (offload.kernels.gather_gemv_q4 / sparse_down_q4) on a GPU and by
their torch references on the CPU. Lossless from a CPU model packed in a 4-bit layout (a GGUF's Q4_0,
Q4_1, Q4_K blocks, ``weights="int4"``), else quantized round to nearest from the float weights.

CPU only (device='cpu'): with no hot neuron there is nothing to overlap, so the cold part runs on the
caller, on numba's pool; one token with an int4 shadow selector takes one numba call for norm, scores,
top-k, the cold kernel and the residual (offload.cpu.cold_step). A nonzero budget on the CPU puts the
"hot" rows in CPU torch tensors (it exercises the split, it is not a fast path). Triton is imported only
when hot rows run on a GPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from offload.cpu.cold import BLOCK_BYTES, ColdFFN
from offload.cpu.pool import start_pool
from offload.cpu.worker import ColdWorker
from offload.errors import UnsupportedModelError
from offload.models.common import FFNModule, RMSNorm
from offload.models.ffn_kind import FFNKind
from offload.packed_hot import HOT_FORMATS, build_packed_hot
from offload.sparse import activation, ffn_weights

DECODE_MAX_TOKENS = 8  # the hot kernels' batch limit; larger batches take the dense paths
PACKED_CHUNK = 4096  # hot neurons dequantized at a time by the packed hot side's torch path (prompts, CPU)

_NO_NORM = np.zeros(0, np.float32)


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
    if w.kind == FFNKind.RELU_FC:  # OPT
        return FFNKind.RELU_FC, w.up, None, w.up_bias, w.down, w.down_bias
    if w.gate_bias is not None:
        raise UnsupportedModelError("hybrid FFN with mlp_bias=true (gate/up biases) is not supported yet")
    return FFNKind.of(w.kind).check_kernels("the hybrid FFN"), w.gate, w.up, None, w.down, w.down_bias


class HybridFFN(FFNModule):
    """One FFN layer split into hot rows on ``device`` and cold rows on the CPU.

    hot_ids: global ids of the hot neurons (the rest are cold). select: the layer's runtime selector
    (offload.select), or None to compute every neuron (then the result equals the dense FFN).
    hot_format: None (hot rows at ``hot_dtype``: w1, w2, w3t) or "int4" (packed: hot_rows, hot_down; the
    fc1 bias at ``hot_dtype``). Shapes: x [b, t, d] → [b, t, d].
    """

    def __init__(self, mlp: nn.Module, hot_ids: Sequence[int] | np.ndarray, select, *,
                 device: torch.device | str, hot_dtype: torch.dtype, worker: ColdWorker, stats: HybridStats,
                 cold_threads: int | None = None, cold_pool: str = "team", hot_format: str | None = None):
        super().__init__()
        kind, w1, w2, b1, down, out_bias = _ffn_sides(mlp)
        n, d = w1.shape
        hot = np.unique(np.asarray(hot_ids, dtype=np.int64))
        if hot.size and (hot[0] < 0 or hot[-1] >= n):
            raise ValueError(f"hot neuron ids must lie in [0, {n}), got {hot[0]}..{hot[-1]}")
        cold = np.setdiff1d(np.arange(n), hot)
        self.kind, self.n, self.d = kind, n, d
        self.device = torch.device(device)
        self.select, self.worker, self.stats = select, worker, stats
        # Position of each global neuron on its side (-1: on the other side).
        self.hot_pos = np.full(n, -1, dtype=np.int64)
        self.hot_pos[hot] = np.arange(hot.size)
        self.cold_pos = np.full(n, -1, dtype=np.int64)
        self.cold_pos[cold] = np.arange(cold.size)
        self.n_hot, self.n_cold = int(hot.size), int(cold.size)
        if self.device.type != "cpu":  # the same maps on the device, for selection without a host sync
            self.hot_pos_dev = torch.from_numpy(self.hot_pos).to(self.device)
            self.cold_pos_dev = torch.from_numpy(self.cold_pos).to(self.device)

        hot_t = torch.from_numpy(hot)
        to_dev = dict(device=self.device, dtype=hot_dtype)
        if hot_format not in (None, *HOT_FORMATS):
            raise ValueError(f"hot_format={hot_format!r}: expected None (float rows) or one of {HOT_FORMATS}")
        self.hot_format = hot_format
        self.b1 = b1[hot_t].to(**to_dev).contiguous() if b1 is not None else None
        bias_bytes = self.b1.element_size() if b1 is not None else 0
        self.hot_rows = self.hot_down = self.w1 = self.w2 = self.w3t = None
        if hot_format is None:
            self.w1 = w1[hot_t].to(**to_dev).contiguous()  # [h, d]
            self.w2 = w2[hot_t].to(**to_dev).contiguous() if w2 is not None else None
            self.w3t = down[:, hot_t].T.to(**to_dev).contiguous()  # [h, d]: down columns as rows
            self.hot_bytes_per_neuron = (3 if w2 is not None else 2) * d * self.w1.element_size() + bias_bytes
        else:  # packed 4-bit rows (offload.formats.packed_rows); none at all for a layer without hot neurons
            rows, down_q = build_packed_hot(mlp, hot, w1, w2, down) if hot.size else (None, None)
            self.hot_rows = None if rows is None else rows.to(self.device)
            self.hot_down = None if down_q is None else down_q.to(self.device)
            self.hot_bytes_per_neuron = 0 if rows is None else (
                (rows.nbytes + down_q.nbytes - down_q.table_nbytes) // hot.size + bias_bytes)
        self.out_bias = out_bias.to(device=self.device, dtype=torch.float32) if out_bias is not None else None

        # Cold rows keep 16-bit storage when the dense weights have it (half the bytes per neuron, fp32
        # accumulation in the kernel), else fp32. The fc1 bias stays fp32.
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
        """Arguments of offload.cpu.cold_step.shadow_topk_cold when this layer can use it (every neuron
        cold, CPU only, an int4 shadow selector, the cold kernel on numba's pool), else None."""
        from offload.cpu.shadow import Int4Shadow

        shadow, k, cold = getattr(self.select, "shadow", None), getattr(self.select, "k", 0), self.cold
        if (self.n_hot or cold is None or self.device.type != "cpu" or cold.pool != "numba"
                or not isinstance(shadow, Int4Shadow) or shadow.pool != "numba" or not 0 < k < self.n):
            return None
        block = max(1, BLOCK_BYTES // cold.bytes_per_neuron)
        parts = np.zeros((cold.threads, 1, self.d), np.float32)  # per-thread outputs, zeroed by the kernel
        scratch = np.empty((cold.threads, 5, 1), np.float32)
        return (shadow.W, shadow.B, shadow.code, shadow.n, k, cold.operand, block, cold.code, cold.bias, parts,
                scratch)

    def residual(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
        """x + self(norm(x)); for one fp32 CPU token on the all-cold path, one numba call (RMSNorm,
        scores, top-k, cold kernel, residual)."""
        if (self._fused is None or not isinstance(norm, RMSNorm) or norm.weight.dtype != torch.float32
                or x.numel() != self.d or x.dtype != torch.float32 or x.device.type != "cpu"):
            return super().residual(x, norm)
        return self._decode_fused(x, norm.weight.detach().numpy(), norm.eps)

    def _decode_fused(self, x: torch.Tensor, norm_w: np.ndarray = _NO_NORM, eps: float = 0.0) -> torch.Tensor:
        """One fp32 CPU token, every neuron cold: scores, top-k and the cold kernel in one numba call
        (with ``norm_w``: the norm before and the residual after too)."""
        t0 = time.perf_counter()
        out, count, bad = _fused_kernel()(x.detach().numpy().reshape(1, self.d), norm_w, eps, *self._fused)
        self.stats.cold_seconds += time.perf_counter() - t0
        self.record_cold_step(count, bad)
        y = torch.from_numpy(out).view(x.shape)
        return y if self.out_bias is None else y + self.out_bias

    def step_half(self, norm: nn.Module):
        """This layer's FFN half for offload.cpu.step.decode_layer (the all-cold path of
        :meth:`residual` with its norm), or None where that path does not apply."""
        if (self._fused is None or self.out_bias is not None or not isinstance(norm, RMSNorm)
                or norm.weight.dtype != torch.float32 or norm.weight.device.type != "cpu"):
            return None
        from offload.cpu.step import ColdFFNHalf

        return ColdFFNHalf(norm.weight.detach().numpy(), norm.eps, *self._fused)

    def record_cold_step(self, count: int, bad: int) -> None:
        """Count one all-cold decode call that computed ``count`` neurons (``bad`` indices out of range:
        IndexError). A block call (offload.cpu.step) leaves ``stats.cold_seconds`` as it is."""
        if bad:
            raise IndexError(f"{bad} neuron indices out of range [0, {self.n_cold})")
        st = self.stats
        st.decode_calls += 1
        st.active_cold += count
        st.bytes_cold += count * self.cold_bytes_per_neuron

    # -- the two sides -------------------------------------------------------------------------------
    def _act(self, g: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        """models.ffn_kind.activation in the hot kernels' terms (for OPT, g is fc1's output and u None)."""
        return activation(self.kind, None, g) if u is None else activation(self.kind, g, u)

    @property
    def hot_nbytes(self) -> int:
        """Bytes the hot side holds on the device (weights, fc1 bias, a packed layer's scale table)."""
        held = [self.w1, self.w2, self.w3t, self.b1]
        total = sum(t.numel() * t.element_size() for t in held if t is not None)
        return total + sum(p.nbytes for p in (self.hot_rows, self.hot_down) if p is not None)

    def _hot_rows(self, x2: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """The hot rows ``rows`` (local ids on the device; None: all) in torch → [t, d] fp32: prompts on
        any device, and decode when the "device" is the CPU."""
        if self.hot_format is not None:
            return self._hot_rows_packed(x2, rows)
        w1, w2, b1, w3t = self.w1, self.w2, self.b1, self.w3t
        if rows is not None:
            w1, w3t = w1[rows], w3t[rows]
            w2 = None if w2 is None else w2[rows]
            b1 = None if b1 is None else b1[rows]
        xh = x2.to(w1.dtype)
        g = torch.nn.functional.linear(xh, w1, b1).float()
        u = torch.nn.functional.linear(xh, w2).float() if w2 is not None else None
        return self._act(g, u) @ w3t.float()

    def _hot_rows_packed(self, x2: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """_hot_rows over packed rows: dequantize PACKED_CHUNK neurons at a time (the kernels' torch
        references, offload.formats.packed_rows), fp32 throughout."""
        from offload.formats.packed_rows import dequantize_down, dequantize_rows

        if rows is None:
            rows = torch.arange(self.n_hot, device=self.device)
        xf = x2.float()
        y = torch.zeros(x2.shape, dtype=torch.float32, device=self.device)
        for i in range(0, rows.numel(), PACKED_CHUNK):
            part = rows[i:i + PACKED_CHUNK].to(self.device, torch.int64)
            w = dequantize_rows(self.hot_rows.select(part))  # [P, c, d]
            g = xf @ w[0].T
            if self.b1 is not None:
                g = g + self.b1.index_select(0, part).float()
            h = self._act(g, xf @ w[1].T if w.shape[0] == 2 else None)
            y += h @ dequantize_down(self.hot_down.select(part))
        return y

    def _hot_kernels(self, x2: torch.Tensor, hot_local: torch.Tensor) -> torch.Tensor:
        """The hot kernels (offload.kernels, Triton) over hot_local (int32, −1-padded) → [t, d] fp32."""
        if self.hot_format is not None:
            from offload.kernels.sparse_down_q4 import ffn_hot_forward_q4

            return ffn_hot_forward_q4(x2, hot_local, rows=self.hot_rows, down=self.hot_down, b1=self.b1,
                                      activation=self.kind.value)
        from offload.kernels.sparse_down import ffn_hot_forward

        return ffn_hot_forward(x2.to(self.w1.dtype), hot_local, w1=self.w1, w3t=self.w3t, w2=self.w2, b1=self.b1,
                               activation=self.kind.value)

    def _cold_dense_torch(self, x: torch.Tensor) -> torch.Tensor:
        """Every cold neuron with torch matmuls over the bundled rows (views, no copy): x [t, d] fp32."""
        W = torch.from_numpy(self.cold.W).float()  # [n_cold, m, d] (a copy only for fp16 storage)
        if self.kind == FFNKind.RELU_FC:
            h = self._act(x @ W[:, 0].T + torch.from_numpy(self.cold.bias), None)
        else:
            h = self._act(x @ W[:, 0].T, x @ W[:, 1].T)
        return h @ W[:, -1]

    def _count(self, hot: int, cold: int) -> None:
        st = self.stats
        st.decode_calls += 1
        st.active_hot += hot
        st.active_cold += cold
        st.bytes_hot += hot * self.hot_bytes_per_neuron
        st.bytes_cold += cold * self.cold_bytes_per_neuron

    def _wait(self, fut, shape, record: bool) -> torch.Tensor:
        t0 = time.perf_counter()
        cold_y = torch.from_numpy(np.asarray(fut.result(), dtype=np.float32).reshape(shape))
        if record:
            self.stats.cold_wait_seconds += time.perf_counter() - t0
        return cold_y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None and x.numel() == self.d and x.dtype == torch.float32 and x.device.type == "cpu":
            return self._decode_fused(x)  # the common CPU-only decode step, with the least Python
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        prefill = (x.dim() == 3 and shape[1] > 1) or x2.shape[0] > DECODE_MAX_TOKENS  # a prompt: x [b, t>1, d]
        if prefill or self.select is None:
            y = self._dense(x2, prefill)
        elif self.device.type == "cpu":
            y = self._decode_host(x2)
        else:
            y = self._decode_device(x2)
        if self.out_bias is not None:
            y = y + self.out_bias
        return y.to(x.dtype).reshape(shape)

    def _dense(self, x2: torch.Tensor, prefill: bool) -> torch.Tensor:
        """Every neuron on both sides (prompts; select=None)."""
        self.stats.prefill_calls += prefill
        x_cpu = x2.detach().to("cpu", torch.float32)
        fut = None
        if self.cold is not None and self.device.type == "cpu":
            # Nothing to overlap with, and torch's thread pool is already running the prompt's other
            # matmuls: computing here avoids a second pool spinning against it.
            fut = _Done(self._cold_dense_torch(x_cpu))
        elif self.cold is not None:
            fut = self.worker.submit(self.cold.forward_dense, x_cpu.numpy())  # not in stats
        y = self._hot_rows(x2, None) if self.n_hot else torch.zeros(x2.shape, dtype=torch.float32, device=self.device)
        if fut is not None:
            y = y + self._wait(fut, x2.shape, False).to(self.device)
        return y

    def _decode_host(self, x2: torch.Tensor) -> torch.Tensor:
        """Decode with the "device" on the CPU: selection, both sides and the sum on the host."""
        x_np = x2.detach().numpy()
        active = self.select.ids(x_np)  # sorted global ids
        if self.n_hot == 0:  # every neuron is cold: local ids are the global ones
            hot_local, cold_local = active[:0], active
        else:
            hot_local = self.hot_pos[active]
            hot_local = hot_local[hot_local >= 0]
            cold_local = self.cold_pos[active]
            cold_local = cold_local[cold_local >= 0]
        self._count(hot_local.size, cold_local.size)
        y = torch.zeros(x2.shape, dtype=torch.float32)
        if cold_local.size:
            t0 = time.perf_counter()
            y += torch.from_numpy(self.cold.forward(x_np, cold_local)).reshape(x2.shape)
            self.stats.cold_seconds += time.perf_counter() - t0
        if hot_local.size:
            y += self._hot_rows(x2, torch.from_numpy(hot_local))
        return y

    def _decode_device(self, x2: torch.Tensor) -> torch.Tensor:
        """Decode on a GPU (module docstring): the hot kernels are queued before the host waits for
        anything; x, the cold ids and the hot count cross to the host in one copy, the cold result back
        in one."""
        ids = self.select.device_ids(x2)  # int64 [m], −1-padded, on the device
        valid = ids >= 0
        safe = ids.clamp(min=0)
        hot_local = torch.where(valid, self.hot_pos_dev[safe], -1).to(torch.int32)
        cold_local = torch.where(valid, self.cold_pos_dev[safe], -1).to(torch.int32)
        n_hot = (hot_local >= 0).sum(dtype=torch.int32).reshape(1)
        # [x as int32 bits | cold ids | hot count], queued before the hot kernels and copied on a side
        # stream, so the copy does not wait for them
        packed = torch.cat((x2.detach().float().reshape(-1).view(torch.int32), cold_local, n_hot))
        main = torch.cuda.current_stream(self.device)
        side = _copy_stream(self.device)
        side.wait_stream(main)
        host = torch.empty(packed.shape, dtype=torch.int32, pin_memory=True)
        with torch.cuda.stream(side):
            host.copy_(packed, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(side)
        packed.record_stream(side)
        y = self._hot_kernels(x2, hot_local) if self.n_hot else torch.zeros(x2.shape, dtype=torch.float32,
                                                                                device=self.device)
        copied.synchronize()  # the copy only: the hot kernels keep running
        nx = x2.numel()
        x_np = host[:nx].numpy().view(np.float32).reshape(x2.shape)
        cold_ids = host[nx:-1].numpy()
        cold_ids = cold_ids[cold_ids >= 0].astype(np.int64)
        self._count(int(host[-1]), cold_ids.size)
        if cold_ids.size == 0:
            return y
        fut = self.worker.submit(_Timed(self.cold.forward, self.stats), x_np, cold_ids)
        cold_y = self._wait(fut, x2.shape, True).pin_memory()
        return y + cold_y.to(self.device, non_blocking=True)


_copy_streams: dict = {}


def _copy_stream(device: torch.device):
    """One side CUDA stream per device for the device → host copies of the cold side's input."""
    s = _copy_streams.get(device)
    if s is None:
        s = _copy_streams[device] = torch.cuda.Stream(device)
    return s


_fused_module: list = []


def _fused_kernel():
    """offload.cpu.cold_step.shadow_topk_cold; the module is imported on first use (it compiles numba code)."""
    if not _fused_module:
        from offload.cpu import cold_step

        _fused_module.append(cold_step)
    return _fused_module[0].shadow_topk_cold


def uses_spinning_pool(device: torch.device | str) -> bool:
    """Whether the CPU kernels of a hybrid model on ``device`` run on numba's pool: when everything runs
    on the CPU (the weight products already do, and one pool cannot spin against another). With a GPU to
    drive, the kernels use helper threads that sleep (offload.cpu.team)."""
    return torch.device(device).type == "cpu"


def apply_placement(model: nn.Module, hot_ids: Sequence[np.ndarray], selectors: Sequence | None,
                    *, device: torch.device | str = "cpu", hot_dtype: torch.dtype | None = None,
                    cold_threads: int | None = None, worker: ColdWorker | None = None,
                    hot_format: str | None = None) -> HybridStats:
    """Replace every ``layers[i].mlp`` of ``model`` with a HybridFFN (in place) and move the rest of
    the model to ``device``. hot_ids[i]: layer i's hot neuron ids; selectors[i]: its runtime selector
    (offload.select; None: all neurons). Returns the stats object the layers update.
    hot_format: None (hot rows at ``hot_dtype``, the default) or "int4" (packed 4-bit hot rows, module
    docstring; plan the budget with ``plan_memory(hot_format=offload.packed_hot.packed_hot_layouts(model))``).

    Refused for a model whose FFNs are already hybrid: place a freshly loaded model instead."""
    layers = model.layers
    if any(isinstance(layer.mlp, HybridFFN) for layer in layers):
        raise ValueError("the model's FFNs are already split (HybridFFN): load the model again to place it anew")
    if len(hot_ids) != len(layers):
        raise ValueError(f"placement has {len(hot_ids)} layers, the model {len(layers)}")
    if hot_format not in (None, *HOT_FORMATS):
        raise ValueError(f"hot_format={hot_format!r}: expected None (float rows) or one of {HOT_FORMATS}")
    selectors = list(selectors) if selectors is not None else [None] * len(layers)
    device = torch.device(device)
    hot_dtype = hot_dtype or model.dtype
    cold_pool = "numba" if uses_spinning_pool(device) else "team"
    if cold_pool == "numba":
        cold_threads = start_pool(cold_threads)
    worker = worker or ColdWorker()
    stats = HybridStats()
    for i, layer in enumerate(layers):
        dense = layer.mlp
        layer.mlp = HybridFFN(dense, hot_ids[i], selectors[i], device=device, hot_dtype=hot_dtype,
                              worker=worker, stats=stats, cold_threads=cold_threads, cold_pool=cold_pool,
                              hot_format=hot_format)
        del dense  # its weights now live on the two sides
    if device.type != "cpu":
        # On an accelerator the non-FFN part takes the hot side's dtype, as the placement's memory plan
        # counts it (an fp32 attention and head under an fp16 plan would take twice the bytes budgeted).
        model.to(device=device, dtype=hot_dtype)
        model.dtype = hot_dtype  # activations and the KV cache follow
    model.hybrid_worker = worker
    return stats
