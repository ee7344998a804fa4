"""CPU decode for the LLaMA family: each half of a block (norm → attention → residual, norm → FFN →
residual) in one numba call per token, whatever the weights' storage format.

:func:`fuse_decode_blocks` is a transform (module swaps, in place): every ``layers[i].attn`` becomes a
:class:`FusedAttention` and every dense ``layers[i].mlp`` a :class:`FusedGatedFFN`. They are the same
modules with the same parameters; only ``residual`` changes: for one fp32 token on the CPU whose weights
are in a CPU storage format (offload.formats) it runs offload.cpu.attention.attention_block /
offload.cpu.ffn_block.gated_ffn_block, otherwise the torch path (prompts, other devices).

Why: at batch 1 a SmolLM2 layer is ~15 small ops; in Python each costs 5-40 µs of dispatch around a few
µs of work. One call per half measured 51 → 63 tok/s on SmolLM2 (fp16 weights, 2 threads).

:class:`FusedRMSNorm` (the final norm) computes one CPU token with the blocks' numba norm: torch's op, the
first one after the blocks, took 0.1-0.5 ms a token there (SmolLM2, AMD Zen 3 VM) against ~50 µs in a loop of
its own: its dispatch code comes back from DRAM after the blocks have streamed their weights through the
caches.

:class:`FusedLlamaLayers` goes one step further: for one CPU token each block runs in one numba call
(offload.cpu.step) over arguments prepared once, with no torch or module plumbing between blocks.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import nn

from offload.cpu.attention import attention_block, rms_norm_row
from offload.cpu.ffn_block import gated_ffn_block
from offload.cpu.step import AttentionHalf, DenseFFNHalf, decode_layer
from offload.formats.cpu import CpuLinear
from offload.models.common import RMSNorm
from offload.models.llama import Attention, GatedFFN, LlamaLayers, LlamaModel

_NONE = np.zeros(0, np.float32)  # "no bias" for the kernels


def one_cpu_token(x: torch.Tensor) -> bool:
    """x holds one fp32 token on the CPU: the fused decode kernels apply."""
    return x.numel() == x.shape[-1] and x.dtype == torch.float32 and x.device.type == "cpu"


def _bias(lin: CpuLinear) -> np.ndarray:
    return _NONE if lin.bias is None else lin.bias.numpy()


class FusedAttention(Attention):
    """Attention whose ``residual`` runs in one numba call for one CPU token (see module docstring)."""

    @classmethod
    def of(cls, attn: Attention) -> "FusedAttention":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.h, new.kvh, new.hd = attn.h, attn.kvh, attn.hd
        new.qkv, new.o = attn.qkv, attn.o
        return new

    def residual(self, x, norm, cos, sin, cache, layer, start):
        args = self._fused_args(norm) if cache is not None and one_cpu_token(x) else None
        kv = _kv_views(self, cache, layer) if args is not None else None
        if kv is None:
            return super().residual(x, norm, cos, sin, cache, layer, start)
        out = np.empty(x.shape[-1], np.float32)
        head, tail = args
        attention_block(x.numpy().reshape(-1), *head, cos[0].numpy(), sin[0].numpy(), *kv, start, *tail, out)
        return torch.from_numpy(out).view(x.shape)

    def step_half(self, norm, cache, layer: int):
        """This block's attention half for offload.cpu.step.decode_layer (the remembered kernel arguments
        and cache views), or None where the fused path does not apply."""
        args = self._fused_args(norm)
        kv = _kv_views(self, cache, layer) if args is not None else None
        if kv is None:
            return None
        (norm_w, eps, qkv, bqkv), (h, kvh, o, bo, threads) = args
        return AttentionHalf(norm_w, eps, qkv, bqkv, kv[0], kv[1], h, kvh, o, bo, threads)

    def _fused_args(self, norm):
        """The kernel's arguments that stay the same from token to token, or None when the fused path does
        not apply (weights not in a CPU storage format, a non-fp32 norm). Remembered per (norm, qkv, o,
        threads): rebuilding them each layer and token cost SmolLM2 ~1 ms a step (5.1 → 4.1 ms outside the
        kernels, one thread)."""
        qkv, o = self._modules["qkv"], self._modules["o"]

        def build():
            if not (isinstance(qkv, CpuLinear) and isinstance(o, CpuLinear) and norm.weight.dtype == torch.float32):
                return None
            return ((norm.weight.numpy(), norm.eps, qkv.operand, _bias(qkv)),
                    (self.h, self.kvh, o.operand, _bias(o), qkv.threads))
        return _remembered(self, (norm, qkv, o, getattr(qkv, "threads", None)), build)


def _remembered(module: nn.Module, key: tuple, build):
    """build()'s result, kept on ``module`` while ``key`` stays equal (modules and norms compare by
    identity, the thread count by value); in ``__dict__``, where torch registers no submodule."""
    got = module.__dict__.get("_fused")
    if got is None or got[0] != key:
        got = module.__dict__["_fused"] = (key, build())
    return got[1]


def _kv_views(attn: nn.Module, cache, layer: int):
    """(k, v) NumPy views of layer ``layer`` of ``cache`` (on the CPU: fp32, or fp16 as its uint16 bits), or
    None: remembered for the cache's tensors through a weak reference (a finished generate's cache is not
    kept alive)."""
    got = attn.__dict__.get("_kv")
    if got is None or got[0]() is not cache.k:
        k, v = cache.k[layer], cache.v[layer]
        views = None
        if k.device.type == "cpu" and k.dtype == torch.float32:
            views = (k[0].numpy(), v[0].numpy())
        elif k.device.type == "cpu" and k.dtype == torch.float16:
            views = (k[0].numpy().view(np.uint16), v[0].numpy().view(np.uint16))
        got = attn.__dict__["_kv"] = (weakref.ref(cache.k), views)
    return got[1]


class FusedGatedFFN(GatedFFN):
    """GatedFFN whose ``residual`` runs in one numba call for one CPU token (no biases)."""

    @classmethod
    def of(cls, mlp: GatedFFN) -> "FusedGatedFFN":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.kind, new.n = mlp.kind, mlp.n
        new.gate_up, new.down = mlp.gate_up, mlp.down
        return new

    def residual(self, x, norm):
        args = self._fused_args(norm) if one_cpu_token(x) else None
        if args is None:
            return super().residual(x, norm)
        out = np.empty(x.shape[-1], np.float32)
        gated_ffn_block(x.numpy().reshape(-1), *args, out)
        return torch.from_numpy(out).view(x.shape)

    def step_half(self, norm):
        """This FFN half for offload.cpu.step.decode_layer, or None where the fused path does not apply."""
        return self._fused_args(norm)

    def _fused_args(self, norm):
        """As FusedAttention._fused_args, as a DenseFFNHalf (gated_ffn_block's arguments but x and out):
        remembered per (norm, gate_up, down, threads); None without CPU storage formats, with biases or a
        non-fp32 norm."""
        gate_up, down = self._modules["gate_up"], self._modules["down"]

        def build():
            if not (isinstance(gate_up, CpuLinear) and isinstance(down, CpuLinear) and gate_up.bias is None
                    and down.bias is None and norm.weight.dtype == torch.float32):
                return None
            return DenseFFNHalf(norm.weight.numpy(), norm.eps, gate_up.operand, down.operand, self.n,
                                self.kind.code, gate_up.threads)
        return _remembered(self, (norm, gate_up, down, getattr(gate_up, "threads", None)), build)


class FusedRMSNorm(RMSNorm):
    """RMSNorm whose one fp32 CPU token runs offload.cpu.attention.rms_norm_row (see the module docstring);
    otherwise (prompts, other devices, Gemma's unit offset) RMSNorm's torch path."""

    @classmethod
    def of(cls, norm: RMSNorm) -> "FusedRMSNorm":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.eps, new.unit_offset = norm.eps, norm.unit_offset
        new.weight = norm.weight
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.unit_offset or not one_cpu_token(x) or w.dtype != torch.float32 or w.device.type != "cpu":
            return super().forward(x)
        out = np.empty(x.shape[-1], np.float32)
        rms_norm_row(np.ascontiguousarray(x.detach().numpy().reshape(-1)), w.detach().numpy(), self.eps, out)
        return torch.from_numpy(out).view(x.shape)


class FusedLlamaLayers(LlamaLayers):
    """LlamaLayers that run one fp32 CPU decode token block by block through offload.cpu.step.decode_layer
    (one numba call a block, its arguments prepared once, no torch in between) when every block offers
    its halves (``step_half``: FusedAttention, FusedGatedFFN, an all-cold HybridFFN); otherwise as
    LlamaLayers.

    The plan (each block's halves) is built at a KV cache's first decode token and kept for that cache:
    building it took SmolLM2 0.2 ms a token (0.4 with hybrid layers), Python that runs from DRAM after
    the kernels. So swap modules or change thread counts between caches (generate calls), not while a
    cache is in use."""

    def forward(self, x, rope, cache, start):
        plan = self._plan_for(cache) if cache is not None and one_cpu_token(x) else None
        if plan is None:
            return super().forward(x, rope, cache, start)
        halves, cold = plan
        cos, sin = rope(start, 1, x.dtype, x.device)
        counts, bad = np.empty(len(halves), np.int64), np.empty(len(halves), np.int64)
        h = x.detach().numpy().reshape(-1).copy()
        cos, sin = cos[0].numpy(), sin[0].numpy()
        for i, layer in enumerate(halves):
            decode_layer(h, cos, sin, start, layer, i, counts, bad)
        if cold:  # hybrid layers count the neurons they computed
            counts, bad = counts.tolist(), bad.tolist()
            for i, mlp in cold:
                mlp.record_cold_step(counts[i], bad[i])
        return torch.from_numpy(h).view(x.shape)

    def _plan_for(self, cache):
        """(halves, [(block index, hybrid FFN)]) for ``cache`` (remembered through a weak reference), or
        None when a block has no fused path."""
        got = self.__dict__.get("_plan")
        if got is None or got[0]() is not cache:
            halves = self._step_plan(cache)
            cold = None if halves is None else [(i, layer.mlp) for i, layer in enumerate(self)
                                                if not isinstance(halves[i][1], DenseFFNHalf)]
            got = self.__dict__["_plan"] = (weakref.ref(cache), None if halves is None else (halves, cold))
        return got[1]

    def _step_plan(self, cache):
        """[(attention half, FFN half)] per block for decode_layer, or None when a block has no fused path."""
        plan = []
        for i, layer in enumerate(self):
            m = layer._modules
            attn, mlp = m["attn"], m["mlp"]
            if not (isinstance(attn, FusedAttention) and hasattr(mlp, "step_half")):
                return None
            a = attn.step_half(m["attn_norm"], cache, i)
            f = mlp.step_half(m["ffn_norm"]) if a is not None else None
            if f is None:
                return None
            plan.append((a, f))
        return plan


KV_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def fuse_decode_blocks(model: nn.Module, kv_cache: str = "float32") -> nn.Module:
    """Swap each LLaMA block's attention and dense FFN, the block list and the final norm for the fused
    decode variants (in place; other families and FFNs the engine already swapped are left as they are).
    ``kv_cache``: the KV cache's dtype, a key of KV_CACHE_DTYPES; "float16" (LLaMA family only) halves the
    bytes one-token attention reads (compute stays fp32; K and V are rounded to fp16 as they are stored).
    Returns the model."""
    if kv_cache not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache={kv_cache!r}: expected one of {', '.join(KV_CACHE_DTYPES)}")
    if not isinstance(model, LlamaModel):
        if kv_cache != "float32":
            raise ValueError(f"kv_cache={kv_cache!r} needs a LLaMA-family model (not {type(model).__name__})")
        return model
    model.kv_dtype = KV_CACHE_DTYPES[kv_cache]
    for layer in model.layers:
        if type(layer.attn) is Attention:
            layer.attn = FusedAttention.of(layer.attn)
        if type(layer.mlp) is GatedFFN and layer.mlp.kind.kernels:  # ffn_block computes the kernels' kinds
            layer.mlp = FusedGatedFFN.of(layer.mlp)
    if type(model.layers) is LlamaLayers:
        model.layers = FusedLlamaLayers(model.layers)
    if type(model.norm) is RMSNorm:
        model.norm = FusedRMSNorm.of(model.norm)
    return model


@torch.inference_mode()
def warm_up(model: nn.Module) -> None:
    """Compile (or load from numba's cache) every kernel one decode step uses, by running one: a prompt
    token, then a decode token, on a two-position cache. The first decode step of a generate call then
    does not pay for compilation (~10-30 s the first time on a machine, ~1 s from the cache)."""
    cache = model.new_cache(1, 2)
    ids = torch.zeros((1, 1), dtype=torch.int64, device=model.device)
    model(ids, cache, 0, last_only=True)
    model(ids, cache, 1, last_only=True)
