"""How weight matrices are stored for CPU decode: one module per storage format, in place of the dense
``models.common.Linear`` modules of a model.

The dense model (torch tensors, any device) is the reference. On the CPU every Linear becomes the module
of a storage format: each owns its one-token path (a numba GEMV over its bytes, offload.cpu.matvec) and
its many-token path (a dense matmul), and is tested against the Linear it replaces.

    weights    stored as                                                       a token reads
    "float32"  fp32                                                            4 bytes a weight
    "float16"  fp16, widened to fp32 in registers (F16C)                       2
    "int8"     8-bit codes, fp16 scale per group of 32 (round to nearest)      1.06
    "int4"     4-bit codes, fp16 scale and min per group of 32                 0.625
    "auto"     what the checkpoint stores: a GGUF's quantized tensors packed   as the file
               as they are (Q4_0 … Q8_0, Q4_K, Q5_K, Q6_K, lossless), float
               tensors fp16 when stored in 16 bits, else fp32

"auto" is the default of ``OffloadedModel.from_pretrained`` on the CPU: it reads what the checkpoint
stored, no more. "float32" reproduces transformers' fp32 numbers (the reference the tests use).

``activations`` says how the one-token product of a quantized matrix takes its input
(offload.formats.quantized): "int8" (the default, llama.cpp's scheme: x rounded to int8 per group of 32,
integer dot products; logits move by about what llama.cpp's do) or "float32" (x as is; transformers'
numbers to float32 rounding). fp32 and fp16 weights always take x in fp32.

Two ways in: :func:`apply_weight_format` converts a loaded dense model (any format but a GGUF's packed
bytes), and offload.loading builds a model straight in a format, tensor by tensor (never an fp32 copy
of the whole model; "auto" on a GGUF keeps the file's blocks). Both go through :func:`linear_for`.
A new format is a module (here, with its kernel in offload/cpu/ and, for the GPU, in kernels/) and a
branch of :func:`linear_for`.
"""
from __future__ import annotations

import torch
from torch import nn

from offload.formats.arena import tensor_in_huge_pages
from offload.formats.cpu import CpuLinear, Float16Linear, Float32Linear
from offload.formats.packed import pack_gguf, quantize, stack_rows
from offload.formats.quantized import ACTIVATIONS, FileEmbedding, PackedEmbedding, PackedLinear, check_activations
from offload.models.common import Embedding, Linear

WEIGHT_FORMATS = ("auto", "float32", "float16", "int8", "int4")
QUANTIZED_BITS = {"int8": 8, "int4": 4}


def check_weight_format(weights: str) -> str:
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r}: expected one of {', '.join(WEIGHT_FORMATS)}")
    return weights


def _packed_from_raw(raw_parts) -> list:
    """GGUF parts → packed matrices: one when their formats allow stacking, else one per part."""
    parts = [pack_gguf(r.data, r.qtype, r.cols) for r in raw_parts]
    if len(parts) == 1:
        return parts
    try:
        return [stack_rows(parts)]
    except ValueError:  # mixed formats (e.g. Q5_0 q/k and a Q8_0 v): kept apart, computed in turn
        return parts


def linear_for(weights: str, dense: torch.Tensor | None, bias: torch.Tensor | None, threads: int,
               raw_parts=None, activations: str = ACTIVATIONS[0]) -> CpuLinear:
    """The CPU storage module for one weight matrix in format ``weights``.

    dense: the weight [out, in] as a float tensor (its dtype tells "auto" what was stored); raw_parts:
    for "auto" on a GGUF, the quantized tensors it is made of (offload.checkpoint.RawTensor, stacked by
    rows), used instead of ``dense``. activations: see the module docstring."""
    weights = check_weight_format(weights)
    if weights == "auto" and raw_parts:
        return PackedLinear(_packed_from_raw(raw_parts), bias, threads, source="gguf", activations=activations)
    if weights == "auto":
        weights = "float16" if dense.dtype in (torch.float16, torch.bfloat16) else "float32"
    if weights == "float32":
        return Float32Linear(dense, bias, threads)
    if weights == "float16":
        return Float16Linear(dense, bias, threads)
    bits = QUANTIZED_BITS[weights]
    if dense.shape[1] % 32:
        raise ValueError(f"weights={weights!r} quantizes groups of 32 input columns; this matrix has "
                         f"{dense.shape[1]} (use float16)")
    return PackedLinear(quantize(dense.detach().float().numpy(), bits), bias, threads, source=weights,
                        activations=activations)


def embedding_for(weights: str, dense: torch.Tensor | None, raw=None, tied: bool = True,
                  activations: str = ACTIVATIONS[0]) -> nn.Module:
    """The token table in format ``weights``: a GGUF's quantized table stays packed ("auto"), or, untied,
    in the file (FileEmbedding: a lookup reads its rows); otherwise a torch table, fp32 for "float32" and
    fp16 for the rest (a lookup reads one row: no kernel needed)."""
    if weights == "auto" and raw is not None and not tied and hasattr(raw.data, "path"):
        return FileEmbedding(raw, raw.data.shape[0], raw.cols)
    if weights == "auto" and raw is not None:
        return PackedEmbedding(_packed_from_raw([raw])[0], activations)
    table = Embedding(dense.shape[0], dense.shape[1], device="meta")
    dtype = torch.float32 if weights == "float32" or (weights == "auto" and dense.dtype == torch.float32) \
        else torch.float16
    # in huge pages: a tied head (tied_head) streams this same storage
    table.weight = nn.Parameter(tensor_in_huge_pages(dense, dtype), requires_grad=False)
    return table


