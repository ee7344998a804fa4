"""Storage formats for CPU decode with fp32 activations: fp32 and fp16 weights.

A :class:`CpuLinear` replaces a :class:`offload.formats.linear.Linear` on the CPU. One token (x with one
row) is a numba GEMV over its :attr:`~CpuLinear.operand` (offload.cpu.matvec: the same call serves
the fused decode blocks), on ``threads`` threads; more tokens (a prompt) go through ``F.linear`` on
:meth:`~CpuLinear.dense_weight` (an fp32 copy made per call for 16-bit storage).

- :class:`Float32Linear`: the weight as stored, fp32. Equal to the torch Linear within float rounding
  (the GEMV sums in another order).
- :class:`Float16Linear`: fp16 weights widened to fp32 in registers (F16C), fp32 accumulation: half the
  bytes a token reads. Equal to a torch Linear holding the same fp16-rounded weights.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from offload.cpu.matvec import matvec_into
from offload.cpu.pool import start_pool
from offload.formats.arena import tensor_in_huge_pages


class CpuLinear(nn.Module):
    """Base of the CPU storage formats. Subclasses set ``self.operand`` (what offload.cpu.matvec reads)
    and implement :meth:`dense_weight` and :attr:`nbytes`. bias: fp32 [out] or None."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, threads: int):
        super().__init__()
        # the pool must exist before compiled code that may launch a parallel region runs (pool.py)
        self.in_features, self.out_features, self.threads = in_features, out_features, start_pool(threads)
        self.register_buffer("bias", None if bias is None else bias.detach().to("cpu", torch.float32).contiguous())
        self._bias_np = None if bias is None else self.bias.numpy()

    def set_bias(self, bias: torch.Tensor | None) -> None:
        """Replace the bias (fp32 [out] or None)."""
        self.bias = None if bias is None else bias.detach().to("cpu", torch.float32).contiguous()
        self._bias_np = None if bias is None else self.bias.numpy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32:
            raise TypeError(f"{type(self).__name__} computes fp32 activations on the CPU, got {x.dtype} on "
                            f"{x.device}")
        if x.numel() != self.in_features:  # a prompt or a batch: dense fp32 matmul
            return F.linear(x, self.dense_weight(), self.bias)
        y = np.empty(self.out_features, np.float32)
        matvec_into(self.operand, np.ascontiguousarray(x.detach().numpy().reshape(-1)), y, self.threads)
        if self._bias_np is not None:
            y += self._bias_np
        return torch.from_numpy(y).view(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"threads={self.threads}")


class Float32Linear(CpuLinear):
    """fp32 weights [out, in], numba GEMV for one token."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, threads: int = 1):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias, threads)
        # in huge pages (offload.formats.arena): measured on SmolLM2-shaped matrices, Intel Xeon VM, 2 threads,
        # fp32 3072×576 20.6 → 26.5 GB/s and fp16 576×1536 19.2 → 24.9 GB/s against 4 KB pages
        self.register_buffer("weight", tensor_in_huge_pages(weight, torch.float32))
        self.operand = self.weight.numpy()

    def dense_weight(self) -> torch.Tensor:
        return self.weight

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * 4


class Float16Linear(CpuLinear):
    """fp16 weights [out, in] (rounded from the given weight), widened to fp32 in the kernel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, threads: int = 1):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias, threads)
        self.register_buffer("weight", tensor_in_huge_pages(weight, torch.float16))  # as Float32Linear
        self.operand = self.weight.numpy().view(np.uint16)

    def dense_weight(self) -> torch.Tensor:
        return self.weight.float()

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * 2
