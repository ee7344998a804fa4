"""``prepare``: profile + predictors + operating point for a model, cached per model identity.

``prepare(om, text=None)`` builds, and caches under ``model_cache_dir(identity)``:
``profile.safetensors``, ``predictor.safetensors`` and ``operating_point.json``. The operating
point of a shadow predictor is its density: the lowest whose perplexity on *validation* text (never
the evaluation text) is within ``max_ppl_ratio − margin`` of dense, under the FFN-bytes budget
``max_bytes``; when no density meets both, the densest one within the bytes budget, flagged
``targets_met: false``. Low-rank predictors (ReLU family) get their operating point from training
(threshold for the recall target at the fewest bytes).

CLI glue: ``add_prepare_arguments`` / ``run_prepare`` (``offload prepare``).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch

from offload.errors import ArtifactError
from offload.evaluate import (MIN_CALIBRATION_TOKENS, MIN_VALIDATION_TOKENS, _err, _kind, _load, _model_arg,
                              format_layers, perplexity)
from offload.sparse import SparsityError, _net, densify, ffn_bytes_fraction, ffn_dense_bytes, ffn_weights, sparsify

PROFILE_FILE, PREDICTOR_FILE, OPERATING_POINT_FILE = "profile.safetensors", "predictor.safetensors", "operating_point.json"
OP_FORMAT = "offload.operating_point"


# ---------------------------------------------------------------------------- operating point
def choose_density(model, predictors, wins: torch.Tensor, *, max_ppl_ratio: float = 1.05, margin: float = 0.01,
                   max_bytes: float = 0.65, step: float = 0.025, steps: int = 3, progress: bool = False,
                   log=None) -> dict:
    """The density (global, top-k per token) of shadow predictors: the lowest whose perplexity on
    ``wins`` is ≤ (max_ppl_ratio − margin)·dense with FFN bytes ≤ max_bytes.

    Starts at d_max (the bytes budget: max_bytes − predictor bytes) and steps down by ``step`` at
    most ``steps`` times while the target holds (on SwiGLU the feasible range sits just under
    d_max, so a downward walk spends fewer perplexity passes than a bisection over (0, d_max]).
    If d_max itself misses the perplexity target it is taken anyway (the best perplexity the
    budget allows) with ``targets_met`` False."""
    net = _net(model)
    dense_bytes = ffn_dense_bytes(net)
    pred_frac = sum(predictors.layer_bytes) / sum(dense_bytes)
    n = ffn_weights(net.layers[0].mlp).n
    d_max = min(1.0, math.floor((max_bytes - pred_frac) * n) / n)
    if d_max <= 0:
        raise SparsityError(f"the predictors alone read {pred_frac:.3f} of the dense FFN bytes, over the "
                            f"budget max_bytes={max_bytes}")
    target = max_ppl_ratio - margin
    dense = perplexity(net, wins, progress=progress, desc="dense")["ppl"]
    tried: list[dict] = []

    def ratio_at(dens: float) -> float:
        try:
            sparsify(net, predictors, density=dens)
            ppl = perplexity(net, wins, progress=progress, desc=f"d={dens:.3f}")["ppl"]
        finally:
            densify(net)
        row = {"density": dens, "ppl_ratio": ppl / dense, "bytes_fraction": pred_frac + dens}
        tried.append(row)
        if log:
            log(f"  density {dens:.3f}: validation perplexity x{ppl / dense:.4f}, FFN bytes {pred_frac + dens:.3f}")
        return ppl / dense

    best = d_max
    if ratio_at(d_max) <= target:
        for j in range(1, steps + 1):
            dens = round((d_max - j * step) * n) / n
            if dens <= 0 or ratio_at(dens) > target:
                break
            best = dens
    chosen = next(r for r in tried if r["density"] == best)
    return {"density": best, "validation_ppl_ratio": chosen["ppl_ratio"], "bytes_fraction": chosen["bytes_fraction"],
            "predictor_bytes_fraction": pred_frac, "targets_met": chosen["ppl_ratio"] <= max_ppl_ratio
            and chosen["bytes_fraction"] <= max_bytes + 1e-9, "max_ppl_ratio": max_ppl_ratio, "margin": margin,
            "max_bytes": max_bytes, "validation_dense_ppl": dense, "validation_tokens": int(wins.numel()),
            "tried": sorted(tried, key=lambda r: r["density"])}


# ---------------------------------------------------------------------------- prepare
@dataclass
class Prepared:
    """What ``prepare`` built or found: paths, the operating point (JSON dict), predictors, profile."""

    directory: str
    operating_point: dict
    predictors: object
    profile: object
    reused: bool

    @property
    def paths(self) -> dict:
        return {k: os.path.join(self.directory, f) for k, f in
                (("profile", PROFILE_FILE), ("predictor", PREDICTOR_FILE), ("operating_point", OPERATING_POINT_FILE))}


def load_operating_point(directory: str, identity: str) -> dict:
    path = os.path.join(directory, OPERATING_POINT_FILE)
    try:
        with open(path) as f:
            op = json.load(f)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: not found; run `offload prepare` for this model first") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: invalid JSON ({e})") from None
    if op.get("format") != OP_FORMAT:
        raise ArtifactError(f"{path}: not an offload operating point (format {op.get('format')!r})")
    if op.get("model_identity") != identity:
        raise ArtifactError(f"{path}: this operating point was made for model {op.get('model_identity')!r}, not for "
                            f"this model ({identity!r})")
    return op


def load_prepared(directory: str, identity: str) -> Prepared:
    """The cached artifacts of ``prepare``; ArtifactError if missing or for another model."""
    from offload.predict import PredictorSet
    from offload.profile import load_profile

    op = load_operating_point(directory, identity)
    preds = PredictorSet.load(os.path.join(directory, PREDICTOR_FILE), identity)
    prof = load_profile(os.path.join(directory, PROFILE_FILE), identity)
    return Prepared(directory, op, preds, prof, reused=True)


def prepare_from_tokens(model, calibration: torch.Tensor, validation: torch.Tensor, *, identity: str,
                        directory: str | None = None, method: str = "auto", bits: int = 4,
                        max_ppl_ratio: float = 1.05, margin: float = 0.01, max_bytes: float = 0.65,
                        recall_target: float = 0.99, window: int = 256, profile_tokens: int = 16384,
                        tune_tokens: int = 2048, train_tokens: int = 8192, report_tokens: int = 512,
                        epochs: int = 8, ranks: list[int] | None = None, source: str = "", source_digest: str = "", progress: bool = True, log=None) -> Prepared:
    """prepare() on token ids: calibration (profile, training) and validation (operating point,
    recall) 1-D ids, disjoint from any evaluation text. Writes the artifacts into ``directory``
    when given."""
    from offload.corpus import require_tokens, windows
    from offload.predict import build_predictors, layer_report
    from offload.profile import capture_ffn_inputs, profile_model

    log = log or (lambda *a: None)
    net = _net(model)
    densify(net)
    t_start = time.perf_counter()
    require_tokens(calibration, max(MIN_CALIBRATION_TOKENS, window), "the calibration text")
    require_tokens(validation, max(MIN_VALIDATION_TOKENS, window), "the validation text")
    cal_wins = windows(calibration, window)
    val_wins = windows(validation, window)
    kind = _kind(net)
    from offload.predict import default_method

    method = default_method(net) if method == "auto" else method
    timings = {}
    t = time.perf_counter()
    log(f"predictors: {method} ({kind} FFN, {len(net.layers)} layers)")
    preds = build_predictors(net, cal_wins, val_wins[: max(1, tune_tokens // window)], identity=identity,
                             method=method, bits=bits, recall_target=recall_target, epochs=epochs, ranks=ranks,
                             max_train_tokens=train_tokens, progress=progress)
    timings["predictors_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tune = val_wins[: max(1, tune_tokens // window)]
    if method == "shadow":
        log(f"operating point: perplexity on {tune.numel()} validation tokens, target x{max_ppl_ratio} "
            f"(margin {margin}), FFN bytes <= {max_bytes}")
        op = choose_density(net, preds, tune, max_ppl_ratio=max_ppl_ratio, margin=margin, max_bytes=max_bytes,
                            progress=progress, log=log)
        for p in preds.layers:
            p.density = op["density"]
        profile_density = op["density"]
    else:
        op = {"density": None, "max_ppl_ratio": max_ppl_ratio, "max_bytes": max_bytes}
        profile_density = None
    timings["operating_point_s"] = time.perf_counter() - t
    # per-layer recall / predicted / true density on held-out validation tokens
    t = time.perf_counter()
    report_wins = val_wins[-max(1, report_tokens // window):]
    xs_val = capture_ffn_inputs(net, report_wins)
    rows = layer_report(preds, net, xs_val)
    del xs_val
    pred_density = [r["predicted_density"] for r in rows]
    op["bytes_fraction"] = ffn_bytes_fraction(net, pred_density, preds.layer_bytes)
    op["predicted_density"] = sum(pred_density) / len(pred_density)
    op["true_density"] = sum(r["true_density"] for r in rows) / len(rows)
    op["recall"] = sum(r["recall"] for r in rows) / len(rows)
    if method != "shadow":
        op["targets_met"] = op["bytes_fraction"] <= max_bytes
        sparsify(net, preds)
        try:
            ppl = perplexity(net, tune, progress=progress, desc="predicted")["ppl"]
        finally:
            densify(net)
        op["validation_ppl_ratio"] = ppl / perplexity(net, tune, progress=progress, desc="dense")["ppl"]
    timings["report_s"] = time.perf_counter() - t
    t = time.perf_counter()
    log(f"profile: {min(cal_wins.numel(), profile_tokens)} calibration tokens"
        + (f" at density {profile_density:.3f}" if profile_density is not None else " (exact activity)"))
    prof = profile_model(net, cal_wins[: max(1, profile_tokens // window)], density=profile_density,
                         identity=identity, source=source, source_digest=source_digest, progress=progress)
    timings["profile_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    preds.info.update(operating_point={k: v for k, v in op.items() if k != "tried"}, layers=rows)
    settings = {"method": method, "bits": bits, "max_ppl_ratio": max_ppl_ratio, "margin": margin,
                "max_bytes": max_bytes, "recall_target": recall_target, "window": window,
                "profile_tokens": profile_tokens, "tune_tokens": tune_tokens}
    op_json = {"format": OP_FORMAT, "version": 1, "model_identity": identity, "method": preds.method,
               "ffn_kind": kind, **op, "settings": settings, "source": source, "source_digest": source_digest,
               "profile_tokens": int(sum(prof.tokens) // max(1, len(prof.tokens))), "timings": timings,
               "layers": rows}
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        preds.save(os.path.join(directory, PREDICTOR_FILE))
        prof.save(os.path.join(directory, PROFILE_FILE))
        tmp = os.path.join(directory, OPERATING_POINT_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(op_json, f, indent=1, default=float)
        os.replace(tmp, os.path.join(directory, OPERATING_POINT_FILE))
    return Prepared(directory or "", op_json, preds, prof, reused=False)


def prepare(om, text: str | os.PathLike | None = None, *, rebuild: bool = False, progress: bool = True,
            log=None, **kw) -> Prepared:
    """Profile + predictors + operating point for an OffloadedModel, cached in its
    ``model_cache_dir``; reused when present and made from the same text, rebuilt with ``rebuild``.
    ``text``: a text file (None: pydoc_data.topics); its evaluation part is never used here."""
    from offload.cache import model_cache_dir
    from offload.corpus import load_corpus, tokenize

    identity = om.checkpoint.identity
    directory = model_cache_dir(identity)
    corpus = load_corpus(text)
    if not rebuild and all(os.path.isfile(os.path.join(directory, f))
                           for f in (PROFILE_FILE, PREDICTOR_FILE, OPERATING_POINT_FILE)):
        found = load_prepared(directory, identity)
        made_with = found.operating_point.get("settings", {})
        changed = sorted(k for k, v in kw.items() if k in made_with and made_with[k] != v)
        if found.operating_point.get("source_digest") == corpus.digest and not changed:
            return found
        if log:
            why = (f"other settings ({', '.join(changed)})" if changed else
                   f"another text ({found.operating_point.get('source')!r})")
            log(f"cached artifacts in {directory} were made with {why}; rebuilding")
    cal = tokenize(om.tokenizer, corpus.calibration)
    val = tokenize(om.tokenizer, corpus.validation)
    return prepare_from_tokens(om.model, cal, val, identity=identity, directory=directory, source=corpus.source,
                               source_digest=corpus.digest, progress=progress, log=log, **kw)


# ---------------------------------------------------------------------------- CLI glue
def add_prepare_arguments(p, model_arg: bool = True) -> None:
    """``offload prepare [MODEL] [--rebuild] [--text FILE]`` options."""
    if model_arg:
        _model_arg(p)
    p.add_argument("--text", default=None, help="calibration text file (default: Python's pydoc_data.topics); "
                   "a held-out part of it is kept for `offload eval`")
    p.add_argument("--rebuild", action="store_true", help="rebuild even if cached artifacts exist")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="shadow predictor bits (SwiGLU; default 4)")
    p.add_argument("--max-ppl-ratio", type=float, default=1.05, help="perplexity target vs dense (default 1.05)")
    p.add_argument("--max-bytes", type=float, default=0.65,
                   help="FFN bytes per token budget, fraction of dense, predictor included (default 0.65)")
    p.add_argument("--recall-target", type=float, default=0.99, help="low-rank predictors (ReLU): recall target")
    p.add_argument("--profile-tokens", type=int, default=16384, help="calibration tokens to profile (default 16384)")
    p.add_argument("--tune-tokens", type=int, default=2048,
                   help="validation tokens for the operating-point search (default 2048)")
    p.add_argument("--json", action="store_true", help="print the operating point as JSON")


def run_prepare(args) -> int:
    """``offload prepare``: build or reuse the cached artifacts; prints paths, operating point, per-layer table."""
    from offload.corpus import load_corpus

    t0 = time.perf_counter()
    load_corpus(args.text)  # a missing or empty text file fails before the model loads
    om = _load(args)
    t_load = time.perf_counter() - t0
    log = (lambda m: _err(m)) if not args.json else (lambda m: None)
    prep = prepare(om, args.text, rebuild=args.rebuild, bits=args.bits, max_ppl_ratio=args.max_ppl_ratio,
                   max_bytes=args.max_bytes, recall_target=args.recall_target, profile_tokens=args.profile_tokens,
                   tune_tokens=args.tune_tokens, progress=not args.json, log=log)
    op = dict(prep.operating_point)
    op.update(reused=prep.reused, paths=prep.paths, load_s=t_load, wall_s=time.perf_counter() - t0)
    if args.json:
        print(json.dumps(op, indent=1, default=float))
        return 0
    print(format_layers(op["layers"]))
    dens = op.get("density")
    print(f"method: {op['method']}; density: {'predicted' if dens is None else f'{dens:.3f}'}; "
          f"mean recall {op['recall']:.3f}, predicted density {op['predicted_density']:.3f}, "
          f"true density {op['true_density']:.3f}")
    print(f"FFN bytes per token: {op['bytes_fraction']:.3f} of dense (budget {op['max_bytes']}); validation "
          f"perplexity x{op['validation_ppl_ratio']:.4f} (target x{op['max_ppl_ratio']}); "
          f"targets {'met' if op['targets_met'] else 'NOT met'}")
    state = "reused" if prep.reused else f"built in {op['timings']['total_s']:.0f} s"
    print(f"artifacts ({state}): {prep.directory}; wall time {op['wall_s']:.0f} s (model load {t_load:.0f} s)")
    return 0
