"""The placement solver against brute force, its invariants, and the Placement artifact."""
import functools
import itertools
import json
import warnings

import numpy as np
import pytest

from offload.errors import ArtifactError, BudgetError
from offload.place.solver import Placement, solve_placement

FIXED = 1000


def brute_force(freqs, nb, cap, c, extra=None):
    """Best mass over every subset of neurons (small instances only); extra[i]: bytes a layer pays once
    when it holds a hot neuron."""
    sizes = [len(f) for f in freqs]
    f_all = np.concatenate(freqs)
    layer = np.repeat(np.arange(len(freqs)), sizes)
    masks = _all_subsets(len(f_all))
    mass = masks @ f_all
    cost = masks @ np.asarray(nb)[layer]
    ok = cost <= cap
    for i, n in enumerate(sizes):
        hot = masks[:, layer == i].sum(1)
        ok &= (hot == 0) | (hot >= min(c, n))
        cost += (hot > 0) * (extra[i] if extra else 0)
    ok &= cost <= cap
    return mass[ok].max()


@functools.cache
def _all_subsets(n):
    return np.array(list(itertools.product((0, 1), repeat=n)), dtype=bool)


def mass(freqs, placement):
    return sum(f[h].sum() for f, h in zip(freqs, placement.hot))


def check_valid(placement, budget, c):
    assert placement.total_bytes <= budget
    for h, n in zip(placement.hot, placement.neurons):
        assert len(h) == 0 or len(h) >= min(c, n)
        assert np.all(np.diff(h) > 0) and (len(h) == 0 or (h[0] >= 0 and h[-1] < n))


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("c", [0, 2, 3])
@pytest.mark.parametrize("nb", [[10, 10, 10], [10, 7, 13]])
def test_milp_and_greedy_against_brute_force(seed, c, nb):
    """3 layers × 4 neurons: all 4096 subsets, with and without the per-layer minimum."""
    rng = np.random.default_rng(seed)
    freqs = [rng.random(4) ** 2 for _ in range(3)]
    for cap in np.linspace(0, sum(nb) * 4, 7).astype(int):
        best = brute_force(freqs, nb, cap, c)
        budget = FIXED + int(cap)
        m = solve_placement(freqs, nb, FIXED, budget, min_hot_per_layer=c, method="milp", batch_size=1)
        g = solve_placement(freqs, nb, FIXED, budget, min_hot_per_layer=c, method="greedy")
        for p in (m, g):
            check_valid(p, budget, c)
        assert mass(freqs, m) == pytest.approx(best, abs=1e-9)
        assert mass(freqs, g) <= best + 1e-9
        if c == 0 and len(set(nb)) == 1:  # global top-k is exact
            assert mass(freqs, g) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("c", [0, 2])
def test_layer_bytes_against_brute_force(seed, c):
    """Per-layer bytes paid once by a layer holding any hot neuron (packed hot rows' down tables): the
    MILP stays exact, greedy valid, auto the better of the two; total_bytes counts them."""
    rng = np.random.default_rng(10 + seed)
    freqs = [rng.random(4) ** 2 for _ in range(3)]
    nb, extra = [10, 7, 13], [15, 0, 30]
    for cap in np.linspace(0, sum(nb) * 4 + sum(extra), 8).astype(int):
        best = brute_force(freqs, nb, cap, c, extra)
        budget = FIXED + int(cap)
        kw = dict(min_hot_per_layer=c, layer_bytes=extra)
        m = solve_placement(freqs, nb, FIXED, budget, method="milp", batch_size=1, **kw)
        g = solve_placement(freqs, nb, FIXED, budget, method="greedy", **kw)
        a = solve_placement(freqs, nb, FIXED, budget, **kw)
        for p in (m, g, a):
            check_valid(p, budget, c)
            assert p.layer_hot_bytes == tuple(len(h) * b + (e if len(h) else 0)
                                              for h, b, e in zip(p.hot, nb, extra))
        assert mass(freqs, m) == pytest.approx(best, abs=1e-9) and mass(freqs, a) == pytest.approx(best, abs=1e-9)
        assert mass(freqs, g) <= best + 1e-9
    with pytest.raises(ValueError, match="layer_bytes: expected one int"):
        solve_placement(freqs, nb, FIXED, FIXED + 100, layer_bytes=[1, 2])


@pytest.mark.parametrize("seed", range(4))
def test_milp_equals_greedy_without_minimum(seed):
    rng = np.random.default_rng(seed)
    freqs = [rng.beta(0.3, 2.0, size=rng.integers(20, 60)) for _ in range(6)]
    for frac in (0.1, 0.35, 0.8):
        budget = FIXED + int(frac * sum(map(len, freqs))) * 24
        g = solve_placement(freqs, 24, FIXED, budget, method="greedy")
        m = solve_placement(freqs, 24, FIXED, budget, method="milp", batch_size=1)
        assert g.method == "greedy" and m.method == "milp"
        assert m.share == pytest.approx(g.share, abs=1e-9)
        assert sum(m.hot_counts) == sum(g.hot_counts)


@pytest.mark.parametrize("seed", range(5))
def test_budget_never_exceeded_and_minimum_split_held(seed):
    rng = np.random.default_rng(100 + seed)
    layers = int(rng.integers(2, 9))
    freqs = [rng.power(0.3, size=int(rng.integers(5, 200))) for _ in range(layers)]
    nb = [int(x) for x in rng.integers(5, 50, size=layers)]
    c = int(rng.integers(0, 40))
    for budget in rng.integers(FIXED, FIXED + sum(n * b for n, b in zip(map(len, freqs), nb)), size=4):
        for method in ("greedy", "milp"):
            p = solve_placement(freqs, nb, FIXED, int(budget), min_hot_per_layer=c, method=method, batch_size=8)
            check_valid(p, int(budget), c)
            assert p.fixed_bytes == FIXED and p.budget == budget
            assert p.share == pytest.approx(mass(freqs, p) / sum(f.sum() for f in freqs))


