"""The layer-split baseline: llama.cpp's ``-ngl`` policy applied to our dense engine.

Whole decoder layers go to the device, first to last, while their weights and KV cache fit the
budget; then the final norm and the head, if they fit too. The embedding table stays in CPU RAM
(one row per token crosses), as in llama.cpp. Everything left runs dense on the CPU. This is what a
user gets from ``llama.cpp -ngl N`` or a hand-written device map, and what the hybrid runtime must
beat at the same budget: it moves whole layers where the hybrid moves hot neurons.

Example::

    from offload.layer_split import apply_layer_split
    m = OffloadedModel.from_pretrained()                       # dense fp32 on the CPU
    split = apply_layer_split(m.model, budget=300 * 2**20, device="cuda", context=1024)
    print(split.gpu_layers, split.head_on_device, split.device_bytes)

Each block computes where its weights live, in their dtype (``dtype`` on the device, the model's
on the CPU); LlamaModel moves x at each boundary and allocates each layer's KV cache at home.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from offload.errors import UnsupportedModelError

RESERVE_BYTES = 300 * 2**20  # CUDA context, cuBLAS workspace, activations (as offload.place.memory)


@dataclass
class LayerSplit:
    """What apply_layer_split placed: the first ``gpu_layers`` layers (and the head when
    ``head_on_device``) on ``device``, using ``device_bytes`` of ``budget``."""

    gpu_layers: int
    layers: int
    head_on_device: bool
    device_bytes: int
    budget: int


def _param_bytes(module: nn.Module, element_size: int) -> int:
    return sum(p.numel() for p in module.parameters()) * element_size


def plan_layer_split(layer_bytes: list[int], head_bytes: int, budget: int, reserve: int = 0) -> tuple[int, bool, int]:
    """(layers that fit from the first, whether the head fits after all of them, bytes used): the
    -ngl policy as a pure function. A layer's bytes include its KV cache."""
    used, n = reserve, 0
    for b in layer_bytes:
        if used + b > budget:
            break
        used, n = used + b, n + 1
    head = n == len(layer_bytes) and used + head_bytes <= budget
    return n, head, used + (head_bytes if head else 0)


def apply_layer_split(model: nn.Module, budget: int, device: torch.device | str, *, context: int,
                      batch: int = 1, dtype: torch.dtype | None = None) -> LayerSplit:
    """Move whole layers (then the head) of a dense LLaMA-family ``model`` to ``device`` in place.

    budget: bytes on the device (RESERVE_BYTES of it are kept free on CUDA). dtype: of the moved
    weights and their KV cache (default float16 on CUDA, the model's own elsewhere)."""
    from offload.models.llama import LlamaModel

    if not isinstance(model, LlamaModel):
        raise UnsupportedModelError(f"layer_split supports the LLaMA family (models/llama.py), not "
                                    f"{type(model).__name__}")
    device = torch.device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else model.dtype)
    elt = torch.empty(0, dtype=dtype).element_size()
    cfg = model.config
    kv = 2 * batch * cfg.num_key_value_heads * context * cfg.head_dim * elt
    layer_bytes = [_param_bytes(layer, elt) + kv for layer in model.layers]
    head_bytes = _param_bytes(model.norm, elt) + model.lm_head.weight.numel() * elt
    reserve = RESERVE_BYTES if device.type == "cuda" else 0
    n, head, used = plan_layer_split(layer_bytes, head_bytes, budget, reserve)
    with torch.no_grad():
        for layer in model.layers[:n]:
            layer.to(device=device, dtype=dtype)
        if head:
            # A tied head gets its own copy on the device; embedding lookups stay on the CPU.
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().to(device, dtype), requires_grad=False)
            model.norm.to(device=device, dtype=dtype)
    return LayerSplit(gpu_layers=n, layers=len(model.layers), head_on_device=head, device_bytes=used, budget=budget)
