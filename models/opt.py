"""OPT: ReLU FFN, LayerNorm, learned positions (offset 2), biases everywhere, optional project_in/out.

Shapes: b batch, t tokens, d hidden, n FFN neurons (ffn_dim), h heads, hd head dim, e word embedding dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from offload.errors import UnsupportedModelError
from offload.models.common import Embedding, FFNModule, KVCache, Linear, cached_attention, empty_param
from offload.models.ffn_kind import FFNKind

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


class ReluFFN(FFNModule):
    """fc2(relu(fc1(x) + b1)) + b2. Neuron i is row i of fc1 (and b1[i]) and column i of fc2.

    fc1: a Linear [n ← d] with bias; fc2 [d ← n] with bias.
    """

    kind = FFNKind.RELU_FC

    def __init__(self, d: int, n: int, dtype=torch.float32, device=None):
        super().__init__()
        self.n = n
        self.fc1 = Linear(d, n, True, dtype, device)
        self.fc2 = Linear(n, d, True, dtype, device)

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.intermediate(x))


class Attention(nn.Module):
    def __init__(self, cfg: OPTConfig, dtype, device):
        super().__init__()
        d = cfg.hidden_size
        self.h, self.hd = cfg.num_attention_heads, cfg.head_dim
        self.qkv = Linear(d, 3 * d, True, dtype, device)
        self.o = Linear(d, d, True, dtype, device)

    def forward(self, x, cache: KVCache | None, layer: int, start: int):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        out = cached_attention(q, k, v, cache, layer, start, scale=self.hd ** -0.5)
        return self.o(out.transpose(1, 2).reshape(b, t, d))


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
            return self.mlp.residual(x, self.ffn_norm)
        x = self.attn_norm(x + self.attn(x, cache, layer, start))
        return self.ffn_norm(x + self.mlp(x))


class OPTModel(nn.Module):
    """The dense OPT decoder. ``forward(ids [b, t], cache, start) → logits [b, t, V]``."""

    def __init__(self, cfg: OPTConfig, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = cfg
        self.dtype = dtype  # of activations and the KV cache (weights may be stored otherwise: offload.formats)
        d, e = cfg.hidden_size, cfg.word_embed_proj_dim
        self.embed = Embedding(cfg.vocab_size, e, dtype, device)
        self.positions = empty_param((cfg.max_position_embeddings + POSITION_OFFSET, d), dtype, device)
        self.project_in = Linear(e, d, False, dtype, device) if e != d else None
        self.project_out = Linear(d, e, False, dtype, device) if e != d else None
        self.layers = nn.ModuleList(Block(cfg, dtype, device) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(d, dtype=dtype, device=device) if cfg.final_layer_norm else None
        self.lm_head = Linear(e, cfg.vocab_size, False, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def parameter_sources(self) -> dict[str, tuple[str, ...]]:
        """Each parameter (its path in this module) → the checkpoint tensors it is made of (see LlamaModel)."""
        c, p0 = self.config, "model.decoder."
        src = {"embed.weight": (p0 + "embed_tokens.weight",), "positions": (p0 + "embed_positions.weight",)}
        if self.project_in is not None:
            src["project_in.weight"] = (p0 + "project_in.weight",)
            src["project_out.weight"] = (p0 + "project_out.weight",)
        if self.norm is not None:
            src["norm.weight"], src["norm.bias"] = (p0 + "final_layer_norm.weight",), (p0 + "final_layer_norm.bias",)
        if not c.tie_word_embeddings:
            src["lm_head.weight"] = ("lm_head.weight",)
        for i in range(c.num_hidden_layers):
            p, m = f"layers.{i}.", f"{p0}layers.{i}."
            a = m + "self_attn."
            for kind in ("weight", "bias"):
                src[p + f"attn.qkv.{kind}"] = (a + f"q_proj.{kind}", a + f"k_proj.{kind}", a + f"v_proj.{kind}")
                src[p + f"attn.o.{kind}"] = (a + f"out_proj.{kind}",)
                src[p + f"attn_norm.{kind}"] = (m + f"self_attn_layer_norm.{kind}",)
                src[p + f"ffn_norm.{kind}"] = (m + f"final_layer_norm.{kind}",)
                src[p + f"mlp.fc1.{kind}"] = (m + f"fc1.{kind}",)
                src[p + f"mlp.fc2.{kind}"] = (m + f"fc2.{kind}",)
        return src

    def new_cache(self, batch: int, max_len: int, device=None) -> KVCache:
        c = self.config
        return KVCache.allocate(c.num_hidden_layers, batch, c.num_attention_heads, max_len, c.head_dim,
                                self.dtype, device or self.device)

    def hidden_states(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        x = self.embed(ids).to(self.dtype)
        if self.project_in is not None:
            x = self.project_in(x)
        t = ids.shape[1]
        x = x + self.positions[start + POSITION_OFFSET: start + POSITION_OFFSET + t].to(self.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, start)
        if self.norm is not None:
            x = self.norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        x = self.hidden_states(ids, cache, start)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)
