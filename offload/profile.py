"""The profiler: run calibration text through the dense model and count, per layer and neuron, how
often each FFN neuron is active (``offload.sparse.true_activity``: exact non-zeros for ReLU-family
FFNs, top round(density·n) of |silu(g)·u| per token for SwiGLU).

``profile_model(model, ids, density=None, window=256) → Profile`` runs ``ids`` in non-overlapping
windows (fresh context per window), counting as it goes: memory holds one window's activations,
never the whole text. ``Profile.save(path)`` writes ``profile.safetensors``:

- tensors ``layers.{i}.counts`` (int64 [n]: tokens where neuron i was active), ``layers.{i}.tokens``
  (int64 [1]), and for SwiGLU ``layers.{i}.threshold`` (float32 [1]: the mean over tokens of the k-th
  largest |act|, the per-layer threshold that top-k corresponds to on average);
- metadata (strings): ``format`` = "offload.profile", ``version``, ``model_identity``, ``kind``,
  ``density`` ("exact" for ReLU-family), ``window``, ``tokens``, ``source``, ``source_digest``.

``load_profile(path, identity)`` refuses a profile made for another model (ArtifactError naming both).
``capture_ffn_inputs(model, windows)`` returns every layer's FFN inputs (for predictor training).
Both work by swapping each ``layers[i].mlp`` for a :class:`Tap` around it for the duration.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from offload.corpus import windows as make_windows
from offload.errors import ArtifactError
from offload.models.common import FFNModule
from offload.sparse import EXACT_KINDS, model_net, check_density, ffn_down, ffn_weights, topk_count

FORMAT, VERSION = "offload.profile", "1"


class Tap(FFNModule):
    """Wraps a dense FFN; computes it unchanged and hands (layer, x, act) to ``hook`` on the way."""

    def __init__(self, dense: nn.Module, layer: int, hook: Callable[[int, torch.Tensor, torch.Tensor], None]):
        super().__init__()
        self.dense, self.layer, self.hook = dense, layer, hook
        self.kind, self.n = dense.kind, dense.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.dense.intermediate(x)
        self.hook(self.layer, x, act)
        return ffn_down(self.dense, act)


@contextmanager
def tapped(model, hook):
    """Within the block, every layer's FFN calls ``hook(layer, x, act)``; restored afterwards."""
    net = model_net(model)
    originals = [layer.mlp for layer in net.layers]
    try:
        for i, layer in enumerate(net.layers):
            layer.mlp = Tap(originals[i], i, hook)
        yield net
    finally:
        for layer, mlp in zip(net.layers, originals):
            layer.mlp = mlp


def _run_tapped(net, wins: torch.Tensor, hook, desc: str, progress: bool) -> None:
    """Run each window of ``wins`` [m, t] through ``net`` (fresh context per window) with every FFN
    calling ``hook(layer, x, act)``; a progress bar counts tokens."""
    from tqdm.auto import tqdm

    device = next(net.parameters()).device
    with tqdm(total=wins.numel(), desc=desc, unit="tok", disable=not progress, leave=False) as bar, \
            tapped(net, hook):
        for w in wins:
            net(w.unsqueeze(0).to(device), last_only=True)
            bar.update(w.numel())


@dataclass
class Profile:
    """Per-layer activation counts over ``tokens`` calibration tokens. ``density`` is None for exact
    (ReLU-family) activity, else the SwiGLU top-k density used."""

    identity: str
    kind: str
    counts: list[np.ndarray]
    tokens: list[int]
    density: float | None = None
    thresholds: list[float] | None = None
    window: int = 256
    source: str = ""
    source_digest: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def frequencies(self) -> list[np.ndarray]:
        """Per layer: activation frequency of each neuron, counts / tokens (float64 [n])."""
        return [c.astype(np.float64) / max(1, t) for c, t in zip(self.counts, self.tokens)]

    @property
    def layer_density(self) -> list[float]:
        """Per layer: mean fraction of neurons active per token."""
        return [float(c.sum()) / max(1, t * len(c)) for c, t in zip(self.counts, self.tokens)]

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.numpy import save_file

        tensors = {}
        for i, (c, t) in enumerate(zip(self.counts, self.tokens)):
            tensors[f"layers.{i}.counts"] = np.ascontiguousarray(c, dtype=np.int64)
            tensors[f"layers.{i}.tokens"] = np.array([t], dtype=np.int64)
            if self.thresholds is not None:
                tensors[f"layers.{i}.threshold"] = np.array([self.thresholds[i]], dtype=np.float32)
        meta = {"format": FORMAT, "version": VERSION, "model_identity": self.identity, "kind": self.kind,
                "density": "exact" if self.density is None else repr(float(self.density)),
                "window": str(self.window), "tokens": str(max(self.tokens) if self.tokens else 0),
                "source": self.source, "source_digest": self.source_digest}
        tmp = os.fspath(path) + ".tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)


