"""Evaluation of sparse FFN execution, and ``prepare`` (profile + predictors + operating point).

``evaluate(model, text_tokens, density=None, predictors=None)`` → dict with the perplexity of the
dense model, of the oracle-sparse model (true activity) and of the predicted-sparse model on the
same windows; greedy token agreement with dense over generated tokens (decode at batch 1 takes the
row-gather path of ``offload.sparse``); achieved FFN density; and FFN bytes touched per token
(predictor bytes included) as a fraction of dense.

``prepare(om, text=None)`` builds, and caches under ``model_cache_dir(identity)``:
``profile.safetensors``, ``predictor.safetensors`` and ``operating_point.json``. The operating
point of a shadow predictor is its density: the lowest whose perplexity on *validation* text (never
the evaluation text) is within ``max_ppl_ratio − margin`` of dense, under the FFN-bytes budget
``max_bytes``; when no density meets both, the densest one within the bytes budget, flagged
``targets_met: false``. Low-rank predictors (ReLU family) get their operating point from training
(threshold for the recall target at the fewest bytes).

CLI glue: ``add_prepare_arguments`` / ``run_prepare`` and ``add_eval_arguments`` / ``run_eval``.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from offload.errors import ArtifactError
from offload.sparse import (EXACT_KINDS, SparsityError, _net, check_density, densify, ffn_bytes_fraction,
                            ffn_dense_bytes, ffn_weights, sparse_stats, sparsify)

PROFILE_FILE, PREDICTOR_FILE, OPERATING_POINT_FILE = "profile.safetensors", "predictor.safetensors", "operating_point.json"
OP_FORMAT = "offload.operating_point"
MIN_CALIBRATION_TOKENS = 1024  # four 256-token windows
MIN_VALIDATION_TOKENS = 512
MIN_EVAL_TOKENS = 256


# ---------------------------------------------------------------------------- measurements
@torch.inference_mode()
def perplexity(model, wins: torch.Tensor, *, progress: bool = False, desc: str = "ppl") -> dict:
    """Perplexity of ``model`` over windows [m, t] (each window a fresh context; tokens 1..t-1 of each
    window are predicted). Returns {"ppl", "nll", "tokens", "argmax" (LongTensor [m, t-1])}."""
    from tqdm.auto import tqdm

    net = _net(model)
    device = next(net.parameters()).device
    nll, count, argmax = 0.0, 0, []
    for w in tqdm(wins, desc=desc, disable=not progress, leave=False):
        w = w.unsqueeze(0).to(device)
        logits = net(w)[0, :-1].float()
        nll += float(F.cross_entropy(logits, w[0, 1:], reduction="sum"))
        count += w.shape[1] - 1
        argmax.append(logits.argmax(-1).cpu())
    return {"ppl": math.exp(nll / count), "nll": nll, "tokens": count, "argmax": torch.stack(argmax)}


@torch.inference_mode()
def greedy_generate(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation [n] of prompt [t] with the KV cache (decode steps are batch 1, one token)."""
    net = _net(model)
    device = next(net.parameters()).device
    prompt = prompt.reshape(1, -1).to(device)
    cache = net.new_cache(1, prompt.shape[1] + n)
    logits = net(prompt, cache, 0, last_only=True)
    out, pos = [], prompt.shape[1]
    for _ in range(n):
        tok = logits[0, -1].argmax().reshape(1, 1)
        out.append(int(tok))
        if len(out) == n:
            break
        logits = net(tok, cache, pos, last_only=True)
        pos += 1
    return torch.tensor(out, dtype=torch.long)