def tied_head(embedding: nn.Module, weights: str, threads: int, activations: str = ACTIVATIONS[0]) -> CpuLinear:
    """The output head of a tied model, reading the embedding's own storage (one table in memory)."""
    if isinstance(embedding, PackedEmbedding):
        return PackedLinear(embedding.packed, None, threads, source="gguf", activations=activations)
    return linear_for(weights, embedding.weight, None, threads, activations=activations)


def apply_weight_format(model: nn.Module, weights: str, threads: int, activations: str = ACTIVATIONS[0]) -> nn.Module:
    """Store every weight matrix of a dense CPU ``model`` in format ``weights`` (in place; returns the
    model). A tied head keeps reading its embedding's table ("auto" keeps each tensor's dtype)."""
    check_weight_format(weights)
    check_activations(activations)
    bad = [n for n, p in model.named_parameters() if p.device.type != "cpu"]
    if bad:
        raise ValueError(f"apply_weight_format needs a model on the CPU; {bad[0]} is on "
                         f"{model.get_parameter(bad[0]).device}")
    tied = model.lm_head.weight is model.embed.weight
    if isinstance(model.embed, Embedding):
        model.embed = embedding_for(weights, model.embed.weight)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear) and not (tied and child is model.lm_head):
                setattr(parent, name, linear_for(weights, child.weight, child.bias, threads,
                                                 activations=activations))
    if tied:
        model.lm_head = tied_head(model.embed, weights, threads, activations)
    return model


def format_name(model: nn.Module) -> str:
    """The storage format a CPU model's FFN weights are in: "float32", "float16", "int8", "int4", or
    "gguf" (a GGUF's packed blocks as stored; what "auto" gives for a quantized GGUF). Prepared artifacts
    are keyed by it, so "auto" on an fp32 checkpoint shares "float32"'s."""
    lin = model.layers[0].mlp
    lin = getattr(lin, "down", None) or getattr(lin, "fc2", None)
    if isinstance(lin, PackedLinear):
        return lin.source
    if getattr(lin, "weight", None) is not None and lin.weight.dtype == torch.float16:
        return "float16"  # Float16Linear, or a torch Linear rounded by store_ffn_weights_fp16 (a GPU run's cold rows)
    return "float32"


def store_ffn_weights_fp16(model: nn.Module) -> nn.Module:
    """Round every FFN weight matrix of a dense torch model to fp16 in place (torch Linears stay): before
    a GPU placement, so that the cold rows the CPU keeps are fp16 (offload.hybrid keeps their dtype) while
    the device side takes its own dtype. Returns the model."""
    for layer in model.layers:
        for module in layer.mlp.modules():
            if isinstance(module, Linear):
                module.weight = nn.Parameter(module.weight.detach().half(), requires_grad=False)
    return model


def dense_outside_ffn(model: nn.Module) -> nn.Module:
    """Swap every CPU storage module outside the FFNs (attention, embedding table, head) of a model built in
    a format for the dense torch module holding its weights in fp32 (dequantized), in place; returns the
    model. What a GPU placement of a GGUF as stored needs: the non-FFN part moves to the device as torch
    tensors, while the FFNs keep the file's blocks, from which the hybrid packs its hot rows losslessly
    (offload.packed_hot). A tied head shares the new table."""
    in_ffn = {id(m) for layer in model.layers for m in layer.mlp.modules()}
    if not isinstance(model.embed, Embedding):
        model.embed = embedding_for("float32", model.embed.dense_weight())
    for parent in list(model.modules()):
        if id(parent) in in_ffn:
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, CpuLinear):
                setattr(parent, name, _dense_linear(child))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


def _dense_linear(stored: CpuLinear) -> Linear:
    lin = Linear(stored.in_features, stored.out_features, bias=stored.bias is not None, device="meta")
    lin.weight = nn.Parameter(stored.dense_weight().detach().float().contiguous(), requires_grad=False)
    if stored.bias is not None:
        lin.bias = nn.Parameter(stored.bias.detach().float().clone(), requires_grad=False)
    return lin


def set_threads(model: nn.Module, threads: int) -> None:
    """Run every CPU storage module of ``model`` on ``threads`` threads."""
    for module in model.modules():
        if isinstance(module, CpuLinear):
            module.threads = threads


def decode_bytes(model: nn.Module) -> int:
    """Weight bytes one decode token reads: every weight matrix once (a tied head and its table counted
    once), norms and biases; of an untied embedding table only the row looked up (~0)."""
    seen, total = set(), 0

    def add(key, n):
        nonlocal total
        if key not in seen:
            seen.add(key)
            total += n
    for module in model.modules():
        if isinstance(module, PackedLinear):
            for P in module.parts:
                add(id(P), P.nbytes)
        elif isinstance(module, CpuLinear):
            add(module.weight.data_ptr(), module.nbytes)
        elif isinstance(module, Linear):
            add(module.weight.data_ptr(), module.nbytes)
        elif isinstance(module, (Embedding, PackedEmbedding, FileEmbedding)):
            continue
        else:
            for p in module.parameters(recurse=False):
                add(p.data_ptr(), p.numel() * p.element_size())
    for module in model.modules():  # biases of the storage modules
        if isinstance(module, CpuLinear) and module.bias is not None:
            add(module.bias.data_ptr(), module.bias.numel() * 4)
    return total


__all__ = ["ACTIVATIONS", "QUANTIZED_BITS", "WEIGHT_FORMATS", "CpuLinear", "FileEmbedding", "Float16Linear",
           "Float32Linear", "PackedEmbedding", "PackedLinear", "apply_weight_format", "check_activations",
           "check_weight_format", "decode_bytes", "dense_outside_ffn", "embedding_for", "format_name", "linear_for",
           "set_threads", "store_ffn_weights_fp16", "tied_head"]
