"""Build a dense model from an opened checkpoint, strictly: every expected tensor present with the
expected shape, nothing unexpected."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from offload.checkpoint import Checkpoint
from offload.errors import CheckpointError
from offload.models import family_for


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
                progress: bool = True) -> torch.nn.Module:
    """The dense model for ``ckpt`` with its weights loaded, in ``dtype`` on ``device``: each parameter
    from the checkpoint tensors its family names (``parameter_sources``), concatenated when several."""
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
