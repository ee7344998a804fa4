"""One file per architecture family; the registry maps HF ``model_type`` to its family.

Each family module provides: ``MODEL_TYPES``, a frozen config dataclass with ``from_hf(dict)``,
``expected_tensors(config) → {hf_name: shape}``, ``ignorable_tensor(name, config)``, and a model
class ``Model(config, dtype, device)`` with ``forward(ids, cache, start, last_only)``, ``new_cache``,
``parameter_sources()`` (each parameter → the checkpoint tensors it is made of: offload.loading fills
them), ``tie_weights()``, a ``device`` property, ``embed`` / ``lm_head`` (models.common Embedding and
Linear) and ``layers[i].mlp`` (the FFN the offloading transforms replace). Every weight matrix is a
models.common.Linear: storage formats (offload.formats) are module swaps of those.

The maths shared by the families is in common.py (norms, RoPE, the KV cache, attention) and
ffn_kind.py (the FFN kinds and their reference activation). A new architecture is a new file here.
"""
from __future__ import annotations

from types import ModuleType

from offload.errors import UnsupportedModelError
from offload.models import gemma3, llama, opt

FAMILIES: dict[str, tuple[ModuleType, type, type]] = {}
for _module, _config, _model in ((llama, llama.LlamaConfig, llama.LlamaModel), (opt, opt.OPTConfig, opt.OPTModel),
                                 (gemma3, gemma3.Gemma3Config, gemma3.Gemma3Model)):
    for _type in _module.MODEL_TYPES:
        FAMILIES[_type] = (_module, _config, _model)


def family_for(model_type: str | None) -> tuple[ModuleType, type, type]:
    """(module, config class, model class) for a HF model_type; raises naming the supported ones."""
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def config_from_hf(cfg: dict):
    """The family config dataclass for a HF config.json dict."""
    _, config_cls, _ = family_for(cfg.get("model_type"))
    return config_cls.from_hf(cfg)
