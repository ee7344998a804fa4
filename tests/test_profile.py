"""The profiler: counts equal a direct computation, the file round-trips, other models are refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from offload.checkpoint import open_checkpoint
from offload.errors import ArtifactError
from offload.loading import build_model
from offload.profile import capture_ffn_inputs, load_profile, profile_model
from offload.sparse import SparsityError, true_activity


def tiny(tiny_checkpoint, kind):
    ckpt = open_checkpoint(tiny_checkpoint(kind))
    return build_model(ckpt, progress=False), ckpt.identity


def test_counts_match_direct_activity(tiny_checkpoint):
    net, identity = tiny(tiny_checkpoint, "llama_relu")
    ids = torch.randint(0, 97, (100,), generator=torch.Generator().manual_seed(0))
    prof = profile_model(net, ids, window=32, identity=identity, progress=False)  # 3 windows, 4 tokens dropped
    xs = capture_ffn_inputs(net, ids[:96].view(3, 32))
    assert prof.tokens == [96, 96] and prof.density is None and prof.kind == "relu"
    for i, x in enumerate(xs):
        with torch.no_grad():
            expected = true_activity(net.layers[i].mlp, x).sum(0).numpy()
        assert prof.counts[i].dtype == np.int64 and np.array_equal(prof.counts[i], expected)
    assert all(0 <= f.min() and f.max() <= 1 for f in prof.frequencies)


def test_swiglu_profile_records_density_and_threshold(tiny_checkpoint, tmp_path):
    net, identity = tiny(tiny_checkpoint, "llama")
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with pytest.raises(SparsityError, match="needs a density"):
        profile_model(net, ids, progress=False)
    prof = profile_model(net, ids, density=0.25, identity=identity, progress=False)
    assert [int(c.sum()) for c in prof.counts] == [32 * 24] * 2  # k = round(0.25·96) per token
    assert prof.layer_density == pytest.approx([0.25, 0.25])
    assert prof.thresholds is not None and all(t > 0 for t in prof.thresholds)
    path = tmp_path / "profile.safetensors"
    prof.save(path)
    back = load_profile(path, identity)
    assert back.density == 0.25 and back.thresholds == pytest.approx(prof.thresholds)
    assert all(np.array_equal(a, b) for a, b in zip(back.counts, prof.counts)) and back.tokens == prof.tokens


def test_profile_round_trip_identity_and_placement_reader(tiny_checkpoint, tmp_path):
    net, identity = tiny(tiny_checkpoint, "opt")
    prof = profile_model(net, torch.randint(0, 97, (64,)), window=32, identity=identity, source="unit test",
                         progress=False)
    path = tmp_path / "profile.safetensors"
    prof.save(path)
    back = load_profile(path, identity)
    assert back.identity == identity and back.kind == "relu_fc" and back.source == "unit test"
    with pytest.raises(ArtifactError, match=rf"made for model '{identity}', not for this model \('other-model'\)"):
        load_profile(path, "other-model")
    with pytest.raises(ArtifactError, match="cannot read the profile"):
        load_profile(tmp_path / "missing.safetensors")
    # the placement side reads the same file (its module is being reorganised: look in both places)
    import importlib

    reader = None
    for name in ("offload.place.report_cli", "offload.place.report"):
        try:
            reader = getattr(importlib.import_module(name), "load_profile_frequencies", None)
        except ImportError:
            continue
        if reader is not None:
            break
    if reader is None:
        pytest.skip("offload.place has no load_profile_frequencies")
    freqs = reader(path, identity)
    assert all(np.allclose(a, b) for a, b in zip(freqs, prof.frequencies))


def test_density_outside_range_is_refused(tiny_checkpoint):
    net, _ = tiny(tiny_checkpoint, "llama")
    with pytest.raises(SparsityError, match=r"density=1.2: expected a number in \(0, 1\]"):
        profile_model(net, torch.zeros(64, dtype=torch.long), density=1.2, progress=False)
