"""Build or train one predictor per layer, and report recall / predicted density / true density.

``build_predictors(model, calibration_windows, validation_windows, method="auto")``:
- "shadow" (default for SwiGLU): quantize each layer's gate and up rows (int4 groups of 32, or int8);
  nothing to train. Its density (top-k per token) is the operating point, chosen by perplexity in
  :func:`offload.prepare.prepare`.
- "lowrank" (default for ReLU / dReLU / OPT): capture FFN inputs, train ``fc2·relu(fc1·x)`` per layer
  (:func:`offload.predict.lowrank.train_lowrank`), hidden size and threshold chosen on validation
  tokens for recall ≥ ``recall_target`` at the fewest FFN bytes.

``layer_report(predictors, model, xs_val)`` → per layer {recall, predicted_density, true_density,
precision, predictor_bytes} on held-out FFN inputs; "true" is the oracle of ``offload.sparse``
(exact non-zeros, or top-k |act| at the layer's density for SwiGLU).
"""
from __future__ import annotations

import time

import torch

from offload.predict.base import PredictorSet, recall_density
from offload.predict.lowrank import train_lowrank
from offload.predict.shadow import ShadowPredictor
from offload.sparse import EXACT_KINDS, SparsityError, model_net, check_density, ffn_weights, true_activity


def default_method(model) -> str:
    kind = ffn_weights(model_net(model).layers[0].mlp).kind
    return "lowrank" if kind in EXACT_KINDS else "shadow"


def _layer_density(pred, density):
    if density is not None:
        return density
    return getattr(pred, "density", None)


@torch.inference_mode()
def layer_report(predictors: PredictorSet, model, xs_val: list[torch.Tensor], density=None) -> list[dict]:
    """Per layer: recall, predicted density, true density, precision on FFN inputs xs_val[i] [T, d]."""
    net = model_net(model)
    density = check_density(density, len(net.layers))
    per = density if isinstance(density, list) else [density] * len(net.layers)
    rows = []
    for i, layer in enumerate(net.layers):
        pred = predictors[i]
        dens = _layer_density(pred, per[i])
        x = xs_val[i].float()
        mlp = getattr(layer.mlp, "dense", layer.mlp)
        kind = ffn_weights(mlp).kind
        true = true_activity(mlp, x, None if (kind in EXACT_KINDS and per[i] is None) else dens)
        sel = predictors.selector(i, per[i]).mask(x)
        rows.append({"layer": i, **recall_density(sel, true), "predictor_bytes": pred.nbytes})
    return rows


def build_predictors(model, calibration: torch.Tensor | None = None, validation: torch.Tensor | None = None, *,
                     identity: str = "", method: str = "auto", bits: int = 4, group: int = 32, density: float = 0.5,
                     recall_target: float = 0.99, ranks: list[int] | None = None, epochs: int = 8,
                     max_train_tokens: int = 8192, progress: bool = True,
                     xs_train: list[torch.Tensor] | None = None,
                     xs_val: list[torch.Tensor] | None = None) -> PredictorSet:
    """One predictor per layer (module docstring). ``calibration`` / ``validation``: token windows
    [m, t] (the low-rank trainer captures FFN inputs from them; or pass ``xs_train`` / ``xs_val``).
    The build report is in ``.info["build"]`` (and per-layer figures in ``.info["layers"]`` for
    trained predictors)."""
    from tqdm.auto import tqdm

    net = model_net(model)
    identity = identity or getattr(getattr(model, "checkpoint", None), "identity", "") or ""
    method = default_method(net) if method == "auto" else method
    kind = ffn_weights(net.layers[0].mlp).kind
    t0 = time.perf_counter()
    if method == "shadow":
        if kind == "relu_fc":
            raise SparsityError("the shadow predictor needs gated FFNs (gate and up rows); OPT: use method='lowrank'")
        if bits not in (4, 8):
            raise SparsityError(f"bits={bits}: the shadow predictor supports 4 (groups of {group}) or 8 (per row)")
        density = check_density(density)
        layers = [ShadowPredictor.from_ffn(layer.mlp, bits=bits, group=group, density=density)
                  for layer in tqdm(net.layers, desc=f"predictors: quantize to int{bits}, layer", disable=not progress, leave=False)]
        info = {"build": {"method": "shadow", "bits": bits, "group": group if bits == 4 else None,
                          "seconds": time.perf_counter() - t0}}
        return PredictorSet(identity, layers, info)
    if method != "lowrank":
        raise SparsityError(f"method={method!r}: expected auto, shadow or lowrank")
    if kind not in EXACT_KINDS:
        raise SparsityError(f"the low-rank predictor is trained on exact activity (ReLU-family FFNs); this model's "
                            f"FFN is {kind}: use method='shadow' (low-rank predictors fail on SwiGLU: benchmarks/predictors.py)")
    from offload.profile import capture_ffn_inputs

    if xs_train is None:
        if calibration is None:
            raise SparsityError("training low-rank predictors needs calibration windows (or xs_train)")
        per_window = calibration.shape[1]
        calibration = calibration[: max(1, max_train_tokens // per_window)]
        xs_train = capture_ffn_inputs(net, calibration, progress=progress)
    if xs_val is None:
        if validation is None:
            raise SparsityError("training low-rank predictors needs validation windows (or xs_val)")
        xs_val = capture_ffn_inputs(net, validation, progress=progress)
    layers, rows = [], []
    for i, layer in enumerate(tqdm(net.layers, desc="predictors: train low-rank, layer", disable=not progress, leave=False)):
        pred, rep = train_lowrank(layer.mlp, xs_train[i], xs_val[i], recall_target=recall_target, ranks=ranks,
                                  epochs=epochs)
        layers.append(pred)
        rows.append({"layer": i, **rep})
    info = {"build": {"method": "lowrank", "recall_target": recall_target, "epochs": epochs,
                      "train_tokens": int(xs_train[0].shape[0]), "val_tokens": int(xs_val[0].shape[0]),
                      "seconds": time.perf_counter() - t0},
            "layers": [{k: v for k, v in r.items() if k != "candidates"} for r in rows],
            "candidates": [r["candidates"] for r in rows]}
    return PredictorSet(identity, layers, info)
