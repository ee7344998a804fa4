"""Prepared artifacts keyed by what they depend on (issue 12 items 1, 2, 3, 10): weight format and predictor
design get their own folders, the bytes budget means the same in every format, a reused operating point
that missed its targets says so with the fix, the first build says what it does, `offload eval`
prepares when needed, and damaged files name the fix. Tiny models, prepare on a few hundred tokens."""
from __future__ import annotations

import json
import os

import pytest

from offload import OffloadedModel
from offload.errors import ArtifactError
from offload.prepare import OPERATING_POINT_FILE, PREDICTOR_FILE, prepare


def load(path, weights="float32"):
    return OffloadedModel.from_pretrained(path, weights=weights, progress=False)


@pytest.fixture(scope="module")
def chat_ckpt(tiny_checkpoint):
    return tiny_checkpoint("llama_chat")


@pytest.fixture(scope="module")
def built(chat_ckpt, tmp_path_factory):
    """The default artifacts of the tiny chat model in float16 and float32, built once for the module:
    (cache folder, {weights: Prepared})."""
    import functools

    import offload.prepare as prep

    cache = tmp_path_factory.mktemp("built") / "offload-cache"
    with pytest.MonkeyPatch.context() as mp:  # the settings of the fast_prepare fixture
        mp.setenv("OFFLOAD_CACHE", str(cache))
        mp.setattr(prep, "prepare_from_tokens", functools.partial(
            prep.prepare_from_tokens, profile_tokens=512, tune_tokens=256, report_tokens=256))
        return cache, {w: prepare(load(chat_ckpt, w), progress=False) for w in ("float16", "float32")}


@pytest.fixture
def prepared_cache(built, fast_prepare):
    """fast_prepare's fresh cache, holding a copy of the module's built artifacts."""
    import shutil

    shutil.copytree(built[0], fast_prepare)
    return fast_prepare


def test_weight_formats_and_designs_get_their_own_artifacts(chat_ckpt, built, prepared_cache):
    from offload.corpus import DEFAULT_SOURCE
    from offload.prepare import artifact_directory, predictor_design, settings_variant

    f16, f32 = built[1]["float16"], built[1]["float32"]
    assert {os.path.basename(p.directory) for p in (f16, f32)} == {"float16-shadow-int4", "float32-shadow-int4"}
    assert f16.operating_point["weights"] == "float16" and f32.operating_point["weights"] == "float32"
    om = load(chat_ckpt, "float16")
    again = prepare(om, progress=False)
    assert again.reused and os.path.basename(again.directory) == "float16-shadow-int4"
    identity = om.checkpoint.identity
    assert artifact_directory(identity, "float32", predictor_design(om.model, bits=8)).endswith("float32-shadow-int8")
    other = settings_variant(DEFAULT_SOURCE, "", {"max_bytes": 0.7})  # another setting: a folder of its own
    assert other and settings_variant(DEFAULT_SOURCE, "", {"max_bytes": 0.65}) == ""
    assert settings_variant("book.txt", "abc", {}) not in ("", other)


def test_bytes_budget_counts_the_predictor_against_fp32_rows_in_every_format(built):
    """fp16 rows must not double the predictor's share (0.1875 instead of 0.094 on SmolLM2): the density
    search, and so the operating point, would be pushed down on the format that reads fewer bytes."""
    f16, f32 = built[1]["float16"].operating_point, built[1]["float32"].operating_point
    assert f16["predictor_bytes_fraction"] == pytest.approx(f32["predictor_bytes_fraction"], rel=1e-6)
    assert f16["tried"][-1]["density"] == f32["tried"][-1]["density"]  # the same d_max
    # as stored, fp16 rows cost half: the reported fraction of the fp16 dense FFN shows the predictor twice as big
    assert f16["stored_bytes_fraction"] > f16["bytes_fraction"]
    assert f32["stored_bytes_fraction"] == pytest.approx(f32["bytes_fraction"])


def test_reused_operating_point_that_missed_its_targets_says_so_with_the_fix(chat_ckpt, prepared_cache):
    om = load(chat_ckpt, "float16")
    path = os.path.join(cached_dir(om), OPERATING_POINT_FILE)
    op = json.loads(open(path).read())
    op.update(targets_met=False, validation_ppl_ratio=1.066)
    open(path, "w").write(json.dumps(op))
    said = []
    found = prepare(om, log=said.append, progress=False)
    assert found.reused
    text = "\n".join(said)
    assert "does not meet its targets" in text and "x1.0660" in text
    assert "offload prepare [MODEL] --weights float16 --rebuild" in text
    with pytest.warns(UserWarning, match="does not meet its targets"):  # said without a log too
        prepare(om, progress=False, log=None)


def cached_dir(om) -> str:
    from offload.prepare import artifact_directory, predictor_design

    return artifact_directory(om.checkpoint.identity, om.weights, predictor_design(om.model))


def test_first_build_says_what_it_does_how_long_and_where(chat_ckpt, fast_prepare, capsys):
    om = load(chat_ckpt, "float16")
    said = []
    built = prepare(om, log=said.append, progress=True)
    first = said[0]
    assert "First use of this model with float16 weights" in first and "once per model, weight format" in first
    assert "under a minute" in first and f"cached in {built.directory}" in first
    bars = capsys.readouterr().err  # tqdm bars on stderr, each named for its stage
    assert "operating point: perplexity at density" in bars and "profile: count activations" in bars
    assert "predictors: quantize to int4" in bars
    said.clear()
    prepare(om, log=said.append, progress=False)
    assert not any("First use" in s for s in said) and "using the prepared sparse FFN" in said[0]


def test_old_artifacts_are_rebuilt(chat_ckpt, prepared_cache):
    om = load(chat_ckpt)
    path = os.path.join(cached_dir(om), OPERATING_POINT_FILE)
    op = json.loads(open(path).read())
    op["version"] = 1
    open(path, "w").write(json.dumps(op))
    said = []
    assert not prepare(om, log=said.append, progress=False).reused
    assert any("made by an older offload; rebuilding" in s for s in said)


def test_damaged_artifact_names_the_file_and_the_rebuild(chat_ckpt, prepared_cache):
    om = load(chat_ckpt)
    with open(os.path.join(cached_dir(om), PREDICTOR_FILE), "r+b") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(ArtifactError, match=r"predictor\.safetensors: .*rebuild with `offload prepare \[MODEL\] "
                                            r"--weights float32 --rebuild`"):
        prepare(om, progress=False)


def test_eval_prepares_a_model_not_yet_prepared(chat_ckpt, fast_prepare, capsys):
    from offload.cli import main

    rc = main(["eval", chat_ckpt, "--weights", "float16", "--max-tokens", "256", "--window", "128", "--generate", "2",
               "--prompts", "1"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert "First use of this model with float16 weights" in err and "perplexity: dense" in out
    assert out.strip().splitlines()[-1].startswith("evaluation took ")  # not a bare "199 s"


def test_prepare_cli_takes_weights_and_reports_targets(chat_ckpt, prepared_cache, capsys):
    from offload.cli import main

    assert main(["prepare", chat_ckpt, "--weights", "float16"]) == 0
    out = capsys.readouterr().out
    assert "weights: float16" in out and "targets met" in out and "artifacts (reused)" in out
    assert "float16-shadow-int4" in out
