"""Packed 4-bit hot rows for the GPU kernels (offload/kernels/*_q4.py): torch tensors, row-major per neuron.

The CPU's packed matrices (offload.formats.packed) keep column planes in row tiles for numba's GEMV; a
sparse GPU kernel gathers whole neurons instead, so here every hot neuron is one row of nibbles. GGUF
quantizes along a matrix's input dimension, which decides what a lossless copy of a neuron must hold:

* gate / up / fc1 (:class:`Q4Rows`): neuron i is row i of [n, d], its groups of 32 run along d, so each
  row carries its own scales. P matrices of h rows (gate and up: P = 2; OPT's fc1: P = 1)::

      codes  uint8 [P, h, d/2]   byte c = q[2c] | q[2c+1] << 4 (columns 2c and 2c+1 of the row)
      d      fp16  [P, h, G/sub] G = d/32 groups; one d per ``sub`` groups (1, or 8 for Q4_K)
      m      fp16  [P, h, G/sub] affine layouts, else [P, h, 0]
      sc, mc int8  [P, h, G]     the K types' per-group multipliers, else [P, h, 0]

* down / fc2 (:class:`Q4Down`): neuron i is column i of [d, n] and its groups of 32 run along n, across
  neurons: the 32 neurons of a group share one scale per output row r. The codes are stored neuron-major
  and the scales stay a per-layer table over all groups of the layer (what a lossless copy needs)::

      codes  uint8 [h, d/2]      q[i, r] for output rows r, two per byte as above
      group  int32 [h]           each hot neuron's group (global neuron id // 32)
      d      fp16  [G/sub, d]    G = n/32; S of (group, output row)
      m      fp16  [G/sub, d]    affine layouts, else [0, d]
      sc, mc int8  [G, d]        K types, else [0, d]

Dequantization (both): S = d[g // sub] (· sc[g]), M = m[g // sub] (· mc[g]) for the affine layouts,
w = S·q + M, else w = S·(q − zero); fp32, in gguf.quants' order, so :func:`dequantize_rows` and
:func:`dequantize_down` equal offload.formats.packed.dequantize of the source bit for bit.

Layouts (:data:`LAYOUTS`) and bytes per hot neuron at model width d (gate + up rows, down codes + its
group id; the down table is charged once per layer that holds a hot neuron, n·d·t bytes):

    layout  source                       gate/up row  down column   table t   vs fp16 (6·d)
    q4_0    GGUF Q4_0 (symmetric, zero 8)  0.5625·d     0.5·d + 4     1/16      3.7× fewer
    q4_1    GGUF Q4_1, and "int4" (RTN)    0.625·d      0.5·d + 4     1/8       3.4×
    q4_k    GGUF Q4_K (d, dmin per 256)    0.578·d      0.5·d + 4     5/64      3.6×

"int4" names what :func:`quantize_rows` / :func:`quantize_down` make from float weights (round to
nearest, fp16 scale and min per group of 32, offload.formats.packed.quantize): the q4_1 layout. The
K types' fp32 S = d·sc is kept two-level (fp16 d, int8 sc), since fp32 S and M would cost 0.75·d a row.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from offload.formats.packed import CHUNK_WEIGHTS, PackedMatrix, quantize
from offload.formats.quads import QuadMatrix
from offload.formats.quantized import row_codes

GROUP = 32  # columns per scale along the quantized dimension (every 4-bit GGUF type)
GROUP_ID_BYTES = 4  # Q4Down.group: one int32 per hot neuron


@dataclass(frozen=True)
class Q4Layout:
    """How a 4-bit matrix stores its scales (see the module docstring)."""
    name: str
    sub: int           # groups per fp16 d (and m) entry
    zero: int          # 8: symmetric, w = S·(q − 8), no m; 0: affine, w = S·q + M
    multipliers: bool  # int8 sc (and mc) per group: S = d·sc, M = m·mc

    @property
    def has_m(self) -> bool:
        return self.zero == 0

    def _scale_bytes(self, groups: int) -> int:
        """Bytes of the scales of ``groups`` groups along one row (or one output row of a down table)."""
        per_d = 2 * (2 if self.has_m else 1)
        per_group = (2 if self.has_m else 1) if self.multipliers else 0
        return groups // self.sub * per_d + groups * per_group

    def check_width(self, cols: int, what: str) -> None:
        unit = GROUP * self.sub
        if cols <= 0 or cols % unit:
            raise ValueError(f"{what}: the {self.name} layout needs a multiple of {unit} columns, got {cols}")

    def row_bytes(self, cols: int) -> int:
        """Bytes of one packed row of ``cols`` columns (codes and scales)."""
        self.check_width(cols, "row_bytes")
        return cols // 2 + self._scale_bytes(cols // GROUP)

    def down_neuron_bytes(self, d: int) -> int:
        """Bytes of one hot neuron's down column: d/2 bytes of codes and its int32 group id."""
        return d // 2 + GROUP_ID_BYTES

    def table_bytes(self, n: int, d: int) -> int:
        """Bytes of a layer's down scale table: n neurons (groups of 32 along n), d output rows."""
        self.check_width(n, "table_bytes")
        return self._scale_bytes(n // GROUP) * d


LAYOUTS = {"q4_0": Q4Layout("q4_0", 1, 8, False), "q4_1": Q4Layout("q4_1", 1, 0, False),
           "q4_k": Q4Layout("q4_k", 8, 0, True)}
INT4 = "q4_1"  # the layout of round-to-nearest int4 (offload.formats.packed.quantize, bits=4)
HOT_FORMATS = ("int4", *LAYOUTS)  # what a memory plan accepts for packed hot rows


def hot_layout(name: str) -> Q4Layout:
    """The layout of a hot-format name: "int4" (round to nearest: q4_1), "q4_0", "q4_1" or "q4_k"."""
    if name not in HOT_FORMATS:
        raise ValueError(f"packed hot format {name!r}: expected one of {', '.join(HOT_FORMATS)}")
    return LAYOUTS[INT4 if name == "int4" else name]


def layout_from(sub: int, zero: int, multipliers: bool) -> Q4Layout:
    """The layout of a kernel's (sub, zero, multipliers) arguments: one of LAYOUTS, or another combination
    the kernels compute alike (named "custom")."""
    for layout in LAYOUTS.values():
        if (layout.sub, layout.zero, layout.multipliers) == (sub, zero, multipliers):
            return layout
    return Q4Layout("custom", sub, zero, multipliers)


def layout_of(P: PackedMatrix | QuadMatrix) -> Q4Layout | None:
    """The layout of a packed matrix whose rows the GPU format can hold losslessly (4-bit codes, groups of
    32 consecutive columns, one d per ``sub`` consecutive groups), else None (5-, 6- and 8-bit types, or a
    matrix whose columns were taken apart by take_cols)."""
    groups = len(P.dmap)
    if P.bits != 4 or P.group != GROUP or P.cols != groups * GROUP or P.d.shape[1] == 0:
        return None
    sub = groups // P.d.shape[1]
    if (sub * P.d.shape[1] != groups or not np.array_equal(P.gmap, np.arange(P.cols) // GROUP)
            or not np.array_equal(P.dmap, np.arange(groups) // sub)):
        return None
    for layout in LAYOUTS.values():
        if (layout.sub, layout.zero, layout.multipliers, layout.has_m) == (
                sub, P.zero, P.sc.shape[1] > 0, P.m.shape[1] > 0):
            return layout
    return None


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Codes [..., C] (0..15) → bytes [..., C/2]: byte c = q[2c] | q[2c+1] << 4."""
    return np.ascontiguousarray((q[..., 0::2] & 15) | ((q[..., 1::2] & 15) << 4), dtype=np.uint8)


def unpack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Bytes [..., H] → codes [..., 2H] uint8 (inverse of pack_nibbles)."""
    return torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)


def _expand(v: torch.Tensor, times: int) -> torch.Tensor:
    return v.repeat_interleave(times, dim=-1) if times > 1 else v


def _affine(layout: Q4Layout, q: torch.Tensor, S: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
    """w = S·q + M, or S·(q − zero): two fp32 roundings at most, as gguf.quants and the kernels round."""
    q = q.float()
    return S * (q - float(layout.zero)) if M is None else S * q + M


class _Tensors:
    """What Q4Rows and Q4Down share: their TENSORS' bytes, and a copy on another device."""
    TENSORS: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).numel() * getattr(self, k).element_size() for k in self.TENSORS)

    def to(self, device):
        return replace(self, **{k: getattr(self, k).to(device) for k in self.TENSORS})


# --------------------------------------------------------------------------------------------------
# gate / up rows
# --------------------------------------------------------------------------------------------------
@dataclass
class Q4Rows(_Tensors):
    """P matrices of h packed rows each (module docstring); tensors on one device."""
    layout: Q4Layout
    codes: torch.Tensor  # uint8 [P, h, cols/2]
    d: torch.Tensor      # float16 [P, h, G/sub]
    m: torch.Tensor      # float16 [P, h, G/sub] or [P, h, 0]
    sc: torch.Tensor     # int8 [P, h, G] or [P, h, 0]
    mc: torch.Tensor     # int8 [P, h, G] or [P, h, 0]
    TENSORS = ("codes", "d", "m", "sc", "mc")

    @property
    def cols(self) -> int:
        return 2 * self.codes.shape[-1]

    @property
    def rows(self) -> int:
        return self.codes.shape[1]

    def select(self, rows: torch.Tensor) -> "Q4Rows":
        """The rows ``rows`` (int64, on the tensors' device) of every matrix."""
        return replace(self, **{k: getattr(self, k).index_select(1, rows) for k in self.TENSORS})


def dequantize_rows(rows: Q4Rows) -> torch.Tensor:
    """fp32 [P, h, cols] on the rows' device: the reference of the gather-GEMV kernel."""
    L = rows.layout
    S = _expand(rows.d.float(), L.sub)
    if L.multipliers:
        S = S * rows.sc.float()
    M = None
    if L.has_m:
        M = _expand(rows.m.float(), L.sub)
        if L.multipliers:
            M = M * rows.mc.float()
        M = _expand(M, GROUP)
    return _affine(L, unpack_nibbles(rows.codes), _expand(S, GROUP), M)


def rows_from_packed(matrices: Sequence[PackedMatrix | QuadMatrix], rows: Sequence) -> Q4Rows:
    """Rows ``rows[p]`` of ``matrices[p]`` (p = 0..P-1, as many rows each), losslessly: dequantize_rows of
    the result equals offload.formats.packed.dequantize_rows(matrices[p], rows[p]) bit for bit. The
    matrices must share one 4-bit layout (ValueError otherwise: quantize the float weights instead)."""
    layouts = {layout_of(P) for P in matrices}
    if None in layouts or len(layouts) != 1 or len({P.cols for P in matrices}) != 1:
        raise ValueError("rows_from_packed: the matrices must share one 4-bit layout (GGUF Q4_0, Q4_1, Q4_K or "
                         f"int4) and their width; got {[(P.bits, P.cols) for P in matrices]}")
    layout = layouts.pop()
    idx = [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]
    if len({len(r) for r in idx}) != 1:
        raise ValueError(f"rows_from_packed: every matrix needs as many rows, got {[len(r) for r in idx]}")
    codes = [row_codes(P, r) for P, r in zip(matrices, idx)]
    h, groups = len(idx[0]), matrices[0].cols // GROUP

    def stacked(name, dtype, width):
        vals = [getattr(c, name) for c in codes]
        if vals[0] is None:
            return torch.zeros((len(codes), h, 0), dtype=dtype)
        return torch.from_numpy(np.stack([np.ascontiguousarray(v).reshape(h, width) for v in vals]))
    return Q4Rows(layout, torch.from_numpy(np.stack([pack_nibbles(c.q) for c in codes])),
                  stacked("d", torch.float16, groups // layout.sub), stacked("m", torch.float16, groups // layout.sub),
                  stacked("sc", torch.int8, groups), stacked("mc", torch.int8, groups))


def quantize_rows(weights: Sequence) -> Q4Rows:
    """Round-to-nearest int4 rows (the q4_1 layout) of float matrices [h, cols] (one per projection)."""
    mats = [quantize(np.asarray(w, dtype=np.float32), bits=4) for w in weights]
    return rows_from_packed(mats, [np.arange(P.rows) for P in mats])


# --------------------------------------------------------------------------------------------------
# down columns, neuron-major
# --------------------------------------------------------------------------------------------------
@dataclass
class Q4Down(_Tensors):
    """The down columns of h hot neurons, neuron-major, with the layer's scale table (module docstring)."""
    layout: Q4Layout
    codes: torch.Tensor  # uint8 [h, d/2]
    group: torch.Tensor  # int32 [h]
    d: torch.Tensor      # float16 [G/sub, d]
    m: torch.Tensor      # float16 [G/sub or 0, d]
    sc: torch.Tensor     # int8 [G or 0, d]
    mc: torch.Tensor     # int8 [G or 0, d]
    TENSORS = ("codes", "group", "d", "m", "sc", "mc")

    @property
    def out_features(self) -> int:
        return 2 * self.codes.shape[-1]

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def table_nbytes(self) -> int:
        """The layer's scale table (shared by every hot neuron)."""
        return self.nbytes - sum(t.numel() * t.element_size() for t in (self.codes, self.group))

    def select(self, rows: torch.Tensor) -> "Q4Down":
        """The neurons at positions ``rows`` (int64); the table is shared, not copied."""
        return replace(self, codes=self.codes.index_select(0, rows), group=self.group.index_select(0, rows))


def dequantize_down(down: Q4Down) -> torch.Tensor:
    """fp32 [h, d]: row j = hot neuron j's down column (the reference of the sparse-down kernel)."""
    L = down.layout
    g = down.group.long()
    S = down.d.float().index_select(0, g // L.sub)
    if L.multipliers:
        S = S * down.sc.float().index_select(0, g)
    M = None
    if L.has_m:
        M = down.m.float().index_select(0, g // L.sub)
        if L.multipliers:
            M = M * down.mc.float().index_select(0, g)
    return _affine(L, unpack_nibbles(down.codes), S, M)


def down_from_packed(P: PackedMatrix | QuadMatrix, neurons) -> Q4Down:
    """The down columns ``neurons`` of a packed down matrix P [d outputs, n neurons], losslessly:
    dequantize_down equals offload.formats.packed.dequantize(P)[:, neurons].T bit for bit. The scale
    table keeps every group of the layer. ValueError unless P has a 4-bit layout and even d."""
    layout = layout_of(P)
    if layout is None:
        raise ValueError(f"down_from_packed: a {P.bits}-bit matrix is not in a 4-bit layout (GGUF Q4_0, Q4_1, "
                         "Q4_K or int4); quantize its float weights instead")
    if P.rows % 2:
        raise ValueError(f"down_from_packed: the down matrix needs an even number of output rows, got {P.rows}")
    neurons = np.asarray(neurons, dtype=np.int64).reshape(-1)
    if len(neurons) and (neurons.min() < 0 or neurons.max() >= P.cols):
        raise IndexError(f"down_from_packed: neurons must lie in 0..{P.cols - 1}")
    groups, d_out = P.cols // GROUP, P.rows
    q = np.empty((len(neurons), d_out), np.uint8)
    table = {"d": np.empty((groups // layout.sub, d_out), np.float16),
             "m": np.empty((groups // layout.sub if layout.has_m else 0, d_out), np.float16),
             "sc": np.empty((groups if layout.multipliers else 0, d_out), np.int8),
             "mc": np.empty((groups if layout.multipliers and layout.has_m else 0, d_out), np.int8)}
    step = max(1, CHUNK_WEIGHTS // max(P.cols, 1))  # output rows per chunk: bounded temporaries
    for r0 in range(0, d_out, step):
        r1 = min(d_out, r0 + step)
        c = row_codes(P, np.arange(r0, r1))
        q[:, r0:r1] = c.q[:, neurons].T
        for name, t in table.items():
            if t.shape[0]:
                t[:, r0:r1] = getattr(c, name).T
    return Q4Down(layout, torch.from_numpy(pack_nibbles(q)), torch.from_numpy((neurons // GROUP).astype(np.int32)),
                  *(torch.from_numpy(np.ascontiguousarray(table[k])) for k in ("d", "m", "sc", "mc")))


def quantize_down(weight, neurons) -> Q4Down:
    """Round-to-nearest int4 (q4_1 layout) of a float down matrix [d, n], groups of 32 neurons per output
    row, then its columns ``neurons`` (the table covers every group, as down_from_packed's)."""
    return down_from_packed(quantize(np.asarray(weight, dtype=np.float32), bits=4), neurons)


__all__ = ["GROUP", "HOT_FORMATS", "INT4", "LAYOUTS", "Q4Down", "Q4Layout", "Q4Rows", "dequantize_down",
           "dequantize_rows", "down_from_packed", "hot_layout", "layout_from", "layout_of", "pack_nibbles",
           "quantize_down", "quantize_rows", "rows_from_packed", "unpack_nibbles"]
