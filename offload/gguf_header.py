"""A GGUF file's header: its metadata values and where each tensor's bytes are, read without the
``gguf`` package's reader.

Why not ``gguf.GGUFReader``: it turns every element of every metadata array into numpy objects, and a
tokenizer's 150k tokens and merges make ~0.5 GB of them (measured on Qwen2.5-Coder-0.5B: 491 MiB of
resident memory for a 491 MB file, before any weight is read). Here arrays of strings are skipped (the
tokenizer is converted by transformers, once, and cached), short numeric arrays are kept, and the rest
of the file is never touched: tensors are read later, one range of rows at a time.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key-value count;
the key-values (u64-length string key, u32 type, value; arrays: u32 element type, u64 count, elements);
the tensor infos (name, u32 dims, u64 sizes innermost first, u32 ggml type, u64 offset into the data);
the data starts at the next multiple of ``general.alignment`` (32 by default).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES

# value types: the struct format of each fixed-size one; 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
KEEP_ARRAY = 64  # numeric arrays up to this many elements are kept (per-layer head counts and the like)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: HF-order shape (rows first), its ggml type, and its bytes' place."""

    name: str
    type: GGMLQuantizationType
    shape: tuple[int, ...]
    data_offset: int  # from the start of the file
    n_bytes: int


class _Cursor:
    def __init__(self, f):
        self.f = f

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise ValueError("truncated GGUF header")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        return self.f.read(self.take("<Q")).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.f.seek(self.take("<Q"), 1)

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype != 9:
            raise ValueError(f"unknown GGUF value type {vtype}")
        etype, count = self.take("<I"), self.take("<Q")
        if etype == 8:  # strings (a vocabulary, merges): skipped, counted
            for _ in range(count):
                self.skip_string()
            return None
        if etype == 9:
            raise ValueError("nested GGUF arrays are not supported")
        size = struct.calcsize(_SCALARS[etype])
        if count > KEEP_ARRAY:
            self.f.seek(size * count, 1)
            return None
        return [self.value(etype) for _ in range(count)]


def read_gguf_header(path: str) -> tuple[dict, list[TensorInfo]]:
    """(metadata: key → value, with string arrays and long numeric arrays as None; tensors in file order)."""
    with open(path, "rb") as f:
        c = _Cursor(f)
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        version = c.take("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        fields = {}
        for _ in range(n_kv):
            key = c.string()
            fields[key] = c.value(c.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.take("<Q") for _ in range(c.take("<I"))]
            qtype = GGMLQuantizationType(c.take("<I"))
            infos.append((name, dims, qtype, c.take("<Q")))
        align = int(fields.get("general.alignment") or 32)
        start = -(-f.tell() // align) * align
    tensors = []
    for name, dims, qtype, offset in infos:
        block, size = GGML_QUANT_SIZES[qtype]
        elements = 1
        for d in dims:
            elements *= d
        tensors.append(TensorInfo(name, qtype, tuple(int(d) for d in reversed(dims)), start + offset,
                                  elements // block * size))
    return fields, tensors
