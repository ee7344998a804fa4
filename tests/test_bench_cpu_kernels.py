"""benchmarks/cpu_kernels.py: its plain baseline loops are right, and the quick run works."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cpu_kernels.py")


def _load():
    spec = importlib.util.spec_from_file_location("bench_cpu_kernels", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_cpu_kernels"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load()


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K"])
def test_plain_gguf_loops_match_gguf(name):
    """The baselines decode GGUF blocks as gguf.quants does (else the table compares nothing)."""
    import gguf
    from gguf import GGMLQuantizationType as QT
    from offload.formats.gguf_blocks import random_rows

    rng = np.random.default_rng(0)
    raw = random_rows(QT[name], 6, 512, rng)
    W = gguf.quants.dequantize(raw, QT[name]).reshape(6, 512).astype(np.float64)
    x = rng.standard_normal(512).astype(np.float32)
    y = np.zeros(6, np.float32)
    bench.run_plain(name, raw, x, y, 1)
    ref = W @ x
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()


def test_quick_run(capsys):
    bench.main(["--quick", "-o", "json"])
    result = json.loads(capsys.readouterr().out)
    assert result["target"] == "host" and result["machine"]["cpu"]
    assert {r["kernel"] for r in result["rows"]} == {"fp16", "Q4_1", "Q4_1/int8x"}
    for r in result["rows"]:
        assert r["gbs"] > 0 and r["plain_gbs"] > 0 and r["stream_gbs"] > 0
        assert r["vs_plain"] == pytest.approx(r["gbs"] / r["plain_gbs"])
