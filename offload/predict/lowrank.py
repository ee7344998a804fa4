"""Low-rank MLP predictor for ReLU-family FFNs (PowerInfer / Deja Vu): logits = fc2·relu(fc1·x + b1) + b2.

Training (``train_lowrank``), one layer at a time on captured FFN inputs:
- labels: the neuron's intermediate value is non-zero (exact for relu / drelu / OPT);
- loss: BCE with the positive class weighted by (#negatives / #positives) of the layer (clipped
  to [1, 50]), Adam, a few epochs;
- threshold: on held-out tokens, the largest logit threshold whose recall (true actives selected /
  true actives) reaches ``recall_target``;
- hidden size: the candidates are tried smallest first, and the one chosen minimises the FFN bytes
  per token — predictor bytes + predicted density × the layer's bytes — among those reaching the
  recall target (PowerInfer found that higher recall at a higher predicted density made it
  slower, so recall alone is not the objective). If none reaches it, the highest recall wins.
Weights are stored in fp16 (thresholds are chosen with the fp16 weights).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from offload.predict.base import LayerPredictor, recall_density
from offload.sparse import ffn_weights


class LowRankPredictor(LayerPredictor):
    method = "lowrank"

    def __init__(self, fc1: torch.Tensor, b1: torch.Tensor, fc2: torch.Tensor, b2: torch.Tensor,
                 threshold: float = 0.0):
        self.fc1, self.b1, self.fc2, self.b2 = fc1, b1, fc2, b2  # [r, d], [r], [n, r], [n] (fp16)
        self.n, self.d, self.rank = fc2.shape[0], fc1.shape[1], fc1.shape[0]
        self.threshold = float(threshold)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.linear(x.float(), self.fc1.float(), self.b1.float()))
        return F.linear(h, self.fc2.float(), self.b2.float())

    def default_mask(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(x) >= self.threshold

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"fc1": self.fc1, "b1": self.b1, "fc2": self.fc2, "b2": self.b2}

    def config(self) -> dict:
        return {"n": self.n, "d": self.d, "rank": self.rank, "threshold": self.threshold}

    @classmethod
    def from_saved(cls, c: dict, t: dict[str, torch.Tensor]) -> "LowRankPredictor":
        return cls(t["fc1"], t["b1"], t["fc2"], t["b2"], float(c["threshold"]))


def threshold_for_recall(logits: torch.Tensor, labels: torch.Tensor, recall_target: float) -> float:
    """The largest t such that (logits ≥ t) selects ≥ recall_target of the positives."""
    pos = logits[labels]
    if pos.numel() == 0:
        return float(logits.max()) + 1.0
    keep = max(1, math.ceil(recall_target * pos.numel()))  # positives that must be ≥ t
    return float(pos.float().sort(descending=True).values[keep - 1])


def default_ranks(d: int, n: int) -> list[int]:
    """Hidden sizes to try: d/32 … d/2 (at least 8), PowerInfer's range for its models."""
    ranks = sorted({max(8, d // k) for k in (32, 16, 8, 4, 2)})
    return [r for r in ranks if r < min(d, n)] or [max(1, min(d, n) // 2)]


def _fit(x: torch.Tensor, y: torch.Tensor, rank: int, epochs: int, lr: float, batch: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    d, n = x.shape[1], y.shape[1]
    net = nn.Sequential(nn.Linear(d, rank), nn.ReLU(), nn.Linear(rank, n))
    p = y.float().mean().clamp(1e-4, 1 - 1e-4)
    pos_weight = ((1 - p) / p).clamp(1.0, 50.0)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * math.ceil(x.shape[0] / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps))
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(x.shape[0])
            for s in range(0, x.shape[0], batch):
                b = perm[s:s + batch]
                loss = F.binary_cross_entropy_with_logits(net(x[b]), y[b].float(), pos_weight=pos_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return net


def train_lowrank(mlp: nn.Module, x_train: torch.Tensor, x_val: torch.Tensor, *, recall_target: float = 0.99,
                  ranks: list[int] | None = None, epochs: int = 8, lr: float = 3e-3, batch: int = 256,
                  seed: int = 0) -> tuple[LowRankPredictor, dict]:
    """Train one layer's predictor on FFN inputs x_train [T, d] (held-out x_val [V, d] for the
    threshold and the choice of hidden size). Returns (predictor, report) where report has the chosen
    rank, recall, predicted/true density on x_val, and every candidate's figures."""
    w = ffn_weights(mlp)
    dense = getattr(mlp, "dense", mlp)
    with torch.no_grad():
        y_train = dense.intermediate(x_train.float()) != 0
        y_val = dense.intermediate(x_val.float()) != 0
    layer_bytes = w.neuron_bytes * w.n
    ranks = sorted(ranks or default_ranks(w.d, w.n))
    candidates, best, best_key = [], None, None
    t0 = time.perf_counter()
    for rank in ranks:
        net = _fit(x_train.float(), y_train, rank, epochs, lr, batch, seed)
        pred = LowRankPredictor(net[0].weight.detach().half(), net[0].bias.detach().half(),
                                net[2].weight.detach().half(), net[2].bias.detach().half())
        with torch.no_grad():
            logits = pred.scores(x_val)
        pred.threshold = threshold_for_recall(logits, y_val, recall_target)
        m = recall_density(logits >= pred.threshold, y_val)
        cost = pred.nbytes + m["predicted_density"] * layer_bytes
        row = {"rank": rank, **m, "bytes_fraction": cost / layer_bytes, "predictor_bytes": pred.nbytes}
        candidates.append(row)
        key = (m["recall"] < recall_target - 1e-9, cost if m["recall"] >= recall_target - 1e-9 else -m["recall"])
        if best_key is None or key < best_key:
            best, best_key = (pred, row), key
        if pred.nbytes >= layer_bytes * (best[1]["bytes_fraction"]):  # bigger ones cannot be cheaper
            break
    pred, row = best
    report = {**row, "threshold": pred.threshold, "candidates": candidates,
              "train_tokens": int(x_train.shape[0]), "val_tokens": int(x_val.shape[0]),
              "seconds": time.perf_counter() - t0}
    return pred, report
