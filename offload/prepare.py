"""``prepare``: profile + predictors + operating point for a model, cached per model, weight format and
predictor design.

``prepare(om, text=None)`` builds, and caches under ``artifact_directory(identity, weights, design)``
(``$OFFLOAD_CACHE/<model identity>/<weights>-<design>[-<settings digest>]``): ``profile.safetensors``,
``predictor.safetensors`` and ``operating_point.json``. Everything the artifacts depend on is in that
key: the model, the weight storage format (the profile, predictors and validation perplexity are
measured on the weights as stored), the predictor design (``shadow-int4``, ``shadow-int8``,
``lowrank``) and, when not the defaults, the text and settings. Another setting builds its own.

The operating point of a shadow predictor is its density: the lowest whose perplexity on
*validation* text (never the evaluation text) is within ``max_ppl_ratio − margin`` of dense, under
the FFN-bytes budget ``max_bytes``; when no density meets both, the densest one within the bytes
budget, flagged ``targets_met: false``. The bytes budget counts the FFN at fp32 in every format
(``offload.sparse.REFERENCE_ITEMSIZE``); the bytes a token reads as stored are reported beside it
(``stored_bytes_fraction``). Low-rank predictors (ReLU family) get their operating point from
training (threshold for the recall target at the fewest bytes).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from offload.errors import ArtifactError
from offload.evaluate import MIN_CALIBRATION_TOKENS, MIN_VALIDATION_TOKENS, ffn_kind, perplexity
from offload.models.ffn_kind import FFNKind
from offload.sparse import (REFERENCE_ITEMSIZE, SparsityError, model_net, densify, ffn_bytes_fraction, ffn_dense_bytes,
                            ffn_weights, sparsify)

PROFILE_FILE, PREDICTOR_FILE, OPERATING_POINT_FILE = "profile.safetensors", "predictor.safetensors", "operating_point.json"
OP_FORMAT = "offload.operating_point"
# 2: artifacts keyed by weight format and design; bytes budget counted at fp32. Older ones are rebuilt.
OP_VERSION = 2
# A full prepare of SmolLM2-135M-Instruct (134.5 M parameters) took ~300 s on 2 threads: the first-run
# message scales that by parameters and threads (a rough guess, said to be one).
_SECONDS_PER_PARAM_THREAD = 300 * 2 / 134.5e6


# ---------------------------------------------------------------------------- operating point
def choose_density(model, predictors, wins: torch.Tensor, *, max_ppl_ratio: float = 1.05, margin: float = 0.01,
                   max_bytes: float = 0.65, step: float = 0.025, steps: int = 3, progress: bool = False,
                   log=None) -> dict:
    """The density (global, top-k per token) of shadow predictors: the lowest whose perplexity on
    ``wins`` is ≤ (max_ppl_ratio − margin)·dense with FFN bytes ≤ max_bytes (counted against the
    FFN at fp32, whatever the storage format: see offload.sparse.REFERENCE_ITEMSIZE).

    Starts at d_max (the bytes budget: max_bytes − predictor bytes) and steps down by ``step`` at
    most ``steps`` times while the target holds (on SwiGLU the feasible range sits just under
    d_max, so a downward walk spends fewer perplexity passes than a bisection over (0, d_max]).
    If d_max itself misses the perplexity target it is taken anyway (the best perplexity the
    budget allows) with ``targets_met`` False."""
    net = model_net(model)
    dense_bytes = ffn_dense_bytes(net, REFERENCE_ITEMSIZE)
    pred_frac = sum(predictors.layer_bytes) / sum(dense_bytes)
    n = ffn_weights(net.layers[0].mlp).n
    d_max = min(1.0, math.floor((max_bytes - pred_frac) * n) / n)
    if d_max <= 0:
        raise SparsityError(f"the predictors alone read {pred_frac:.3f} of the dense FFN bytes, over the "
                            f"budget max_bytes={max_bytes}")
    target = max_ppl_ratio - margin
    dense = perplexity(net, wins, progress=progress, desc="operating point: dense perplexity")["ppl"]
    tried: list[dict] = []

    def ratio_at(dens: float) -> float:
        try:
            sparsify(net, predictors, density=dens)
            ppl = perplexity(net, wins, progress=progress, desc=f"operating point: perplexity at density {dens:.3f}")["ppl"]
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


# ---------------------------------------------------------------------------- artifacts
@dataclass
class Prepared:
    """What ``prepare`` built or found: paths, the operating point (JSON dict), predictors, profile."""

    directory: str
    operating_point: dict
    predictors: object
    profile: object
    reused: bool

    @property
    def targets_met(self) -> bool:
        return bool(self.operating_point.get("targets_met"))

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


def artifacts_complete(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, f)) for f in (PROFILE_FILE, PREDICTOR_FILE, OPERATING_POINT_FILE))


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
                        epochs: int = 8, ranks: list[int] | None = None, source: str = "", source_digest: str = "",
                        weights: str = "", progress: bool = True, log=None) -> Prepared:
    """prepare() on token ids: calibration (profile, training) and validation (operating point,
    recall) 1-D ids, disjoint from any evaluation text. Writes the artifacts into ``directory``
    when given. ``weights``: the storage format's name, recorded in the operating point."""
    from offload.corpus import require_tokens, windows
    from offload.predict import build_predictors, layer_report
    from offload.profile import capture_ffn_inputs, profile_model

    log = log or (lambda *a: None)
    net = model_net(model)
    FFNKind.of(ffn_kind(net)).check_kernels("the hybrid's preparation (predictors, operating point)")
    densify(net)
    t_start = time.perf_counter()
    require_tokens(calibration, max(MIN_CALIBRATION_TOKENS, window), "the calibration text")
    require_tokens(validation, max(MIN_VALIDATION_TOKENS, window), "the validation text")
    cal_wins = windows(calibration, window)
    val_wins = windows(validation, window)
    kind = ffn_kind(net)
    from offload.predict import default_method

    method = default_method(net) if method == "auto" else method
    timings = {}
    t = time.perf_counter()
    log(f"[1/3] predictors: {method}{f' int{bits}' if method == 'shadow' else ''} ({kind} FFN, "
        f"{len(net.layers)} layers)")
    preds = build_predictors(net, cal_wins, val_wins[: max(1, tune_tokens // window)], identity=identity,
                             method=method, bits=bits, recall_target=recall_target, epochs=epochs, ranks=ranks,
                             max_train_tokens=train_tokens, progress=progress)
    timings["predictors_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tune = val_wins[: max(1, tune_tokens // window)]
    if method == "shadow":
        log(f"[2/3] operating point: perplexity on {tune.numel()} validation tokens, target x{max_ppl_ratio} "
            f"(margin {margin}), FFN bytes <= {max_bytes} of dense (counted at fp32)")
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
    op["bytes_fraction"] = ffn_bytes_fraction(net, pred_density, preds.layer_bytes, REFERENCE_ITEMSIZE)
    op["stored_bytes_fraction"] = ffn_bytes_fraction(net, pred_density, preds.layer_bytes)
    op["predicted_density"] = sum(pred_density) / len(pred_density)
    op["true_density"] = sum(r["true_density"] for r in rows) / len(rows)
    op["recall"] = sum(r["recall"] for r in rows) / len(rows)
    if method != "shadow":
        op["targets_met"] = op["bytes_fraction"] <= max_bytes
        sparsify(net, preds)
        try:
            ppl = perplexity(net, tune, progress=progress, desc="operating point: perplexity, predicted")["ppl"]
        finally:
            densify(net)
        op["validation_ppl_ratio"] = ppl / perplexity(net, tune, progress=progress,
                                                      desc="operating point: perplexity, dense")["ppl"]
    timings["report_s"] = time.perf_counter() - t
    t = time.perf_counter()
    log(f"[3/3] profile: {min(cal_wins.numel(), profile_tokens)} calibration tokens"
        + (f" at density {profile_density:.3f}" if profile_density is not None else " (exact activity)"))
    prof = profile_model(net, cal_wins[: max(1, profile_tokens // window)], density=profile_density,
                         identity=identity, source=source, source_digest=source_digest, progress=progress)
    timings["profile_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    preds.info.update(operating_point={k: v for k, v in op.items() if k != "tried"}, layers=rows)
    settings = {"method": method, "bits": bits, "max_ppl_ratio": max_ppl_ratio, "margin": margin,
                "max_bytes": max_bytes, "recall_target": recall_target, "window": window,
                "profile_tokens": profile_tokens, "tune_tokens": tune_tokens}
    op_json = {"format": OP_FORMAT, "version": OP_VERSION, "model_identity": identity, "weights": weights,
               "method": preds.method, "ffn_kind": kind, **op, "settings": settings, "source": source, "source_digest": source_digest,
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



# ---------------------------------------------------------------------------- keyed cache
# prepare_from_tokens' settings that change the artifacts, with their defaults: a non-default one
# (or a text other than the default corpus) gives the artifacts a folder of their own.
_KEYED = ("max_ppl_ratio", "margin", "max_bytes", "recall_target", "window", "profile_tokens", "tune_tokens",
          "train_tokens", "report_tokens", "epochs", "ranks")
_DEFAULTS = {k: p.default for k, p in inspect.signature(prepare_from_tokens).parameters.items() if k in _KEYED}


def predictor_design(model, method: str = "auto", bits: int = 4) -> str:
    """The predictor design's name in cache keys: ``shadow-int4``, ``shadow-int8`` or ``lowrank``."""
    from offload.predict import default_method

    method = default_method(model_net(model)) if method == "auto" else method
    return f"shadow-int{bits}" if method == "shadow" else method


def artifact_directory(identity: str, weights: str, design: str, variant: str = "") -> str:
    """``<cache>/<identity>/<weights>-<design>[-<variant>]``: where one setting's artifacts live."""
    from offload.cache import model_cache_dir

    name = f"{weights}-{design}" + (f"-{variant}" if variant else "")
    return os.path.join(model_cache_dir(identity, create=False), name)


def settings_variant(source: str, digest: str, settings: dict) -> str:
    """A short digest of the text and settings that differ from the defaults; "" when none do."""
    from offload.corpus import DEFAULT_SOURCE

    unknown = sorted(set(settings) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"prepare() got unexpected settings {', '.join(unknown)}")
    changed = {k: v for k, v in settings.items() if v != _DEFAULTS[k]}
    if source != DEFAULT_SOURCE:
        changed["text"] = digest
    if not changed:
        return ""
    return hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_artifacts(identity: str, weights: str) -> str | None:
    """The folder of the default-setting artifacts of a model and weight format, if prepared (for tools that
    do not load the model, such as ``offload report``: any predictor design, the default one first)."""
    for design in ("shadow-int4", "lowrank", "shadow-int8"):
        directory = artifact_directory(identity, weights, design)
        if artifacts_complete(directory):
            return directory
    return None


def rebuild_hint(weights: str) -> str:
    return f"`offload prepare [MODEL] --weights {weights} --rebuild` (API: prepare(model, rebuild=True))"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _warn(message: str, log) -> None:
    """Said even when progress output is off: a result the user should know is not what was asked."""
    if log:
        log(f"warning: {message}")
    else:
        warnings.warn(message, stacklevel=3)


def targets_message(op: dict, directory: str, weights: str, bits: int = 4) -> str:
    """What a missed target is and how to retry (empty when the targets were met)."""
    if op.get("targets_met"):
        return ""
    ppl, bytes_ = op.get("validation_ppl_ratio", float("nan")), op.get("bytes_fraction", float("nan"))
    other = " or --bits 8" if op.get("method") == "shadow" and bits == 4 else ""
    return (f"the operating point in {directory} does not meet its targets (validation perplexity x{ppl:.4f}, "
            f"target x{op.get('max_ppl_ratio')}; FFN bytes {bytes_:.3f} of dense, budget {op.get('max_bytes')}); "
            f"sparse decode runs there anyway. Retry with {rebuild_hint(weights)}, or other targets: "
            f"--max-ppl-ratio, --max-bytes{other}")


def estimate_seconds(ckpt) -> float:
    params = sum(math.prod(s) for s in ckpt.shapes.values())
    return _SECONDS_PER_PARAM_THREAD * params / max(1, torch.get_num_threads())


def first_run_message(ckpt, weights: str, design: str, directory: str) -> str:
    s = estimate_seconds(ckpt)
    took = "under a minute" if s < 60 else f"about {s / 60:.0f} minutes"
    return (f"First use of this model with {weights} weights: preparing its sparse FFN once (an activation profile, "
            f"{design} predictors, and the density whose validation perplexity stays in target). This is done once "
            f"per model, weight format and predictor design, takes {took} here ({torch.get_num_threads()} threads; "
            f"a guess from the model's size), and is cached in {directory}.")


def cached_prepared(om, text: str | os.PathLike | None = None, *, method: str = "auto", bits: int = 4,
                    log=None, **settings) -> Prepared | None:
    """The artifacts prepare() would reuse for this model, text and settings, or None (not built yet, or
    by an older offload). ArtifactError, with the fix, for damaged files."""
    from offload.corpus import load_corpus

    corpus = load_corpus(text)
    weights = getattr(om, "weights", "float32")
    directory = artifact_directory(om.checkpoint.identity, weights, predictor_design(om.model, method, bits),
                                   settings_variant(corpus.source, corpus.digest, settings))
    if not artifacts_complete(directory):
        return None
    try:
        found = load_prepared(directory, om.checkpoint.identity)
    except ArtifactError as e:
        raise ArtifactError(f"{e}. The cached file is damaged or foreign: rebuild with {rebuild_hint(weights)}, "
                            f"or delete {directory}") from None
    if found.operating_point.get("version") != OP_VERSION:
        if log:
            log(f"the artifacts in {directory} were made by an older offload; rebuilding them")
        return None
    return found


def prepare(om, text: str | os.PathLike | None = None, *, rebuild: bool = False, progress: bool = True,
            log=None, method: str = "auto", bits: int = 4, **settings) -> Prepared:
    """Profile + predictors + operating point for an OffloadedModel (``om.weights`` names its storage
    format), reused from its cache folder (module docstring) or built there; ``rebuild`` rebuilds.
    ``text``: a text file (None: pydoc_data.topics); its evaluation part is never used here.
    ``log(message)``: progress messages (default: stderr when ``progress``). A first build says what it
    does and where it caches; reused artifacts whose targets were not met say so, with the fix (a
    warning when there is no log)."""
    from offload.corpus import load_corpus, tokenize

    log = log or (_stderr if progress else None)
    weights = getattr(om, "weights", "float32")
    found = None if rebuild else cached_prepared(om, text, method=method, bits=bits, log=log, **settings)
    if found is not None:
        if log:
            log(f"using the prepared sparse FFN in {found.directory}")
        if not found.targets_met:
            _warn(targets_message(found.operating_point, found.directory, weights, bits), log)
        return found
    corpus = load_corpus(text)
    design = predictor_design(om.model, method, bits)
    directory = artifact_directory(om.checkpoint.identity, weights, design,
                                   settings_variant(corpus.source, corpus.digest, settings))
    if log:
        log(first_run_message(om.checkpoint, weights, design, directory))
    cal = tokenize(om.tokenizer, corpus.calibration)
    val = tokenize(om.tokenizer, corpus.validation)
    built = prepare_from_tokens(om.model, cal, val, identity=om.checkpoint.identity, directory=directory,
                                method=method, bits=bits, source=corpus.source, source_digest=corpus.digest,
                                weights=weights, progress=progress, log=log, **settings)
    if log:
        log(f"prepared in {built.operating_point['timings']['total_s']:.0f} s; cached in {directory}")
    if not built.targets_met:
        _warn(targets_message(built.operating_point, directory, weights, bits), log)
    return built
