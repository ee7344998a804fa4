"""One block of a LLaMA-family model for one decode token in one numba call, its arguments prepared once.

Why: with each half of a block in its own call made from the model's modules (offload.cpu.decode's
FusedAttention / FusedGatedFFN residuals), a SmolLM2 fp16 token spent ~6 ms of an 18 ms step in the
Python around the 60 calls: torch and module plumbing between kernels that stream megabytes through
the caches, so that Python runs from DRAM. The same kernels called from a bare loop over prepared
arguments took 12.1 ms (Intel Xeon VM, 2 threads). offload.cpu.decode.FusedLlamaLayers is that loop:

    decode_layer(x, cos, sin, pos, layer, i, counts, bad)   # x: in, then out

x float32 [d] (overwritten: the token after this block); cos, sin float32 [hd] at position ``pos``;
``layer`` an ``(AttentionHalf, FFN half)`` pair. The FFN half is a :class:`DenseFFNHalf`
(offload.cpu.ffn_block) or a :class:`ColdFFNHalf` (the all-cold hybrid layer of offload.cpu.cold_step);
for a cold half, ``counts[i]`` gets the neurons computed and ``bad[i]`` the out-of-range indices (dense
halves: -1 and 0). numba compiles once per pair type (a Q4_K_M file's blocks have a few).

Why not every block in one call: a tuple of 30 blocks' argument structs took LLVM ~2 minutes to compile
(SmolLM2 Q4_1, row quads), ``literal_unroll`` over it over 12 minutes and 6 GB, and a numba typed List
of them compiles the list's methods in every process (+66 MB peak memory, which a 0.5B model's memory
budget does not have). One call per block measured within noise of one call per step.
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit, types
from numba.extending import overload

from offload.cpu.attention import attention_block
from offload.cpu.cold_step import shadow_topk_cold
from offload.cpu.ffn_block import gated_ffn_block

# the attention half: offload.cpu.attention.attention_block's arguments that are not per token
# (k, v: this block's KV cache, float32 [kvh, max_len, hd]; empty biases mean none)
AttentionHalf = namedtuple("AttentionHalf", "norm_w eps qkv bqkv k v h kvh o bo threads")
# a dense gated FFN half: offload.cpu.ffn_block.gated_ffn_block's arguments but x and out
DenseFFNHalf = namedtuple("DenseFFNHalf", "norm_w eps gate_up down n kind threads")
# an all-cold hybrid FFN half: offload.cpu.cold_step.shadow_topk_cold's arguments but x
ColdFFNHalf = namedtuple("ColdFFNHalf", "norm_w eps shadow_w shadow_b shadow_kind n k cold_w block kind bias "
                                        "parts scratch")


def ffn_half(half, x, out):
    """out = x + FFN(rms_norm(x)) for one token → (neurons computed or -1, out-of-range count). Numba only."""
    raise NotImplementedError("ffn_half is a numba function")


@njit(nogil=True, fastmath=True, cache=True)
def dense_half(half, x, out):
    gated_ffn_block(x, half.norm_w, half.eps, half.gate_up, half.down, half.n, half.kind, half.threads, out)
    return -1, 0


@njit(nogil=True, fastmath=True, cache=True)
def cold_half(half, x, out):
    y, count, bad = shadow_topk_cold(x.reshape(1, x.shape[0]), half.norm_w, half.eps, half.shadow_w,
                                     half.shadow_b, half.shadow_kind, half.n, half.k, half.cold_w, half.block,
                                     half.kind, half.bias, half.parts, half.scratch)
    out[:] = y
    return count, bad


@overload(ffn_half, jit_options={"nogil": True, "fastmath": True, "cache": True})
def _ffn_half_impl(half, x, out):
    if isinstance(half, types.BaseNamedTuple) and half.instance_class is DenseFFNHalf:
        return lambda half, x, out: dense_half(half, x, out)
    if isinstance(half, types.BaseNamedTuple) and half.instance_class is ColdFFNHalf:
        return lambda half, x, out: cold_half(half, x, out)
    return None


@njit(nogil=True, fastmath=True, cache=True)
def decode_layer(x, cos, sin, pos, layer, i, counts, bad):
    """See the module docstring."""
    a = np.empty_like(x)
    at = layer[0]
    attention_block(x, at.norm_w, at.eps, at.qkv, at.bqkv, cos, sin, at.k, at.v, pos, at.h, at.kvh, at.o,
                    at.bo, at.threads, a)
    counts[i], bad[i] = ffn_half(layer[1], a, x)
