"""Sparsity for a quantized gated FFN on the CPU: exact gate and up, the k neurons of largest |h|, and a
down projection that reads only those neurons' columns.

Why this design for packed (4–8-bit) weights: a low-bit shadow of gate and up, which the fp16/fp32 engine
uses to predict active neurons, costs as many bytes as gate and up themselves once they are 4-bit. Here
there is no predictor: gate and up are computed exactly from the packed bytes (so the selection is the
oracle's: the top-k of |silu(g)·u| per token), and down — whose columns are neurons in the packed
column-plane layout (offload.formats.packed) — reads k of its n columns. FFN bytes per token:
(2 + density)/3 of dense; quality: the oracle top-k's.

:class:`TopKDownFFN` is a module swap of a ``models.llama.GatedFFN`` with packed gate_up and down (in
place of the dense FFN, for CPU-only runs); one token is one numba call (norm, gate·up, activation,
top-k, sparse down, residual: :func:`topk_ffn_block`); prompts run the dense FFN. Reference:
offload.sparse's oracle selector with the same density (tests compare them).
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit

from offload.cpu.attention import rms_norm_row
from offload.cpu.ffn_block import gated_activation
from offload.cpu.matvec import matvec, matvec_cols
from offload.cpu.topk import topk_union
from offload.models.common import FFNModule
from offload.sparse import topk_count


@njit(nogil=True, fastmath=True, cache=True)
def topk_ffn_block(x, norm_w, eps, Wgu, Wd, n, kind, k, threads, out):
    """out = x + down[:, top] · h[top], h = act(gate·xn, up·xn), top = the k largest |h|, xn = rms_norm(x):
    the FFN half of a block for one token. Wgu, Wd: packed operands (offload.formats.quantized);
    ``norm_w`` empty: no norm and no residual (out = the FFN of x). Returns the neurons computed (k)."""
    d = x.shape[0]
    xn = np.empty(d, np.float32)
    if norm_w.shape[0]:
        rms_norm_row(x, norm_w, eps, xn)
    else:
        xn[:] = x
    gu = np.empty(2 * n, np.float32)
    matvec(Wgu, xn, gu, threads)
    h = np.empty(n, np.float32)
    score = np.empty((1, n), np.float32)
    for i in range(n):
        h[i] = gated_activation(gu[i], gu[n + i], kind)
        score[0, i] = abs(h[i])
    top = topk_union(score, k)
    y = np.empty(d, np.float32)
    matvec_cols(Wd, h, y, top, threads)
    if norm_w.shape[0]:
        for j in range(d):
            out[j] = x[j] + y[j]
    else:
        out[:] = y
    return top.shape[0]


class TopKDownFFN(FFNModule):
    """A GatedFFN (packed gate_up and down) computing, for one CPU token, only the ``density`` share of
    neurons with the largest |h| in its down projection (module docstring). ``selected`` counts them."""

    def __init__(self, mlp, density: float):
        super().__init__()
        from offload.formats.packed import PackedMatrix
        from offload.formats.quantized import PackedLinear

        if not (isinstance(mlp.gate_up, PackedLinear) and isinstance(mlp.down, PackedLinear)):
            raise TypeError("TopKDownFFN needs packed gate_up and down (offload.formats: a GGUF as stored, "
                            "int4 or int8)")
        if not all(isinstance(P, PackedMatrix) for P in mlp.gate_up.parts + mlp.down.parts):
            raise TypeError("TopKDownFFN reads column planes: build the model with activations='float32'")
        if mlp.gate_up.bias is not None or mlp.down.bias is not None or len(mlp.down.parts) != 1:
            raise TypeError("TopKDownFFN supports FFNs without biases whose down is one packed matrix")
        self.dense, self.kind, self.n = mlp, mlp.kind.check_kernels("TopKDownFFN (offload.cpu.topk_ffn)"), mlp.n
        self.density, self.k = float(density), topk_count(density, mlp.n)
        self.selected = self.tokens = 0
        self._none = np.zeros(0, np.float32)

    @property
    def down_bytes_per_neuron(self) -> float:
        return self.dense.down.nbytes / self.n

    def _one(self, x: torch.Tensor, norm_w: np.ndarray, eps: float) -> torch.Tensor:
        out = np.empty(x.shape[-1], np.float32)
        d = self.dense
        self.selected += topk_ffn_block(x.detach().numpy().reshape(-1), norm_w, eps, d.gate_up.operand,
                                        d.down.operand, self.n, self.kind.code, self.k, d.gate_up.threads, out)
        self.tokens += 1
        return torch.from_numpy(out).view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == x.shape[-1] and x.dtype == torch.float32 and x.device.type == "cpu":
            return self._one(x, self._none, 0.0)
        return self.dense(x)  # prompts: every neuron

    def residual(self, x: torch.Tensor, norm) -> torch.Tensor:
        if x.numel() == x.shape[-1] and x.dtype == torch.float32 and x.device.type == "cpu" \
                and norm.weight.dtype == torch.float32:
            return self._one(x, norm.weight.detach().numpy(), norm.eps)
        return super().residual(x, norm)

    def extra_repr(self) -> str:
        return f"kind={self.kind.value}, n={self.n}, density={self.density:.3f} (k={self.k})"


def apply_topk_down(model, density: float) -> list[TopKDownFFN]:
    """Swap every layer's packed GatedFFN for a TopKDownFFN at ``density`` (in place); returns them."""
    swapped = []
    for layer in model.layers:
        layer.mlp = TopKDownFFN(getattr(layer.mlp, "dense", layer.mlp), density)
        swapped.append(layer.mlp)
    return swapped
