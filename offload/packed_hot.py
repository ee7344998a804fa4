"""Where a hybrid FFN's packed 4-bit hot side comes from (``apply_placement(..., hot_format="int4")``).

Losslessly from the CPU model's packed weights when they are in a 4-bit layout the GPU format holds
(offload.formats.packed_rows: GGUF Q4_0, Q4_1, Q4_K, or ``weights="int4"``): gate and up rows from the
fused ``gate_up`` (or OPT's ``fc1``) PackedLinear, sharing one layout, and the down columns from the
``down`` (``fc2``) PackedLinear. Otherwise (float weights, 5/6/8-bit GGUF types, gate and up in different
layouts) the float weights are quantized round to nearest ("int4": the q4_1 layout), each side on its own:
a Q4_K_M GGUF keeps its Q4_K gate/up rows and quantizes a Q6_K down.

:func:`packed_hot_layouts` names each layer's (gate/up, down) layouts before anything is built, for
``plan_memory(hot_format=...)``, so that the plan counts the bytes these builders make.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from offload.formats.packed import PackedMatrix
from offload.formats.quantized import PackedLinear
from offload.formats.packed_rows import (GROUP, INT4, Q4Down, Q4Rows, down_from_packed, layout_of, quantize_down,
                                         quantize_rows, rows_from_packed)

HOT_FORMATS = ("int4",)  # apply_placement's packed hot formats (None: the float hot rows)


def _linears(mlp: nn.Module):
    """(the W1/W2 module, the first row of each projection in it, the down module): a gated FFN's fused
    gate_up (gate rows 0..n-1, up rows n..2n-1) and down, or OPT's fc1 and fc2."""
    mlp = getattr(mlp, "dense", mlp)  # a SparseFFN wraps its dense FFN
    if hasattr(mlp, "gate_up"):
        return mlp.gate_up, (0, mlp.n), mlp.down
    return mlp.fc1, (0,), mlp.fc2


def _part_with(linear: nn.Module, first: int, n: int) -> tuple[PackedMatrix, int] | None:
    """(the packed part holding rows first..first+n-1 of a PackedLinear, their offset in it), or None."""
    offset = 0
    for P in getattr(linear, "parts", None) or ():
        if offset <= first and first + n <= offset + P.rows:
            return P, first - offset
        offset += P.rows
    return None


def packed_sources(mlp: nn.Module) -> tuple[list | None, PackedMatrix | None]:
    """The 4-bit packed matrices a lossless hot side reads: [(matrix, row offset)] per projection (W1, W2)
    in one shared layout, and the down matrix [d, n] (one part, even d); None for a side that has none."""
    w, firsts, down = _linears(mlp)
    n = getattr(mlp, "dense", mlp).n
    found = [_part_with(w, first, n) for first in firsts]
    rows = found if all(found) and len({layout_of(P) for P, _ in found} - {None}) == 1 and \
        layout_of(found[0][0]) is not None else None
    parts = getattr(down, "parts", None) or ()
    single = parts[0] if len(parts) == 1 and layout_of(parts[0]) is not None and parts[0].rows % 2 == 0 else None
    return rows, single


def packed_hot_layouts(model: nn.Module) -> list[tuple[str, str]]:
    """Per layer, the (gate/up, down) layout names ``hot_format="int4"`` builds: the packed source's
    ("q4_0", "q4_1", "q4_k") or "int4" where the float weights are quantized. What plan_memory's
    ``hot_format`` takes to count exactly what apply_placement will build."""
    out = []
    for layer in model.layers:
        rows, down = packed_sources(layer.mlp)
        out.append((layout_of(rows[0][0]).name if rows else INT4, layout_of(down).name if down else INT4))
    return out


def packed_hot_format(model: nn.Module) -> list[tuple[str, str]] | None:
    """How offload() holds ``model``'s hot rows: packed 4-bit (its :func:`packed_hot_layouts`) when its FFN
    weights are quantized on the CPU (a GGUF as stored, ``weights="int4"`` / ``"int8"``), since a budget
    then holds ~3.5× more hot neurons; None (rows at the device dtype) for float weights, and for FFNs
    whose widths are not in groups of 32."""
    _, _, down = _linears(model.layers[0].mlp)
    if not isinstance(down, PackedLinear):  # float weights
        return None
    d, n = down.out_features, down.in_features
    return packed_hot_layouts(model) if d % GROUP == 0 and n % GROUP == 0 else None


def check_packable(d: int, n: int) -> None:
    if d % GROUP or n % GROUP:
        raise ValueError(f"hot_format='int4' packs groups of {GROUP} along d and along the neurons: this FFN has "
                         f"d={d}, n={n} (use the float hot rows: hot_format=None)")


def build_packed_hot(mlp: nn.Module, hot: np.ndarray, w1: torch.Tensor, w2: torch.Tensor | None,
                     down: torch.Tensor) -> tuple[Q4Rows, Q4Down]:
    """The packed hot side (on the CPU) of neurons ``hot`` (sorted global ids): lossless from the packed
    sources, else round-to-nearest from the float weights w1, w2 [n, d] and down [d, n]."""
    check_packable(w1.shape[1], w1.shape[0])
    rows_src, down_src = packed_sources(mlp)
    if rows_src:
        rows = rows_from_packed([P for P, _ in rows_src], [offset + hot for _, offset in rows_src])
    else:
        rows = quantize_rows([w.detach().to("cpu", torch.float32).numpy()[hot] for w in (w1, w2) if w is not None])
    if down_src is not None:
        return rows, down_from_packed(down_src, hot)
    return rows, quantize_down(down.detach().to("cpu", torch.float32).numpy(), hot)


__all__ = ["HOT_FORMATS", "build_packed_hot", "check_packable", "packed_hot_format", "packed_hot_layouts",
           "packed_sources"]
