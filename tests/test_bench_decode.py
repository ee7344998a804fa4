"""The pure pieces of benchmarks/decode.py (benchmarks/table.py): statistics, bytes/roofline arithmetic,
table and JSON output; benchmarks/sweep.py's budgets and plot. No model is loaded."""
import importlib.util
import json
import math
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "table.py")


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load("bench_table", _PATH)
sweep = _load("bench_sweep", os.path.join(os.path.dirname(_PATH), "sweep.py"))


def test_mean_sd():
    assert bench.mean_sd([2.0, 4.0]) == (3.0, 1.0)
    assert bench.mean_sd([5.0]) == (5.0, 0.0)
    m, sd = bench.mean_sd([])
    assert math.isnan(m) and math.isnan(sd)


def test_roofline_arithmetic():
    assert bench.roofline_tokens_per_s(100e9, 1e9) == pytest.approx(100.0)
    assert bench.roofline_fraction(25.0, 100e9, 1e9) == pytest.approx(0.25)
    assert bench.roofline_fraction(25.0, 100e9, None) is None
    # 1000 non-FFN bytes + 600 FFN bytes over 3 steps + 50 predictor bytes
    assert bench.hybrid_bytes_per_token(1000, 600, 3, 50) == pytest.approx(1250.0)
    assert bench.hybrid_bytes_per_token(1000, 600, 0, 0) == pytest.approx(1600.0)  # steps clamp to 1


def _rows():
    common = dict(model="m.gguf", size=2**30, params=135_000_000, bandwidth=10e9)
    base = 10.0
    return [
        bench.make_row(backend="transformers", budget=None, test="pp128", runs=[50.0, 50.0], base_mean=50.0,
                       bytes_per_token=2**30, **common),
        bench.make_row(backend="transformers", budget=None, test="tg128", runs=[9.0, 11.0], base_mean=base,
                       bytes_per_token=2**30, **common),
        bench.make_row(backend="offload hybrid", budget=300 * 2**20, test="tg128", runs=[20.0, 20.0],
                       base_mean=base, bytes_per_token=500e6, **common),
    ]


def test_make_row_fields():
    pp, tg, hyb = _rows()
    assert pp["bytes_per_token"] is None and pp["roofline_fraction"] is None  # pp is not bandwidth bound
    assert tg["tokens_per_s_mean"] == 10.0 and tg["tokens_per_s_sd"] == 1.0
    assert tg["ratio_to_transformers"] == pytest.approx(1.0)
    assert tg["roofline_fraction"] == pytest.approx(10.0 / (10e9 / 2**30))
    assert hyb["ratio_to_transformers"] == pytest.approx(2.0)
    assert hyb["roofline_fraction"] == pytest.approx(20.0 / 20.0)  # 10 GB/s ÷ 500 MB = 20 t/s


def test_markdown_table():
    text = bench.format_markdown(_rows(), [("llama.cpp", "not installed")], {"cpu_count": 2}, ["a note"])
    lines = text.splitlines()
    assert lines[0].startswith("| model | size | params | backend | budget | test | t/s |")
    assert lines[1].count("---") == lines[0].count("|") - 1
    assert "| offload hybrid | 300.00 MiB | tg128 | 20.00 ± 0.00 | 2.00 |" in text
    assert "| transformers | — | tg128 | 10.00 ± 1.00 | 1.00 | 1.00 GiB |" in text
    assert "100%" in text  # hybrid at its roofline
    assert "skipped llama.cpp: not installed" in text and "a note" in text and "cpu_count 2" in text
    assert all(line.count("|") == lines[0].count("|") for line in lines[:5])


def test_json_output():
    doc = json.loads(bench.format_json(_rows(), [("layer-split", "no CUDA")], {"cpu_count": 2, "torch": "x"},
                                       {"reps": 2}))
    assert doc["machine"] == {"cpu_count": 2, "torch": "x"}
    assert doc["reps"] == 2
    assert doc["skipped"] == [{"backend": "layer-split", "reason": "no CUDA"}]
    assert len(doc["rows"]) == 3
    row = doc["rows"][2]
    for key in ("model", "size_bytes", "params", "backend", "budget_bytes", "test", "tokens_per_s_mean",
                "tokens_per_s_sd", "ratio_to_transformers", "bytes_per_token", "roofline_fraction",
                "machine_cpu_count", "machine_torch"):
        assert key in row
    assert row["runs"] == [20.0, 20.0]


def test_human_units():
    assert bench.human_bytes(None) == "—"
    assert bench.human_bytes(512) == "512 B"
    assert bench.human_bytes(3 * 2**20) == "3.00 MiB"
    assert bench.human_count(134_515_008) == "134.52 M"


def test_sweep_budgets_and_plot(tmp_path):
    assert sweep.sweep_budgets(300, 700, [0.5, 1.0, 1.2]) == [500, 1000, 1200]
    rows = [{"engine": e, "budget_bytes": b * 2**20, "tokens_per_s_mean": t, "tokens_per_s_sd": 0.5}
            for e, pts in (("offload hybrid", [(100, 20.0), (200, 30.0)]), ("layer-split", [(100, 10.0), (200, 25.0)]))
            for b, t in pts]
    path = tmp_path / "sweep.png"
    sweep.plot_sweep(rows, str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
