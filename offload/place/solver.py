"""The placement solver: which FFN neurons go on the accelerator, as a pure function over plain data.

Problem: layers L with n_L neurons of activation frequency f_{L,i} ∈ [0, 1] and b_L bytes each;
choose hot sets H_L maximising the activation mass served by the accelerator, Σ_L Σ_{i∈H_L} f_{L,i},
subject to Σ_L (b_L·|H_L| + e_L·[H_L ≠ ∅]) ≤ budget − fixed, and (PowerInfer's minimum split) each layer
holds 0 or ≥ C_L = min(C, n_L) hot neurons, so that the accelerator's share of a layer outweighs its sync.
e_L (``layer_bytes``, default 0) is paid once by a layer that holds any hot neuron: packed 4-bit hot
rows keep their down projection's scale table per layer (offload.formats.packed_rows).

- greedy: items taken in order of mass per byte while they fit. With C ≤ 1 the items are single
  neurons, and with equal neuron sizes that is the global top-k: exact. With C > 1 each layer's
  top-C neurons form one block item that must be taken before any other neuron of that layer
  (a block's mass per byte is ≥ that of any neuron outside it, so the order allows this); every
  layer satisfies the constraint by construction, but the result is a heuristic. A layer with e_L > 0
  is a block of its top max(C_L, 1) neurons costing e_L more, taken likewise.
- milp: within a layer the best hot set of size h is its top h, whose mass F_L(h) is concave. So the
  variables are the hot count h_L (integer), z_L (binary: layer used) and, per group of
  frequency-sorted neurons (≤ ``batch_size``, ≥ 64 groups a layer), a continuous y_{L,g} ∈ [0, |g|]
  (neurons taken from the group) weighted by the group's mean frequency; Σ_g y_{L,g} = h_L,
  C_L·z_L ≤ h_L ≤ n_L·z_L, Σ_L (b_L·h_L + e_L·z_L) ≤ budget − fixed. Concavity makes the LP fill groups in
  order, so with batch_size=1 the model is exact; larger groups interpolate F_L linearly between
  group edges. The hard part is the choice of layers (z); given it, greedy completes the hot sets
  exactly (equal neuron sizes), and the better of the two answers is kept. Only 2 integer variables
  per layer: 80 layers × 28,672 neurons take 1–3 s here. Any failure falls back to greedy with a
  warning.
"""
from __future__ import annotations

import base64
import json
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

from offload.errors import ArtifactError
from offload.place.memory import budget_error

FORMAT, VERSION = "offload.placement", 1
MIN_GROUPS = 64  # the MILP splits each layer into at least this many groups (when it has the neurons)
HOT_ENCODING = "base64 of numpy.packbits(hot_mask, bitorder='little'); bit i = neuron i is hot"


