"""Per-layer activity predictors: from the FFN input x, which neurons to compute for this token.

- :class:`ShadowPredictor` (SwiGLU; the default there): int4 (groups of 32) or int8 copies of the
  gate and up rows; score |silu(g̃)·ũ|, compute the top round(density·n).
- :class:`LowRankPredictor` (ReLU / dReLU / OPT; the default there): PowerInfer/Deja Vu
  ``fc2·relu(fc1·x)`` trained with class-weighted BCE, per-layer hidden size and threshold.
- :class:`PredictorSet`: one per layer + the model identity; ``save(path)`` / ``load(path, identity)``
  (``predictor.safetensors``; another model's file raises ArtifactError).
- :func:`build_predictors` builds or trains them; :func:`layer_report` gives recall, predicted
  density and true density per layer on held-out FFN inputs.

Use with :func:`offload.sparse.sparsify(model, predictor_set)`.
"""
from offload.predict.base import LayerPredictor, PredictorSet, Selector, recall_density
from offload.predict.build import build_predictors, default_method, layer_report
from offload.predict.lowrank import LowRankPredictor, train_lowrank
from offload.predict.shadow import ShadowPredictor

__all__ = ["LayerPredictor", "LowRankPredictor", "PredictorSet", "Selector", "ShadowPredictor", "build_predictors",
           "default_method", "layer_report", "load_predictors", "recall_density", "train_lowrank"]


def load_predictors(path, identity: str | None = None) -> PredictorSet:
    """``PredictorSet.load``: ArtifactError if the file belongs to another model."""
    return PredictorSet.load(path, identity)
