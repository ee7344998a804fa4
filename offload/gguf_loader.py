"""GGUF checkpoints (llama.cpp's format) opened as HF-named fp32 tensors.

Metadata (offload.gguf_header) becomes a HF-style config dict; a tensor is read from the file when asked
for: as stored (``raw``: a quantized tensor's blocks, for the packed formats) or dequantized with the
``gguf`` package (``get``). llama.cpp's converter permutes the rows of LLaMA's q and k projections (its
RoPE pairs adjacent dims, HF's pairs the two halves); we undo that so the weights match HF's.
Qwen2 (``qwen2``: q/k/v biases, its own rope θ) is converted without that permutation, because
llama.cpp runs it with the NeoX (halves) rope, which is HF's.
Gemma 3 (``gemma3``, the text model: HF ``gemma3_text``) is not permuted either; llama.cpp's converter
stores its RMSNorm weights as 1 + w (Gemma's norms multiply by 1 + w), so we subtract 1 again, as
transformers' GGUF loader does; what the metadata does not hold (the local rope θ, the sliding-window
pattern, the query scale) is what llama.cpp hard-codes for the architecture.
"""
from __future__ import annotations

import os
import re
import struct

import numpy as np
import torch

from offload.checkpoint import Checkpoint
from offload.errors import CheckpointError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
_PERMUTED_QK = ("llama",)  # architectures whose q/k rows llama.cpp permutes for its adjacent-pair rope
_UNIT_OFFSET_NORMS = ("gemma3",)  # architectures whose norm weights llama.cpp stores as 1 + w

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_ARCH_LAYER_NAMES = {"gemma3": {
    **_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_MODEL_TYPES = {"gemma3": "gemma3_text"}  # GGUF architecture → HF model_type, where they differ


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """HF name of a GGUF tensor ("blk.3.ffn_up.weight" → "model.layers.3.mlp.up_proj.weight")."""
    layer_names = _ARCH_LAYER_NAMES.get(arch, _LAYER_NAMES)
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in layer_names:
        return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows [head, pair, half] → HF's [head, half, pair]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def config_from_gguf(fields: dict, tensors, path: str) -> dict:
    """A HF-style config dict from a GGUF's metadata (offload.gguf_header.read_gguf_header's output)."""
    def _field(key, default=None):
        value = fields.get(key)
        return default if value is None else value

    arch = _field("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported; "
                                    f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    names = {t.name for t in tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError(f"{path}: GGUF with a rope_freqs tensor (LLaMA-3.1 rope scaling) is not "
                                    "supported; load the HF checkpoint instead")

    def need(key):
        value = _field(f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    heads = int(need("attention.head_count"))
    embed = next(t for t in tensors if t.name == "token_embd.weight")
    vocab = int(_field(f"{arch}.vocab_size", int(embed.shape[0])))
    config = {
        "model_type": arch, "hidden_act": "silu",
        "vocab_size": vocab,
        "hidden_size": int(need("embedding_length")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(f"{arch}.attention.head_count_kv", heads)),
        "max_position_embeddings": int(_field(f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field("tokenizer.ggml.eos_token_id"),
    }
    rope_dim = _field(f"{arch}.rope.dimension_count")
    if rope_dim is not None:
        config["head_dim"] = int(rope_dim)
    scaling = _field(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise UnsupportedModelError(f"{path}: GGUF rope scaling {scaling!r} is not supported; supported: linear")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    if arch == "gemma3":
        del config["hidden_act"]
        config.update(gemma3_config(_field, config))
    return config


def gemma3_config(field, config: dict) -> dict:
    """The Gemma 3 keys of a HF config from a ``gemma3`` GGUF's metadata (``field(key, default)``) and the
    common keys already read. llama.cpp (src/llama-model.cpp) hard-codes what the file does not say: the
    local rope θ 10⁴ and no rope scaling on sliding-window layers, every 6th layer global, and queries
    scaled by 1/√head_dim, except the 27B (62 layers): 1/√(hidden / heads). The rope scaling read
    (``rope_scaling``) applies to the global layers."""
    head_dim = int(field("gemma3.attention.key_length", config.get("head_dim") or
                         config["hidden_size"] // config["num_attention_heads"]))
    scalar = config["hidden_size"] // config["num_attention_heads"] if config["num_hidden_layers"] == 62 else head_dim
    out = {"model_type": _MODEL_TYPES["gemma3"], "hidden_activation": "gelu_pytorch_tanh", "head_dim": head_dim,
           "sliding_window": int(field("gemma3.attention.sliding_window", 4096)), "rope_local_base_freq": 10000.0,
           "query_pre_attn_scalar": scalar, "sliding_window_pattern": 6,
           "final_logit_softcapping": field("gemma3.final_logit_softcapping"),
           "attn_logit_softcapping": field("gemma3.attn_logit_softcapping")}
    pattern = field("gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple)) and len(pattern) == config["num_hidden_layers"]:  # per layer: sliding?
        out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
    elif pattern is not None:
        out["sliding_window_pattern"] = int(pattern)
    return out


FLOAT_TYPES = ("F32", "F16", "BF16")


class FileRows:
    """Rows of a GGUF tensor's stored bytes, read from the file when sliced (``rows[a:b]`` → uint8
    [b − a, row_bytes]): packing a tensor chunk by chunk then never holds more than a chunk of it, and
    no page of the file stays mapped into the process (a memory map's touched pages count as resident)."""

    def __init__(self, path: str, offset: int, rows: int, row_bytes: int):
        self.path, self.offset = path, offset
        self.shape = (rows, row_bytes)

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("FileRows reads contiguous row ranges only")
        out = np.empty((max(0, stop - start), self.shape[1]), np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.shape[1])
            if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                raise CheckpointError(f"{self.path}: truncated while reading a tensor's rows")
        return out


def read_tensor_bytes(path: str, tensor) -> np.ndarray:
    """The stored bytes of a tensor (offload.gguf_header.TensorInfo), read from the file (no memory map,
    whose touched pages would stay in the process's resident memory), as uint8 [rows, row_bytes]."""
    rows = int(np.prod(tensor.shape[:-1])) if len(tensor.shape) > 1 else 1
    buf = np.empty(int(tensor.n_bytes), np.uint8)
    with open(path, "rb") as f:
        f.seek(int(tensor.data_offset))
        if f.readinto(memoryview(buf)) != buf.size:
            raise CheckpointError(f"{path}: truncated: tensor {tensor.name!r} needs {buf.size} bytes at offset "
                                  f"{tensor.data_offset}")
    return buf.reshape(rows, -1)


def open_gguf(path: str) -> Checkpoint:
    from gguf.quants import dequantize

    from offload.checkpoint import RawTensor
    from offload.gguf_header import read_gguf_header

    try:
        fields, tensors = read_gguf_header(path)
    except (ValueError, OSError, struct.error) as e:
        raise CheckpointError(f"{path}: cannot read GGUF file ({e})") from None
    config = config_from_gguf(fields, tensors, path)
    by_hf, shapes = {}, {}
    arch = fields.get("general.architecture")
    for t in tensors:
        name = hf_tensor_name(t.name, arch)
        if name is None:
            raise CheckpointError(f"{path}: unexpected GGUF tensor {t.name!r}")
        by_hf[name] = t
        shapes[name] = t.shape
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    permuted = arch in _PERMUTED_QK
    unit_offset = arch in _UNIT_OFFSET_NORMS

    def get(name: str) -> torch.Tensor:
        t = by_hf[name]
        w = dequantize(read_tensor_bytes(path, t), t.type).astype(np.float32, copy=False).reshape(shapes[name])
        if permuted and name.endswith("q_proj.weight"):
            w = unpermute_qk(w, heads)
        elif permuted and name.endswith("k_proj.weight"):
            w = unpermute_qk(w, kv_heads)
        elif unit_offset and name.endswith("norm.weight"):
            w = w - np.float32(1.0)
        return torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # own, writable copy

    def raw(name: str):
        t = by_hf[name]
        if t.type.name in FLOAT_TYPES or len(shapes[name]) != 2:
            return None
        cols = shapes[name][1]
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):  # whole quantized rows move: lossless
            n_head = heads if name.endswith("q_proj.weight") else kv_heads
            return RawTensor(np.ascontiguousarray(unpermute_qk(read_tensor_bytes(path, t), n_head)), int(t.type), cols)
        rows = shapes[name][0]
        return RawTensor(FileRows(path, t.data_offset, rows, t.n_bytes // rows), int(t.type), cols)

    return Checkpoint(source=path, config=config, shapes=shapes, files={n: path for n in shapes}, get=get,
                      tokenizer_path=os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path),
                      raw=raw)