@dataclass(frozen=True, eq=False)
class Placement:
    """Per-layer hot neurons (sorted int64 arrays, read-only) and what they cost and serve."""

    model_identity: str
    hot: tuple[np.ndarray, ...]
    neurons: tuple[int, ...]
    neuron_bytes: tuple[int, ...]
    fixed_bytes: int
    budget: int
    layer_share: tuple[float, ...]  # per layer: hot frequency mass / the layer's frequency mass
    share: float  # all layers: hot mass / total mass (expected share of activations on the GPU)
    method: str  # "greedy" or "milp": which solver produced this placement
    note: str = ""
    min_hot_per_layer: int = 0
    layer_bytes: tuple[int, ...] = ()  # per layer: bytes paid once when it holds any hot neuron (or ())

    @property
    def hot_counts(self) -> tuple[int, ...]:
        return tuple(len(h) for h in self.hot)

    @property
    def layer_hot_bytes(self) -> tuple[int, ...]:
        """Per layer: its hot neurons' bytes and, when it holds any, its ``layer_bytes``."""
        extra = self.layer_bytes or (0,) * len(self.hot)
        return tuple(len(h) * b + (e if len(h) else 0) for h, b, e in zip(self.hot, self.neuron_bytes, extra))

    @property
    def hot_bytes(self) -> int:
        return sum(self.layer_hot_bytes)

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.hot_bytes

    def __eq__(self, other) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        same = [getattr(self, k) == getattr(other, k) for k in self.__dataclass_fields__ if k != "hot"]
        return all(same) and all(np.array_equal(a, b) for a, b in zip(self.hot, other.hot, strict=True))

    def check_identity(self, identity: str) -> None:
        """Raise ArtifactError unless this placement was made for the model with ``identity``."""
        if identity != self.model_identity:
            raise ArtifactError(
                f"this placement was made for model {self.model_identity!r}, not for this model ({identity!r}); "
                "solve a new placement for this model (offload report / the placement step)")

    def to_json(self) -> str:
        layers = []
        extra = self.layer_bytes or (0,) * len(self.hot)
        for hot, n, b, e, s in zip(self.hot, self.neurons, self.neuron_bytes, extra, self.layer_share):
            mask = np.zeros(n, dtype=bool)
            mask[hot] = True
            bits = base64.b64encode(np.packbits(mask, bitorder="little").tobytes()).decode()
            layers.append({"neurons": n, "neuron_bytes": b, "layer_bytes": e, "hot_count": len(hot), "gpu_share": s,
                           "hot": bits})
        return json.dumps({
            "format": FORMAT, "version": VERSION, "model_identity": self.model_identity, "method": self.method,
            "note": self.note, "min_hot_per_layer": self.min_hot_per_layer, "budget_bytes": self.budget,
            "fixed_bytes": self.fixed_bytes, "hot_ffn_bytes": self.hot_bytes, "total_bytes": self.total_bytes,
            "gpu_share": self.share, "hot_encoding": HOT_ENCODING, "layers": layers}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "placement") -> "Placement":
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise ArtifactError(f"{source}: not an {FORMAT} v{VERSION} file "
                                    f"(format={doc.get('format')!r}, version={doc.get('version')!r})")
            hot = []
            for i, layer in enumerate(doc["layers"]):
                n = int(layer["neurons"])
                bits = np.frombuffer(base64.b64decode(layer["hot"], validate=True), dtype=np.uint8)
                mask = np.unpackbits(bits, bitorder="little")[:n].astype(bool)
                if len(mask) != n or int(mask.sum()) != layer["hot_count"]:
                    raise ArtifactError(f"{source}: layer {i}: hot mask does not match hot_count / neurons")
                hot.append(_frozen(np.flatnonzero(mask)))
            layers = doc["layers"]
            return cls(model_identity=doc["model_identity"], hot=tuple(hot),
                       neurons=tuple(int(x["neurons"]) for x in layers),
                       neuron_bytes=tuple(int(x["neuron_bytes"]) for x in layers),
                       fixed_bytes=int(doc["fixed_bytes"]), budget=int(doc["budget_bytes"]),
                       layer_share=tuple(float(x["gpu_share"]) for x in layers), share=float(doc["gpu_share"]),
                       method=doc["method"], note=doc.get("note", ""),
                       min_hot_per_layer=int(doc.get("min_hot_per_layer", 0)),
                       layer_bytes=tuple(int(x.get("layer_bytes", 0)) for x in layers))
        except ArtifactError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ArtifactError(f"{source}: invalid placement JSON ({type(e).__name__}: {e})") from None

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, identity: str | None = None) -> "Placement":
        """Read a placement; with ``identity``, refuse one made for another model."""
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise ArtifactError(f"{path}: cannot read placement ({e.strerror})") from None
        placement = cls.from_json(text, source=os.fspath(path))
        if identity is not None:
            placement.check_identity(identity)
        return placement


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.int64)
    a.setflags(write=False)
    return a


def _check_inputs(frequencies, neuron_bytes, fixed_bytes, budget, layer_bytes=None):
    freqs = [np.asarray(f, dtype=np.float64) for f in frequencies]
    if not freqs:
        raise ValueError("frequencies: expected one array per layer, got none")
    for i, f in enumerate(freqs):
        if f.ndim != 1 or f.size == 0 or not np.all(np.isfinite(f)) or f.min() < 0 or f.max() > 1:
            raise ValueError(f"frequencies[{i}]: expected a non-empty 1-D array of values in [0, 1]")
    nb = [int(neuron_bytes)] * len(freqs) if np.isscalar(neuron_bytes) else [int(b) for b in neuron_bytes]
    if len(nb) != len(freqs) or min(nb) <= 0:
        raise ValueError(f"neuron_bytes: expected a positive int or one per layer ({len(freqs)}), got {neuron_bytes!r}")
    if fixed_bytes < 0 or budget <= 0:
        raise ValueError(f"fixed_bytes must be ≥ 0 and budget > 0, got {fixed_bytes} and {budget}")
    extra = [0] * len(freqs) if layer_bytes is None else [int(e) for e in layer_bytes]
    if len(extra) != len(freqs) or min(extra) < 0:
        raise ValueError(f"layer_bytes: expected one int ≥ 0 per layer ({len(freqs)}), got {layer_bytes!r}")
    return freqs, nb, extra


