"""llama-bench-style benchmark: prompt processing (pp) and generation (tg) across engines, one process.

    python benchmarks/decode.py [--model X.gguf] [--budget BYTES] [--pp 128] [--tg 128] [--reps 3]
                                [--threads 2] [--cpu-bandwidth BYTES_PER_S] [-o md|json]

Engines (repetitions alternate between them, so drift hits all alike):

* ``transformers``   dense fp32 AutoModelForCausalLM(gguf_file=...) on the CPU
* ``offload dense``  OffloadedModel.from_pretrained(path)
* ``offload hybrid`` a deep copy of the dense model, ``.offload(budget, device=cpu, prepared=prepare(...))``;
                     default budget = plan.fixed_bytes + 1 (every FFN neuron cold: the fastest CPU setting)
* ``layer-split``    llama.cpp's -ngl policy; identical to dense without CUDA → skipped (reported)
* ``llama.cpp``      via llama_cpp (llama-cpp-python) if importable; otherwise skipped (reported)

Tests: ``pp<N>``: one prefill forward over N random token ids; ``tg<N>``: N new tokens after the chat
prompt, EOS ignored; decode rate = (N - 1) tokens over the time after the first token.
Columns: t/s mean ± sd over --reps, ratio to transformers, weight bytes read per decode token
(dense: every weight incl. the head; hybrid: non-FFN weights + the FFN bytes the hybrid layers
counted + the predictors), and the fraction of the bandwidth roofline (t/s ÷ (CPU bandwidth ÷ bytes)).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time

PROMPT = "Write a short story about a robot who learns to paint."


# ---------------------------------------------------------------- pure pieces (tested without a model)

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
             bytes_per_token=None, bandwidth=None) -> dict:
    """One result row. ``base_mean``: the transformers mean for the same test (ratio column)."""
    m, sd = mean_sd(runs)
    frac = roofline_fraction(m, bandwidth, bytes_per_token) if test.startswith("tg") else None
    return {"model": model, "size_bytes": int(size), "params": int(params), "backend": backend,
            "budget_bytes": budget, "test": test, "tokens_per_s_mean": m, "tokens_per_s_sd": sd,
            "runs": list(runs), "ratio_to_transformers": (m / base_mean) if base_mean else None,
            "bytes_per_token": bytes_per_token if test.startswith("tg") else None,
            "roofline_fraction": frac}


def format_markdown(rows, skipped=(), info=None, notes=()) -> str:
    head = ["model", "size", "params", "backend", "budget", "test", "t/s", "× transformers",
            "bytes/token", "of roofline"]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        ratio = f"{r['ratio_to_transformers']:.2f}" if r.get("ratio_to_transformers") is not None else "—"
        frac = f"{100 * r['roofline_fraction']:.0f}%" if r.get("roofline_fraction") is not None else "—"
        budget = human_bytes(r["budget_bytes"]) if r.get("budget_bytes") is not None else "—"
        out.append(f"| {r['model']} | {human_bytes(r['size_bytes'])} | {human_count(r['params'])} | {r['backend']} | "
                   f"{budget} | {r['test']} | {r['tokens_per_s_mean']:.2f} ± {r['tokens_per_s_sd']:.2f} | {ratio} | "
                   f"{human_bytes(r.get('bytes_per_token'))} | {frac} |")
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


def machine_info(threads: int, bandwidth: float, bandwidth_source: str) -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "cuda": torch.cuda.is_available(), "platform": platform.platform(),
            "cpu_bandwidth_GBps": round(bandwidth / 1e9, 2), "cpu_bandwidth_source": bandwidth_source,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------- engines

def unique_param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())  # parameters() dedupes tied


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help=".gguf file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--budget", type=int, default=None,
                    help="hybrid budget in bytes (default: fixed bytes + 1, every FFN neuron cold)")
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--cpu-bandwidth", type=float, default=None, help="bytes/s (default: measured)")
    ap.add_argument("-o", "--output", choices=("md", "json"), default="md")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from offload import OffloadedModel
    from offload.checkpoint import default_model_path
    from offload.prepare import prepare
    from decode_dense import run_hf as hf_decode_and_prefill_rates  # benchmarks/ is on sys.path
    from offload.place.memory import plan_memory
    from offload.place.report import build_report, measure_cpu_bandwidth

    def log(msg):
        if args.output == "md":
            print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    path = str(args.model or default_model_path())
    name = os.path.basename(path)
    if args.cpu_bandwidth:
        bw, bw_src = args.cpu_bandwidth, "given"
    else:
        bw, bw_src = measure_cpu_bandwidth(), "measured"
    log(f"CPU bandwidth {bw / 1e9:.2f} GB/s ({bw_src}); loading {name}")

    dense = OffloadedModel.from_pretrained(path, progress=False)
    n_layers = len(dense.model.layers)
    params = sum(p.numel() for p in dense.model.parameters())
    dense_bytes = unique_param_bytes(dense.model)
    ffn_bytes = sum(unique_param_bytes(layer.mlp) for layer in dense.model.layers)
    prepared = prepare(dense, progress=False)
    pred_bytes = int(prepared.predictors.nbytes)
    plan = plan_memory(dense.checkpoint.config, dtype="float32", device="cpu", context=args.context,
                       predictor_bytes=pred_bytes // n_layers, shapes=dense.checkpoint.shapes)
    budget = args.budget if args.budget is not None else plan.fixed_bytes + 1
    hybrid = OffloadedModel(copy.deepcopy(dense.model), dense.tokenizer, dense.checkpoint, device=torch.device("cpu"))
    hybrid.offload(budget, device=torch.device("cpu"), context=args.context, prepared=prepared, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=path, dtype=torch.float32).eval()
    log("models loaded")

    skipped = []
    if torch.cuda.is_available():
        skipped.append(("layer-split", "CUDA present, but the -ngl layer split is not implemented in this script"))
    else:
        skipped.append(("layer-split", "no CUDA: every layer would stay on the CPU, i.e. identical to offload dense"))
    try:
        import llama_cpp  # noqa: F401
        skipped.append(("llama.cpp", "llama_cpp importable, but this script does not drive it yet"))
    except ImportError:
        skipped.append(("llama.cpp", "llama_cpp (llama-cpp-python) is not installed"))

    gen = torch.Generator().manual_seed(0)
    pp_ids = torch.randint(0, dense.config.vocab_size, (1, args.pp), generator=gen)
    tg_ids = dense.chat_ids(PROMPT)

    def ours_pp(m):
        m.generate(pp_ids, max_new_tokens=1, eos_token_id=[])
        return m.last_stats.prefill_tokens_per_second

    def ours_tg(m, n=args.tg):
        m.generate(tg_ids, max_new_tokens=n, eos_token_id=[])
        return m.last_stats.decode_tokens_per_second

    def hf_pp(_):
        t0 = time.perf_counter()
        hf(pp_ids, attention_mask=torch.ones_like(pp_ids), use_cache=True)
        return pp_ids.shape[1] / (time.perf_counter() - t0)

    def hf_tg(_, n=args.tg):
        return hf_decode_and_prefill_rates(hf, tg_ids, n)[0]

    engines = [("transformers", hf, hf_pp, hf_tg), ("offload dense", dense, ours_pp, ours_tg),
               ("offload hybrid", hybrid, ours_pp, ours_tg)]
    runs = {(e, t): [] for e, *_ in engines for t in ("pp", "tg")}
    hybrid_ffn_bytes = []
    with torch.inference_mode():
        for _, model, fpp, ftg in engines:  # warm-up
            fpp(model)
            ftg(model, 4)
        for rep in range(args.reps):
            for e, model, fpp, ftg in engines:
                runs[(e, "pp")].append(fpp(model))
                runs[(e, "tg")].append(ftg(model))
                if model is hybrid:
                    h = hybrid.hybrid_stats
                    hybrid_ffn_bytes.append((h.bytes_hot + h.bytes_cold) / max(args.tg - 1, 1))
            log(f"rep {rep + 1}/{args.reps} done")

    hyb_bpt = hybrid_bytes_per_token(dense_bytes - ffn_bytes, statistics.mean(hybrid_ffn_bytes), 1, pred_bytes)
    bpt = {"transformers": dense_bytes, "offload dense": dense_bytes, "offload hybrid": hyb_bpt}
    budgets = {"transformers": None, "offload dense": None, "offload hybrid": budget}
    rows = []
    for test, n in (("pp", args.pp), ("tg", args.tg)):
        base = mean_sd(runs[("transformers", test)])[0]
        for e, *_ in engines:
            rows.append(make_row(model=name, size=dense_bytes, params=params, backend=e, budget=budgets[e],
                                 test=f"{test}{n}", runs=runs[(e, test)], base_mean=base,
                                 bytes_per_token=bpt[e], bandwidth=bw))

    # The report's roofline for the same budget. On a CPU-only machine its "GPU" side is the CPU too, so
    # give it the CPU bandwidth for both, and also add the two sides (they are serial on one CPU).
    rep = build_report(dense.checkpoint.config, budget=budget, frequencies=prepared.profile.frequencies,
                       context=args.context, dtype="float32", predictor_bytes=pred_bytes // n_layers,
                       shapes=dense.checkpoint.shapes, device="cpu", cpu_bw=bw, gpu_bw=bw, gpu="CPU")
    rf = rep["roofline"]
    serial = bw / (rf["gpu_bytes_per_token"] + rf["cpu_bytes_per_token"])
    hyb_tg = mean_sd(runs[("offload hybrid", "tg")])[0]
    roof = {"report_tokens_per_s": rf["tokens_per_s"], "report_serial_cpu_tokens_per_s": serial,
            "report_bytes_per_token": rf["gpu_bytes_per_token"] + rf["cpu_bytes_per_token"],
            "measured_bytes_per_token": hyb_bpt, "measured_roofline_tokens_per_s": roofline_tokens_per_s(bw, hyb_bpt),
            "hybrid_tg_tokens_per_s": hyb_tg, "misses_by_pct_vs_serial": 100 * (1 - hyb_tg / serial),
            "misses_by_pct_vs_report": 100 * (1 - hyb_tg / rf["tokens_per_s"]),
            "density": prepared.operating_point.get("density")}
    wall = time.perf_counter() - t_start
    info = machine_info(args.threads, bw, bw_src)
    info["wall_s"] = round(wall, 1)
    if args.output == "json":
        print(format_json(rows, skipped, info, {"roofline": roof, "pp": args.pp, "tg": args.tg, "reps": args.reps}))
    else:
        notes = [
            f"roofline (report, budget {human_bytes(budget)}, context {args.context}, CPU {bw / 1e9:.2f} GB/s): "
            f"{rf['tokens_per_s']:.1f} t/s as max(side) [{human_bytes(rf['gpu_bytes_per_token'])} 'GPU' side on "
            f"the CPU + {human_bytes(rf['cpu_bytes_per_token'])} cold], {serial:.1f} t/s with both sides serial "
            f"on the CPU; from measured bytes ({human_bytes(hyb_bpt)}/token): "
            f"{roof['measured_roofline_tokens_per_s']:.1f} t/s",
            f"measured hybrid tg: {hyb_tg:.1f} t/s → misses the serial roofline by "
            f"{roof['misses_by_pct_vs_serial']:.0f}% (the report's max-side figure by "
            f"{roof['misses_by_pct_vs_report']:.0f}%)"]
        print(format_markdown(rows, skipped, info, notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
