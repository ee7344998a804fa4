"""Memory accounting from a config and dtypes alone: nothing is loaded or allocated.

The source of truth is the family's ``expected_tensors(config)`` (the same map the loader checks
checkpoints against). Each HF tensor name is classified into a role, and each role is placed on a
device. FFN tensors indexed by neuron (gate/up/fc1 rows and their biases, down/fc2 columns) are not
part of the fixed bytes: they are counted per neuron, since the solver decides which are hot.

Fill order on the accelerator (PowerInfer's, which worked): attention, predictors, norms, output head, KV cache,
scratch, then hot FFN rows. Every tensor is counted once per device that holds it: a tied head and
embedding on the same device cost one table.

Packed hot rows (``hot_format``, offload.formats.packed_rows): a hot neuron costs its packed gate/up rows
(codes and per-row scales), its down column's codes and group id, and its per-neuron biases at ``dtype``;
a layer holding any hot neuron also keeps its down projection's scale table (``layer_bytes``, charged by
the solver once per such layer). The rest of the device side stays at ``dtype``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from offload.errors import BudgetError
from offload.models import config_from_hf, family_for
from offload.units import format_bytes

MiB = 2**20
DEFAULT_CONTEXT_RESERVE = 300 * MiB  # CUDA context + allocator slack, on an accelerator only
ROLES = ("embeddings", "positions", "attention", "norms", "head", "projections", "ffn_fixed", "other",
         "predictors", "kv_cache", "scratch", "context_reserve")
_FFN_IN = ("gate_proj", "up_proj", "fc1", "w1", "w3")  # neuron i is row i (bias element i)
_FFN_OUT = ("down_proj", "fc2", "w2")  # neuron i is column i; the [d] bias is fixed
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float": torch.float32}


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per element of a torch dtype or a name such as ``"float16"`` / ``"bf16"``."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(sorted(_DTYPES))}")
        dtype = _DTYPES[dtype]
    return dtype.itemsize


def classify_tensor(name: str) -> str:
    """Role of a HF tensor name: embeddings, positions, attention, norms, head, projections, ffn_in
    (neuron i = row i), ffn_out (neuron i = column i), other (unknown: counted as fixed)."""
    parts = name.split(".")
    if "embed_positions" in parts:
        return "positions"
    if "embed_tokens" in parts or "wte" in parts:
        return "embeddings"
    if "lm_head" in parts:
        return "head"
    if "project_in" in parts or "project_out" in parts:  # OPT: embedding dim ↔ hidden dim
        return "projections"
    if any("norm" in p for p in parts):
        return "norms"
    if any(p in _FFN_IN for p in parts):
        return "ffn_in"
    if any(p in _FFN_OUT for p in parts):
        return "ffn_out"
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    return "other"


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes the model needs, by role and device. ``device`` runs attention and holds the hot rows.

    ``device_bytes``: role → bytes on ``device`` (the fixed part, filled before any FFN row).
    A tied output head is the embedding table: it is counted once, under ``embeddings``.
    ``host_bytes``: role → bytes kept in CPU RAM besides the cold FFN rows (the embedding table
    when ``embed_on_host``; empty when ``device`` is the CPU, where everything is one device).
    ``neurons[L]`` / ``neuron_bytes[L]``: FFN neurons of layer L and the bytes of one neuron at
    the device dtype (gate row + up row + down column + per-neuron biases; OPT: fc1 row + bias +
    fc2 column), or packed (``hot_format``: e.g. "int4"; see the module docstring), when
    ``layer_bytes[L]`` is what layer L pays once if it holds any hot neuron (0 for float rows).
    The solver gets ``fixed_bytes``, ``neuron_bytes`` and ``layer_bytes``. ``neuron_elements`` are the
    weights of one neuron (what the CPU's cold rows hold at its own dtype); ``weight_bytes`` counts
    every tensor at ``dtype``, packed or not.

    Scratch formula (decode buffers, ``tokens`` tokens in flight per sequence, default 1):
    ``batch·vocab·4`` (fp32 logits) ``+ 6·batch·tokens·max(d, 2n, qkv_out)·dtype_bytes``.
    """

    device: str
    dtype_bytes: int
    context: int
    batch: int
    device_bytes: dict[str, int] = field(hash=False)
    host_bytes: dict[str, int] = field(hash=False)
    neurons: tuple[int, ...]
    neuron_elements: tuple[int, ...]
    weight_bytes: int  # weights held, all devices together (each tensor once per device holding it)
    hot_format: str = ""  # "" (hot rows at the device dtype) or the packed format's name
    packed_neuron_bytes: tuple[int, ...] = ()  # per layer, with hot_format
    layer_bytes: tuple[int, ...] = ()  # per layer, with hot_format: the down scale table

    @property
    def neuron_bytes(self) -> tuple[int, ...]:
        """Bytes of one FFN neuron per layer on the device: at the device dtype, or packed."""
        return self.packed_neuron_bytes or tuple(e * self.dtype_bytes for e in self.neuron_elements)

    @property
    def fixed_bytes(self) -> int:
        """Everything on ``device`` except the FFN neurons."""
        return sum(self.device_bytes.values())

    @property
    def ffn_bytes(self) -> int:
        """All FFN neurons of all layers on the device (at its dtype, or packed with every layer's table)."""
        return sum(n * b for n, b in zip(self.neurons, self.neuron_bytes)) + sum(self.layer_bytes)

    def check_fits(self, budget: int) -> None:
        """Raise BudgetError (budget, need by role, shortfall, what to try) if the fixed part
        does not fit ``budget``."""
        if self.fixed_bytes > budget:
            raise budget_error(budget, self.fixed_bytes, self.device_bytes, self.context, self.batch, self.device)


