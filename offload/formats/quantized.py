"""Quantized weights on the CPU: a packed matrix (offload.formats.packed, "column planes") behind the
interface of a Linear, and a packed embedding table.

:class:`PackedLinear` replaces a ``models.common.Linear``. One token is a numba GEMV over the packed bytes
(offload.cpu.packed_gemv: read once, dequantized in registers, fp32 accumulation); a few tokens (≤ 8)
decode each plane once for all of them; a prompt dequantizes row chunks and multiplies (never an fp32 copy
of the whole matrix). Its operand (what offload.cpu.matvec reads) is a :data:`PACKED_OPERANDS` named
tuple, one class per code width, so the fused decode blocks compile the right unpacking per matrix.

Where the bytes come from: a GGUF tensor as stored (:func:`packed_from_gguf`, lossless for Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), or a float weight quantized round-to-nearest in groups of 32
(:func:`offload.formats.packed.quantize`: ``weights="int4"`` / ``"int8"``).
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from offload.cpu.packed_gemv import KERNELS, kernel_scales
from offload.formats.cpu import CpuLinear
from offload.formats.packed import PackedMatrix, dequantize_rows

# what offload.cpu.matvec and the fused blocks read: the kernel's arrays, the active columns (all of
# them), the zero point and the row count. One class per code width: the width picks the unpacking
# loop at compile time.
OPERAND_FIELDS = ("planes", "d", "m", "sc", "mc", "flags", "gmap", "dmap", "cols", "zero", "rows")
Packed4 = namedtuple("Packed4", OPERAND_FIELDS)
Packed5 = namedtuple("Packed5", OPERAND_FIELDS)
Packed6 = namedtuple("Packed6", OPERAND_FIELDS)
Packed8 = namedtuple("Packed8", OPERAND_FIELDS)
PACKED_OPERANDS = {4: Packed4, 5: Packed5, 6: Packed6, 8: Packed8}
FEW_TOKENS = 8  # tokens per call of the batched kernel (each plane decoded once for all of them)
# Prompts up to this many tokens go through the batched kernel, FEW_TOKENS at a time: no fp32 copy of any
# weight (memory stays flat); longer ones dequantize PROMPT_CHUNK_WEIGHTS weights at a time and multiply.
BATCHED_PROMPT_TOKENS = 256
PROMPT_CHUNK_WEIGHTS = 1 << 20


def packed_operand(P: PackedMatrix):
    """The named tuple offload.cpu.matvec takes for P."""
    d, m, sc, mc, flags = kernel_scales(P)
    return PACKED_OPERANDS[P.bits](P.planes, d, m, sc, mc, flags, P.gmap, P.dmap, P.all_cols,
                                   np.float32(P.zero), P.rows)


class PackedLinear(CpuLinear):
    """A Linear whose weight is packed: one PackedMatrix [out, in], or several stacked by rows when they
    are stored in different formats (a fused q/k/v whose v is Q8_0 and q, k Q5_0); bias fp32 or None."""

    def __init__(self, packed: PackedMatrix | list[PackedMatrix], bias: torch.Tensor | None = None,
                 threads: int = 1, source: str = "gguf"):
        parts = list(packed) if isinstance(packed, (list, tuple)) else [packed]
        super().__init__(parts[0].cols, sum(P.rows for P in parts), bias, threads)
        self.parts, self.source = parts, source  # source: "gguf" (a file's blocks) or "int4" / "int8"
        ops = tuple(packed_operand(P) for P in parts)
        self.operand = ops[0] if len(ops) == 1 else ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // max(1, self.in_features)
        if tokens == 1 or x.device.type != "cpu" or x.dtype != torch.float32:
            return super().forward(x)  # one token: offload.cpu.matvec (CpuLinear); else its error
        x2 = np.ascontiguousarray(x.detach().reshape(-1, self.in_features).numpy())
        y = np.empty((x2.shape[0], self.out_features), np.float32)
        r0 = 0
        for P in self.parts:
            self._part_product(P, x2, y[:, r0:r0 + P.rows], tokens)
            r0 += P.rows
        if self._bias_np is not None:
            y += self._bias_np
        return torch.from_numpy(y).view(*x.shape[:-1], self.out_features)

    def _part_product(self, P: PackedMatrix, x2: np.ndarray, y: np.ndarray, tokens: int) -> None:
        if tokens <= BATCHED_PROMPT_TOKENS:  # each plane decoded once per FEW_TOKENS tokens
            op = packed_operand(P)
            out = np.empty((min(tokens, FEW_TOKENS), P.rows), np.float32)
            _, batch = KERNELS[0]
            parts = max(1, min(self.threads, op.planes.shape[0]))
            for t0 in range(0, tokens, FEW_TOKENS):
                xb = x2[t0:t0 + FEW_TOKENS]
                ob = out[:xb.shape[0]]
                batch(op.planes, op.d, op.m, op.sc, op.mc, op.flags, op.gmap, op.dmap, op.cols, op.zero, xb, ob,
                      parts)
                y[t0:t0 + xb.shape[0]] = ob
            return
        step = max(1, PROMPT_CHUNK_WEIGHTS // self.in_features)  # a prompt: dequantized row chunks
        xt = torch.from_numpy(x2)
        for r0 in range(0, P.rows, step):
            w = torch.from_numpy(dequantize_rows(P, np.arange(r0, min(P.rows, r0 + step))))
            y[:, r0:r0 + w.shape[0]] = F.linear(xt, w).numpy()

    def dense_weight(self) -> torch.Tensor:
        """fp32 [out, in] (a copy: dequantized)."""
        return torch.from_numpy(np.concatenate([dequantize_rows(P, np.arange(P.rows)) for P in self.parts]))

    @property
    def nbytes(self) -> int:
        return sum(P.nbytes for P in self.parts)

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{P.rows} rows {P.bits}-bit groups of {P.group}" for P in self.parts)
        return super().extra_repr() + f", packed: {kinds}"


class PackedEmbedding(nn.Module):
    """An embedding table kept packed: a lookup dequantizes the rows it needs (fp32 out)."""

    def __init__(self, packed: PackedMatrix):
        super().__init__()
        self.packed, self.vocab, self.d = packed, packed.rows, packed.cols

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize_rows(self.packed, ids.detach().reshape(-1).cpu().numpy())
        return torch.from_numpy(rows).view(*ids.shape, self.d)

    def dense_weight(self) -> torch.Tensor:
        return torch.from_numpy(dequantize_rows(self.packed, np.arange(self.vocab)))

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, d={self.d}, packed={self.packed.bits}-bit"


class FileEmbedding(nn.Module):
    """An untied token table left in its GGUF file: a lookup reads the rows it needs (a few hundred bytes
    each) and dequantizes them (fp32 out, gguf.quants' numbers). A decode step reads one row, so keeping
    the table resident would only cost memory: 94 MB for Qwen2.5-0.5B's Q5_0 table. (llama.cpp maps the
    file: the rows it never reads never become resident either.)"""

    def __init__(self, raw, vocab: int, d: int):
        super().__init__()
        self.raw, self.vocab, self.d = raw, vocab, d

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from gguf.quants import dequantize

        flat = ids.detach().reshape(-1).cpu().numpy()
        out = np.empty((flat.size, self.d), np.float32)
        for j, i in enumerate(flat):
            if not 0 <= i < self.vocab:
                raise IndexError(f"token id {int(i)} is outside the vocabulary of {self.vocab}")
            out[j] = dequantize(self.raw.data[int(i):int(i) + 1], self.raw.qtype).reshape(-1)
        return torch.from_numpy(out).view(*ids.shape, self.d)

    def dense_weight(self) -> torch.Tensor:
        from gguf.quants import dequantize

        rows = self.raw.data[0:self.vocab]
        return torch.from_numpy(np.ascontiguousarray(dequantize(rows, self.raw.qtype), dtype=np.float32))

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, d={self.d}, read from the file per lookup"
