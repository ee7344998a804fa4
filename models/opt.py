"""OPT: ReLU FFN, LayerNorm, learned positions (offset 2), biases everywhere, optional project_in/out.

Shapes: b batch, t tokens, d hidden, n FFN neurons (ffn_dim), h heads, hd head dim, e word embedding dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from offload.errors import UnsupportedModelError
from offload.models.common import KVCache, cached_attention, empty_param, linear, param_loader

MODEL_TYPES = ("opt",)
POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (fairseq legacy)


@dataclass(frozen=True)
class OPTConfig:
    vocab_size: int
    hidden_size: int
    ffn_dim: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    word_embed_proj_dim: int
    do_layer_norm_before: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    final_layer_norm: bool = True
    tie_word_embeddings: bool = True
    model_type: str = "opt"
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 2

    @classmethod
    def from_hf(cls, cfg: dict) -> "OPTConfig":
        act = cfg.get("activation_function", "relu")
        if act != "relu":
            raise UnsupportedModelError(f"OPT activation_function {act!r} is not supported; supported: relu")
        d = cfg["hidden_size"]
        pre = cfg.get("do_layer_norm_before", True)
        if not cfg.get("enable_bias", True) or not cfg.get("layer_norm_elementwise_affine", True):
            raise UnsupportedModelError("OPT with enable_bias=false or layer_norm_elementwise_affine=false "
                                        "is not supported; supported: the published OPT checkpoints")
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=d, ffn_dim=cfg["ffn_dim"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            word_embed_proj_dim=cfg.get("word_embed_proj_dim") or d,
            do_layer_norm_before=pre,
            # OPT-350m (post-LN) has no final layer norm; transformers drops it the same way.
            final_layer_norm=pre and not cfg.get("_remove_final_layer_norm", False),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            bos_token_id=cfg.get("bos_token_id", 2), eos_token_id=cfg.get("eos_token_id", 2),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    @property
    def intermediate_size(self) -> int:
        return self.ffn_dim


def expected_tensors(cfg: OPTConfig) -> dict[str, tuple[int, ...]]:
    d, n, e = cfg.hidden_size, cfg.ffn_dim, cfg.word_embed_proj_dim
    p0 = "model.decoder."
    shapes = {p0 + "embed_tokens.weight": (cfg.vocab_size, e),
              p0 + "embed_positions.weight": (cfg.max_position_embeddings + POSITION_OFFSET, d)}
    if e != d:
        shapes.update({p0 + "project_in.weight": (d, e), p0 + "project_out.weight": (e, d)})
    if cfg.final_layer_norm:
        shapes.update({p0 + "final_layer_norm.weight": (d,), p0 + "final_layer_norm.bias": (d,)})
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, e)
    for i in range(cfg.num_hidden_layers):
        p = f"{p0}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (d, d)
            shapes[f"{p}self_attn.{proj}.bias"] = (d,)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            shapes[f"{p}{norm}.weight"] = (d,)
            shapes[f"{p}{norm}.bias"] = (d,)
        shapes.update({p + "fc1.weight": (n, d), p + "fc1.bias": (n,), p + "fc2.weight": (d, n), p + "fc2.bias": (d,)})
    return shapes


def ignorable_tensor(name: str, cfg: OPTConfig) -> bool:
    return cfg.tie_word_embeddings and name == "lm_head.weight"


class ReluFFN(nn.Module):
    """fc2(relu(fc1(x) + b1)) + b2. Neuron i is row i of fc1 (and b1[i]) and column i of fc2.

    fc1 [n, d], fc1_bias [n], fc2 [d, n], fc2_bias [d].
    """

    kind = "relu_fc"

    def __init__(self, d: int, n: int, dtype=torch.float32, device=None):
        super().__init__()
        self.n = n
        self.fc1, self.fc1_bias = empty_param((n, d), dtype, device), empty_param((n,), dtype, device)
        self.fc2, self.fc2_bias = empty_param((d, n), dtype, device), empty_param((d,), dtype, device)

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(linear(x, self.fc1, self.fc1_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.intermediate(x), self.fc2, self.fc2_bias)


class Attention(nn.Module):
    def __init__(self, cfg: OPTConfig, dtype, device):
        super().__init__()
        d = cfg.hidden_size
        self.h, self.hd = cfg.num_attention_heads, cfg.head_dim
        self.qkv, self.qkv_bias = empty_param((3 * d, d), dtype, device), empty_param((3 * d,), dtype, device)
        self.o, self.o_bias = empty_param((d, d), dtype, device), empty_param((d,), dtype, device)

    def forward(self, x, cache: KVCache | None, layer: int, start: int):
        b, t, d = x.shape
        q, k, v = linear(x, self.qkv, self.qkv_bias).view(b, t, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        out = cached_attention(q, k, v, cache, layer, start, scale=self.hd ** -0.5)
        return linear(out.transpose(1, 2).reshape(b, t, d), self.o, self.o_bias)


class Block(nn.Module):
    def __init__(self, cfg: OPTConfig, dtype, device):
        super().__init__()
        d = cfg.hidden_size
        self.pre_norm = cfg.do_layer_norm_before
        self.attn_norm = nn.LayerNorm(d, dtype=dtype, device=device)
        self.attn = Attention(cfg, dtype, device)
        self.ffn_norm = nn.LayerNorm(d, dtype=dtype, device=device)
        self.mlp = ReluFFN(d, cfg.ffn_dim, dtype, device)

    def forward(self, x, cache, layer, start):
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), cache, layer, start)
            return x + self.mlp(self.ffn_norm(x))
        x = self.attn_norm(x + self.attn(x, cache, layer, start))
        return self.ffn_norm(x + self.mlp(x))


class OPTModel(nn.Module):
    """The dense OPT decoder. ``forward(ids [b, t], cache, start) → logits [b, t, V]``."""

    def __init__(self, cfg: OPTConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = cfg
        self.dtype = dtype  # of activations and the KV cache (weights may be stored in fp16: offload.half)
        d, e = cfg.hidden_size, cfg.word_embed_proj_dim
        self.embed = empty_param((cfg.vocab_size, e), dtype, device)
        self.positions = empty_param((cfg.max_position_embeddings + POSITION_OFFSET, d), dtype, device)
        self.project_in = empty_param((d, e), dtype, device) if e != d else None
        self.project_out = empty_param((e, d), dtype, device) if e != d else None
        self.layers = nn.ModuleList(Block(cfg, dtype, device) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(d, dtype=dtype, device=device) if cfg.final_layer_norm else None
        self.lm_head = None if cfg.tie_word_embeddings else empty_param((cfg.vocab_size, e), dtype, device)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head

    def new_cache(self, batch: int, max_len: int, device=None) -> KVCache:
        c = self.config
        return KVCache.allocate(c.num_hidden_layers, batch, c.num_attention_heads, max_len, c.head_dim,
                                self.dtype, device or self.embed.device)

    def hidden_states(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        x = F.embedding(ids, self.embed).to(self.dtype)
        if self.project_in is not None:
            x = linear(x, self.project_in)
        t = ids.shape[1]
        x = x + self.positions[start + POSITION_OFFSET: start + POSITION_OFFSET + t].to(self.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, start)
        if self.norm is not None:
            x = self.norm(x)
        if self.project_out is not None:
            x = linear(x, self.project_out)
        return x

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        x = self.hidden_states(ids, cache, start)
        if last_only:
            x = x[:, -1:]
        return linear(x, self.head_weight)

    @torch.no_grad()
    def load_weights(self, get) -> None:
        put = param_loader(get, self.embed.dtype, self.embed.device)

        p0 = "model.decoder."
        put(self, "embed", p0 + "embed_tokens.weight")
        put(self, "positions", p0 + "embed_positions.weight")
        if self.project_in is not None:
            put(self, "project_in", p0 + "project_in.weight")
            put(self, "project_out", p0 + "project_out.weight")
        if self.norm is not None:
            put(self.norm, "weight", p0 + "final_layer_norm.weight")
            put(self.norm, "bias", p0 + "final_layer_norm.bias")
        if self.lm_head is not None:
            put(self, "lm_head", "lm_head.weight")
        for i, layer in enumerate(self.layers):
            p = f"{p0}layers.{i}."
            a = p + "self_attn."
            put(layer.attn, "qkv", a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight")
            put(layer.attn, "qkv_bias", a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias")
            put(layer.attn, "o", a + "out_proj.weight")
            put(layer.attn, "o_bias", a + "out_proj.bias")
            for norm, name in ((layer.attn_norm, "self_attn_layer_norm"), (layer.ffn_norm, "final_layer_norm")):
                put(norm, "weight", p + name + ".weight")
                put(norm, "bias", p + name + ".bias")
            put(layer.mlp, "fc1", p + "fc1.weight")
            put(layer.mlp, "fc1_bias", p + "fc1.bias")
            put(layer.mlp, "fc2", p + "fc2.weight")
            put(layer.mlp, "fc2_bias", p + "fc2.bias")
