"""The prepared layouts of offload.cpu.shadow's low-bit kernels: int4 and int8 rows in blocks of 8 rows
per group of 32 columns (the vector code that reads them: offload.cpu.lowbit_ir), the per-block
biases, and the checks of the packed inputs (offload.predict.quant's formats)."""
from __future__ import annotations

import numpy as np

from offload.cpu.lowbit_ir import BLK, GROUP, I4_BYTES, I8_BYTES

__all__ = ["as_numpy", "block_biases", "check_int4", "pack_int4_blocks", "pack_int8_blocks", "pad_rows"]


def as_numpy(t, name: str) -> np.ndarray:
    """A NumPy view of a CPU torch tensor (zero-copy; bfloat16, which NumPy lacks, as float32) or
    np.asarray of anything else."""
    if hasattr(t, "detach") and hasattr(t, "numpy"):
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got {t.device}")
        t = t.detach()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def pad_rows(a: np.ndarray, rows: int, fill) -> np.ndarray:
    if a.shape[0] == rows:
        return a
    out = np.full((rows,) + a.shape[1:], fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


def pack_int4_blocks(packed: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The kernel layout of int4 rows: uint8 [rows/8, G, 144] (rows a multiple of 8).

    Block k, group g: bytes 32c + 4m + j (c < 4, m < 8 rows, j < 4) hold row 8k+m's column
    32g + 4c + j in the low nibble and column 32g + 16 + 4c + j in the high nibble (nibble = q + 8,
    as in the input); bytes 128..143 are the 8 rows' fp16 scales of group g."""
    rows, H = packed.shape
    G = scales.shape[1]
    nblk = rows // BLK
    q = np.empty((rows, 2 * H), np.uint8)
    q[:, 0::2] = packed & 15
    q[:, 1::2] = packed >> 4
    q = q.reshape(nblk, BLK, G, 2, 4, 4).transpose(0, 2, 4, 1, 5, 3)  # blk, g, c, m, j, half
    W = np.empty((nblk, G, I4_BYTES), np.uint8)
    W[:, :, :128] = (q[..., 0] | (q[..., 1] << 4)).reshape(nblk, G, 128)
    s = np.ascontiguousarray(scales.astype(np.float16, copy=False).reshape(nblk, BLK, G).transpose(0, 2, 1))
    W[:, :, 128:] = s.view(np.uint8).reshape(nblk, G, 16)
    return W


def pack_int8_blocks(q: np.ndarray, G: int) -> np.ndarray:
    """The kernel layout of int8 rows [rows, d] (rows a multiple of 8): int8 [rows/8, G, 256];
    block k, group g: bytes 16j + 2m + e = row 8k+m, column 32g + 2j + e (zero past d)."""
    rows, d = q.shape
    nblk = rows // BLK
    qp = np.zeros((rows, G * GROUP), np.int8)
    qp[:, :d] = q
    W = qp.reshape(nblk, BLK, G, GROUP // 2, 2).transpose(0, 2, 3, 1, 4)  # blk, g, j, m, e
    return np.ascontiguousarray(W).reshape(nblk, G, I8_BYTES)


def block_biases(n: int, n_pad: int, gate_bias, up_bias) -> np.ndarray:
    """float32 [n_pad/8, 16]: per block pair the 8 gate biases then the 8 up biases."""
    if (gate_bias is None) != (up_bias is None):
        raise ValueError("give both gate_bias and up_bias or neither")
    B = np.zeros((n_pad // BLK, 2, BLK), np.float32)
    if gate_bias is not None:
        for j, (name, v) in enumerate((("gate_bias", gate_bias), ("up_bias", up_bias))):
            v = as_numpy(v, name).astype(np.float32).reshape(-1)
            if v.shape != (n,):
                raise ValueError(f"{name} must have shape [n={n}], got {v.shape}")
            B[:, j] = pad_rows(v, n_pad, 0).reshape(-1, BLK)
    return B.reshape(-1, 2 * BLK)


def check_int4(name: str, packed: np.ndarray, scales: np.ndarray) -> tuple[int, int]:
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise TypeError(f"{name}: packed int4 must be uint8 [n, d_pad/2], got {packed.dtype} {packed.shape}")
    if scales.ndim != 2 or scales.shape[0] != packed.shape[0] or not np.issubdtype(scales.dtype, np.floating):
        raise ValueError(f"{name}: scales must be float [n={packed.shape[0]}, groups], got {scales.dtype} "
                         f"{scales.shape}")
    d_pad = 2 * packed.shape[1]
    G = scales.shape[1]
    if G == 0 or d_pad != G * GROUP:
        group = d_pad / G if G else float("nan")
        raise ValueError(f"{name}: the kernels need groups of {GROUP} columns, got {d_pad} columns in {G} groups "
                         f"(group {group:g})")
    return d_pad, G
