"""The report: JSON keys, roofline arithmetic, table, plot, model sizes without weights, bad inputs."""
import argparse
import io
import json
import sys

import numpy as np
import pytest

from offload.errors import ArtifactError, BudgetError, CheckpointError, OffloadError
from offload.place.report import build_report, format_report_table, gpu_bandwidth, plot_report
from offload.cli.report import add_arguments as add_report_arguments, run as run_report
from offload.place.report_cli import load_profile_frequencies, model_sizes

CONFIG = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 256,
          "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}
TOP_KEYS = {"schema", "model", "model_identity", "model_type", "dtype", "hot_format", "cpu_dtype", "context", "batch",
            "budget_bytes", "frequencies", "profile", "density", "memory", "placement", "layers", "roofline"}
MEMORY_KEYS = {"gpu", "gpu_fixed_bytes", "gpu_hot_ffn_bytes", "gpu_total_bytes", "gpu_free_bytes",
               "cpu_cold_ffn_bytes", "cpu_other_bytes", "cpu_device_fixed_bytes"}
ROOFLINE_KEYS = {"gpu", "gpu_bandwidth", "gpu_bandwidth_source", "cpu_bandwidth", "cpu_bandwidth_source",
                 "gpu_bytes_per_token", "cpu_bytes_per_token", "pcie_bytes_per_token", "gpu_ms", "cpu_ms",
                 "tokens_per_s", "bound", "dense_cpu_tokens_per_s"}


def profile_freqs(seed=0):
    rng = np.random.default_rng(seed)
    return [np.clip(rng.power(0.3, 256), 0, 1) for _ in range(4)]


def report(budget="2MiB", **kw):
    kw = {"context": 128, "cpu_bw": 20e9, "gpu": "H100 SXM", **kw}
    return build_report(CONFIG, budget=parse_budget(budget), **kw)


def parse_budget(b):
    # 300 MiB CUDA-context reserve + the tiny model's fixed part + `b` for hot rows
    from offload.place.memory import plan_memory
    from offload.units import parse_memory_size

    return plan_memory(CONFIG, context=128).fixed_bytes + parse_memory_size(b)


def test_json_keys_and_consistency():
    r = report(frequencies=profile_freqs(), profile="p.safetensors", identity="abc", min_hot_per_layer=16)
    json.dumps(r)  # plain data
    assert set(r) == TOP_KEYS and set(r["memory"]) == MEMORY_KEYS and set(r["roofline"]) == ROOFLINE_KEYS
    assert set(r["placement"]) == {"method", "note", "min_hot_per_layer", "hot_neurons", "neurons", "gpu_share"}
    assert all(set(row) == {"layer", "neurons", "hot", "hot_pct", "gpu_mib", "gpu_share"} for row in r["layers"])
    assert r["schema"] == "offload.report/1" and r["frequencies"] == "profile" and r["model_identity"] == "abc"
    mem, pl = r["memory"], r["placement"]
    assert mem["gpu_total_bytes"] <= r["budget_bytes"] and mem["gpu_free_bytes"] >= 0
    assert mem["gpu_fixed_bytes"] == sum(mem["gpu"].values())
    assert sum(row["hot"] for row in r["layers"]) == pl["hot_neurons"] and pl["neurons"] == 4 * 256
    assert mem["gpu_hot_ffn_bytes"] == pl["hot_neurons"] * 3 * 64 * 2
    assert mem["cpu_cold_ffn_bytes"] == (pl["neurons"] - pl["hot_neurons"]) * 3 * 64 * 4
    assert all(row["hot"] == 0 or row["hot"] >= 16 for row in r["layers"])


def test_roofline_arithmetic():
    freqs = profile_freqs(1)
    r = report("100KiB", frequencies=freqs)
    rf, n_bytes = r["roofline"], 3 * 64
    hot_mass = sum(row["gpu_share"] * f.sum() for row, f in zip(r["layers"], freqs))
    cold = sum(f.sum() for f in freqs) - hot_mass
    assert rf["cpu_bytes_per_token"] == pytest.approx(cold * n_bytes * 4, rel=1e-6, abs=2)
    gpu_fixed = r["memory"]["gpu"]
    per_token = sum(gpu_fixed[k] for k in ("attention", "norms", "embeddings", "kv_cache"))  # tied: head = table
    assert rf["gpu_bytes_per_token"] == pytest.approx(per_token + hot_mass * n_bytes * 2, rel=1e-6, abs=2)
    assert rf["gpu_bandwidth"] == 3.35e12 and rf["gpu_bandwidth_source"] == "table"
    assert rf["cpu_bandwidth_source"] == "given"
    expected = 1 / max(rf["gpu_bytes_per_token"] / 3.35e12, rf["cpu_bytes_per_token"] / 20e9)
    assert rf["tokens_per_s"] == pytest.approx(expected, rel=1e-4)
    assert rf["bound"] == "cpu" and rf["cpu_ms"] > rf["gpu_ms"] > 0