def _prompts(tokens: torch.Tensor, n_prompts: int, prompt_tokens: int) -> list[torch.Tensor]:
    tokens = tokens.reshape(-1)
    if n_prompts <= 0:
        return []
    span = max(1, (tokens.numel() - prompt_tokens) // n_prompts)
    return [tokens[i * span: i * span + prompt_tokens] for i in range(n_prompts)
            if tokens[i * span: i * span + prompt_tokens].numel() == prompt_tokens]


def _kind(net) -> str:
    return ffn_weights(net.layers[0].mlp).kind


def _operating_densities(net, predictors, density) -> list[float] | None:
    """Per-layer densities used for the oracle: the explicit density, else the predictors' own."""
    layers = len(net.layers)
    density = check_density(density, layers)
    if density is not None:
        return density if isinstance(density, list) else [density] * layers
    if predictors is not None and all(getattr(p, "density", None) is not None for p in predictors.layers):
        return [float(p.density) for p in predictors.layers]
    return None


def evaluate(model, text_tokens: torch.Tensor, density=None, predictors=None, *, n_generate: int = 32,
             n_prompts: int = 3, prompt_tokens: int = 64, window: int = 256, max_tokens: int | None = 4096,
             progress: bool = False) -> dict:
    """Dense vs oracle-sparse vs predicted-sparse on held-out ``text_tokens`` (1-D ids).

    ``density``: None (the predictors' operating point; exact activity for the oracle of a
    ReLU-family model), a float in (0, 1] or one per layer (top-k per token for oracle and
    predictors alike). ``predictors``: a PredictorSet, or None for dense vs oracle only.
    Perplexity uses non-overlapping ``window``-token windows, at most ``max_tokens`` tokens.
    Token agreement: ``n_prompts`` prompts of ``prompt_tokens`` tokens from the text, ``n_generate``
    greedy tokens each, fraction of positions equal to dense (predicted-sparse, else oracle).
    """
    from offload.corpus import require_tokens, windows

    net = _net(model)
    densify(net)
    t0 = time.perf_counter()
    layers = len(net.layers)
    kind = _kind(net)
    check_density(density, layers)
    if predictors is not None and len(predictors) != layers:
        raise SparsityError(f"the predictors cover {len(predictors)} layers, the model has {layers}")
    identity = getattr(getattr(model, "checkpoint", None), "identity", None)
    if predictors is not None and identity and predictors.identity and predictors.identity != identity:
        raise ArtifactError(f"the predictors were made for model {predictors.identity!r}, not for this model "
                            f"({identity!r})")
    oracle_density = _operating_densities(net, predictors, density)
    if oracle_density is None and kind not in EXACT_KINDS:
        raise SparsityError(f"a {kind} model needs a density in (0, 1] (or predictors with an operating point)")
    text_tokens = text_tokens.reshape(-1)
    require_tokens(text_tokens, max(MIN_EVAL_TOKENS, window), "the evaluation text")
    wins = windows(text_tokens, window, max_tokens)
    dense_bytes = ffn_dense_bytes(net)
    result: dict = {"tokens": int(wins.numel()), "windows": int(wins.shape[0]), "window": window,
                    "ffn_kind": kind, "density": density if density is not None else "operating point",
                    "dense_ffn_bytes_per_token": int(sum(dense_bytes))}

    dense = perplexity(net, wins, progress=progress, desc="dense")
    result["dense_ppl"] = dense["ppl"]
    prompts = _prompts(text_tokens, n_prompts, prompt_tokens)
    dense_gen = [greedy_generate(net, p, n_generate) for p in prompts] if n_generate > 0 else []

    def run_sparse(tag, preds, dens):
        try:
            sparsify(net, preds, density=dens)
            r = perplexity(net, wins, progress=progress, desc=tag)
            st = sparse_stats(net, reset=True)
            gen = [greedy_generate(net, p, n_generate) for p in prompts] if n_generate > 0 else []
            gst = sparse_stats(net, reset=True)
        finally:
            densify(net)
        agree = [float((a == b).float().mean()) for a, b in zip(gen, dense_gen)]
        first = [int((a != b).nonzero()[0]) if bool((a != b).any()) else len(a) for a, b in zip(gen, dense_gen)]
        return {"ppl": r["ppl"], "ratio": r["ppl"] / dense["ppl"],
                "top1_agreement": float((r["argmax"] == dense["argmax"]).float().mean()),
                "density": st["density"], "layer_density": st["layers"], "decode_density": gst["density"],
                "token_agreement": sum(agree) / len(agree) if agree else None, "first_divergence": first}

    oracle = run_sparse("oracle", "oracle", oracle_density)
    result.update(oracle_ppl=oracle["ppl"], oracle_ratio=oracle["ratio"], oracle_density=oracle["density"],
                  oracle_bytes_fraction=ffn_bytes_fraction(net, oracle["layer_density"]),
                  oracle_token_agreement=oracle["token_agreement"], oracle_top1_agreement=oracle["top1_agreement"])
    if predictors is not None:
        pred = run_sparse("predicted", predictors, density)
        result.update(predicted_ppl=pred["ppl"], predicted_ratio=pred["ratio"], predicted_density=pred["density"],
                      predictor_bytes_per_token=predictors.nbytes,
                      bytes_fraction=ffn_bytes_fraction(net, pred["layer_density"], predictors.layer_bytes),
                      token_agreement=pred["token_agreement"], top1_agreement=pred["top1_agreement"],
                      first_divergence=pred["first_divergence"], decode_density=pred["decode_density"],
                      layer_density=pred["layer_density"], method=predictors.method)
    else:
        result.update(bytes_fraction=result["oracle_bytes_fraction"], token_agreement=oracle["token_agreement"],
                      top1_agreement=oracle["top1_agreement"], layer_density=oracle["layer_density"])
    result["generated_tokens"] = n_generate * len(prompts)
    result["seconds"] = time.perf_counter() - t0
    return result


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
def _model_arg(p) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="hub repo id, local HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")


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