def budget_error(budget: int, need: int, breakdown: dict[str, int] | None = None, context: int | None = None,
                 batch: int | None = None, device: str = "cuda") -> BudgetError:
    """The error for a budget below the non-FFN need; nothing has been allocated when it is raised.
    What it suggests depends on ``device``: on the CPU, a budget of 0 (every FFN neuron cold) rather
    than device='cpu', which is already the case; on a GPU, that the need counts the CUDA context."""
    parts = ""
    if breakdown:
        items = sorted(((v, k) for k, v in breakdown.items() if v), reverse=True)
        parts = ": " + ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for v, k in items)
    ctx = f" for a context of {context} tokens" if context else ""
    ctx += f" × batch {batch}" if batch and batch > 1 else ""
    if torch.device(device).type == "cpu":
        where, note = "Device memory budget", " On device='cpu' no CUDA context is counted."
        other = ("or a budget of 0 (gpu_memory=0 / --gpu-memory 0: every FFN neuron on the CPU's cold path, the "
                 "fastest CPU-only setting)")
    else:
        where, note = "GPU memory budget", ""
        reserve = (breakdown or {}).get("context_reserve", 0)
        if reserve:
            note = f" The need counts {format_bytes(reserve)} for the CUDA context and allocator slack."
        other = "or the CPU alone (device='cpu' with gpu_memory=0 / --device cpu --gpu-memory 0)"
    return BudgetError(
        f"{where} {format_bytes(budget)} ({budget} bytes) is too small: the non-FFN part of the "
        f"model{ctx} needs {format_bytes(need)} ({need} bytes{parts}), a shortfall of "
        f"{format_bytes(need - budget)}. Try a shorter context (context= / --context), a larger budget "
        f"(gpu_memory= / --gpu-memory), {other}.{note}")


