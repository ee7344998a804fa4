"""Corpus splits and text errors, prepare → artifacts → evaluate on tiny models, and one SmolLM2 check."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from offload.checkpoint import open_checkpoint
from offload.corpus import CorpusError, default_corpus, load_corpus, require_tokens, tokenize, windows
from offload.errors import ArtifactError
from offload.cli.evaluate import add_arguments as add_eval_arguments
from offload.cli.prepare import add_arguments as add_prepare_arguments
from offload.evaluate import evaluate
from offload.prepare import OPERATING_POINT_FILE, PREDICTOR_FILE, PROFILE_FILE, load_prepared, prepare_from_tokens
from offload.loading import build_model
from offload.sparse import SparsityError, is_sparse

from helpers import rand_ids


def tiny(tiny_checkpoint, kind):
    ckpt = open_checkpoint(tiny_checkpoint(kind))
    return build_model(ckpt, progress=False), ckpt.identity


class WordTokenizer:
    """Stands in for a HF tokenizer: one token per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [hash(w) % 97 for w in text.split()]}


def test_default_corpus_parts_are_disjoint_topics():
    from pydoc_data.topics import topics

    c = default_corpus()
    sizes = {k: len(c.part(k)) for k in ("calibration", "validation", "evaluation")}
    total = sum(len(v) for v in topics.values())
    assert sizes["calibration"] > 0.6 * total and sizes["evaluation"] > 0.1 * total and sizes["validation"] > 0.05 * total
    for body in topics.values():  # every topic lands in exactly one part
        body = body.strip()
        assert sum(body in c.part(k) for k in sizes) == 1
    assert load_corpus(None).digest == c.digest


