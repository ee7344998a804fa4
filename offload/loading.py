"""Build a dense model from an opened checkpoint, strictly: every expected tensor present with the
expected shape, nothing unexpected."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from offload.checkpoint import Checkpoint
from offload.errors import CheckpointError
from offload.formats.cpu import CpuLinear
from offload.models import family_for
from offload.models.common import Embedding, Linear


def check_tensors(ckpt: Checkpoint, expected: dict[str, tuple[int, ...]], ignorable) -> None:
    """Raise CheckpointError naming the file and tensor for anything missing, unexpected or misshapen."""
    missing = sorted(set(expected) - set(ckpt.shapes))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{ckpt.source}: missing tensors {', '.join(missing[:5])}{more}")
    unexpected = sorted(n for n in set(ckpt.shapes) - set(expected) if not ignorable(n))
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{ckpt.source}: unexpected tensors {', '.join(unexpected[:5])}{more} "
                              "for this config (loading is strict)")
    for name, shape in expected.items():
        if tuple(ckpt.shapes[name]) != tuple(shape):
            raise CheckpointError(f"{ckpt.files.get(name, ckpt.source)}: tensor {name!r} has shape "
                                  f"{list(ckpt.shapes[name])}, expected {list(shape)} from config.json")


def set_parameter(model: nn.Module, path: str, value: torch.Tensor) -> None:
    """Set the parameter at ``path`` ("layers.0.attn.qkv.weight") to a frozen Parameter holding ``value``."""
    owner, _, attr = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, nn.Parameter(value, requires_grad=False))


def build_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                progress: bool = True, weights: str | None = None, threads: int = 1,
                activations: str = "int8") -> torch.nn.Module:
    """The model for ``ckpt`` with its weights loaded: each parameter from the checkpoint tensors its
    family names (``parameter_sources``), concatenated when several.

    weights=None: the dense torch model in ``dtype`` on ``device`` (the reference). Otherwise a CPU model
    whose weight matrices are stored in that format (offload.formats), built tensor by tensor: no fp32
    copy of the whole model exists, and "auto" packs a GGUF's quantized tensors as stored; ``activations``
    ("int8" or "float32") is how quantized matrices take a token's input (offload.formats)."""
    if weights is not None:
        return _build_in_format(ckpt, weights, threads, progress, activations)
    module, config_cls, model_cls = family_for(ckpt.config.get("model_type"))
    cfg = config_cls.from_hf(ckpt.config)
    expected = module.expected_tensors(cfg)
    check_tensors(ckpt, expected, lambda n: module.ignorable_tensor(n, cfg))
    model = model_cls(cfg, dtype=dtype, device="meta")
    sources = model.parameter_sources()
    bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=not progress, leave=False)

    def get(name: str) -> torch.Tensor:
        tensor = ckpt.get(name)
        if tuple(tensor.shape) != tuple(expected[name]):  # headers can lie; check what was read too
            raise CheckpointError(f"{ckpt.files.get(name, ckpt.source)}: tensor {name!r} read with shape "
                                  f"{list(tensor.shape)}, expected {list(expected[name])}")
        bar.update(1)
        return tensor

    try:
        with torch.no_grad():
            for path, names in sources.items():
                parts = [get(n) for n in names]
                value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
                set_parameter(model, path, value.to(device=device, dtype=dtype).contiguous())
    finally:
        bar.close()
    model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:  # a family's parameter_sources forgot a parameter: a bug in offload, not in the checkpoint
        raise RuntimeError(f"parameters left unloaded: {left[:5]}")
    model.eval()
    return model


def _build_in_format(ckpt: Checkpoint, weights: str, threads: int, progress: bool,
                     activations: str) -> torch.nn.Module:
    from offload.formats import check_activations, check_weight_format, embedding_for, linear_for, tied_head

    check_weight_format(weights)
    check_activations(activations)
    module, config_cls, model_cls = family_for(ckpt.config.get("model_type"))
    cfg = config_cls.from_hf(ckpt.config)
    expected = module.expected_tensors(cfg)
    check_tensors(ckpt, expected, lambda n: module.ignorable_tensor(n, cfg))
    model = model_cls(cfg, dtype=torch.float32, device="meta")
    sources = model.parameter_sources()
    bar = tqdm(total=len(expected), desc="loading weights", unit="tensor", disable=not progress, leave=False)
    use_raw = weights == "auto" and ckpt.raw is not None

    def dense(names) -> torch.Tensor:
        parts = [ckpt.get(n) for n in names]
        for n, t in zip(names, parts):
            if tuple(t.shape) != tuple(expected[n]):
                raise CheckpointError(f"{ckpt.files.get(n, ckpt.source)}: tensor {n!r} read with shape "
                                      f"{list(t.shape)}, expected {list(expected[n])}")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def raw(names):
        parts = [ckpt.raw(n) for n in names] if use_raw else [None]
        return parts if all(p is not None for p in parts) else None

    try:
        with torch.no_grad():
            for path, names in sources.items():
                owner_path, _, attr = path.rpartition(".")
                owner = model.get_submodule(owner_path) if owner_path else model
                parent_path, _, child = owner_path.rpartition(".")
                parent = model.get_submodule(parent_path) if parent_path else model
                if isinstance(owner, Linear) and attr == "weight":
                    parts = raw(names)
                    bias = owner.bias  # still on "meta": set when its own source comes
                    new = linear_for(weights, None if parts else dense(names), None, threads, raw_parts=parts,
                                     activations=activations)
                    if bias is not None:
                        new.set_bias(torch.zeros(new.out_features))
                    setattr(parent, child, new)
                elif isinstance(owner, CpuLinear) and attr == "bias":
                    owner.set_bias(dense(names))
                elif isinstance(owner, Embedding) and attr == "weight":
                    parts = raw(names)
                    table = embedding_for(weights, None if parts else dense(names), parts[0] if parts else None,
                                          tied=cfg.tie_word_embeddings, activations=activations)
                    setattr(parent, child, table)
                else:
                    set_parameter(model, path, dense(names).to(torch.float32).contiguous())
                bar.update(len(names))
    finally:
        bar.close()
    if cfg.tie_word_embeddings:
        model.lm_head = tied_head(model.embed, weights, threads, activations)
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:  # a family's parameter_sources forgot a parameter: a bug in offload, not in the checkpoint
        raise RuntimeError(f"parameters left unloaded: {left[:5]}")
    model.eval()
    return model