def _layer_of(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _hot_layouts(hot_format, layers: int) -> list:
    """Per layer (gate/up layout, down layout) of offload.formats.packed_rows for ``hot_format``: a name
    ("int4", "q4_0", "q4_1", "q4_k") for every layer, or one (gate/up name, down name) pair per layer."""
    from offload.formats.packed_rows import hot_layout

    if isinstance(hot_format, str):
        return [(hot_layout(hot_format),) * 2] * layers
    pairs = list(hot_format)
    if len(pairs) != layers:
        raise ValueError(f"hot_format has {len(pairs)} per-layer (gate/up, down) layouts for {layers} layers")
    return [(hot_layout(a), hot_layout(b)) for a, b in pairs]


def plan_memory(config, *, dtype: str | torch.dtype = "float16", device: str = "cuda", context: int = 4096,
                batch: int = 1, kv_dtype: str | torch.dtype | None = None, predictor_bytes: int | list[int] = 0,
                tokens: int = 1, context_reserve: int | None = None, embed_on_host: bool = False,
                shapes: dict[str, tuple[int, ...]] | None = None, hot_format=None) -> MemoryPlan:
    """Account a model's memory from its config (a family config dataclass or a HF config dict).

    ``predictor_bytes``: bytes of one layer's predictor (or a per-layer list), on ``device``.
    ``context_reserve``: default 300 MiB on an accelerator, 0 on the CPU. ``shapes`` overrides
    ``expected_tensors(config)`` (e.g. shapes read from a checkpoint's headers).
    ``embed_on_host``: keep the embedding table in CPU RAM (one row per token crosses); a tied head
    then also needs the table on ``device``, so it is counted on both.
    ``hot_format``: None (hot rows at ``dtype``), or packed 4-bit hot rows: "int4" (what
    ``apply_placement(hot_format="int4")`` builds from float weights), a GGUF layout "q4_0" / "q4_1" /
    "q4_k", or one (gate/up, down) pair of those per layer (offload.packed_hot.packed_hot_layouts of a model).
    """
    if isinstance(config, dict):
        config = config_from_hf(config)
    if context < 1 or batch < 1 or tokens < 1:
        raise ValueError(f"context, batch and tokens must be ≥ 1, got {context}, {batch}, {tokens}")
    module, _, _ = family_for(config.model_type)
    shapes = module.expected_tensors(config) if shapes is None else shapes
    on_cpu = torch.device(device).type == "cpu"
    elt = dtype_bytes(dtype)
    kv_elt = dtype_bytes(kv_dtype) if kv_dtype is not None else elt
    layers = config.num_hidden_layers
    dev = dict.fromkeys(ROLES, 0)
    neurons, per_neuron = [0] * layers, [0] * layers  # per_neuron in elements
    layouts = None if hot_format is None else _hot_layouts(hot_format, layers)
    packed, tables = [0] * layers, [0] * layers  # with hot_format: bytes per neuron, per layer
    weights = 0
    for name, shape in shapes.items():
        numel = 1
        for s in shape:
            numel *= s
        weights += numel * elt
        role = classify_tensor(name)
        if role in ("ffn_in", "ffn_out"):
            layer = _layer_of(name)
            if layer is None or layer >= layers:
                raise ValueError(f"FFN tensor {name!r} has no layer index below {layers}")
            n = shape[0] if role == "ffn_in" else shape[-1]
            if len(shape) == 2 or role == "ffn_in":
                if neurons[layer] not in (0, n):
                    raise ValueError(f"FFN tensor {name!r} of shape {list(shape)}: expected {neurons[layer]} neurons")
                neurons[layer] = n
            if role == "ffn_in":  # [n, d] weight or [n] bias: one row / element per neuron
                per_neuron[layer] += numel // n
                if layouts:
                    packed[layer] += layouts[layer][0].row_bytes(shape[1]) if len(shape) == 2 else elt
            elif len(shape) == 2:  # [d, n]: one column per neuron
                per_neuron[layer] += shape[0]
                if layouts:
                    packed[layer] += layouts[layer][1].down_neuron_bytes(shape[0])
                    tables[layer] += layouts[layer][1].table_bytes(n, shape[0])
            else:  # the [d] output bias: added once per token, not per neuron
                dev["ffn_fixed"] += numel * elt
        else:
            dev[role] += numel * elt
    for layer, count in enumerate(neurons):
        if count == 0:
            raise ValueError(f"no FFN input tensor (gate/up/fc1) found for layer {layer}")
    host: dict[str, int] = {}
    if embed_on_host and not on_cpu:
        host["embeddings"] = dev["embeddings"]
        if config.tie_word_embeddings:  # the head reads the same table: a copy stays on the device
            weights += dev["embeddings"]
        else:
            dev["embeddings"] = 0
    pred = predictor_bytes if isinstance(predictor_bytes, (list, tuple)) else [predictor_bytes] * layers
    if len(pred) != layers:
        raise ValueError(f"predictor_bytes has {len(pred)} entries for {layers} layers")
    dev["predictors"] = int(sum(pred))
    kvh, hd = config.num_key_value_heads, config.head_dim
    dev["kv_cache"] = 2 * layers * batch * kvh * context * hd * kv_elt
    d, n = config.hidden_size, max(neurons)
    qkv_out = (config.num_attention_heads + 2 * kvh) * hd
    dev["scratch"] = batch * config.vocab_size * 4 + 6 * batch * tokens * max(d, 2 * n, qkv_out) * elt
    if context_reserve is None:
        context_reserve = 0 if on_cpu else DEFAULT_CONTEXT_RESERVE
    dev["context_reserve"] = int(context_reserve)
    name = "" if layouts is None else (hot_format if isinstance(hot_format, str) else "int4")
    return MemoryPlan(device=str(device), dtype_bytes=elt, context=context, batch=batch, device_bytes=dev,
                      host_bytes=host, neurons=tuple(neurons), neuron_elements=tuple(per_neuron),
                      weight_bytes=weights, hot_format=name, packed_neuron_bytes=tuple(packed) if layouts else (),
                      layer_bytes=tuple(tables) if layouts else ())