def test_text_file_errors(tmp_path):
    with pytest.raises(CorpusError, match="nope.txt: text file not found"):
        load_corpus(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(CorpusError, match="empty.txt: the text file is empty"):
        load_corpus(empty)
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n\nAnd a second paragraph.")
    corpus = load_corpus(short)
    ids = tokenize(WordTokenizer(), corpus.calibration)
    with pytest.raises(CorpusError, match=rf"the calibration text is too short: {ids.numel()} tokens, at least 1024 are needed"):
        require_tokens(ids, 1024, "the calibration text")


def test_user_text_is_split_into_disjoint_parts(tmp_path):
    paras = [f"Paragraph {i}: " + "word " * 80 for i in range(200)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(paras))
    c = load_corpus(path)
    assert c.source == str(path) and len(c.digest) == 16
    for p in paras:
        assert sum(p.strip() in c.part(k) for k in ("calibration", "validation", "evaluation")) == 1
    assert len(c.evaluation) > 0.1 * len(c.calibration)


def test_prepare_and_evaluate_relu_model(tiny_checkpoint, tmp_path):
    net, identity = tiny(tiny_checkpoint, "llama_relu")
    prepare_from_tokens(net, rand_ids(1024, 1), rand_ids(512, 2), identity=identity, directory=str(tmp_path),
                               window=64, tune_tokens=256, train_tokens=512, profile_tokens=512, report_tokens=128,
                               epochs=3, ranks=[8, 16], progress=False)
    for f in (PROFILE_FILE, PREDICTOR_FILE, OPERATING_POINT_FILE):
        assert os.path.isfile(tmp_path / f)
    op = json.loads((tmp_path / OPERATING_POINT_FILE).read_text())
    assert op["model_identity"] == identity and op["method"] == "lowrank" and op["density"] is None
    assert len(op["layers"]) == 2 and {"recall", "predicted_density", "true_density"} <= set(op["layers"][0])
    assert 0 < op["bytes_fraction"] and op["validation_ppl_ratio"] > 0
    back = load_prepared(str(tmp_path), identity)
    assert back.reused and back.profile.tokens == [512, 512] and len(back.predictors) == 2
    with pytest.raises(ArtifactError, match="made for model"):
        load_prepared(str(tmp_path), "another-model")

    r = evaluate(net, rand_ids(300, 3), predictors=back.predictors, n_generate=4, n_prompts=2, prompt_tokens=8,
                 window=64)
    assert r["oracle_ratio"] == pytest.approx(1.0, abs=1e-5) and r["oracle_token_agreement"] == 1.0  # exact sparsity
    assert r["tokens"] == 256 and r["generated_tokens"] == 8
    assert 0 < r["predicted_density"] <= 1 and r["predicted_ppl"] > 0 and 0 <= r["token_agreement"] <= 1
    assert r["bytes_fraction"] == pytest.approx(r["predictor_bytes_per_token"] / r["dense_ffn_bytes_per_token"]
                                                + r["predicted_density"], rel=1e-6)
    assert not is_sparse(net)


def test_prepare_swiglu_chooses_a_density_within_the_bytes_budget(tiny_checkpoint):
    net, identity = tiny(tiny_checkpoint, "llama")
    prep = prepare_from_tokens(net, rand_ids(1024, 4), rand_ids(512, 5), identity=identity, window=64,
                               tune_tokens=128, profile_tokens=256, report_tokens=64, progress=False)
    op = prep.operating_point
    assert op["method"] == "shadow" and 0 < op["density"] <= 0.65 - op["predictor_bytes_fraction"] + 1e-9
    assert op["bytes_fraction"] <= 0.65 + 1e-6 and op["tried"]
    assert prep.profile.density == op["density"] and all(p.density == op["density"] for p in prep.predictors.layers)
    r = evaluate(net, rand_ids(256, 6), predictors=prep.predictors, n_generate=2, n_prompts=1, prompt_tokens=8,
                 window=64)
    assert r["predicted_density"] == pytest.approx(op["density"], abs=0.02)
    assert r["oracle_density"] == pytest.approx(op["density"], abs=0.02)


def test_evaluate_errors(tiny_checkpoint):
    net, _ = tiny(tiny_checkpoint, "llama")
    with pytest.raises(SparsityError, match="needs a density"):
        evaluate(net, rand_ids(300, 0), n_generate=0)
    with pytest.raises(SparsityError, match=r"density=0.0: expected a number in \(0, 1\]"):
        evaluate(net, rand_ids(300, 0), density=0.0, n_generate=0)
    with pytest.raises(CorpusError, match="the evaluation text is too short: 100 tokens, at least 256 are needed"):
        evaluate(net, rand_ids(100, 0), density=0.5, n_generate=0)
    with pytest.raises(CorpusError, match="the calibration text is too short: 200 tokens, at least 1024"):
        prepare_from_tokens(net, rand_ids(200, 0), rand_ids(600, 0), identity="x", progress=False)
    with pytest.raises(CorpusError, match="text too short for one window"):
        windows(rand_ids(10, 0), 64)


def test_cli_arguments():
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    a = p.parse_args(["model.gguf", "--text", "t.txt", "--density", "0.5", "--json"])
    assert (a.model, a.text, a.density, a.json) == ("model.gguf", "t.txt", 0.5, True)
    q = argparse.ArgumentParser()
    add_prepare_arguments(q, model_arg=False)
    b = q.parse_args(["--rebuild", "--text", "x.txt"])
    assert b.rebuild and b.text == "x.txt" and b.bits == 4 and b.max_bytes == 0.65


def test_smollm2_int4_shadow_close_to_oracle(smollm2_ours):
    """The real model: int4 shadow at density 0.55 on one held-out window stays near the oracle."""
    from offload.predict import build_predictors

    om = smollm2_ours
    ids = tokenize(om.tokenizer, load_corpus().evaluation)[:256]
    preds = build_predictors(om.model, identity=om.checkpoint.identity, density=0.55, progress=False)
    r = evaluate(om, ids, predictors=preds, n_generate=3, n_prompts=1, prompt_tokens=8, window=96, max_tokens=96)
    assert r["tokens"] == 96 and r["generated_tokens"] == 3
    assert r["oracle_ratio"] < 1.08 and r["predicted_ratio"] < 1.15
    assert r["bytes_fraction"] == pytest.approx(0.55 + 1.125 / 12, abs=0.005)
    assert r["top1_agreement"] > 0.85


def test_cli_bad_arguments_fail_before_loading_the_model(tmp_path):
    from offload.cli.evaluate import run as run_eval
    from offload.cli.prepare import run as run_prepare

    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    with pytest.raises(CorpusError, match="missing.txt: text file not found"):
        run_eval(p.parse_args(["--text", str(tmp_path / "missing.txt")]))
    with pytest.raises(SparsityError, match=r"density=1.5: expected a number in \(0, 1\]"):
        run_eval(p.parse_args(["--density", "1.5"]))
    q = argparse.ArgumentParser()
    add_prepare_arguments(q)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="empty.txt: the text file is empty"):
        run_prepare(q.parse_args(["--text", str(tmp_path / "empty.txt")]))


@pytest.mark.parametrize("weights, activations, tol", [("float32", "int8", 1e-4), ("int4", "float32", 1e-4),
                                                        ("int4", "int8", None)])
def test_token_by_token_perplexity(tiny_checkpoint, weights, activations, tol):
    """Through the decode path token by token, perplexity equals the whole-window one where the one-token
    products compute the same numbers (fp32 weights; fp32 x), and is close where x is rounded to int8. Both
    paths round x there, so it differs from the fp32-x model's; whether the two paths' sums come out
    bit-identical depends on the CPU's kernels (equal on an AVX2 Zen 3, not on an AVX-512 VNNI Xeon)."""
    from offload.evaluate import perplexity

    ckpt = open_checkpoint(tiny_checkpoint("llama"))
    net = build_model(ckpt, weights=weights, activations=activations, progress=False)
    wins = torch.stack([rand_ids(24, 1), rand_ids(24, 2)])
    whole, step = perplexity(net, wins)["ppl"], perplexity(net, wins, token_by_token=True)["ppl"]
    if tol is not None:
        assert step == pytest.approx(whole, rel=tol)
    else:
        assert step == pytest.approx(whole, rel=0.05)
        exact_x = build_model(ckpt, weights=weights, activations="float32", progress=False)
        assert whole != perplexity(exact_x, wins)["ppl"]  # x was rounded
