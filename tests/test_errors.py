"""Every documented error: the exception type and what its message names."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from offload import OffloadedModel
from offload.checkpoint import open_checkpoint
from offload.errors import BudgetError, CheckpointError, GenerationError, UnsupportedModelError
from offload.generation import SamplingConfig
from offload.loading import build_model
from offload.units import parse_memory_size


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _single_file(path):
    return os.path.join(path, "model.safetensors")


def test_missing_directory_or_file():
    with pytest.raises(CheckpointError, match="no-such-dir.*no such file or directory"):
        open_checkpoint("./no-such-dir")
    with pytest.raises(CheckpointError, match="missing.gguf: file not found"):
        open_checkpoint("/tmp/missing.gguf")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path)


def test_truncated_safetensors(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint("llama_relu"), tmp_path)
    f = _single_file(ckpt)
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '.*' ends at byte"):
        open_checkpoint(ckpt)


def test_corrupt_safetensors_header(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint("llama_relu"), tmp_path)
    with open(_single_file(ckpt), "r+b") as fh:
        fh.seek(8)
        fh.write(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        open_checkpoint(ckpt)


def _rewrite(ckpt, edit):
    from safetensors.torch import load_file, save_file

    f = _single_file(ckpt)
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_tensor_of_wrong_shape(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint("llama_relu"), tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(ckpt, lambda t: t.__setitem__(name, torch.zeros(95, 64)))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \[95, 64\], expected \[96, 64\]"):
        build_model(open_checkpoint(ckpt), progress=False)


def test_missing_tensor(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint("llama_relu"), tmp_path)
    _rewrite(ckpt, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.0\.self_attn\.k_proj\.weight"):
        build_model(open_checkpoint(ckpt), progress=False)


def test_unexpected_tensor(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint("llama_relu"), tmp_path)
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors model\.layers\.0\.mlp\.extra\.weight"):
        build_model(open_checkpoint(ckpt), progress=False)


def _set_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_unsupported_model_type(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint("llama_relu"), tmp_path)
    _set_config(ckpt, model_type="mamba")
    with pytest.raises(UnsupportedModelError, match="model_type 'mamba' is not supported.*llama.*opt.*qwen2"):
        build_model(open_checkpoint(ckpt), progress=False)


def test_unsupported_activation(tiny_checkpoint, tmp_path):
    ckpt = _copy(tiny_checkpoint("llama_relu"), tmp_path)
    _set_config(ckpt, hidden_act="gelu_new")
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu_new'"):
        build_model(open_checkpoint(ckpt), progress=False)


def test_hub_id_offline_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="some-org/some-model"):
        open_checkpoint("some-org/some-model", local_files_only=True)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    path = tiny_checkpoint("llama_relu")
    ckpt = open_checkpoint(path)
    return OffloadedModel(build_model(ckpt, progress=False), None, ckpt, device=torch.device("cpu"))


def test_prompt_longer_than_context(tiny_model):
    ids = torch.zeros(1, 128, dtype=torch.long)
    with pytest.raises(GenerationError, match="prompt has 128 tokens but the model's context is 128"):
        tiny_model.generate(ids, max_new_tokens=1, eos_token_id=[])
    with pytest.raises(GenerationError, match="max_new_tokens=100.*at most 28 new tokens fit"):
        tiny_model.generate(ids[:, :100], max_new_tokens=100, eos_token_id=[])


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens=-1: expected an integer >= 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5"),
    (dict(temperature=-0.5), "temperature=-0.5: expected a number >= 0"),
    (dict(top_p=0.0), r"top_p=0.0: expected a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5: expected a number in \(0, 1\]"),
    (dict(top_k=-3), "top_k=-3"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
    (dict(min_p=1.5), r"min_p=1.5: expected a number in \[0, 1\]"),
])
def test_invalid_generation_arguments(tiny_model, kwargs, message):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(GenerationError, match=message):
        tiny_model.generate(ids, eos_token_id=[], **kwargs)


def test_sampling_config_validates_directly():
    with pytest.raises(GenerationError, match="top_p"):
        SamplingConfig(top_p=-1)


@pytest.mark.parametrize("budget, message", [
    ("abc", "cannot parse 'abc'"), ("-1GiB", "cannot parse '-1GiB'"), ("10XB", "unknown unit 'XB'"),
    (0, "positive"), ("0GiB", "positive"),
])
def test_bad_gpu_memory(budget, message):
    with pytest.raises(BudgetError, match=message):
        parse_memory_size(budget)
    if budget not in (0, "0GiB"):  # a zero budget is valid for from_pretrained on the CPU (test_cli_budgets)
        with pytest.raises(BudgetError, match=message):
            OffloadedModel.from_pretrained("/nonexistent/x.gguf", gpu_memory=budget)


def test_memory_units():
    assert parse_memory_size("8GiB") == 8 * 2**30
    assert parse_memory_size("8GB") == 8 * 10**9
    assert parse_memory_size("1.5 MiB") == 3 * 2**19
    assert parse_memory_size(12345) == 12345
