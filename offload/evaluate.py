"""Evaluation of sparse FFN execution (``prepare``, which picks the operating point, is in offload.prepare).

``evaluate(model, text_tokens, density=None, predictors=None)`` → dict with the perplexity of the
dense model, of the oracle-sparse model (true activity) and of the predicted-sparse model on the
same windows; greedy token agreement with dense over generated tokens (decode at batch 1 takes the
row-gather path of ``offload.sparse``); achieved FFN density; and FFN bytes touched per token
(predictor bytes included) as a fraction of dense.

CLI glue: ``add_eval_arguments`` / ``run_eval`` (``offload eval``).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from offload.errors import ArtifactError
from offload.sparse import (EXACT_KINDS, SparsityError, _net, check_density, densify, ffn_bytes_fraction,
                            ffn_dense_bytes, ffn_weights, sparse_stats, sparsify)

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


def greedy_generate(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation [n] of prompt [t] with the KV cache (offload.generation.generate: decode
    steps are batch 1, one token)."""
    from offload.generation import SamplingConfig, generate

    net = _net(model)
    prompt = prompt.reshape(1, -1)
    ids, _ = generate(net, prompt, SamplingConfig(max_new_tokens=n), max_context=prompt.shape[1] + n)
    return ids[0, prompt.shape[1]:].cpu()


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


# ---------------------------------------------------------------------------- CLI glue
def _model_arg(p) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="hub repo id, local HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")


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
    p.add_argument("--weights", choices=("float32", "float16"), default="float32",
                   help="weight storage of the evaluated model (float16: what `generate --weights float16` runs)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _load(args):
    from offload import OffloadedModel

    return OffloadedModel.from_pretrained(args.model, device=getattr(args, "device", None),
                                          dtype=getattr(args, "dtype", None),
                                          revision=getattr(args, "revision", None),
                                          local_files_only=getattr(args, "local_files_only", False),
                                          weights=getattr(args, "weights", "float32"))


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def format_layers(rows: list[dict]) -> str:
    out = ["layer  recall  predicted  true   predictor KiB"]
    for r in rows:
        out.append(f"{r['layer']:>5}  {r['recall']:.3f}   {r['predicted_density']:.3f}    {r['true_density']:.3f}  "
                   f"{r['predictor_bytes'] / 1024:>9.1f}")
    return "\n".join(out)


def run_eval(args) -> int:
    """``offload eval``: dense / oracle / predicted perplexity, token agreement, density, bytes."""
    from offload.prepare import OPERATING_POINT_FILE, load_prepared

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
