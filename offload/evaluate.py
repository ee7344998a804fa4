"""Evaluation of sparse FFN execution (``prepare``, which picks the operating point, is in offload.prepare).

``evaluate(model, text_tokens, density=None, predictors=None)`` → dict with the perplexity of the
dense model, of the oracle-sparse model (true activity) and of the predicted-sparse model on the
same windows; greedy token agreement with dense over generated tokens (decode at batch 1 takes the
row-gather path of ``offload.sparse``); achieved FFN density; and FFN bytes touched per token
(predictor bytes included) as a fraction of dense: counted at fp32 like prepare's budget
(``bytes_fraction``) and as stored (``stored_bytes_fraction``).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from offload.errors import ArtifactError
from offload.sparse import (EXACT_KINDS, REFERENCE_ITEMSIZE, SparsityError, model_net, check_density, densify,
                            ffn_bytes_fraction, ffn_dense_bytes, ffn_weights, sparse_stats, sparsify)

MIN_CALIBRATION_TOKENS = 1024  # four 256-token windows
MIN_VALIDATION_TOKENS = 512
MIN_EVAL_TOKENS = 256


# ---------------------------------------------------------------------------- measurements
@torch.inference_mode()
def perplexity(model, wins: torch.Tensor, *, progress: bool = False, desc: str = "ppl",
               token_by_token: bool = False) -> dict:
    """Perplexity of ``model`` over windows [m, t] (each window a fresh context; tokens 1..t-1 of each
    window are predicted). ``token_by_token``: each window fed one token at a time through the KV cache,
    so every product takes the one-token (decode) path, whose numbers can differ from a prompt's (int8
    activations, offload.formats). Returns {"ppl", "nll", "tokens", "argmax" (LongTensor [m, t-1])}."""
    from tqdm.auto import tqdm

    net = model_net(model)
    device = next(net.parameters()).device
    nll, count, argmax = 0.0, 0, []
    for w in tqdm(wins, desc=desc, disable=not progress, leave=False):
        w = w.unsqueeze(0).to(device)
        if token_by_token:
            cache = net.new_cache(1, w.shape[1])
            logits = torch.cat([net(w[:, i:i + 1], cache, i, last_only=True)[0] for i in range(w.shape[1] - 1)])
            logits = logits.float()
        else:
            logits = net(w)[0, :-1].float()
        nll += float(F.cross_entropy(logits, w[0, 1:], reduction="sum"))
        count += w.shape[1] - 1
        argmax.append(logits.argmax(-1).cpu())
    return {"ppl": math.exp(nll / count), "nll": nll, "tokens": count, "argmax": torch.stack(argmax)}


def greedy_generate(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation [n] of prompt [t] with the KV cache (offload.generation.generate: decode
    steps are batch 1, one token)."""
    from offload.generation import SamplingConfig, generate

    net = model_net(model)
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


def ffn_kind(net) -> str:
    """The FFN kind of a model's layers: swiglu, relu, drelu, relu_fc or geglu (models.ffn_kind)."""
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
             progress: bool = False, token_by_token: bool = False) -> dict:
    """Dense vs oracle-sparse vs predicted-sparse on held-out ``text_tokens`` (1-D ids).

    ``density``: None (the predictors' operating point; exact activity for the oracle of a
    ReLU-family model), a float in (0, 1] or one per layer (top-k per token for oracle and
    predictors alike). ``predictors``: a PredictorSet, or None for dense vs oracle only.
    Perplexity uses non-overlapping ``window``-token windows, at most ``max_tokens`` tokens.
    Token agreement: ``n_prompts`` prompts of ``prompt_tokens`` tokens from the text, ``n_generate``
    greedy tokens each, fraction of positions equal to dense (predicted-sparse, else oracle).
    ``token_by_token``: also the dense perplexity with every token through the decode path
    ("dense_ppl_token_by_token"; see :func:`perplexity`).
    """
    from offload.corpus import require_tokens, windows

    net = model_net(model)
    densify(net)
    t0 = time.perf_counter()
    layers = len(net.layers)
    kind = ffn_kind(net)
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
    if token_by_token:
        result["dense_ppl_token_by_token"] = perplexity(net, wins, progress=progress, desc="dense, token by token",
                                                        token_by_token=True)["ppl"]
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
                      bytes_fraction=ffn_bytes_fraction(net, pred["layer_density"], predictors.layer_bytes,
                                                        REFERENCE_ITEMSIZE),
                      stored_bytes_fraction=ffn_bytes_fraction(net, pred["layer_density"], predictors.layer_bytes),
                      token_agreement=pred["token_agreement"], top1_agreement=pred["top1_agreement"],
                      first_divergence=pred["first_divergence"], decode_density=pred["decode_density"],
                      layer_density=pred["layer_density"], method=predictors.method)
    else:
        result.update(bytes_fraction=result["oracle_bytes_fraction"], token_agreement=oracle["token_agreement"],
                      top1_agreement=oracle["top1_agreement"], layer_density=oracle["layer_density"])
    result["generated_tokens"] = n_generate * len(prompts)
    result["seconds"] = time.perf_counter() - t0
    return result