def test_uniform_frequencies_said_in_json_and_table():
    r = report(density=0.3)
    assert r["frequencies"] == "uniform (no profile)" and r["density"] == 0.3
    hot = [row["hot"] for row in r["layers"]]
    assert max(hot) - min(hot) <= 1  # ties are spread evenly across layers
    table = format_report_table(r)
    assert "uniform (no profile)" in table and "p = 0.30" in table
    assert "tokens/s" in table and "layer |" in table and table.count("\n") > 4 + 8


@pytest.mark.parametrize("name, label", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("h200", "H200"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA A100 80GB PCIe", "A100 80GB"), ("NVIDIA A10", "A10"),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S")])
def test_gpu_table(name, label):
    assert gpu_bandwidth(name)[0] == label


def test_unknown_gpu():
    with pytest.raises(OffloadError, match="unknown GPU 'Voodoo2'.*--gpu-bandwidth"):
        gpu_bandwidth("Voodoo2")


def parse(*argv):
    p = argparse.ArgumentParser()
    add_report_arguments(p)
    return p.parse_args(list(argv))


@pytest.fixture
def config_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CONFIG))
    return d


def run(*argv, **kw):
    out = io.StringIO()
    assert run_report(parse(*argv, "--cpu-bandwidth", "20GB", "--gpu", "H100 SXM"), out=out, **kw) == 0
    return out.getvalue()


def test_run_report_config_only_directory_json(config_dir):
    r = json.loads(run(str(config_dir), "--gpu-memory", "1GiB", "--context", "256", "--json"))
    assert set(r) == TOP_KEYS and r["frequencies"] == "uniform (no profile)" and r["profile"] is None
    assert r["model"] == str(config_dir) and len(r["model_identity"]) == 16 and r["context"] == 256
    assert r["roofline"]["cpu_bandwidth"] == 20e9 and r["placement"]["hot_neurons"] == 1024  # all fit


