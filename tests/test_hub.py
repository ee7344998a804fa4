"""Hub repo ids resolve through huggingface_hub's cache (no network here): a tiny checkpoint laid
out as the hub cache stores it loads by repo id, with local_files_only and HF_HUB_OFFLINE."""
from __future__ import annotations

import shutil

import pytest
import torch

from offload.checkpoint import HUB_PATTERNS, open_checkpoint
from offload.loading import build_model


@pytest.fixture
def hub_cache(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    src = tiny_checkpoint("llama_relu")
    repo = tmp_path / "models--test-org--tiny-relu"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    return src


def test_repo_id_loads_from_hub_cache(hub_cache):
    ckpt = open_checkpoint("test-org/tiny-relu", local_files_only=True)
    model = build_model(ckpt, progress=False)
    reference = build_model(open_checkpoint(hub_cache), progress=False)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))


def test_unknown_revision_is_a_clear_error(hub_cache):
    from offload.errors import CheckpointError

    with pytest.raises(CheckpointError, match="test-org/tiny-relu: not in the local Hugging Face cache"):
        open_checkpoint("test-org/tiny-relu", revision="v9", local_files_only=True)


def test_download_patterns_skip_pickles():
    assert "*.safetensors" in HUB_PATTERNS and not any(p.endswith(".bin") for p in HUB_PATTERNS)
