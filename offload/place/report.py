"""``offload report``: where each layer's neurons would go under a GPU budget, and what that buys.

Library functions (the CLI wiring, ``add_report_arguments(parser)`` + ``run_report(args)``, and the
inputs ``model_sizes`` / ``load_profile_frequencies`` are in :mod:`offload.place.report_cli`):
``plan_and_place`` (MemoryPlan + Placement), ``build_report`` (→ dict), ``format_report_table``,
``plot_report`` (PNG), ``model_sizes`` (config and shapes without loading weights),
``load_profile_frequencies``, ``gpu_bandwidth``, ``measure_cpu_bandwidth``.

Roofline (decode, batch 1, the last token of ``context``): only activations cross PCIe, so
``tokens/s = 1 / max(gpu_bytes / BW_gpu, cpu_bytes / BW_cpu)`` with
``gpu_bytes`` = per-token weights on the GPU (attention, norms, output head — the embedding table
when tied —, projections, FFN biases, predictors) + the KV cache read at ``context`` tokens
+ the active hot rows Σ_L Σ_{i hot} f_{L,i}·b_L (+ for packed hot rows, the down scale table of every
layer holding hot neurons: at decode densities nearly every group of 32 neurons has an active one), and
``cpu_bytes`` = the active cold rows Σ_L Σ_{i cold} f_{L,i}·b^cpu_L = Σ_L (1 − share_L)·E[active_L]·b^cpu_L,
where E[active_L] = Σ_i f_{L,i} and b^cpu_L is a neuron's bytes at the CPU dtype.

JSON schema (``--json``; ``schema`` = "offload.report/1"; bytes are ints, shares in [0, 1])::

    {"schema", "model", "model_identity", "model_type", "dtype", "hot_format" (the hot FFN rows' format: the
     dtype, or "int4" for packed 4-bit rows with `--dtype int4`), "cpu_dtype", "context", "batch",
     "budget_bytes",
     "frequencies": "profile" | "uniform (no profile)", "profile": path | null,
     "density": mean activation frequency (expected active fraction of FFN neurons),
     "memory": {"gpu": {role: bytes}  (embeddings, positions, attention, norms, head, projections,
                                      ffn_fixed, other, predictors, kv_cache, scratch, context_reserve),
                "gpu_fixed_bytes", "gpu_hot_ffn_bytes", "gpu_total_bytes", "gpu_free_bytes",
                "cpu_cold_ffn_bytes" (at cpu_dtype), "cpu_other_bytes",
                "cpu_device_fixed_bytes" (the fixed part with device='cpu': fp32, no CUDA context reserve)},
     "placement": {"method", "note", "min_hot_per_layer", "hot_neurons", "neurons", "gpu_share"},
     "layers": [{"layer", "neurons", "hot", "hot_pct", "gpu_mib" (hot rows, and a packed layer's table),
                 "gpu_share"}],
     "roofline": {"gpu", "gpu_bandwidth", "gpu_bandwidth_source": "table" | "given",
                  "cpu_bandwidth", "cpu_bandwidth_source": "measured" | "given",
                  "gpu_bytes_per_token", "cpu_bytes_per_token", "pcie_bytes_per_token",
                  "gpu_ms", "cpu_ms", "tokens_per_s", "bound": "gpu" | "cpu",
                  "dense_cpu_tokens_per_s"}}
"""
from __future__ import annotations

import re
import time

import numpy as np

from offload.errors import ArtifactError, OffloadError
from offload.place.memory import dtype_bytes, plan_memory
from offload.place.solver import Placement, solve_placement
from offload.units import format_bytes, parse_memory_size

SCHEMA = "offload.report/1"
# Peak memory bandwidth, bytes/s. Matched by name tokens, most specific first.
GPUS = [("H100 PCIe", ("h100", "pcie"), 2.0e12), ("H100 NVL", ("h100", "nvl"), 3.9e12),
        ("H100 SXM", ("h100",), 3.35e12), ("H200", ("h200",), 4.8e12), ("GH200", ("gh200",), 4.0e12),
        ("A100 40GB", ("a100", "40gb"), 1.555e12), ("A100 80GB", ("a100",), 2.0e12),
        ("A10", ("a10",), 0.6e12), ("A6000", ("a6000",), 0.768e12), ("L40S", ("l40s",), 0.864e12),
        ("L4", ("l4",), 0.3e12), ("T4", ("t4",), 0.32e12), ("V100", ("v100",), 0.9e12),
        ("RTX 4090", ("4090",), 1.008e12), ("RTX 4080", ("4080",), 0.717e12), ("RTX 3090", ("3090",), 0.936e12),
        ("RTX 3080", ("3080",), 0.76e12), ("MI300X", ("mi300x",), 5.3e12)]