def test_int4_hot_rows_hold_more_neurons(config_dir):
    """--dtype int4: hot FFN rows packed 4-bit (the rest fp16); the same budget holds ~3× more hot neurons
    (d = 64 here: per neuron 2·(32 + 8) + 36 bytes against 3·64·2, less each used layer's down table)."""
    fp16 = report("100KiB", density=0.3)
    int4 = report("100KiB", density=0.3, hot_format="int4")
    assert int4["hot_format"] == "int4" and int4["dtype"] == "float16" and fp16["hot_format"] == "float16"
    assert int4["memory"]["gpu_fixed_bytes"] == fp16["memory"]["gpu_fixed_bytes"]
    hot16, hot4 = fp16["placement"]["hot_neurons"], int4["placement"]["hot_neurons"]
    tables = sum(256 * 64 // 8 for row in int4["layers"] if row["hot"])
    assert hot16 == 100 * 1024 // 384 and hot4 == (100 * 1024 - tables) // 116 and hot4 > 2.9 * hot16
    assert int4["memory"]["gpu_hot_ffn_bytes"] == hot4 * 116 + tables
    out = run(str(config_dir), "--gpu-memory", "1GiB", "--dtype", "int4", "--context", "64")
    assert "float16 on the GPU (hot FFN rows int4)" in out
    r = json.loads(run(str(config_dir), "--gpu-memory", "1GiB", "--dtype", "int4", "--json"))
    assert r["hot_format"] == "int4" and r["memory"]["gpu_hot_ffn_bytes"] == 1024 * 116 + 4 * 256 * 64 // 8


def write_profile(path, identity, layers=4, n=256, tokens=1000):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = {f"layers.{i}.counts": rng.integers(0, tokens, n).astype(np.int64) for i in range(layers)}
    tensors.update({f"layers.{i}.tokens": np.array(tokens, dtype=np.int64) for i in range(layers)})
    save_file(tensors, str(path), metadata={"model_identity": identity})
    return tensors


def test_profile_is_loaded_and_checked(config_dir, tmp_path):
    _, identity = model_sizes(str(config_dir))
    path = tmp_path / "profile.safetensors"
    tensors = write_profile(path, identity)
    freqs = load_profile_frequencies(path, identity)
    assert np.allclose(freqs[2], tensors["layers.2.counts"] / 1000)
    out = run(str(config_dir), "--gpu-memory", "0.3GiB", "--context", "64", "--profile", str(path))
    assert "frequencies: profile" in out and "uniform" not in out
    seen = []
    run(str(config_dir), "--gpu-memory", "1GiB", "--profile", str(path),
        load_frequencies=lambda p, i: seen.append((p, i)) or freqs)
    assert seen == [(str(path), identity)]
    write_profile(path, "another-model")
    with pytest.raises(ArtifactError, match="made for model 'another-model'"):
        run(str(config_dir), "--gpu-memory", "1GiB", "--profile", str(path))
    write_profile(path, identity, layers=3)
    with pytest.raises(ArtifactError, match="neurons per layer"):
        run(str(config_dir), "--gpu-memory", "1GiB", "--profile", str(path))
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(ArtifactError, match="cannot read the profile"):
        load_profile_frequencies(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("budget, message", [
    ("abc", "--gpu-memory: cannot parse 'abc'"), ("-1GiB", "--gpu-memory: cannot parse '-1GiB'"),
    ("10XB", "--gpu-memory: unknown unit 'XB'"), ("0GiB", "--gpu-memory: expected a positive size")])
def test_bad_budget_strings(config_dir, budget, message):
    with pytest.raises(BudgetError, match=message):
        run(str(config_dir), f"--gpu-memory={budget}")
    with pytest.raises(BudgetError, match=message):
        build_report(CONFIG, budget=budget)


def test_budget_below_non_ffn_need(config_dir):
    with pytest.raises(BudgetError) as e:
        run(str(config_dir), "--gpu-memory", "100MiB", "--context", "8192")
    msg = str(e.value)
    assert "100.00 MiB (104857600 bytes) is too small" in msg and "context of 8192 tokens" in msg
    assert "shortfall" in msg and "context reserve 300.00 MiB" in msg and "device='cpu'" in msg


def test_hub_id_honours_offline_mode(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        model_sizes("test-org/absent")
    # Only config.json cached (no weights): sizes come from it, nothing is fetched.
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "models--test-org--cfg-only" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "models--test-org--cfg-only" / "refs").mkdir()
    (tmp_path / "models--test-org--cfg-only" / "refs" / "main").write_text(commit)
    config, identity = model_sizes("test-org/cfg-only")
    assert config == CONFIG and len(identity) == 16


def test_identity_of_a_checkpoint_directory_matches_loading(config_dir):
    import torch
    from safetensors.torch import save_file

    from offload.checkpoint import open_checkpoint
    from offload.models import config_from_hf, llama

    config_only = model_sizes(str(config_dir))[1]
    shapes = llama.expected_tensors(config_from_hf(CONFIG))
    weights = {k: torch.zeros(v, dtype=torch.float16) for k, v in shapes.items()}
    save_file(weights, str(config_dir / "model.safetensors"))
    config, identity = model_sizes(str(config_dir))
    assert config == CONFIG and identity == open_checkpoint(str(config_dir)).identity == config_only


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    held = []
    report(frequencies=profile_freqs(), placement_out=held)
    _, placement, freqs = held
    path = tmp_path / "report.png"
    plot_report(freqs, placement, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    held = []
    report(placement_out=held)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(OffloadError, match="pip install matplotlib"):
        plot_report(held[2], held[1], tmp_path / "x.png")


def test_profile_layouts(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "p.safetensors"
    save_file({"model.layers.0.counts": np.array([5, 0, 10]), "model.layers.1.counts": np.array([1, 2, 3]),
               "tokens": np.array(10)}, str(path))  # one global token count, no identity metadata
    freqs = load_profile_frequencies(path, "any")
    assert np.allclose(freqs[0], [0.5, 0, 1]) and np.allclose(freqs[1], [0.1, 0.2, 0.3])
    save_file({"layers.0.counts": np.array([1])}, str(path))
    with pytest.raises(ArtifactError, match="no positive token count for layer 0"):
        load_profile_frequencies(path)
    save_file({"something": np.array([1])}, str(path))
    with pytest.raises(ArtifactError, match="expected tensors layers.0.counts"):
        load_profile_frequencies(path)