@pytest.mark.parametrize("c", [0, 30])
def test_share_monotone_in_budget(c):
    rng = np.random.default_rng(7)
    freqs = [rng.power(0.2 + 0.2 * i, size=100) for i in range(5)]
    shares = []
    for budget in range(FIXED, FIXED + 500 * 8 + 1, 400):
        p = solve_placement(freqs, 8, FIXED, budget, min_hot_per_layer=c, method="milp", batch_size=4)
        shares.append(p.share)
    assert all(b >= a - 1e-12 for a, b in zip(shares, shares[1:]))
    assert shares[0] == 0 and shares[-1] == pytest.approx(1.0)


def test_layer_smaller_than_minimum_may_be_fully_hot():
    freqs = [np.array([0.9, 0.8]), np.full(10, 0.1)]
    for method in ("greedy", "milp"):
        p = solve_placement(freqs, 1, 0, 2, min_hot_per_layer=5, method=method)
        assert p.hot_counts == (2, 0)


def test_auto_uses_exact_greedy_and_milp_with_minimum():
    freqs = [np.linspace(0, 1, 10), np.linspace(0.2, 0.3, 10)]
    assert solve_placement(freqs, 2, 0, 10).method == "greedy"
    p = solve_placement(freqs, 2, 0, 10, min_hot_per_layer=3)
    assert p.method in ("milp", "greedy") and p.hot_counts == (5, 0)
    # A case where the greedy heuristic is beaten: auto returns the MILP's (optimal) answer.
    freqs = [np.array([0.5, 0.1, 0.6]), np.array([0.8, 0.6, 0.9])]  # total mass 3.5
    g = solve_placement(freqs, 1, 0, 4, min_hot_per_layer=2, method="greedy")
    assert g.hot_counts == (0, 3) and g.share == pytest.approx(2.3 / 3.5)
    p = solve_placement(freqs, 1, 0, 4, min_hot_per_layer=2)
    assert p.method == "milp" and p.hot_counts == (2, 2) and p.share == pytest.approx(2.8 / 3.5)


def test_milp_failure_falls_back_to_greedy(monkeypatch):
    import scipy.optimize

    def broken(*args, **kwargs):
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(scipy.optimize, "milp", broken)
    freqs = [np.linspace(0, 1, 10)] * 2
    with pytest.warns(UserWarning, match="solver exploded"):
        p = solve_placement(freqs, 1, 0, 8, min_hot_per_layer=3, method="milp")
    assert p.method == "greedy" and "MILP failed" in p.note and sum(p.hot_counts) == 8


def test_budget_below_fixed_raises_before_solving():
    with pytest.raises(BudgetError) as e:
        solve_placement([np.ones(4)], 10, fixed_bytes=3 * 2**30, budget=2 * 2**30,
                        fixed_breakdown={"attention": 2 * 2**30, "kv_cache": 2**30})
    msg = str(e.value)
    assert "2.00 GiB (2147483648 bytes)" in msg and "3.00 GiB (3221225472 bytes: " in msg
    assert "shortfall of 1.00 GiB" in msg and "attention 2.00 GiB" in msg and "kv cache 1.00 GiB" in msg
    assert "shorter context" in msg and "device='cpu'" in msg


@pytest.mark.parametrize("bad", [[np.array([0.5, 1.5])], [np.array([np.nan])], [np.zeros((2, 2))], []])
def test_bad_frequencies(bad):
    with pytest.raises(ValueError, match="frequencies"):
        solve_placement(bad, 1, 0, 10)


def test_json_round_trip_save_load_and_identity(tmp_path):
    rng = np.random.default_rng(3)
    freqs = [rng.random(n) for n in (13, 8, 21)]
    p = solve_placement(freqs, [6, 7, 8], 50, 150, min_hot_per_layer=2, model_identity="abc123", method="milp")
    q = Placement.from_json(p.to_json())
    assert q == p and q.hot_counts == p.hot_counts and q.share == p.share
    assert not q.hot[0].flags.writeable
    doc = json.loads(p.to_json())
    assert {"format", "version", "model_identity", "method", "budget_bytes", "fixed_bytes", "hot_ffn_bytes",
            "total_bytes", "gpu_share", "layers"} <= set(doc)
    path = tmp_path / "placement.json"
    p.save(path)
    assert Placement.load(path, identity="abc123") == p
    with pytest.raises(ArtifactError, match="made for model 'abc123'.*'zzz'"):
        Placement.load(path, identity="zzz")
    with pytest.raises(ArtifactError, match="made for model"):
        p.check_identity("other")
    p.check_identity("abc123")
    with_tables = solve_placement(freqs, [6, 7, 8], 50, 150, layer_bytes=[9, 0, 4], method="greedy")
    again = Placement.from_json(with_tables.to_json())
    assert again == with_tables and again.hot_bytes == with_tables.hot_bytes
    old = json.loads(with_tables.to_json())  # written before layer_bytes existed: 0 each
    for layer in old["layers"]:
        del layer["layer_bytes"]
    assert Placement.from_json(json.dumps(old)).layer_bytes == (0, 0, 0)


@pytest.mark.parametrize("text", ["not json", '{"format": "x"}', json.dumps(
    {"format": "offload.placement", "version": 1, "layers": [{"neurons": 3, "hot": "!!", "hot_count": 1}]})])
def test_corrupt_placement_json(text, tmp_path):
    with pytest.raises(ArtifactError):
        Placement.from_json(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ArtifactError, match="cannot read"):
            Placement.load(tmp_path / "missing.json")
