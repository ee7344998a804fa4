"""Quantized-shadow predictor for SwiGLU FFNs (and any gated FFN).

A low-bit copy of the layer's gate and up rows gives approximate g̃ = Q(W_gate)·x and
ũ = Q(W_up)·x; the score of neuron i is |act(g̃_i, ũ_i)| (|silu(g̃)·ũ| for SwiGLU), and the
top round(density·n) scores are computed exactly. benchmarks/predictors.py measured
that SmolLM2's gate/up are far from low rank (SVD and low-rank-MLP predictors fail), while int8/int4
shadows track the oracle.

Bytes per token: int4 (groups of 32, fp16 scales): 2·n·(d/2 + 2·d/32) = 1.125·n·d bytes, i.e.
1.125/12 ≈ 0.094 of an fp32 gate+up+down FFN; int8 (per-row fp16 scales): 2·n·(d + 2) ≈ 0.167.

The reference scoring here dequantizes in torch (cached as fp32 after the first call; a fast
low-bit GEMV that reads the packed bytes once is the runtime's job).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from offload.predict.base import LayerPredictor
from offload.predict.quant import dequantize, quantize
from offload.sparse import activation, ffn_weights, topk_count, topk_mask


class ShadowPredictor(LayerPredictor):
    method = "shadow"

    def __init__(self, kind: str, n: int, d: int, bits: int, group: int, q_gate: torch.Tensor, s_gate: torch.Tensor,
                 q_up: torch.Tensor, s_up: torch.Tensor, gate_bias: torch.Tensor | None = None,
                 up_bias: torch.Tensor | None = None, density: float = 0.5):
        if kind == "relu_fc":
            raise ValueError("the shadow predictor needs a gated FFN (gate and up); OPT uses the low-rank predictor")
        self.kind, self.n, self.d, self.bits, self.group = kind, n, d, bits, group
        self.q_gate, self.s_gate, self.q_up, self.s_up = q_gate, s_gate, q_up, s_up
        self.gate_bias, self.up_bias = gate_bias, up_bias
        self.density = float(density)
        self._w: torch.Tensor | None = None  # dequantized [2n, d] fp32, built on first use

    @classmethod
    def from_ffn(cls, mlp: nn.Module, bits: int = 4, group: int = 32, density: float = 0.5) -> "ShadowPredictor":
        w = ffn_weights(mlp)
        if w.gate is None:
            raise ValueError("the shadow predictor needs a gated FFN (gate and up); OPT uses the low-rank predictor")
        g, u = quantize(w.gate, bits, group), quantize(w.up, bits, group)
        cast = (lambda b: None if b is None else b.detach().float().clone())
        return cls(w.kind, w.n, w.d, bits, group, g["q"], g["scales"], u["q"], u["scales"],
                   cast(w.gate_bias), cast(w.up_bias), density)

    def dequantized(self) -> torch.Tensor:
        """[2n, d] fp32: gate rows then up rows of the shadow (cached)."""
        if self._w is None:
            self._w = torch.cat((dequantize(self.q_gate, self.s_gate, self.bits, self.d),
                                 dequantize(self.q_up, self.s_up, self.bits, self.d)))
        return self._w

    def clear_cache(self) -> None:
        self._w = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized()
        bias = None if self.gate_bias is None else torch.cat((self.gate_bias, self.up_bias))
        g, u = F.linear(x.float(), w, bias).split(self.n, dim=-1)
        return activation(self.kind, g, u).abs()

    def default_mask(self, x: torch.Tensor) -> torch.Tensor:
        return topk_mask(self.scores(x), topk_count(self.density, self.n))

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {"q_gate": self.q_gate, "s_gate": self.s_gate, "q_up": self.q_up, "s_up": self.s_up}
        if self.gate_bias is not None:
            t.update(gate_bias=self.gate_bias, up_bias=self.up_bias)
        return t

    def config(self) -> dict:
        return {"kind": self.kind, "n": self.n, "d": self.d, "bits": self.bits, "group": self.group,
                "density": self.density}

    @classmethod
    def from_saved(cls, c: dict, t: dict[str, torch.Tensor]) -> "ShadowPredictor":
        return cls(c["kind"], int(c["n"]), int(c["d"]), int(c["bits"]), int(c["group"]), t["q_gate"], t["s_gate"],
                   t["q_up"], t["s_up"], t.get("gate_bias"), t.get("up_bias"), float(c["density"]))
