"""benchmarks/sparsity_designs.py on a tiny random LLaMA (fp32 safetensors): the functional forward
equals the model's, dense is 1.000, and the bytes each design counts follow from the shapes."""
import importlib.util
import os
import sys

import pytest
import torch

from offload.checkpoint import open_checkpoint
from offload.loading import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

_DIR = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def _load():
    sys.path.insert(0, _DIR)  # the script imports its neighbour predictors.py, as when run from benchmarks/
    try:
        spec = importlib.util.spec_from_file_location("bench_sparsity_designs",
                                                      os.path.join(_DIR, "sparsity_designs.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(_DIR)  # benchmarks/ holds names (decode, solver) other tests must not pick up
    return module


sd = _load()


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    ckpt = open_checkpoint(tiny_checkpoint("llama"))
    net = build_model(ckpt, progress=False)
    ids = torch.randint(0, net.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    return net, sd.byte_table(sd.tensor_bytes(ckpt), ckpt.config), ids


def test_byte_table_from_shapes(tiny):
    net, table, _ = tiny
    c = net.config  # d 64, n 96, 4 heads of 16, 2 kv heads; fp32 = 4 bytes a weight
    d, n, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    assert table.qkv == [(d * d + 2 * kv * d) * 4] * 2 and table.o == [d * d * 4] * 2
    assert table.gate_up == [2 * n * d * 4] * 2 and table.down == [n * d * 4] * 2
    assert table.fixed == [2 * d * 4] * 2 and table.head == c.vocab_size * d * 4 and table.final == d * 4


def test_dense_forward_equals_model(tiny):
    net, _, ids = tiny
    run = sd.SparseRun(net, sd.parse_design("dense", 1.0), thresholds={})
    torch.testing.assert_close(run.hidden(ids), net.hidden_states(ids), atol=1e-5, rtol=1e-5)


def test_design_rows_and_bytes(tiny):
    net, t, ids = tiny
    specs = ["topk", "teal-down", "teal-all-head", "sign", "int2", "qkv+o+topk@0.25"]
    rows = {r["design"]: r for r in sd.measure(net, t, ids, ids, specs, [0.5])}
    dense = rows["dense"]
    assert (dense["ppl_ratio"], dense["ffn_bytes"], dense["model_bytes"]) == (1.0, 1.0, 1.0)
    gu, down, ffn, model = sum(t.gate_up), sum(t.down), t.dense_ffn, t.dense_model

    # top-k: n = 96, k = 48 exactly; gate/up dense, half of down's columns
    r = rows["topk"]
    assert r["neuron_density"] == 0.5 and r["layout"] == "column planes"
    assert r["ffn_bytes"] == pytest.approx((gu + down / 2) / ffn)
    assert r["model_bytes"] == pytest.approx((model - down / 2) / model)

    # thresholds calibrated on the evaluated windows themselves keep the target fraction
    r = rows["teal-down"]
    assert r["neuron_density"] == pytest.approx(0.5, abs=0.01)
    assert r["ffn_bytes"] == pytest.approx((gu + r["neuron_density"] * down) / ffn)

    # every site: each matrix group reads its achieved fraction (both layers have the same shapes)
    r = rows["teal-all-head"]
    k = r["kept"]
    assert set(k) == {"qkv", "o", "gu", "down", "head"}
    assert {s: len(v) for s, v in r["thresholds"].items()} == {"qkv": 2, "o": 2, "gu": 2, "down": 2, "head": 1}
    assert all(v == pytest.approx(0.5, abs=0.01) for v in k.values())
    want = (sum(t.qkv) * k["qkv"] + sum(t.o) * k["o"] + gu * k["gu"] + down * k["down"] + sum(t.fixed)
            + t.head * k["head"] + t.final)
    assert r["model_bytes"] == pytest.approx(want / model)

    # a shadow: 1 bit a weight of gate and up plus an fp16 scale a row, then the selected rows (row-major)
    r = rows["sign"]
    shadow = 2 * (2 * t.n * (t.d + 16) / 8)  # two layers
    assert r["layout"] == "row-major gate/up"
    assert r["ffn_bytes"] == pytest.approx((shadow + gu / 2 + down / 2) / ffn)
    assert rows["int2"]["ffn_bytes"] == pytest.approx((2 * 2 * t.n * t.d * 2.5 / 8 + gu / 2 + down / 2) / ffn)

    # a fixed density for one component, the swept one for the others
    r = rows["qkv+o+topk@0.25"]
    assert r["neuron_density"] == 0.25 and r["kept"]["qkv"] == pytest.approx(0.5, abs=0.01)

    table = sd.format_md(list(rows.values()), "tiny")
    assert "| dense | column planes | 1.00 | 1.000 | - | 1.000 | 1.000 | 1.0000 |" in table


@pytest.mark.parametrize("spec", ["foo", "topk+sign", "topk+down", "sign+gu", "down@1.5"])
def test_bad_designs(spec):
    with pytest.raises(ValueError):
        sd.parse_design(spec, 0.5)
