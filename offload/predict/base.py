"""The per-layer predictor interface, the set of them for one model, and its safetensors file.

A layer predictor reads the FFN input x (after the FFN norm) and scores the n neurons; a
*selector* (``PredictorSet.selector(i, density)``) turns scores into the neurons to compute:
``mask(x [..., d]) → bool [..., n]`` per token, ``select(x [d]) → LongTensor idx`` for one token.

File ``predictor.safetensors``: tensors ``layers.{i}.{name}``; metadata (strings):
``format`` = "offload.predictor", ``version``, ``model_identity``, ``method``, ``layers`` (JSON list
of per-layer configs), ``info`` (JSON: operating point, build report). ``PredictorSet.load(path,
identity)`` refuses a file made for another model (ArtifactError naming both identities).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from offload.errors import ArtifactError
from offload.sparse import check_density

FORMAT, VERSION = "offload.predictor", "1"


class LayerPredictor:
    """Base class. Subclasses define ``scores``, ``default_mask`` (their own operating point),
    ``tensors()``, ``config()``, ``from_saved(config, tensors)`` and set ``n``, ``d``."""

    method = "base"
    n: int
    d: int

    def scores(self, x: torch.Tensor) -> torch.Tensor:  # [..., d] → [..., n], higher = more likely active
        raise NotImplementedError

    def default_mask(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mask(self, x: torch.Tensor, density: float | None = None) -> torch.Tensor:
        """bool [..., n]: the predictor's own operating point, or the top round(density·n) scores."""
        if density is None:
            return self.default_mask(x)
        from offload.sparse import topk_count, topk_mask

        return topk_mask(self.scores(x), topk_count(density, self.n))

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes read per token: every stored tensor once."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class Selector:
    """A layer predictor bound to a density (None: its own operating point)."""

    def __init__(self, predictor: LayerPredictor, density: float | None = None):
        self.predictor, self.density = predictor, check_density(density)

    @property
    def nbytes(self) -> int:
        return self.predictor.nbytes

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor.mask(x, self.density)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Sorted neuron indices for one token x [d]."""
        return self.mask(x.reshape(1, -1))[0].nonzero().reshape(-1)


def recall_density(pred: torch.Tensor, true: torch.Tensor) -> dict:
    """Deja Vu's figures for bool masks [T, n]: recall (true actives selected / true actives),
    predicted density (selected / T·n), true density (active / T·n), precision."""
    pred, true = pred.reshape(-1, pred.shape[-1]), true.reshape(-1, true.shape[-1])
    hit = (pred & true).sum().item()
    n_true, n_pred, total = true.sum().item(), pred.sum().item(), true.numel()
    return {"recall": hit / n_true if n_true else 1.0, "predicted_density": n_pred / total,
            "true_density": n_true / total, "precision": hit / n_pred if n_pred else 1.0}


def _registry():
    from offload.predict.lowrank import LowRankPredictor
    from offload.predict.shadow import ShadowPredictor

    return {cls.method: cls for cls in (ShadowPredictor, LowRankPredictor)}


@dataclass
class PredictorSet:
    """One predictor per layer for the model ``identity``; ``info`` holds the operating point and
    the build report (JSON-able)."""

    identity: str
    layers: list[LayerPredictor]
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerPredictor:
        return self.layers[i]

    @property
    def method(self) -> str:
        methods = sorted({p.method for p in self.layers})
        return methods[0] if len(methods) == 1 else "+".join(methods)

    def selector(self, layer: int, density: float | None = None) -> Selector:
        return Selector(self.layers[layer], density)

    @property
    def layer_bytes(self) -> list[int]:
        return [p.nbytes for p in self.layers]

    @property
    def nbytes(self) -> int:
        return sum(self.layer_bytes)

    def save(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        tensors = {f"layers.{i}.{k}": v.detach().cpu().contiguous()
                   for i, p in enumerate(self.layers) for k, v in p.tensors().items()}
        meta = {"format": FORMAT, "version": VERSION, "model_identity": self.identity, "method": self.method,
                "layers": json.dumps([{"method": p.method, **p.config()} for p in self.layers]),
                "info": json.dumps(self.info, default=float)}
        tmp = os.fspath(path) + ".tmp"
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, identity: str | None = None) -> "PredictorSet":
        """Read a predictor.safetensors; ArtifactError if unreadable, not a predictor file, or made
        for another model than ``identity``."""
        from safetensors import safe_open

        path = os.fspath(path)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # missing file, not safetensors
            raise ArtifactError(f"{path}: cannot read the predictor file ({e})") from None
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{path}: not an offload predictor file (format {meta.get('format')!r}, "
                                f"expected {FORMAT!r})")
        made_for = meta.get("model_identity", "")
        if identity is not None and made_for != identity:
            raise ArtifactError(f"{path}: these predictors were made for model {made_for!r}, not for this model "
                                f"({identity!r}); run `offload prepare` for this model")
        try:
            configs = json.loads(meta["layers"])
            info = json.loads(meta.get("info", "{}"))
            registry = _registry()
            layers = []
            for i, c in enumerate(configs):
                prefix = f"layers.{i}."
                own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                layers.append(registry[c["method"]].from_saved(c, own))
        except (KeyError, ValueError, TypeError) as e:
            raise ArtifactError(f"{path}: corrupt predictor file ({type(e).__name__}: {e})") from None
        return cls(made_for, layers, info)
