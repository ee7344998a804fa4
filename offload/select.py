"""Runtime selectors: a layer's trained predictor (offload.predict) turned into what HybridFFN calls each
decode step to learn which neurons to compute.

- On the CPU, ``ids(x [b, d] float32 ndarray) → sorted int64 ndarray``: the union over the batch of each
  token's selected neurons, with no torch conversions in between. A shadow predictor scores from its
  packed int4/int8 bytes (offload.cpu.shadow) and keeps the top-k (offload.cpu.topk).
- On a GPU, ``device_ids(x [b, d]) → int64 [m]`` on the device, padded with −1 and never synchronizing
  the host: for one token the top-k ids themselves (m = k), for a batch the union as a fixed-length
  list (m = n, −1 where no token selected the neuron). The hot kernels skip −1 entries.
"""
from __future__ import annotations

import numpy as np
import torch

from offload.sparse import topk_count


class CallableSelector:
    """A selector from any function ``fn(x [b, d]) → selected global ids`` (torch, on x's device; the
    union over the batch): tests and references, e.g. an oracle. Both entry points."""

    def __init__(self, fn, n: int):
        self.fn, self.n = fn, n

    def ids(self, x: np.ndarray) -> np.ndarray:
        return np.unique(self.fn(torch.from_numpy(x)).cpu().numpy().astype(np.int64))

    def device_ids(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(self.n, dtype=torch.bool, device=x.device)
        mask[self.fn(x)] = True
        return torch.where(mask, torch.arange(self.n, device=x.device), -1)


class CpuSelector:
    """ids(x) from a predictor's own mask (any predictor; the reference path)."""

    def __init__(self, selector):
        self.selector = selector

    def ids(self, x: np.ndarray) -> np.ndarray:
        mask = self.selector.mask(torch.from_numpy(x))
        return mask.any(0).nonzero().flatten().numpy().astype(np.int64)


class CpuShadowSelector:
    """ids(x) from a shadow predictor's packed bytes. ``shadow`` (an offload.cpu.shadow Int4Shadow or
    Int8Shadow) and ``k`` (neurons per token) are public: the all-cold CPU step runs scores, top-k and
    the cold kernel in one call (offload.cpu.cold_step)."""

    def __init__(self, predictor, threads: int, pool: str):
        from offload.cpu.shadow import shadow_from_predictor

        self.shadow = shadow_from_predictor(predictor, threads=threads, pool=pool)
        self.k = topk_count(predictor.density, predictor.n)
        predictor.clear_cache()  # drop the fp32 copy the reference scorer may have built

    def ids(self, x: np.ndarray) -> np.ndarray:
        from offload.cpu.topk import topk_indices

        return topk_indices(self.shadow.scores(x), self.k)


class DeviceSelector:
    """device_ids(x) on a GPU: top-k of a shadow predictor's scores (torch.ops.offload.shadow_scores_*,
    Triton), or a predictor's own mask; see the module docstring for the −1-padded result."""

    def __init__(self, predictor, selector, device: torch.device):
        from offload.predict.shadow import ShadowPredictor

        self.n = predictor.n
        self.arange = torch.arange(self.n, device=device)
        self.shadow = None
        if isinstance(predictor, ShadowPredictor):
            self.tensors = {name: v.to(device) for name, v in predictor.tensors().items()}
            self.k, self.bits, self.kind = topk_count(predictor.density, predictor.n), predictor.bits, predictor.kind
            self.shadow = predictor
            predictor.clear_cache()
        else:
            self.selector = selector

    def device_ids(self, x: torch.Tensor) -> torch.Tensor:
        if self.shadow is not None:
            from offload.kernels.shadow_scores import shadow_scores_int4, shadow_scores_int8

            t = self.tensors
            score = shadow_scores_int4 if self.bits == 4 else shadow_scores_int8
            s = score(x, t["q_gate"], t["s_gate"], t["q_up"], t["s_up"], t.get("gate_bias"), t.get("up_bias"),
                      self.kind)
            top = s.topk(self.k, dim=-1).indices  # [b, k]
            if top.shape[0] == 1:
                return top[0]
            mask = torch.zeros(self.n, dtype=torch.bool, device=x.device).index_fill_(0, top.flatten(), True)
        else:
            mask = self.selector.mask(x).any(0)
        return torch.where(mask, self.arange, -1)


def runtime_selector(predictor, selector, device: torch.device, threads: int, pool: str):
    """The selector HybridFFN uses on ``device`` for a layer's ``predictor`` (``selector``: its
    offload.predict selector at the operating point). ``threads``/``pool``: where CPU scoring runs."""
    from offload.predict.shadow import ShadowPredictor

    if device.type != "cpu":
        return DeviceSelector(predictor, selector, device)
    if isinstance(predictor, ShadowPredictor):
        return CpuShadowSelector(predictor, threads, pool)
    return CpuSelector(selector)