DEFAULT_GPU = "H100 SXM"


def gpu_bandwidth(name: str) -> tuple[str, float]:
    """(table name, bytes/s) for a GPU name such as "H100 SXM", "a100-40gb" or torch's device name."""
    tokens = set(re.split(r"[^a-z0-9]+", name.lower()))
    for label, need, bw in GPUS:
        if set(need) <= tokens:
            return label, bw
    raise OffloadError(f"unknown GPU {name!r}; known: {', '.join(g[0] for g in GPUS)}; "
                       "or give its memory bandwidth with --gpu-bandwidth (bytes/s, e.g. 3.35e12 or 3.35TB)")


def measure_cpu_bandwidth(nbytes: int = 100_000_000, repeats: int = 10) -> float:
    """Bytes/s of a dense fp32 NumPy GEMV over an ``nbytes`` matrix (best of ``repeats``)."""
    w = np.ones((max(1, nbytes // 4096), 1024), dtype=np.float32)
    x = np.ones(1024, dtype=np.float32)
    w @ x
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        w @ x
        best = min(best, time.perf_counter() - t0)
    return w.nbytes / best


def plan_and_place(config, *, budget, frequencies=None, density: float = 0.5, context: int = 4096, batch: int = 1,
                   dtype="float16", predictor_bytes=0, min_hot_per_layer: int = 0, method: str = "auto",
                   identity: str = "", shapes=None, **plan_kwargs):
    """(MemoryPlan, Placement, frequencies used). ``frequencies`` None → uniform at ``density``.
    Raises BudgetError (budget, need by role, shortfall) when the non-FFN part does not fit."""
    budget = parse_memory_size(budget, name="--gpu-memory")
    plan = plan_memory(config, dtype=dtype, context=context, batch=batch, predictor_bytes=predictor_bytes,
                       shapes=shapes, **plan_kwargs)
    plan.check_fits(budget)
    if frequencies is None:
        if not 0 < density <= 1:
            raise OffloadError(f"--density={density}: expected a fraction in (0, 1]")
        # Uniform, with a 1e-6 tilt by index so that ties break evenly across layers.
        frequencies = [density * (1 - 1e-6 * np.arange(n) / n) for n in plan.neurons]
    elif [len(f) for f in frequencies] != list(plan.neurons):
        raise ArtifactError(f"the profile has {[len(f) for f in frequencies][:4]}… neurons per layer "
                            f"({len(frequencies)} layers); this model has {plan.neurons[:4]}… ({len(plan.neurons)})")
    placement = solve_placement(frequencies, plan.neuron_bytes, plan.fixed_bytes, budget,
                                min_hot_per_layer=min_hot_per_layer, method=method, model_identity=identity,
                                fixed_breakdown=plan.device_bytes, layer_bytes=plan.layer_bytes or None)
    return plan, placement, frequencies


def roofline(plan, placement, frequencies, config, *, cpu_dtype="float32", gpu=None, gpu_bw=None, cpu_bw=None):
    """The decode roofline dict (see the module docstring for the formula)."""
    if gpu_bw is not None:
        gpu_name, gpu_src = gpu or "given", "given"
    else:
        gpu_name, gpu_bw = gpu_bandwidth(gpu or DEFAULT_GPU)
        gpu_src = "table"
    cpu_src = "given" if cpu_bw is not None else "measured"
    cpu_bw = float(cpu_bw) if cpu_bw is not None else measure_cpu_bandwidth()
    dev = plan.device_bytes
    per_token = ("attention", "norms", "head", "projections", "ffn_fixed", "other", "predictors")
    kv_read = dev["kv_cache"] // plan.batch
    gpu_bytes = sum(dev[k] for k in per_token) + kv_read
    gpu_bytes += dev["embeddings"] if config.tie_word_embeddings else 0
    cpu_elt, cold_bytes = dtype_bytes(cpu_dtype), 0.0
    tables = plan.layer_bytes or (0,) * len(plan.neurons)
    for f, hot, nb, el, table in zip(frequencies, placement.hot, plan.neuron_bytes, plan.neuron_elements, tables):
        hot_mass = float(f[hot].sum())
        gpu_bytes += hot_mass * nb + (table if len(hot) else 0)
        cold_bytes += (float(f.sum()) - hot_mass) * el * cpu_elt
    gpu_s, cpu_s = gpu_bytes / gpu_bw, cold_bytes / cpu_bw
    dense_cpu = plan.weight_bytes / plan.dtype_bytes * cpu_elt + kv_read
    return {"gpu": gpu_name, "gpu_bandwidth": float(gpu_bw), "gpu_bandwidth_source": gpu_src,
            "cpu_bandwidth": cpu_bw, "cpu_bandwidth_source": cpu_src,
            "gpu_bytes_per_token": int(gpu_bytes), "cpu_bytes_per_token": int(cold_bytes),
            "pcie_bytes_per_token": 2 * 4 * config.hidden_size * len(plan.neurons),
            "gpu_ms": gpu_s * 1e3, "cpu_ms": cpu_s * 1e3, "tokens_per_s": 1.0 / max(gpu_s, cpu_s, 1e-12),
            "bound": "gpu" if gpu_s >= cpu_s else "cpu", "dense_cpu_tokens_per_s": cpu_bw / dense_cpu}


def build_report(config, *, budget, frequencies=None, density: float = 0.5, context: int = 4096, batch: int = 1,
                 dtype: str = "float16", cpu_dtype: str = "float32", predictor_bytes=0, min_hot_per_layer: int = 0,
                 method: str = "auto", identity: str = "", source: str = "", profile: str | None = None,
                 gpu: str | None = None, gpu_bw: float | None = None, cpu_bw: float | None = None,
                 shapes=None, placement_out: list | None = None, **plan_options) -> dict:
    """The report as plain data (schema in the module docstring). ``config``: a HF config dict or a
    family config. ``placement_out``, if a list, receives (plan, placement, frequencies).
    ``plan_options`` go to ``plan_memory`` (kv_dtype, context_reserve, embed_on_host, tokens)."""
    if isinstance(config, dict):
        from offload.models import config_from_hf

        config = config_from_hf(config)
    plan, placement, freqs = plan_and_place(
        config, budget=budget, frequencies=frequencies, density=density, context=context, batch=batch, dtype=dtype,
        predictor_bytes=predictor_bytes, min_hot_per_layer=min_hot_per_layer, method=method, identity=identity,
        shapes=shapes, **plan_options)
    if placement_out is not None:
        placement_out[:] = [plan, placement, freqs]
    cold = sum((n - len(h)) * e for n, h, e in zip(plan.neurons, placement.hot, plan.neuron_elements))
    layers = [{"layer": i, "neurons": n, "hot": len(h), "hot_pct": 100.0 * len(h) / n,
               "gpu_mib": b / 2**20, "gpu_share": s}
              for i, (n, h, b, s) in enumerate(zip(plan.neurons, placement.hot, placement.layer_hot_bytes,
                                                   placement.layer_share))]
    return {
        "schema": SCHEMA, "model": source, "model_identity": identity, "model_type": config.model_type,
        "dtype": str(dtype), "hot_format": plan.hot_format or str(dtype), "cpu_dtype": str(cpu_dtype),
        "context": context, "batch": batch,
        "budget_bytes": placement.budget,
        "frequencies": "uniform (no profile)" if frequencies is None else "profile", "profile": profile,
        "density": float(density if frequencies is None else np.mean(np.concatenate(freqs))),
        "memory": {"gpu": dict(plan.device_bytes), "gpu_fixed_bytes": plan.fixed_bytes,
                   "gpu_hot_ffn_bytes": placement.hot_bytes, "gpu_total_bytes": placement.total_bytes,
                   "gpu_free_bytes": placement.budget - placement.total_bytes,
                   "cpu_cold_ffn_bytes": cold * dtype_bytes(cpu_dtype),
                   "cpu_other_bytes": sum(plan.host_bytes.values()),
                   "cpu_device_fixed_bytes": plan_memory(config, dtype="float32", device="cpu", context=context,
                                                         batch=batch, predictor_bytes=predictor_bytes,
                                                         shapes=shapes).fixed_bytes},
        "placement": {"method": placement.method, "note": placement.note,
                      "min_hot_per_layer": placement.min_hot_per_layer, "hot_neurons": sum(placement.hot_counts),
                      "neurons": sum(plan.neurons), "gpu_share": placement.share},
        "layers": layers,
        "roofline": roofline(plan, placement, freqs, config, cpu_dtype=cpu_dtype, gpu=gpu, gpu_bw=gpu_bw,
                             cpu_bw=cpu_bw),
    }


def format_report_table(report: dict) -> str:
    """The human-readable report: header, GPU memory by role, per-layer table, totals, roofline."""
    r, mem, pl, rf = report, report["memory"], report["placement"], report["roofline"]
    out = [f"model {r['model'] or '?'} ({r['model_type']}, identity {r['model_identity'] or '?'}): "
           f"budget {format_bytes(r['budget_bytes'])}, context {r['context']}, batch {r['batch']}, "
           f"{r['dtype']} on the GPU" + (f" (hot FFN rows {r['hot_format']})" if r["hot_format"] != r["dtype"]
                                         else "") + f", {r['cpu_dtype']} on the CPU"]
    if r["frequencies"] == "profile":
        out.append(f"frequencies: profile {r['profile'] or ''} (mean activation frequency {r['density']:.3f})")
    else:
        out.append(f"frequencies: uniform (no profile): every neuron assumed active with p = {r['density']:.2f}; "
                   "run the profiler for a real placement")
    out.append("GPU memory, fixed part (filled before any FFN row):")
    out += [f"  {k.replace('_', ' '):16s} {format_bytes(v):>12s}" for k, v in mem["gpu"].items() if v]
    out.append(f"  {'fixed total':16s} {format_bytes(mem['gpu_fixed_bytes']):>12s}")
    if mem["gpu"].get("context_reserve"):
        out.append(f"  (context reserve: the CUDA context and allocator slack, counted on a GPU only. With "
                   f"--device cpu, generate counts none and keeps fp32 rows: its fixed part here is "
                   f"{format_bytes(mem['cpu_device_fixed_bytes'])})")
    out.append(f"  {'hot FFN rows':16s} {format_bytes(mem['gpu_hot_ffn_bytes']):>12s}")
    out.append(f"  {'total':16s} {format_bytes(mem['gpu_total_bytes']):>12s} of {format_bytes(r['budget_bytes'])} "
               f"({format_bytes(mem['gpu_free_bytes'])} free)")
    out.append(f"CPU RAM: cold FFN rows {format_bytes(mem['cpu_cold_ffn_bytes'])}"
               + (f", other {format_bytes(mem['cpu_other_bytes'])}" if mem["cpu_other_bytes"] else ""))
    out.append(f"{'layer':>5} | {'hot':>7} | {'hot %':>6} | {'GPU MiB':>9} | {'GPU share':>9}")
    for row in r["layers"]:
        out.append(f"{row['layer']:>5} | {row['hot']:>7} | {row['hot_pct']:>5.1f}% | {row['gpu_mib']:>9.1f} | "
                   f"{100 * row['gpu_share']:>8.1f}%")
    total_pct = 100.0 * pl["hot_neurons"] / pl["neurons"]
    out.append(f"{'total':>5} | {pl['hot_neurons']:>7} | {total_pct:>5.1f}% | "
               f"{mem['gpu_hot_ffn_bytes'] / 2**20:>9.1f} | {100 * pl['gpu_share']:>8.1f}%")
    out.append(f"placement: {pl['method']} ({pl['note']}); "
               f"minimum hot neurons per used layer: {pl['min_hot_per_layer']}")
    out.append(f"roofline, decode at batch 1 at the end of the context: GPU {rf['gpu']} "
               f"{rf['gpu_bandwidth'] / 1e9:.0f} GB/s ({rf['gpu_bandwidth_source']}), "
               f"CPU {rf['cpu_bandwidth'] / 1e9:.1f} GB/s ({rf['cpu_bandwidth_source']})")
    out.append(f"  GPU {format_bytes(rf['gpu_bytes_per_token'])}/token = {rf['gpu_ms']:.2f} ms; "
               f"CPU (active cold rows) {format_bytes(rf['cpu_bytes_per_token'])}/token = {rf['cpu_ms']:.2f} ms; "
               f"PCIe: activations only, {format_bytes(rf['pcie_bytes_per_token'])}/token")
    out.append(f"  ≈ {rf['tokens_per_s']:.1f} tokens/s, bound by the {rf['bound'].upper()} "
               f"(dense on the CPU alone: {rf['dense_cpu_tokens_per_s']:.1f} tokens/s)")
    return "\n".join(out)


def plot_report(frequencies, placement: Placement, path) -> None:
    """PNG: sorted activation frequency vs neuron rank for a few layers (hot cut marked), and the
    GPU share of activations and of neurons per layer."""
    try:
        import matplotlib
    except ImportError:
        raise OffloadError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    count = len(frequencies)
    for i in sorted({0, count // 4, count // 2, 3 * count // 4, count - 1}):
        curve = np.sort(np.asarray(frequencies[i]))[::-1]
        (line,) = left.plot(np.arange(1, len(curve) + 1), curve, label=f"layer {i}")
        k = len(placement.hot[i])
        if 0 < k <= len(curve):
            left.plot([k], [curve[k - 1]], "o", color=line.get_color())
    left.set(xlabel="neuron rank (by frequency)", ylabel="activation frequency", xscale="log",
             title="per-layer activation frequency (dot: last hot neuron)")
    left.legend()
    layers = np.arange(count)
    right.bar(layers, placement.layer_share, color="tab:orange", label="share of activations on GPU")
    right.plot(layers, [len(h) / n for h, n in zip(placement.hot, placement.neurons)], "k.-",
               label="share of neurons on GPU")
    right.set(xlabel="layer", ylabel="share", ylim=(0, 1.3), yticks=np.linspace(0, 1, 6),
              title=f"hot share per layer (overall {100 * placement.share:.1f}% of activations)")
    right.legend(loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
