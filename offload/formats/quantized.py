"""Quantized weights on the CPU: a quantized matrix behind the interface of a Linear, and a quantized
embedding table.

:class:`PackedLinear` replaces a ``models.common.Linear``. Its matrices are kept in one of two lossless
layouts of the same numbers, chosen by how the one-token product takes its input, ``activations``:

* "int8" (default): row quads (offload.formats.quads). One token is offload.cpu.intdot's GEMV: x
  quantized to int8 per group (llama.cpp's Q8 activations), exact integer dot products (AVX-512 / AVX
  VNNI, AVX2), one FMA per group: 1.3-4.5× the GEMV speed of "float32"; the result is off from fp32 x by at most
  x's rounding (offload.cpu.intdot states the bound; llama.cpp rounds x the same way). Several tokens
  go up to 4 per pass over the codes.
* "float32": column planes (offload.formats.packed). One token is offload.cpu.packed_gemv's GEMV: fp32 x,
  dequantized in registers, fp32 accumulation (exact to float32 rounding); several tokens decode each
  plane once for all of them. Matrices whose groups are not 16 or 32 columns stay in planes.

A prompt goes through the same kernels, TOKENS_PER_CALL tokens per call, with the same activations as
decode (as llama.cpp does). Dequantizing row chunks for a dense matmul instead ran SmolLM2 Q4_1's
128-token prompt 5× (int8) to 11× (float32) slower on 2 cores.
The operand (what offload.cpu.matvec reads) is a named tuple whose class names the layout and storage
kind (offload.cpu.intdot.QUAD_OPERANDS, :data:`PACKED_OPERANDS`), so the fused decode blocks compile the
right unpacking per matrix.

Where the bytes come from: a GGUF tensor as stored (:func:`packed_from_gguf`, lossless for Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), or a float weight quantized round-to-nearest in groups of 32
(:func:`offload.formats.packed.quantize`: ``weights="int4"`` / ``"int8"``).
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
import torch
from torch import nn

from offload.cpu.intdot import QuadGemv, quad_operand
from offload.cpu.packed_gemv import PackedGemv, kernel_scales
from offload.cpu.quad_rows import quad_rows_into
from offload.formats import packed, quads
from offload.formats.cpu import CpuLinear
from offload.formats.packed import PackedMatrix
from offload.formats.quads import QuadMatrix

# what offload.cpu.matvec and the fused blocks read: the kernel's arrays, the active columns (all of
# them), the zero point and the row count. One class per code width: the width picks the unpacking
# loop at compile time.
OPERAND_FIELDS = ("planes", "d", "m", "sc", "mc", "flags", "gmap", "dmap", "cols", "zero", "rows")
Packed4 = namedtuple("Packed4", OPERAND_FIELDS)
Packed5 = namedtuple("Packed5", OPERAND_FIELDS)
Packed6 = namedtuple("Packed6", OPERAND_FIELDS)
Packed8 = namedtuple("Packed8", OPERAND_FIELDS)
PACKED_OPERANDS = {4: Packed4, 5: Packed5, 6: Packed6, 8: Packed8}
TOKENS_PER_CALL = 64  # a prompt's tokens go through the batched kernels this many at a time
ACTIVATIONS = ("int8", "float32")  # how a one-token product takes x (module docstring); the first is the default


def packed_operand(P: PackedMatrix):
    """The named tuple offload.cpu.matvec takes for P."""
    d, m, sc, mc, flags = kernel_scales(P)
    return PACKED_OPERANDS[P.bits](P.planes, d, m, sc, mc, flags, P.gmap, P.dmap, P.all_cols,
                                   np.float32(P.zero), P.rows)


def check_activations(activations: str) -> str:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r}: expected one of {', '.join(ACTIVATIONS)}")
    return activations


def for_activations(M: PackedMatrix | QuadMatrix, activations: str) -> PackedMatrix | QuadMatrix:
    """M in the layout whose kernel takes x as ``activations`` (module docstring): row quads for "int8"
    when its groups allow, column planes for "float32" (a QuadMatrix is not converted back)."""
    if check_activations(activations) == "int8" and isinstance(M, PackedMatrix) and M.group in quads.GROUPS:
        return quads.to_quads(M)
    return M


def operand_of(M: PackedMatrix | QuadMatrix):
    return quad_operand(M) if isinstance(M, QuadMatrix) else packed_operand(M)


def row_codes(M: PackedMatrix | QuadMatrix, idx) -> packed.Codes:
    """The codes and scales of rows ``idx`` of a matrix in either layout, as per-row arrays
    (offload.formats.packed.row_codes' form)."""
    return (quads if isinstance(M, QuadMatrix) else packed).row_codes(M, np.asarray(idx, dtype=np.int64))


def dequantize_rows(M: PackedMatrix | QuadMatrix, idx) -> np.ndarray:
    """fp32 [len(idx), C]: rows ``idx`` of a matrix in either layout (bit for bit gguf's values). Row quads
    take one numba call (offload.cpu.quad_rows, equal to quads.dequantize_rows): a decode step's embedding
    lookup, run right after the blocks, cost ~0.5 ms in NumPy's many small operations."""
    if isinstance(M, QuadMatrix):
        return quad_rows_into(M, idx)
    return packed.dequantize_rows(M, idx)


class PackedLinear(CpuLinear):
    """A Linear whose weight is quantized: one matrix [out, in], or several stacked by rows when they are
    stored in different formats (a fused q/k/v whose v is Q8_0 and q, k Q5_0); bias fp32 or None.
    packed: PackedMatrix / QuadMatrix parts, held in the layout of ``activations`` (module docstring)."""

    def __init__(self, packed: PackedMatrix | QuadMatrix | list, bias: torch.Tensor | None = None,
                 threads: int = 1, source: str = "gguf", activations: str = ACTIVATIONS[0]):
        parts = [for_activations(P, activations) for P in (packed if isinstance(packed, (list, tuple)) else [packed])]
        super().__init__(parts[0].cols, sum(P.rows for P in parts), bias, threads)
        self.parts, self.source = parts, source  # source: "gguf" (a file's blocks) or "int4" / "int8"
        # many-token products: row quads take up to 4 tokens per pass over the codes; column planes decode
        # each plane once for every token of a call
        self._gemv = [QuadGemv(P) if isinstance(P, QuadMatrix) else PackedGemv(P) for P in parts]
        ops = tuple(operand_of(P) for P in parts)
        self.operand = ops[0] if len(ops) == 1 else ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // max(1, self.in_features)
        if tokens == 1 or x.device.type != "cpu" or x.dtype != torch.float32:
            return super().forward(x)  # one token: offload.cpu.matvec (CpuLinear); else its error
        x2 = np.ascontiguousarray(x.detach().reshape(-1, self.in_features).numpy())
        y = np.empty((x2.shape[0], self.out_features), np.float32)
        r0 = 0
        for P, K in zip(self.parts, self._gemv):
            # TOKENS_PER_CALL tokens a call: bounded temporaries, and a call's tokens stay in cache while
            # the codes stream
            for t0 in range(0, tokens, TOKENS_PER_CALL):
                y[t0:t0 + TOKENS_PER_CALL, r0:r0 + P.rows] = K(x2[t0:t0 + TOKENS_PER_CALL], threads=self.threads)
            r0 += P.rows
        if self._bias_np is not None:
            y += self._bias_np
        return torch.from_numpy(y).view(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """fp32 [out, in] (a copy: dequantized)."""
        return torch.from_numpy(np.concatenate([dequantize_rows(P, np.arange(P.rows)) for P in self.parts]))

    @property
    def nbytes(self) -> int:
        return sum(P.nbytes for P in self.parts)

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{P.rows} rows {P.bits}-bit groups of {P.group} "
                          f"({'row quads' if isinstance(P, QuadMatrix) else 'column planes'})" for P in self.parts)
        return super().extra_repr() + f", packed: {kinds}"


class PackedEmbedding(nn.Module):
    """An embedding table kept quantized: a lookup dequantizes the rows it needs (fp32 out). The table is
    held in the layout of ``activations``, so that a tied output head (PackedLinear of the same matrix)
    shares it."""

    def __init__(self, packed: PackedMatrix | QuadMatrix, activations: str = ACTIVATIONS[0]):
        super().__init__()
        packed = for_activations(packed, activations)
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
