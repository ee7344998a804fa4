"""Predictors: int4/int8 packing, the shadow predictor, low-rank training on a tiny ReLU model,
round trips of predictor.safetensors and refusal of another model's file."""
from __future__ import annotations

import pytest
import torch

from offload.checkpoint import open_checkpoint
from offload.errors import ArtifactError
from offload.loading import build_model
from offload.predict import (LowRankPredictor, PredictorSet, ShadowPredictor, build_predictors, layer_report,
                             load_predictors)
from offload.predict.quant import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from offload.profile import capture_ffn_inputs
from offload.sparse import SparsityError, ffn_weights, sparse_stats, sparsify, densify


def tiny(tiny_checkpoint, kind):
    path = tiny_checkpoint(kind)
    ckpt = open_checkpoint(path)
    return build_model(ckpt, progress=False), ckpt.identity


def tokens(m, t=64, seed=0):
    return torch.randint(0, 97, (m, t), generator=torch.Generator().manual_seed(seed))


def test_int4_packing_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g)  # 40 columns: padded to 64 (two groups of 32)
    packed, scales = quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 32) and scales.shape == (6, 2)
    assert scales.dtype == torch.float16
    deq = dequantize_int4(packed, scales, 40)
    assert deq.shape == w.shape
    step = scales.float().repeat_interleave(32, dim=1)[:, :40]
    assert ((deq - w).abs() <= step * 0.5 + 1e-6 + (w.abs() - 7 * step).clamp_min(0)).all()
    # values on the grid come back exactly; nibble layout: low nibble = even column
    exact = torch.cat((torch.arange(-7, 8.0), torch.zeros(1))).repeat(2).view(1, 32) * 0.25  # scale 7·0.25/7
    p, s = quantize_int4(exact, 32, search=False)
    assert torch.equal(dequantize_int4(p, s, 32), exact)
    assert int(p[0, 0]) == (1 | (2 << 4))  # q+8 of -7 (column 0) and -6 (column 1)


def test_int8_round_trip():
    w = torch.randn(5, 33, generator=torch.Generator().manual_seed(1))
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (5,)
    assert (dequantize_int8(q, s) - w).abs().max() <= s.float().max() * 0.5 + 1e-6


@pytest.mark.parametrize("bits", [4, 8])
def test_shadow_predictor_tracks_the_oracle(tiny_checkpoint, bits):
    net, identity = tiny(tiny_checkpoint, "llama")
    preds = build_predictors(net, identity=identity, method="shadow", bits=bits, density=0.5, progress=False)
    xs = capture_ffn_inputs(net, tokens(2))
    rows = layer_report(preds, net, xs)
    for r in rows:
        assert r["predicted_density"] == pytest.approx(0.5, abs=0.01)
        assert r["true_density"] == pytest.approx(0.5, abs=0.01)
        assert r["recall"] > (0.9 if bits == 8 else 0.8)
    n, d = 96, 64
    expected = 2 * n * (d // 2 + 2 * d // 32) if bits == 4 else 2 * n * (d + 2)
    assert preds[0].nbytes == expected
    with torch.no_grad():
        sparsify(net, preds)
        net(tokens(1, 16))
        assert sparse_stats(net)["density"] == pytest.approx(0.5, abs=0.01)
        densify(net)


def test_lowrank_training_reports_recall_and_density(tiny_checkpoint):
    net, identity = tiny(tiny_checkpoint, "llama_relu")
    preds = build_predictors(net, tokens(12, 64, seed=1), tokens(6, 64, seed=2), identity=identity,
                             recall_target=0.95, epochs=3, ranks=[8, 16], progress=False)
    assert preds.method == "lowrank" and isinstance(preds[0], LowRankPredictor)
    for r in preds.info["layers"]:
        assert r["recall"] >= 0.95 - 1e-9
        assert 0 < r["true_density"] < 1 and r["true_density"] <= r["predicted_density"] <= 1
        assert r["rank"] in [c["rank"] for c in preds.info["candidates"][r["layer"]]]
    # on other held-out tokens the figures are reported the same way
    rows = layer_report(preds, net, capture_ffn_inputs(net, tokens(4, 64, seed=3)))
    assert all(r["recall"] > 0.8 and 0 < r["predicted_density"] <= 1 for r in rows)


@pytest.mark.parametrize("kind,method", [("llama", "shadow"), ("opt", "lowrank")])
def test_predictor_file_round_trip_and_identity(tiny_checkpoint, tmp_path, kind, method):
    net, identity = tiny(tiny_checkpoint, kind)
    if method == "shadow":
        preds = build_predictors(net, identity=identity, density=0.4, progress=False)
    else:
        preds = build_predictors(net, tokens(8), tokens(4, seed=5), identity=identity, epochs=2, ranks=[8],
                                 progress=False)
    path = tmp_path / "predictor.safetensors"
    preds.save(path)
    back = load_predictors(path, identity)
    assert back.identity == identity and back.method == method and len(back) == len(preds)
    x = torch.randn(7, 64)
    for i in range(len(preds)):
        assert torch.equal(back.selector(i).mask(x), preds.selector(i).mask(x))
        assert back[i].nbytes == preds[i].nbytes
    with pytest.raises(ArtifactError, match=rf"made for model '{identity}', not for this model \('someone-else'\)"):
        load_predictors(path, "someone-else")


def test_unreadable_or_foreign_predictor_files(tmp_path):
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="cannot read the predictor file"):
        PredictorSet.load(bad)
    with pytest.raises(ArtifactError, match="cannot read the predictor file"):
        PredictorSet.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other), metadata={"format": "something"})
    with pytest.raises(ArtifactError, match="not an offload predictor file"):
        PredictorSet.load(other)


def test_method_checks(tiny_checkpoint):
    net, identity = tiny(tiny_checkpoint, "opt")
    with pytest.raises(SparsityError, match="needs gated FFNs"):
        build_predictors(net, method="shadow", progress=False)
    swiglu, _ = tiny(tiny_checkpoint, "llama")
    with pytest.raises(SparsityError, match="low-rank predictors fail on SwiGLU"):
        build_predictors(swiglu, tokens(2), tokens(2), method="lowrank", progress=False)
    with pytest.raises(SparsityError, match=r"expected a number in \(0, 1\]"):
        build_predictors(swiglu, method="shadow", density=2.0, progress=False)
    assert isinstance(build_predictors(swiglu, progress=False)[0], ShadowPredictor)
    assert ffn_weights(swiglu.layers[0].mlp).kind == "swiglu"
