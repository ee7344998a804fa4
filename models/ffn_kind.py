"""The FFN kinds the engine knows, and the one reference for what each computes.

Neuron i of an FFN layer is row i of gate and up (fc1 for OPT) and column i of down (fc2). Every kernel
that computes a neuron's activation — numba on the CPU, Triton on the GPU, the torch paths — is tested
against :func:`activation` here, and takes the kind's integer :attr:`FFNKind.code`.

    kind      h_i (the value neuron i adds, times its down column)     models
    swiglu    silu(g_i)·u_i                                           LLaMA, Mistral, Qwen2, SmolLM
    relu      relu(g_i)·u_i                                           ReluLLaMA, ProSparse
    drelu     relu(g_i)·relu(u_i)                                     TurboSparse, Bamboo
    relu_fc   relu(f_i)   (f = fc1·x + b1, no up projection)          OPT
    geglu     gelu_tanh(g_i)·u_i   (GELU, tanh approximation)             Gemma 3

The numba and Triton kernels (fused CPU decode blocks, the cold FFN, the shadow predictors' scores, the
hybrid's hot rows) compute the first four kinds; geglu runs only through the torch paths (:func:`activation`:
dense models, on any device and in any CPU weight format). :meth:`FFNKind.check_kernels` refuses it, naming
the kind, where a kernel would otherwise branch on its code.
"""
from __future__ import annotations

import enum

import torch
import torch.nn.functional as F

from offload.errors import UnsupportedModelError


class FFNKind(str, enum.Enum):
    """A str enum: ``FFNKind.SWIGLU == "swiglu"``, so artifacts and configs keep plain strings."""

    SWIGLU = "swiglu"
    RELU = "relu"
    DRELU = "drelu"
    RELU_FC = "relu_fc"
    GEGLU = "geglu"

    @property
    def code(self) -> int:
        """The integer the numba and Triton kernels branch on (0..4, in declaration order)."""
        return _CODES[self]

    @property
    def gated(self) -> bool:
        """Whether the FFN has a gate and an up projection (everything but OPT's relu_fc)."""
        return self is not FFNKind.RELU_FC

    @property
    def exact_sparsity(self) -> bool:
        """Whether inactive neurons contribute exactly zero (ReLU family): a neuron's activity is then
        a fact of the token, not a choice of density."""
        return self in (FFNKind.RELU, FFNKind.DRELU, FFNKind.RELU_FC)

    @property
    def kernels(self) -> bool:
        """Whether the numba and Triton kernels compute this kind (module docstring)."""
        return self is not FFNKind.GEGLU

    def check_kernels(self, where: str) -> "FFNKind":
        """This kind if the kernels compute it; UnsupportedModelError naming it and ``where`` otherwise."""
        if not self.kernels:
            supported = ", ".join(k.value for k in FFNKind if k.kernels)
            raise UnsupportedModelError(
                f"FFN kind {self.value!r} is not supported by {where} (its kernels compute {supported}); "
                "such a model runs dense (no gpu_memory / offload())")
        return self

    @classmethod
    def of(cls, kind: "str | FFNKind") -> "FFNKind":
        """The FFNKind for a name; UnsupportedModelError naming the known ones otherwise."""
        try:
            return cls(kind)
        except ValueError:
            raise UnsupportedModelError(f"FFN kind {kind!r}; supported: {', '.join(k.value for k in cls)}") from None


_CODES = {kind: i for i, kind in enumerate(FFNKind)}

# HF config ``hidden_act`` → kind, for the gated (LLaMA-family) FFNs.
GATED_KIND_OF_HIDDEN_ACT = {"silu": FFNKind.SWIGLU, "swish": FFNKind.SWIGLU, "relu": FFNKind.RELU,
                            "drelu": FFNKind.DRELU}


def activation(kind: "str | FFNKind", g: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """h from gate g and up u (for relu_fc: g is None and u is fc1's output with its bias), elementwise.

    The reference every kernel is tested against; works in any float dtype (tests use float64)."""
    kind = FFNKind.of(kind)
    if kind is FFNKind.SWIGLU:
        return F.silu(g) * u
    if kind is FFNKind.RELU:
        return F.relu(g) * u
    if kind is FFNKind.DRELU:
        return F.relu(g) * F.relu(u)
    if kind is FFNKind.GEGLU:
        return F.gelu(g, approximate="tanh") * u
    return F.relu(u)


def reference_ffn(kind: "str | FFNKind", x: torch.Tensor, gate: torch.Tensor | None, up: torch.Tensor,
                  down: torch.Tensor, idx: torch.Tensor | None = None, fc1_bias: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Σ_{i ∈ idx} down[:, i]·h_i(x) in float64 (all neurons when idx is None), returned in x's dtype.

    x [..., d]; gate, up [n, d] (gate None and up = fc1 for relu_fc, with ``fc1_bias`` [n]); down [d, n].
    Only for tests: it gathers and copies the selected rows."""
    xd = x.double()
    sel = (lambda w: w.double()) if idx is None else (lambda w: w.double().index_select(0, idx.long()))
    f = xd @ sel(up).T
    if FFNKind.of(kind).gated:
        h = activation(kind, xd @ sel(gate).T, f)
    else:
        h = activation(kind, None, f + (fc1_bias.double() if idx is None else fc1_bias.double()[idx.long()]))
    d = down.double() if idx is None else down.double().index_select(1, idx.long())
    return (h @ d.T).to(x.dtype)
