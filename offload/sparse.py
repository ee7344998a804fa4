"""Sparse FFN on the dense engine: compute only the selected neurons of each FFN layer.

This is the reference semantics the hybrid GPU/CPU runtime reproduces, so the API is small:

- ``sparse_ffn_forward(mlp, x, idx)``: x [..., d], idx LongTensor [k] of neurons computed for every
  row of x: ``down[:, idx] @ act(gate[idx] @ x, up[idx] @ x)`` (+ down bias), by torch row gathers
  (rows idx and n + idx of the fused ``gate_up``, columns idx of ``down``; fc1 rows / fc2 columns
  for OPT). Decode is batch 1, so this is the decode path.
- ``masked_ffn_forward(mlp, x, mask)``: per-token selection, mask [..., n] bool: for each token the
  result equals ``sparse_ffn_forward`` with that token's own idx (computed densely, then masked;
  prefill and perplexity use it).
- A *selector* is any object with ``mask(x) → bool [..., n]`` (and ``select(x [d]) → idx``):
  per-layer predictors (:mod:`offload.predict`) and :class:`OracleSelector` (true activity).
- ``sparsify(model, predictors | "oracle", density=None)`` wraps each ``layers[i].mlp`` in a
  :class:`SparseFFN` (the original module is kept inside, nothing is copied); ``densify(model)``
  undoes it. A one-token input takes the gather path with ``select``; several tokens take the mask
  path. ``sparse_stats(model)`` gives the achieved density per layer since the last reset.

What "active" means (the oracle): ReLU, dReLU and OPT FFNs: the neuron's intermediate value is
non-zero (exact: skipping the others changes nothing; for ReLU-gated LLaMA ``relu(g)·u`` is
non-zero iff g > 0, for OPT and dReLU it is > 0). SwiGLU: |silu(g)·u| is among the top k of the
token's n values, k = round(density·n) (:func:`topk_count`). Top-k per token rather than a
per-layer threshold: the work (and bytes) per token is fixed — fixed buffers and kernel grids in
the runtime, a byte budget that holds on any text — whereas thresholds calibrated on one text drift
on another (+1.2 % density measured). A threshold did measure ~0.5 % better perplexity at equal
achieved density (benchmarks/predictors.py); that is the price paid for the guarantee.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from offload.errors import OffloadError
from offload.models.common import FFNModule
from offload.models.ffn_kind import FFNKind, activation as ffn_activation

EXACT_KINDS = tuple(k.value for k in FFNKind if k.exact_sparsity)  # inactive neurons contribute exactly 0
# Byte budgets (prepare's max_bytes) count the FFN at fp32, 4 bytes a weight, in every storage format: the
# predictor's bytes do not shrink with the rows', so against fp16 rows it would count double and force a
# lower density (worse perplexity) on the format that reads fewer bytes.
REFERENCE_ITEMSIZE = 4


class SparsityError(OffloadError, ValueError):
    """A density outside (0, 1], a missing density where one is needed, or predictors that do not fit."""


@dataclass(frozen=True)
class FFNWeights:
    """Views of one FFN's weights in neuron order (no copies). kind: swiglu | relu | drelu | relu_fc.

    gate, up [n, d] (gate is None for OPT's relu_fc, whose fc1 is ``up``), down [d, n]; biases or None.
    """

    kind: str
    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None

    @property
    def n(self) -> int:
        return self.up.shape[0]

    @property
    def d(self) -> int:
        return self.up.shape[1]

    @property
    def neuron_bytes(self) -> int:
        """Bytes of one neuron's weights (gate row, up row, down column; fc1 row and fc2 column for OPT)."""
        rows = 2 if self.gate is None else 3
        return rows * self.d * self.up.element_size()


def stored_weight(linear: nn.Module) -> torch.Tensor:
    """A linear module's weight [out, in] as a float tensor in its storage dtype (fp32, fp16, bf16), or
    dequantized to fp32 for formats that store something else (offload.formats)."""
    w = getattr(linear, "weight", None)
    return w if isinstance(w, torch.Tensor) else linear.dense_weight()


def ffn_weights(mlp: nn.Module) -> FFNWeights:
    """The FFN's weights for a GatedFFN (LLaMA family) or ReluFFN (OPT), or a SparseFFN wrapping one."""
    mlp = getattr(mlp, "dense", mlp)
    if mlp.kind == FFNKind.RELU_FC:
        return FFNWeights("relu_fc", None, stored_weight(mlp.fc1), stored_weight(mlp.fc2), None, mlp.fc1.bias,
                          mlp.fc2.bias)
    n = mlp.n
    b = mlp.gate_up.bias
    w = stored_weight(mlp.gate_up)
    return FFNWeights(FFNKind.of(mlp.kind).value, w[:n], w[n:], stored_weight(mlp.down),
                      None if b is None else b[:n], None if b is None else b[n:], mlp.down.bias)


def activation(kind: str, g: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """The per-neuron intermediate value from gate g and up u (u is fc1's output for relu_fc):
    models.ffn_kind.activation."""
    return ffn_activation(kind, g, u)


def check_density(density, layers: int | None = None) -> list[float] | float | None:
    """None, a float in (0, 1], or a per-layer sequence of them; SparsityError otherwise."""
    if density is None:
        return None
    if isinstance(density, (list, tuple)) or (isinstance(density, torch.Tensor) and density.ndim == 1):
        values = [float(v) for v in density]
        if layers is not None and len(values) != layers:
            raise SparsityError(f"density has {len(values)} per-layer values for a model with {layers} layers")
        for v in values:
            check_density(v)
        return values
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise SparsityError(f"density={density!r}: expected a number in (0, 1]") from None
    if not 0.0 < value <= 1.0:
        raise SparsityError(f"density={density}: expected a number in (0, 1] (the fraction of FFN neurons computed)")
    return value


def topk_count(density: float, n: int) -> int:
    """k = round(density·n), at least 1 and at most n."""
    return min(n, max(1, int(round(float(density) * n))))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool [..., n]: True at each row's k largest scores."""
    if k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    idx = scores.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def true_activity(mlp: nn.Module, x: torch.Tensor, density: float | None = None,
                  act: torch.Tensor | None = None) -> torch.Tensor:
    """The oracle: bool [..., n], which neurons are active for each token of x (module docstring).
    ``density`` is required for SwiGLU; for exact kinds it switches to top-k of |act| instead."""
    kind = ffn_weights(mlp).kind
    if act is None:
        act = getattr(mlp, "dense", mlp).intermediate(x)
    if density is None:
        if kind not in EXACT_KINDS:
            raise SparsityError(f"a {kind} FFN has no exact zeros: give a density in (0, 1] (top-k by |act|)")
        return act != 0
    return topk_mask(act.abs(), topk_count(check_density(density), act.shape[-1]))


def ffn_down(mlp: nn.Module, act: torch.Tensor) -> torch.Tensor:
    """down(act) (+ bias): the FFN's output from its intermediate values [..., n]."""
    mlp = getattr(mlp, "dense", mlp)
    return (mlp.down if mlp.kind != FFNKind.RELU_FC else mlp.fc2)(act)


def _matmul(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """F.linear with the weight (any storage dtype) taken to x's dtype."""
    return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


def sparse_ffn_forward(mlp: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The FFN output [..., d] computing only neurons ``idx`` (LongTensor [k]) for every row of x."""
    w = ffn_weights(mlp)
    idx = idx.reshape(-1).to(device=x.device, dtype=torch.long)
    if w.kind == "relu_fc":
        act = F.relu(_matmul(x, w.up.index_select(0, idx), w.up_bias.index_select(0, idx)))
        return _matmul(act, w.down.index_select(1, idx), w.down_bias)
    gb = None if w.gate_bias is None else w.gate_bias.index_select(0, idx)
    ub = None if w.up_bias is None else w.up_bias.index_select(0, idx)
    g = _matmul(x, w.gate.index_select(0, idx), gb)
    u = _matmul(x, w.up.index_select(0, idx), ub)
    return _matmul(activation(w.kind, g, u), w.down.index_select(1, idx), w.down_bias)


def masked_ffn_forward(mlp: nn.Module, x: torch.Tensor, mask: torch.Tensor,
                       act: torch.Tensor | None = None) -> torch.Tensor:
    """The FFN output [..., d] where token j computes only the neurons with mask[j] True."""
    mlp = getattr(mlp, "dense", mlp)
    if act is None:
        act = mlp.intermediate(x)
    return ffn_down(mlp, act * mask.to(act.dtype))


class OracleSelector:
    """Selects the truly active neurons (``true_activity``) — needs the FFN itself, so it is a
    reference for tests and evaluation, not a predictor."""

    def __init__(self, mlp: nn.Module, density: float | None = None):
        self.mlp = getattr(mlp, "dense", mlp)
        self.density = check_density(density)
        kind = ffn_weights(self.mlp).kind
        if self.density is None and kind not in EXACT_KINDS:
            raise SparsityError(f"a {kind} FFN has no exact zeros: the oracle needs a density in (0, 1] "
                                f"(top-k by |act|)")

    nbytes = 0

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return true_activity(self.mlp, x, self.density)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask(x.reshape(-1)).nonzero().reshape(-1)


class SparseFFN(FFNModule):
    """Wraps a layer's FFN (``dense``, kept unchanged) and computes only the neurons ``selector``
    picks: one token → ``select`` + row gathers; several → per-token ``mask``. Counts what it
    computed (``selected`` neurons over ``tokens``) for :func:`sparse_stats`."""

    def __init__(self, dense: nn.Module, selector, layer: int):
        super().__init__()
        self.dense = dense
        self.selector = selector
        self.layer = layer
        self.kind, self.n = dense.kind, dense.n
        self.selected = 0
        self.tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if tokens == 1:
            idx = self.selector.select(x.reshape(-1))
            y = sparse_ffn_forward(self.dense, x, idx)
            self.selected += int(idx.numel())
        else:
            if isinstance(self.selector, OracleSelector):  # reuse the intermediate values
                act = self.dense.intermediate(x)
                mask = true_activity(self.dense, x, self.selector.density, act=act)
                y = masked_ffn_forward(self.dense, x, mask, act=act)
            else:
                mask = self.selector.mask(x)
                y = masked_ffn_forward(self.dense, x, mask)
            self.selected += int(mask.sum())
        self.tokens += tokens
        return y

    def extra_repr(self) -> str:
        return f"layer={self.layer}, kind={self.kind}, n={self.n}, selector={type(self.selector).__name__}"


def model_net(model) -> nn.Module:
    """The nn.Module of an OffloadedModel, or the module itself."""
    net = getattr(model, "model", model)
    if not hasattr(net, "layers"):
        raise SparsityError(f"{type(model).__name__}: expected a model with .layers[i].mlp")
    return net


def sparsify(model, predictors="oracle", density=None) -> nn.Module:
    """Replace each ``layers[i].mlp`` by a SparseFFN; returns the (modified) nn.Module.

    ``predictors``: "oracle" (true activity; SwiGLU needs ``density``) or an object with
    ``selector(layer, density) → selector`` (a :class:`offload.predict.PredictorSet`).
    ``density``: None (the predictors' own operating point; exact sparsity for oracle on ReLU
    models), a float in (0, 1], or one per layer. Calling it again replaces the previous selectors.
    """
    net = model_net(model)
    layers = len(net.layers)
    density = check_density(density, layers)
    per_layer = density if isinstance(density, list) else [density] * layers
    if predictors is None:
        raise SparsityError("predictors=None: pass 'oracle' or a PredictorSet")
    if isinstance(predictors, str):
        if predictors != "oracle":
            raise SparsityError(f"predictors={predictors!r}: expected 'oracle' or a PredictorSet")
        selectors = [OracleSelector(layer.mlp, per_layer[i]) for i, layer in enumerate(net.layers)]
    else:
        if len(predictors) != layers:
            raise SparsityError(f"the predictors cover {len(predictors)} layers, the model has {layers}")
        selectors = [predictors.selector(i, per_layer[i]) for i in range(layers)]
    for i, layer in enumerate(net.layers):
        dense = getattr(layer.mlp, "dense", layer.mlp)
        layer.mlp = SparseFFN(dense, selectors[i], i)
    return net


def densify(model) -> nn.Module:
    """Undo :func:`sparsify`: put each layer's original FFN back."""
    net = model_net(model)
    for layer in net.layers:
        if isinstance(layer.mlp, SparseFFN):
            layer.mlp = layer.mlp.dense
    return net


def is_sparse(model) -> bool:
    return any(isinstance(layer.mlp, SparseFFN) for layer in model_net(model).layers)


def sparse_stats(model, reset: bool = False) -> dict:
    """{"density": neurons computed / (tokens·n) over all layers, "layers": per-layer densities,
    "tokens": tokens seen} since the last reset."""
    net = model_net(model)
    mods = [layer.mlp for layer in net.layers if isinstance(layer.mlp, SparseFFN)]
    per = [m.selected / max(1, m.tokens * m.n) for m in mods]
    total_sel = sum(m.selected for m in mods)
    total = sum(m.tokens * m.n for m in mods)
    out = {"density": total_sel / total if total else float("nan"), "layers": per,
           "tokens": mods[0].tokens if mods else 0}
    if reset:
        for m in mods:
            m.selected = m.tokens = 0
    return out


def ffn_dense_bytes(model, itemsize: int | None = None) -> list[int]:
    """Per layer: bytes of the FFN weights one dense token reads (weights only, biases left out), as
    stored, or at ``itemsize`` bytes a weight (REFERENCE_ITEMSIZE: the fp32 FFN that byte budgets
    are counted against, whatever the storage format)."""
    net = model_net(model)
    out = []
    for layer in net.layers:
        if itemsize is None:  # each weight module's own bytes: packed formats store less than a float a weight
            mlp = getattr(layer.mlp, "dense", layer.mlp)
            out.append(sum(getattr(mlp, name).nbytes for name in ("gate_up", "down", "fc1", "fc2")
                           if getattr(mlp, name, None) is not None))
            continue
        w = ffn_weights(layer.mlp)
        out.append(w.neuron_bytes // w.up.element_size() * itemsize * w.n)
    return out


def ffn_bytes_fraction(model, densities: Sequence[float], predictor_bytes: Sequence[int] | None = None,
                       itemsize: int | None = None) -> float:
    """FFN bytes touched per token as a fraction of dense: Σ_l (predictor_l + density_l·dense_l) / Σ_l dense_l,
    dense bytes as stored or at ``itemsize`` bytes a weight (see ffn_dense_bytes)."""
    dense = ffn_dense_bytes(model, itemsize)
    pred = list(predictor_bytes) if predictor_bytes is not None else [0] * len(dense)
    return sum(p + dn * b for p, dn, b in zip(pred, densities, dense)) / sum(dense)