def _greedy(freqs, nb, cap, mins, extra, used=None):
    """Hot index arrays: block/singleton items by mass per byte, taken while they fit. A layer's block is
    its top max(mins, 1) neurons when mins > 1 or it has extra (per-layer) bytes, which the block carries.

    With ``used`` (bool per layer, whose blocks are known to fit together): only those layers, and
    their blocks first — the exact completion of a MILP's choice of layers (equal neuron sizes)."""
    layers = len(freqs)
    sizes = np.array([len(f) for f in freqs])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    f_all = np.concatenate(freqs)
    layer_of = np.repeat(np.arange(layers, dtype=np.int32), sizes)
    in_block = np.zeros(len(f_all), dtype=bool)
    blk_layers = np.array([i for i in range(layers) if mins[i] > 1 or extra[i] > 0], dtype=np.int64)
    block = np.maximum(np.asarray(mins, dtype=np.int64), 1)
    for i in blk_layers:
        c, f = block[i], freqs[i]
        top = np.argpartition(-f, c - 1)[:c] if c < len(f) else np.arange(len(f))
        in_block[offsets[i] + top] = True
    nb_arr = np.asarray(nb, dtype=np.float64)
    single = np.flatnonzero(~in_block).astype(np.int32)  # neurons that are items of their own
    s_layer = layer_of[single] if len(blk_layers) else layer_of
    s_key = f_all[single] / (nb[0] if len(set(nb)) == 1 else nb_arr[s_layer])
    b_mass = np.bincount(layer_of[in_block], weights=f_all[in_block], minlength=layers)[blk_layers]
    b_cost = block[blk_layers] * nb_arr[blk_layers] + np.asarray(extra, dtype=np.float64)[blk_layers]
    top_single = np.zeros(layers)
    np.maximum.at(top_single, s_layer, s_key)
    # A block's mean is ≥ any neuron outside it; nudge it above them so no order puts one first.
    b_key = np.nextafter(np.maximum(b_mass / b_cost, top_single[blk_layers]), np.inf)
    s_cost = np.full(len(single), float(nb[0])) if len(set(nb)) == 1 else nb_arr[s_layer]
    if used is not None:
        b_key[used[blk_layers]] = np.inf
        b_cost[~used[blk_layers]] = np.inf
        s_cost[~used[s_layer]] = np.inf
    # Items: blocks 0..B-1, then single neurons. Ties in key between layers may fall either way.
    key = np.concatenate([b_key, s_key])
    cost = np.concatenate([b_cost, s_cost])
    layer = np.concatenate([blk_layers.astype(np.int32), s_layer])
    is_block = np.zeros(len(key), dtype=bool)
    is_block[:len(blk_layers)] = True
    has_block = np.zeros(layers, dtype=bool)
    has_block[blk_layers] = True
    # Only the first cap/min_cost + 1 items can matter for the first prefix: partition, sort those.
    m = min(len(key), int(cap // cost.min()) + 1)
    head = np.argpartition(-key, m - 1)[:m] if m < len(key) else np.arange(len(key))
    cand = head[np.argsort(-key[head])]
    outside = np.ones(len(key), dtype=bool)
    outside[head] = False
    pending = np.flatnonzero(outside)
    taken = np.zeros(len(key), dtype=bool)
    dead = np.zeros(layers, dtype=bool)  # layers whose block can no longer fit: none of their neurons
    rem = float(cap)
    while cand.size:
        too_big = cost[cand] > rem
        dead[layer[cand[too_big & is_block[cand]]]] = True
        cand = cand[~too_big & (is_block[cand] | ~dead[layer[cand]] | ~has_block[layer[cand]])]
        if not cand.size:
            break
        cum = np.cumsum(cost[cand])
        k = int(np.searchsorted(cum, rem, side="right"))
        taken[cand[:k]] = True
        rem -= cum[k - 1] if k else 0.0
        if k == cand.size and not pending.size:
            break
        if k < cand.size and is_block[cand[k]]:
            dead[layer[cand[k]]] = True
        rest = np.concatenate([cand[k:], pending[cost[pending] <= rem]])
        pending = pending[:0]
        cand = rest[np.argsort(-key[rest])]
    hot = np.zeros(len(f_all), dtype=bool)
    hot[single[taken[len(blk_layers):]]] = True
    block_taken = np.zeros(layers, dtype=bool)
    block_taken[blk_layers[taken[:len(blk_layers)]]] = True
    hot |= in_block & block_taken[layer_of]
    return [np.flatnonzero(hot[offsets[i]:offsets[i + 1]]) for i in range(layers)]


class _MilpFailed(RuntimeError):
    pass


def _milp(freqs, nb, cap, mins, extra, batch_size, time_limit_s, mip_rel_gap):
    """Hot counts per layer and a note, from the hot-count MILP described in the module docstring."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    layers = len(freqs)
    desc = [np.sort(f)[::-1] for f in freqs]
    seg_size, seg_weight, seg_layer = [], [], []
    for i, f in enumerate(desc):
        starts = np.arange(0, len(f), min(batch_size, -(-len(f) // MIN_GROUPS)))
        sizes = np.diff(np.append(starts, len(f)))
        seg_size.append(sizes)
        seg_weight.append(np.add.reduceat(f, starts) / sizes)
        seg_layer.append(np.full(len(sizes), i))
    seg_size, seg_weight, seg_layer = map(np.concatenate, (seg_size, seg_weight, seg_layer))
    s = len(seg_size)
    n = np.array([len(f) for f in freqs], dtype=np.float64)
    h_col, z_col, rows = s + np.arange(layers), s + layers + np.arange(layers), np.arange(layers)
    unit = math.gcd(*nb, *extra)  # memory row in units of the gcd: integer coefficients, exact capacity
    # Rows 0..L-1: Σ_g y − h = 0; L..2L-1: h − C·z ≥ 0; 2L..3L-1: h − n·z ≤ 0; 3L: Σ b·h + e·z ≤ cap.
    r = np.concatenate([seg_layer, rows, rows + layers, rows + layers, rows + 2 * layers, rows + 2 * layers,
                        np.full(2 * layers, 3 * layers)])
    c = np.concatenate([np.arange(s), h_col, h_col, z_col, h_col, z_col, h_col, z_col])
    v = np.concatenate([np.ones(s), -np.ones(layers), np.ones(layers), -np.asarray(mins, dtype=np.float64),
                        np.ones(layers), -n, np.asarray(nb, dtype=np.float64) / unit,
                        np.asarray(extra, dtype=np.float64) / unit])
    a = coo_array((v, (r, c)), shape=(3 * layers + 1, s + 2 * layers)).tocsr()
    lo = np.concatenate([np.zeros(layers), np.zeros(layers), np.full(layers, -np.inf), [-np.inf]])
    hi = np.concatenate([np.zeros(layers), np.full(layers, np.inf), np.zeros(layers), [cap // unit]])
    cost = np.concatenate([-seg_weight, np.zeros(2 * layers)])
    integrality = np.concatenate([np.zeros(s), np.ones(2 * layers)])
    bounds = Bounds(np.zeros(s + 2 * layers), np.concatenate([seg_size, n, np.ones(layers)]))
    res = milp(cost, integrality=integrality, bounds=bounds, constraints=LinearConstraint(a, lo, hi),
               options={"time_limit": time_limit_s, "mip_rel_gap": mip_rel_gap, "disp": False})
    if res.x is None or res.status not in (0, 1):
        raise _MilpFailed(f"HiGHS status {res.status}: {res.message}")
    counts = np.clip(np.round(res.x[h_col]).astype(np.int64), 0, n.astype(np.int64))
    counts[(counts > 0) & (counts < np.asarray(mins))] = 0  # rounding noise only; keeps the constraint
    # likewise: trim the least frequent neuron while over the capacity
    while sum(int(k) * b + (e if k else 0) for k, b, e in zip(counts, nb, extra)) > cap:
        cut = min((desc[i][counts[i] - 1], i) for i in range(layers) if counts[i] > mins[i])[1]
        counts[cut] -= 1
    gap = getattr(res, "mip_gap", float("nan"))
    note = (f"HiGHS optimal (gap {gap:.2g}) over {s} groups of ≤ {seg_size.max()} neurons" if res.status == 0
            else f"HiGHS stopped at the time limit ({time_limit_s} s), gap {gap:.2g}")
    return counts, note


def _top(freqs, counts):
    """The k most frequent neurons of each layer, sorted by index."""
    return [np.sort(np.argpartition(-f, k - 1)[:k]) if 0 < k < len(f) else np.arange(k)
            for f, k in zip(freqs, counts)]


def _mass(freqs, hot) -> float:
    return float(sum(f[h].sum() for f, h in zip(freqs, hot)))


def solve_placement(frequencies, neuron_bytes, fixed_bytes: int, budget: int, *, min_hot_per_layer: int = 0,
                    method: str = "auto", batch_size: int = 512, time_limit_s: float = 10.0,
                    mip_rel_gap: float = 1e-6, model_identity: str = "",
                    fixed_breakdown: dict[str, int] | None = None, layer_bytes=None) -> Placement:
    """Choose each layer's hot neurons under ``budget`` bytes, ``fixed_bytes`` of which are taken.

    ``frequencies``: one array per layer, activation frequency per neuron in [0, 1].
    ``neuron_bytes``: bytes of one neuron on the accelerator (int, or one per layer).
    ``min_hot_per_layer`` (C): each layer holds 0 or ≥ min(C, n_L) hot neurons.
    ``batch_size``: at most this many frequency-sorted neurons per MILP group (and at least
    ``MIN_GROUPS`` groups per layer); 1 makes the MILP exact, larger is faster (see the module docstring).
    ``method``: "greedy", "milp" (falls back to greedy with a warning on failure), or "auto" (greedy
    where it is exact — C ≤ 1 and equal neuron sizes — else the better of milp and greedy).
    ``fixed_breakdown`` (role → bytes) only enriches the BudgetError raised, before anything is
    solved or allocated, when ``fixed_bytes > budget``.
    ``layer_bytes``: per layer, bytes paid once if the layer holds any hot neuron (None: 0 each).
    """
    if method not in ("auto", "greedy", "milp"):
        raise ValueError(f"method={method!r}: expected 'auto', 'greedy' or 'milp'")
    if min_hot_per_layer < 0 or batch_size < 1:
        raise ValueError(f"min_hot_per_layer must be ≥ 0 and batch_size ≥ 1, got {min_hot_per_layer}, {batch_size}")
    if fixed_bytes > budget:
        raise budget_error(int(budget), int(fixed_bytes), fixed_breakdown)
    freqs, nb, extra = _check_inputs(frequencies, neuron_bytes, fixed_bytes, budget, layer_bytes)
    cap = int(budget) - int(fixed_bytes)
    mins = [min(int(min_hot_per_layer), len(f)) for f in freqs]
    exact = max(mins) <= 1 and len(set(nb)) == 1 and not any(extra)
    if method == "greedy" or (method == "auto" and exact):
        hot = _greedy(freqs, nb, cap, mins, extra)
        used, note = "greedy", ("exact: global top-k (no per-layer minimum, equal neuron sizes)" if exact
                                else "heuristic: mass-per-byte order, each layer's top-C taken as one block")
    else:
        try:
            counts, note = _milp(freqs, nb, cap, mins, extra, batch_size, time_limit_s, mip_rel_gap)
            # The MILP's hard part is which layers to use; given those, greedy completes them exactly
            # (equal sizes) without the grouping's interpolation. Keep whichever serves more.
            hot, used = _top(freqs, counts), "milp"
            # (a layer the MILP left empty stays empty when using it costs per-layer bytes)
            free = (np.asarray(mins) <= 1) & (np.asarray(extra) == 0)
            polished = _greedy(freqs, nb, cap, mins, extra, used=(np.asarray(counts) > 0) | free)
            if _mass(freqs, polished) > _mass(freqs, hot):
                hot, note = polished, note + "; hot sets completed greedily within the chosen layers"
        except Exception as e:  # HiGHS failure or scipy missing/too old: the greedy answer is still valid
            warnings.warn(f"MILP placement failed ({e}); falling back to the greedy placement", stacklevel=2)
            hot, used, note = _greedy(freqs, nb, cap, mins, extra), "greedy", f"fallback: MILP failed ({e})"
        if method == "auto" and used == "milp":
            alt = _greedy(freqs, nb, cap, mins, extra)
            if _mass(freqs, alt) > _mass(freqs, hot):
                hot, used, note = alt, "greedy", f"greedy beat the MILP ({note})"
    totals = [f.sum() for f in freqs]
    layer_share = tuple(float(f[h].sum() / t) if t > 0 else 0.0 for f, h, t in zip(freqs, hot, totals))
    total = float(sum(totals))
    return Placement(model_identity=model_identity, hot=tuple(_frozen(h) for h in hot),
                     neurons=tuple(len(f) for f in freqs), neuron_bytes=tuple(nb), fixed_bytes=int(fixed_bytes),
                     budget=int(budget), layer_share=layer_share, share=_mass(freqs, hot) / total if total else 0.0,
                     method=used, note=note, min_hot_per_layer=int(min_hot_per_layer), layer_bytes=tuple(extra))