def add_eval_arguments(p, model_arg: bool = True) -> None:
    """``offload eval [MODEL] --text FILE [--density D] [--json]`` options."""
    if model_arg:
        _model_arg(p)
    p.add_argument("--text", default=None, help="evaluation text file (default: the held-out part of "
                   "pydoc_data.topics; the held-out part of FILE when FILE was the prepare text)")
    p.add_argument("--density", type=float, default=None,
                   help="fraction of FFN neurons computed (default: the prepared operating point)")
    p.add_argument("--max-tokens", type=int, default=4096, help="perplexity tokens (default 4096)")
    p.add_argument("--window", type=int, default=256, help="perplexity window (default 256)")
    p.add_argument("--generate", type=int, default=32, help="greedy tokens per prompt for token agreement")
    p.add_argument("--prompts", type=int, default=3, help="prompts for token agreement (default 3)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _load(args):
    from offload import OffloadedModel

    return OffloadedModel.from_pretrained(args.model, device=getattr(args, "device", None),
                                          dtype=getattr(args, "dtype", None),
                                          revision=getattr(args, "revision", None),
                                          local_files_only=getattr(args, "local_files_only", False))


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def format_layers(rows: list[dict]) -> str:
    out = ["layer  recall  predicted  true   predictor KiB"]
    for r in rows:
        out.append(f"{r['layer']:>5}  {r['recall']:.3f}   {r['predicted_density']:.3f}    {r['true_density']:.3f}  "
                   f"{r['predictor_bytes'] / 1024:>9.1f}")
    return "\n".join(out)


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


def run_eval(args) -> int:
    """``offload eval``: dense / oracle / predicted perplexity, token agreement, density, bytes."""
    from offload.cache import model_cache_dir
    from offload.corpus import load_corpus, read_text, tokenize

    check_density(args.density)  # bad arguments fail before the model loads
    if args.text is not None:
        read_text(args.text)
    om = _load(args)
    identity = om.checkpoint.identity
    directory = model_cache_dir(identity, create=False)
    if not os.path.isfile(os.path.join(directory, OPERATING_POINT_FILE)):
        raise ArtifactError(f"no prepared predictors for this model ({identity}) in {directory}; "
                            f"run `offload prepare{' ' + args.model if args.model else ''}` first")
    prep = load_prepared(directory, identity)
    if args.text is None:
        text, what = load_corpus().evaluation, "pydoc_data.topics (evaluation topics)"
    else:
        corpus = load_corpus(args.text)
        if corpus.digest == prep.operating_point.get("source_digest"):
            text, what = corpus.evaluation, f"{args.text} (held-out part: it is the prepare text)"
        else:
            text, what = read_text(args.text), args.text
    ids = tokenize(om.tokenizer, text)
    r = evaluate(om, ids, density=args.density, predictors=prep.predictors, n_generate=args.generate,
                 n_prompts=args.prompts, window=args.window, max_tokens=args.max_tokens, progress=not args.json)
    r["text"] = what
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "layer_density"}, indent=1, default=float))
        return 0
    print(f"text: {what}; {r['tokens']} tokens in {r['windows']} windows of {r['window']}")
    print(f"perplexity: dense {r['dense_ppl']:.3f} | oracle {r['oracle_ppl']:.3f} (x{r['oracle_ratio']:.4f}, "
          f"density {r['oracle_density']:.3f}) | predicted {r['predicted_ppl']:.3f} (x{r['predicted_ratio']:.4f}, "
          f"density {r['predicted_density']:.3f})")
    print(f"FFN bytes per token: {r['bytes_fraction']:.3f} of dense (predictor {r['predictor_bytes_per_token'] / 2**20:.2f} "
          f"MiB of {r['dense_ffn_bytes_per_token'] / 2**20:.2f} MiB dense)")
    if r["token_agreement"] is not None:
        print(f"greedy token agreement with dense: predicted {r['token_agreement']:.3f} (first divergence at "
              f"{r['first_divergence']}), oracle {r['oracle_token_agreement']:.3f}, over {r['generated_tokens']} "
              f"tokens; teacher-forced top-1 agreement: predicted {r['top1_agreement']:.3f}, oracle "
              f"{r['oracle_top1_agreement']:.3f}")
    print(f"{r['seconds']:.0f} s")
    return 0