def load_profile(path: str | os.PathLike, identity: str | None = None) -> Profile:
    """Read a profile.safetensors; ArtifactError if unreadable, not a profile, or made for another
    model than ``identity``."""
    from safetensors.numpy import load_file
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
    except Exception as e:
        raise ArtifactError(f"{path}: cannot read the profile ({e})") from None
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an offload profile (format {meta.get('format')!r}, expected {FORMAT!r})")
    made_for = meta.get("model_identity", "")
    if identity is not None and made_for != identity:
        raise ArtifactError(f"{path}: this profile was made for model {made_for!r}, not for this model "
                            f"({identity!r}); profile this model first (offload prepare)")
    layers = sum(1 for k in tensors if k.endswith(".counts"))
    try:
        counts = [tensors[f"layers.{i}.counts"] for i in range(layers)]
        tokens = [int(tensors[f"layers.{i}.tokens"].sum()) for i in range(layers)]
        thresholds = ([float(tensors[f"layers.{i}.threshold"][0]) for i in range(layers)]
                      if "layers.0.threshold" in tensors else None)
    except KeyError as e:
        raise ArtifactError(f"{path}: corrupt profile, missing tensor {e}") from None
    density = None if meta.get("density", "exact") == "exact" else float(meta["density"])
    return Profile(made_for, meta.get("kind", ""), counts, tokens, density, thresholds, int(meta.get("window", 0)),
                   meta.get("source", ""), meta.get("source_digest", ""))


def _ffn_kind(net) -> str:
    return ffn_weights(net.layers[0].mlp).kind


@torch.inference_mode()
def profile_model(model, ids: torch.Tensor, *, density: float | None = None, window: int = 256,
                  max_tokens: int | None = None, identity: str | None = None, source: str = "",
                  source_digest: str = "", progress: bool = True) -> Profile:
    """Count per-neuron activity over ``ids`` (1-D token ids, or windows [m, window]).

    ``density``: required for SwiGLU (top-k per token); must be None for ReLU-family models, whose
    activity is exact. ``identity`` defaults to the OffloadedModel's checkpoint identity.
    """
    net = model_net(model)
    identity = identity or getattr(getattr(model, "checkpoint", None), "identity", "") or ""
    kind = _ffn_kind(net)
    if kind in EXACT_KINDS:
        if density is not None:
            check_density(density)
    elif density is None:
        from offload.sparse import SparsityError

        raise SparsityError(f"profiling a {kind} model needs a density in (0, 1] (top-k by |act| per token)")
    density = check_density(density)
    wins = ids if ids.ndim == 2 else make_windows(ids, window, max_tokens)
    layers = len(net.layers)
    n = ffn_weights(net.layers[0].mlp).n
    counts = [torch.zeros(ffn_weights(layer.mlp).n, dtype=torch.int64) for layer in net.layers]
    thr_sum = [0.0] * layers
    seen = [0] * layers

    def hook(i, x, act):
        a = act.reshape(-1, act.shape[-1])
        if density is None:
            counts[i] += (a != 0).sum(0)
        else:
            k = topk_count(density, a.shape[-1])
            top = a.abs().topk(k, dim=-1, sorted=False)
            counts[i].scatter_add_(0, top.indices.reshape(-1), torch.ones(top.indices.numel(), dtype=torch.int64))
            thr_sum[i] += float(top.values.min(-1).values.sum())
        seen[i] += a.shape[0]

    _run_tapped(net, wins, hook, "profile: count activations", progress)
    thresholds = None if density is None else [s / max(1, t) for s, t in zip(thr_sum, seen)]
    return Profile(identity, kind, [c.numpy() for c in counts], seen, density, thresholds, int(wins.shape[1]),
                   source, source_digest, {"n": n})


@torch.inference_mode()
def capture_ffn_inputs(model, wins: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                       progress: bool = False) -> list[torch.Tensor]:
    """Every layer's FFN input (after the FFN norm) for the tokens of ``wins`` [m, t]: a list of
    [m·t, d] tensors in ``dtype`` (memory: layers × tokens × d × element size)."""
    net = model_net(model)
    chunks: list[list[torch.Tensor]] = [[] for _ in net.layers]

    def hook(i, x, act):
        chunks[i].append(x.reshape(-1, x.shape[-1]).to(dtype).cpu())

    _run_tapped(net, wins, hook, "capture FFN inputs", progress)
    return [torch.cat(c) for c in chunks]
