"""Budget sweep: decode tokens/s against the GPU budget for ours (hybrid), the layer split and
accelerate, printed as a table and drawn as a PNG.

    python benchmarks/sweep.py [--model PATH] [--device cuda|cpu] [--fractions 0.3,0.5,0.7,0.9,1.1]
                               [--tg 64] [--reps 2] [--context 1024] [--plot sweep.png] [--weights float16]
                               [--profile-tokens N] [--tune-tokens N] [-o md|json]

Budgets are fractions of the model's size at the device dtype (fp16 on CUDA) plus its KV cache for
``--context`` tokens, as offload.place.memory accounts it. At each budget, one process, repetitions
alternating:

* ``offload hybrid``  OffloadedModel.offload(budget, device): hot neurons on the device, cold on the CPU
  (skipped at budgets below the non-FFN part, which the hybrid keeps on the device); the cold rows in
  fp32, or fp16 with ``--weights float16`` (``from_pretrained(weights="float16")``)
* ``layer-split``     offload.layer_split: whole layers on the device, the rest dense on the CPU
* ``accelerate``      transformers with device_map="auto", max_memory={0: budget} (CUDA only)

MODEL: a .gguf file (default: the embedded SmolLM2-135M-Instruct) or an HF directory, e.g. one made by
benchmarks/random_llama.py (a random-weight LLaMA larger than the budget). With ``--device cpu`` (no GPU)
the "device" is the CPU too: the script runs end to end, but its figures say nothing about GPUs (the
layer split then equals dense, and the hybrid's hot side runs on CPU torch). On CUDA the table has
the most device memory each engine held during its runs (baselines.DevicePeak) next to the budget.
``--profile-tokens`` / ``--tune-tokens`` go to ``prepare``, as in benchmarks/decode.py (give both scripts
the same values and the second reuses the first's artifacts).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import statistics
import time



def sweep_budgets(fixed_bytes: int, ffn_bytes: int, fractions) -> list[int]:
    """Budgets in bytes: each fraction of (fixed + FFN) bytes."""
    return [int(f * (fixed_bytes + ffn_bytes)) for f in fractions]


def plot_sweep(rows: list[dict], path: str, title: str) -> None:
    """tokens/s (mean, with sd bars) against budget (MiB), one line per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for engine in dict.fromkeys(r["engine"] for r in rows):
        pts = sorted((r["budget_bytes"] / 2**20, r["tokens_per_s_mean"], r["tokens_per_s_sd"])
                     for r in rows if r["engine"] == engine)
        xs, ys, sds = zip(*pts)
        ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=3, label=engine)
    ax.set_xlabel("GPU budget (MiB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    ap.add_argument("--fractions", default="0.3,0.5,0.7,0.9,1.1")
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--plot", default="sweep.png")
    ap.add_argument("--weights", choices=("float32", "float16"), default="float32",
                    help="storage of the hybrid's cold rows on the CPU (default float32)")
    import baselines as bl  # benchmarks/ is on sys.path

    bl.add_prepare_options(ap)
    ap.add_argument("-o", "--output", choices=("md", "json"), default="md")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from offload import OffloadedModel
    from offload.checkpoint import default_model_path
    from offload.errors import OffloadError
    from offload.layer_split import apply_layer_split
    from offload.place.memory import plan_memory
    from offload.prepare import prepare

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    dtype = "float16" if cuda else "float32"
    path = str(args.model or default_model_path())
    t0 = time.perf_counter()

    def log(msg):
        if args.output == "md":
            print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    dense = OffloadedModel.from_pretrained(path, progress=False)
    base = dense if args.weights == "float32" else OffloadedModel.from_pretrained(path, progress=False,
                                                                                 weights=args.weights)
    layers = len(dense.model.layers)
    prepared = prepare(dense, progress=args.output == "md", **bl.prepare_options(args))
    plan = plan_memory(dense.checkpoint.config, dtype=dtype, device=device, context=args.context,
                       predictor_bytes=prepared.predictors.nbytes // layers, shapes=dense.checkpoint.shapes)
    budgets = sweep_budgets(plan.fixed_bytes, plan.ffn_bytes, [float(f) for f in args.fractions.split(",")])
    ids = dense.chat_ids(bl.PROMPT)
    skipped = []
    if not cuda:
        skipped.append("accelerate: needs CUDA")
    elif not bl.importable("accelerate"):
        skipped.append("accelerate: not installed (pip install accelerate)")
    meter = bl.DevicePeak(cuda)
    hybrid = "offload hybrid" + (" fp16" if args.weights == "float16" else "")

    def ours_tg(m):
        return bl.offload_rates(m, ids, args.tg)[0]

    rows = []
    for budget in budgets:
        engines = {}
        meter.rebase()
        h = OffloadedModel(copy.deepcopy(base.model), base.tokenizer, base.checkpoint, device=torch.device("cpu"))
        try:
            h.offload(budget, device=torch.device(device), hot_dtype=torch.float16 if cuda else None,
                      context=args.context, prepared=prepared, progress=False)
            engines[hybrid] = lambda m=h: ours_tg(m)
        except OffloadError as e:  # below the non-FFN part: the hybrid does not fit at all
            skipped.append(f"{hybrid} at {budget / 2**20:.0f} MiB: {e}")
        meter.built(hybrid)
        ls = OffloadedModel(copy.deepcopy(dense.model), dense.tokenizer, dense.checkpoint, device=torch.device("cpu"))
        split = apply_layer_split(ls.model, budget, device, context=args.context)
        engines["layer-split"] = lambda m=ls: ours_tg(m)
        meter.built("layer-split")
        if cuda and bl.importable("accelerate"):
            acc = bl.load_accelerate(path, budget)
            engines["accelerate"] = lambda m=acc: bl.transformers_tg(m, ids, args.tg)
            meter.built("accelerate")
        runs = {k: [] for k in engines}
        meter.peak.clear()
        with torch.inference_mode():
            for k, f in engines.items():  # warm-up
                meter.run(k, f)
            for _ in range(args.reps):
                for k, f in engines.items():
                    runs[k].append(meter.run(k, f))
        for k, r in runs.items():
            rows.append({"engine": k, "budget_bytes": budget, "tokens_per_s_mean": statistics.mean(r),
                         "tokens_per_s_sd": statistics.pstdev(r), "runs": r, "peak_gpu_bytes": meter.peak.get(k),
                         "gpu_layers": split.gpu_layers if k == "layer-split" else None})
        log(f"budget {budget / 2**20:.0f} MiB: " + ", ".join(f"{k} {statistics.mean(r):.1f}" for k, r in runs.items()) +
            f" (layer-split: {split.gpu_layers}/{split.layers} layers)")
        for m in (h, ls):  # stop the hybrid's cold-side threads so that its rows can be freed
            worker = getattr(m.model, "hybrid_worker", None)
            if worker is not None:
                worker.close()
        del h, ls, engines
        acc = None  # the accelerate model of this budget, if any
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    where = torch.cuda.get_device_name() if cuda else "CPU only (the 'GPU' side is the CPU)"
    title = f"{os.path.basename(os.path.normpath(path))} · {where} · tg{args.tg} · {date[:10]}"
    try:
        plot_sweep(rows, args.plot, title)
    except ImportError as e:  # the table still stands
        skipped.append(f"plot: {e} (pip install matplotlib)")
        args.plot = None
    if args.output == "json":
        print(json.dumps({"model": path, "device": where, "date": date, "rows": rows, "skipped": skipped,
                          "plot": args.plot}, indent=1))
        return 0
    print(f"\n{title}\n\n| budget | engine | decode t/s | peak GPU |\n|---|---|---|---|")
    for r in rows:
        extra = f" ({r['gpu_layers']} layers)" if r["gpu_layers"] is not None else ""
        peak = f"{r['peak_gpu_bytes'] / 2**20:.0f} MiB" if r["peak_gpu_bytes"] is not None else "—"
        print(f"| {r['budget_bytes'] / 2**20:.0f} MiB | {r['engine']}{extra} | {r['tokens_per_s_mean']:.1f} ± "
              f"{r['tokens_per_s_sd']:.1f} | {peak} |")
    for s in skipped:
        print(f"\nskipped {s}")
    print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
