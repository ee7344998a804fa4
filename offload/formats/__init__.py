"""How weight matrices are stored: one module per storage format, swapped for the dense
``models.common.Linear`` modules of a model.

The dense model (torch tensors, any device) is the reference. On the CPU, :func:`apply_weight_format`
replaces every Linear with the module of a storage format (:mod:`offload.formats.cpu`): each owns its
one-token path (a numba GEMV over its bytes, offload.cpu.matvec) and its many-token path (a dense matmul),
and is tested against the Linear it replaced.

    weights      stored as                                   one token reads
    "float32"    fp32                                         4 bytes a weight
    "float16"    fp16, widened to fp32 in registers (F16C)    2 bytes a weight

A new format is a module here (with its kernel in offload/cpu/ and, for the GPU, in kernels/) and a line
in :data:`WEIGHT_FORMATS`.
"""
from __future__ import annotations

import torch
from torch import nn

from offload.formats.cpu import CpuLinear, Float16Linear, Float32Linear
from offload.models.common import Embedding, Linear

WEIGHT_FORMATS = {"float32": Float32Linear, "float16": Float16Linear}
_TABLE_DTYPE = {"float32": torch.float32, "float16": torch.float16}  # embedding tables, looked up by torch


def check_weight_format(weights: str) -> str:
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
    return weights


def apply_weight_format(model: nn.Module, weights: str, threads: int) -> nn.Module:
    """Store every weight matrix of a CPU ``model`` in format ``weights`` (in place; returns the model).

    Every :class:`Linear` becomes the format's CpuLinear (one-token products on ``threads`` threads);
    embedding tables take the format's dtype (torch looks rows up; activations stay fp32). A weight
    shared by two modules (a tied head and its embedding) stays one tensor."""
    cls = WEIGHT_FORMATS[check_weight_format(weights)]
    bad = [n for n, p in model.named_parameters() if p.device.type != "cpu"]
    if bad:
        raise ValueError(f"apply_weight_format needs a model on the CPU; {bad[0]} is on {model.get_parameter(bad[0]).device}")
    tables = {}
    for module in model.modules():
        if isinstance(module, Embedding):
            old = module.weight
            module.weight = nn.Parameter(old.detach().to(_TABLE_DTYPE[weights]), requires_grad=False)
            tables[id(old)] = module.weight
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                weight = tables.get(id(child.weight), child.weight)  # a tied head reads the converted table
                setattr(parent, name, cls(weight.detach(), child.bias, threads))
    return model


def store_ffn_weights_fp16(model: nn.Module) -> nn.Module:
    """Round every FFN weight matrix of a dense torch model to fp16 in place (torch Linears stay): before
    a GPU placement, so that the cold rows the CPU keeps are fp16 (offload.hybrid keeps their dtype) while
    the device side takes its own dtype. Returns the model."""
    for layer in model.layers:
        for module in layer.mlp.modules():
            if isinstance(module, Linear):
                module.weight = nn.Parameter(module.weight.detach().half(), requires_grad=False)
    return model


def set_threads(model: nn.Module, threads: int) -> None:
    """Run every CPU storage module of ``model`` on ``threads`` threads."""
    for module in model.modules():
        if isinstance(module, CpuLinear):
            module.threads = threads


__all__ = ["WEIGHT_FORMATS", "CpuLinear", "Float16Linear", "Float32Linear", "apply_weight_format",
           "check_weight_format", "set_threads", "store_ffn_weights_fp16"]
