"""Placement solver at LLaMA-2-70B's shape: 80 layers × 28,672 neurons, fp16 (3 × 8192 × 2 bytes a neuron).

Synthetic power-law frequencies whose skew and density vary by layer (flat early layers, skewed
late ones, as profiles of real models show), the fixed bytes of a 70B model at context 4096 from
``plan_memory``, and PowerInfer's minimum split C. Prints each method's time and activation mass.
Targets on the 2-core dev machine: MILP ≤ 5 s, greedy ≤ 0.5 s.

    python benchmarks/solver.py [--budget 40GiB] [--min-hot 1024] [--batch-size 64] [--json]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from offload.place import plan_memory, solve_placement
from offload.units import format_bytes, parse_memory_size

LLAMA_70B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 8192, "intermediate_size": 28672,
             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
             "max_position_embeddings": 4096, "hidden_act": "silu"}


def synthetic_frequencies(layers: int, neurons: int, seed: int = 0) -> list[np.ndarray]:
    """Per layer: f(rank) = min(1, a·rank^-α), α from 0.2 (flat) to 1.1 (skewed), shuffled ranks."""
    rng = np.random.default_rng(seed)
    rank = np.arange(1, neurons + 1, dtype=np.float64)
    out = []
    for i in range(layers):
        alpha = 0.2 + 0.9 * i / max(layers - 1, 1) + rng.normal(0, 0.05)
        density = rng.uniform(0.05, 0.5)  # mean frequency of the layer
        f = rank ** -alpha
        f = np.minimum(1.0, f * density * neurons / f.sum())
        out.append(rng.permutation(f))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="40GiB", help="GPU memory budget (default 40GiB)")
    p.add_argument("--min-hot", type=int, default=1024, help="minimum hot neurons per used layer (C)")
    p.add_argument("--batch-size", type=int, default=512, help="neurons per MILP group")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per method (best is reported)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    plan = plan_memory(LLAMA_70B, dtype="float16", device="cuda", context=4096)
    budget = parse_memory_size(args.budget, name="--budget")
    freqs = synthetic_frequencies(plan.neurons.__len__(), plan.neurons[0])
    nb = plan.neuron_bytes[0]
    assert nb == 3 * 8192 * 2
    results = {}
    for method in ("greedy", "milp"):
        best, placement = float("inf"), None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            placement = solve_placement(freqs, nb, plan.fixed_bytes, budget, min_hot_per_layer=args.min_hot,
                                        method=method, batch_size=args.batch_size)
            best = min(best, time.perf_counter() - t0)
        counts = placement.hot_counts
        results[method] = {"seconds": best, "gpu_share": placement.share, "hot_neurons": sum(counts),
                           "layers_used": sum(c > 0 for c in counts),
                           "min_used_layer": min((c for c in counts if c), default=0),
                           "total_bytes": placement.total_bytes, "method": placement.method, "note": placement.note}
    unconstrained = solve_placement(freqs, nb, plan.fixed_bytes, budget, method="greedy")
    results["greedy_no_min"] = {"gpu_share": unconstrained.share,
                                "layers_below_min": sum(0 < c < args.min_hot for c in unconstrained.hot_counts)}
    if args.json:
        print(json.dumps({"budget_bytes": budget, "fixed_bytes": plan.fixed_bytes, "neuron_bytes": nb,
                          "min_hot_per_layer": args.min_hot, "batch_size": args.batch_size, **results}, indent=1))
        return
    print(f"70B shape: 80 × 28672 neurons of {nb} B; budget {format_bytes(budget)}, "
          f"fixed {format_bytes(plan.fixed_bytes)}, "
          f"C = {args.min_hot}, MILP groups of ≤ {args.batch_size} (≥ 64 a layer)")
    for method in ("greedy", "milp"):
        r = results[method]
        print(f"  {method:6s} {r['seconds']:7.3f} s  mass served {r['gpu_share']:.5f}  hot {r['hot_neurons']} "
              f"in {r['layers_used']} layers (smallest {r['min_used_layer']}), {format_bytes(r['total_bytes'])}")
    u = results["greedy_no_min"]
    print(f"  without the minimum: mass {u['gpu_share']:.5f}, {u['layers_below_min']} layers would hold 0 < hot < C")


if __name__ == "__main__":
    main()
