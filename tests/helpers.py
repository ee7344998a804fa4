"""Helpers shared by test modules (pytest puts tests/ on sys.path: ``from helpers import ...``)."""
from __future__ import annotations

import contextlib

import torch

from offload.models.common import cpu_decode_mode


def greedy_logits(model, ids: torch.Tensor, steps: int, decode_mode: bool = False) -> torch.Tensor:
    """Logits [b, t + steps, V] of a prefill over ids, then ``steps`` cached greedy decode steps
    (inside cpu_decode_mode when ``decode_mode``: the one-token CPU paths)."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    out = []
    with torch.no_grad():
        logits = model(ids, cache, 0)
        out.append(logits)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        for s in range(steps):
            with cpu_decode_mode() if decode_mode else contextlib.nullcontext():
                logits = model(tok, cache, ids.shape[1] + s)
            out.append(logits)
            tok = logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(out, dim=1)
