"""The pure pieces of the decode benchmarks: statistics, bytes and roofline arithmetic, the llama-bench
table (markdown) and JSON. No model, no torch."""
from __future__ import annotations

import json
import statistics


def mean_sd(values) -> tuple[float, float]:
    """(mean, population sd); sd is 0 for a single value."""
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def roofline_tokens_per_s(bandwidth: float, bytes_per_token: float) -> float:
    """Bandwidth-bound decode rate: bytes/s ÷ bytes/token."""
    return bandwidth / bytes_per_token if bytes_per_token else float("nan")


def roofline_fraction(tokens_per_s: float, bandwidth: float, bytes_per_token: float | None) -> float | None:
    """Measured t/s as a share of the bandwidth roofline (None when bytes are unknown)."""
    if not bytes_per_token or not bandwidth:
        return None
    return tokens_per_s / roofline_tokens_per_s(bandwidth, bytes_per_token)


def hybrid_bytes_per_token(non_ffn_bytes: int, ffn_bytes_counted: int, steps: int, predictor_bytes: int) -> float:
    """Weights read per hybrid decode token: the non-FFN weights, the FFN bytes HybridStats counted over
    ``steps`` decode steps (hot + cold), and every layer's predictor."""
    return non_ffn_bytes + ffn_bytes_counted / max(steps, 1) + predictor_bytes


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def make_row(*, model: str, size: int, params: int, backend: str, budget, test: str, runs, base_mean=None,
             bytes_per_token=None, bandwidth=None, peak_gpu_bytes=None) -> dict:
    """One result row. ``base_mean``: the transformers mean for the same test (ratio column)."""
    m, sd = mean_sd(runs)
    frac = roofline_fraction(m, bandwidth, bytes_per_token) if test.startswith("tg") else None
    return {"model": model, "size_bytes": int(size), "params": int(params), "backend": backend,
            "budget_bytes": budget, "test": test, "tokens_per_s_mean": m, "tokens_per_s_sd": sd,
            "runs": list(runs), "ratio_to_transformers": (m / base_mean) if base_mean else None,
            "bytes_per_token": bytes_per_token if test.startswith("tg") else None,
            "roofline_fraction": frac, "peak_gpu_bytes": peak_gpu_bytes}


def format_markdown(rows, skipped=(), info=None, notes=()) -> str:
    head = ["model", "size", "params", "backend", "budget", "test", "t/s", "× transformers",
            "bytes/token", "of roofline"]
    peak = any(r.get("peak_gpu_bytes") is not None for r in rows)
    head += ["peak GPU"] if peak else []
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        ratio = f"{r['ratio_to_transformers']:.2f}" if r.get("ratio_to_transformers") is not None else "—"
        frac = f"{100 * r['roofline_fraction']:.0f}%" if r.get("roofline_fraction") is not None else "—"
        budget = human_bytes(r["budget_bytes"]) if r.get("budget_bytes") is not None else "—"
        out.append(f"| {r['model']} | {human_bytes(r['size_bytes'])} | {human_count(r['params'])} | {r['backend']} | "
                   f"{budget} | {r['test']} | {r['tokens_per_s_mean']:.2f} ± {r['tokens_per_s_sd']:.2f} | {ratio} | "
                   f"{human_bytes(r.get('bytes_per_token'))} | {frac} |"
                   + (f" {human_bytes(r.get('peak_gpu_bytes'))} |" if peak else ""))
    for name, reason in skipped:
        out.append(f"\nskipped {name}: {reason}")
    for n in notes:
        out.append(f"\n{n}")
    if info:
        out.append("\n" + ", ".join(f"{k} {v}" for k, v in info.items()))
    return "\n".join(out)


def format_json(rows, skipped=(), info=None, extra=None) -> str:
    info = info or {}
    doc = {"machine": info, "rows": [{**r, **{f"machine_{k}": v for k, v in info.items()}} for r in rows],
           "skipped": [{"backend": n, "reason": why} for n, why in skipped]}
    if extra:
        doc.update(extra)
    return json.dumps(doc, indent=2, default=float)
