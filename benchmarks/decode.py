"""llama-bench-style benchmark: prompt processing (pp) and generation (tg) across engines, one process.

    python benchmarks/decode.py [--model X.gguf|HF_DIR] [--device cpu|cuda] [--budget BYTES | --budget-fraction F]
                                [--pp 128] [--tg 128] [--reps 3] [--threads 2] [--cpu-bandwidth BYTES_PER_S]
                                [--profile-tokens N] [--tune-tokens N] [-o md|json]

Engines (repetitions alternate between them, so drift hits all alike; benchmarks/baselines.py):

* ``transformers``        dense AutoModelForCausalLM (GGUF or HF directory): fp32 on the CPU; on CUDA the
                          whole model on the GPU in fp16, whatever the budget (the reference)
* ``accelerate``          transformers with device_map="auto", max_memory={0: budget} (CUDA only)
* ``layer-split``         llama.cpp's -ngl policy on our engine (offload.layer_split; CUDA only)
* ``llama.cpp``           llama-cpp-python on the same GGUF, if importable (an optional extra)
* ``offload dense``       OffloadedModel.from_pretrained(path): fp32 weights (CUDA: fp16, the whole model)
* ``offload dense fp16``  the same with weights="float16" (CPU only: fp16 storage, fp32 math)
* ``offload hybrid``      ``.offload(budget, prepared=prepare(...))`` on a copy; on the CPU the default
                          budget is plan.fixed_bytes + 1 (every FFN neuron cold); fp32 cold rows
* ``offload hybrid fp16`` the same on the fp16-weight model (fp16 cold rows on the CPU)

Budget: ``--budget`` bytes, or ``--budget-fraction F``: F × the model's bytes as offload.place.memory
plans them at the device dtype (non-FFN part with KV cache and predictors, plus every FFN row), as
benchmarks/sweep.py counts budgets. ``--profile-tokens`` / ``--tune-tokens`` go to ``prepare`` (fewer
tokens: a faster, rougher operating point, e.g. for random-weight models).

Tests: ``pp<N>``: one prefill forward over N random token ids; ``tg<N>``: N new tokens after the chat
prompt, EOS ignored; decode rate = (N - 1) tokens over the time after the first token.
Columns: t/s mean ± sd over --reps, ratio to transformers, weight bytes read per decode token
(dense: every weight incl. the head, at its storage dtype; hybrid: non-FFN weights + the FFN bytes the
hybrid layers counted + the predictors; llama.cpp: the GGUF file's size), and the fraction of the
bandwidth roofline (t/s ÷ (CPU bandwidth ÷ bytes); CPU-only runs). On CUDA a ``peak GPU`` column: the
most device memory the engine held during its runs (torch.cuda.max_memory_allocated over the run, less
what the other engines hold: the bytes allocated while the engine was built count as its own).
"""
from __future__ import annotations

import argparse
import copy
import os
import time

from decode_cpu import CPU_ENGINES, DEFAULT_CPU_ENGINES, Engine, main_cpu, run_reps, unique_param_bytes
from machine import machine_info
from table import (format_json, format_markdown, human_bytes, hybrid_bytes_per_token, make_row, mean_sd,
                   roofline_tokens_per_s)


def detected_gpu(name: str) -> str | None:
    """``name`` when offload.place.report's table of GPUs knows it, else None (its default GPU)."""
    from offload.errors import OffloadError
    from offload.place.report import gpu_bandwidth

    try:
        gpu_bandwidth(name)
    except OffloadError:
        return None
    return name


# ---------------------------------------------------------------- engines

def build_engines(args, path, log, meter):
    """(engines, skipped, context): every engine this machine can run, and why the others are skipped.
    ``meter`` (baselines.DevicePeak) is told when each engine is built."""
    import torch

    import baselines as bl  # benchmarks/ is on sys.path
    from offload import OffloadedModel
    from offload.layer_split import apply_layer_split
    from offload.place.memory import plan_memory
    from offload.prepare import prepare

    cuda = args.device == "cuda"
    dense = OffloadedModel.from_pretrained(path, progress=False)
    n_layers = len(dense.model.layers)
    prepared = prepare(dense, progress=False, **bl.prepare_options(args))
    pred_bytes = int(prepared.predictors.nbytes)
    plan = plan_memory(dense.checkpoint.config, dtype="float16" if cuda else "float32", device=args.device,
                       context=args.context, predictor_bytes=pred_bytes // n_layers, shapes=dense.checkpoint.shapes)
    budget = args.budget
    if args.budget_fraction is not None:
        budget = int(args.budget_fraction * (plan.fixed_bytes + plan.ffn_bytes))
    if budget is None and not cuda:
        budget = plan.fixed_bytes + 1  # every FFN neuron cold
    if budget is None:
        raise SystemExit("--budget or --budget-fraction is required with --device cuda")
    log(f"budget {human_bytes(budget)}: the model plans {human_bytes(plan.fixed_bytes + plan.ffn_bytes)} on "
        f"{args.device} ({human_bytes(plan.fixed_bytes)} non-FFN incl. KV cache and predictors)")
    gen = torch.Generator().manual_seed(0)
    pp_ids = torch.randint(0, dense.config.vocab_size, (1, args.pp), generator=gen)
    tg_ids = dense.chat_ids(bl.PROMPT)
    engines, skipped = [], []

    def add(engine):
        meter.built(engine.name)  # what building it allocated on the device is its own
        engines.append(engine)

    def ours(name, m, budget=None, hybrid=False):
        def pp():
            return bl.offload_rates(m, pp_ids, 1)[1]

        def tg(n):
            return bl.offload_rates(m, tg_ids, n)[0]

        def nbytes():
            if not hybrid:
                return unique_param_bytes(m.model)
            h = m.hybrid_stats  # counted over the last tg run's decode steps
            return hybrid_bytes_per_token(unique_param_bytes(m.model), h.bytes_hot + h.bytes_cold,
                                          max(h.decode_calls // n_layers, 1), pred_bytes)
        add(Engine(name, pp, tg, nbytes, budget))

    # On CUDA transformers holds the whole model on the GPU (fp16): the no-budget reference.
    hf = bl.load_transformers(path, args.device, torch.float16 if cuda else torch.float32)
    dense_bytes = unique_param_bytes(dense.model)
    add(Engine("transformers (cuda, whole model)" if cuda else "transformers (cpu)",
               lambda: bl.transformers_pp(hf, pp_ids), lambda n: bl.transformers_tg(hf, tg_ids, n),
               lambda: dense_bytes // (2 if cuda else 1)))
    if cuda and not bl.importable("accelerate"):
        skipped.append(("accelerate", "accelerate is not installed (pip install accelerate)"))
    elif cuda:
        acc = bl.load_accelerate(path, budget)
        add(Engine("accelerate auto", lambda: bl.transformers_pp(acc, pp_ids),
                   lambda n: bl.transformers_tg(acc, tg_ids, n), lambda: None, budget))
    if cuda:
        ls = OffloadedModel(copy.deepcopy(dense.model), dense.tokenizer, dense.checkpoint, device=torch.device("cpu"))
        split = apply_layer_split(ls.model, budget, "cuda", context=args.context)
        log(f"layer-split: {split.gpu_layers}/{split.layers} layers on the GPU, head {split.head_on_device}")
        ours(f"layer-split ({split.gpu_layers}/{split.layers} layers)", ls, budget)
    else:
        skipped.append(("accelerate", "needs CUDA (device_map='auto' with a GPU max_memory)"))
        skipped.append(("layer-split", "needs CUDA: without a GPU every layer stays on the CPU (= offload dense)"))
    if not path.endswith(".gguf"):
        skipped.append(("llama.cpp", "the model is not a GGUF file"))
    elif bl.importable("llama_cpp"):
        ngl = split.gpu_layers + (1 if split.head_on_device else 0) if cuda else 0
        lc = bl.LlamaCpp(path, args.threads, n_ctx=max(args.context, args.pp + args.tg + 64), n_gpu_layers=ngl)
        gguf_bytes = os.path.getsize(path)
        add(Engine(f"llama.cpp (ngl {ngl})", lambda: lc.pp(pp_ids), lambda n: lc.tg(tg_ids, n),
                   lambda: gguf_bytes, budget if cuda else None))
    else:
        skipped.append(("llama.cpp", "llama_cpp (llama-cpp-python) is not installed: pip install llama-cpp-python"))
    if cuda:
        ours("offload dense (cuda, whole model)", OffloadedModel.from_pretrained(path, device="cuda", progress=False))
    else:
        ours("offload dense", dense)
        ours("offload dense fp16", OffloadedModel.from_pretrained(path, progress=False, weights="float16"))
    device = torch.device(args.device)
    for weights in ("float32", "float16"):  # the cold rows' storage on the CPU
        base = dense if weights == "float32" else OffloadedModel.from_pretrained(path, progress=False, weights=weights)
        h = OffloadedModel(copy.deepcopy(base.model), base.tokenizer, base.checkpoint, device=torch.device("cpu"))
        h.offload(budget, device=device, hot_dtype=torch.float16 if cuda else None, context=args.context,
                  prepared=prepared, progress=False)
        ours("offload hybrid" + (" fp16" if weights == "float16" else ""), h, budget, hybrid=True)
    return engines, skipped, dict(dense=dense, prepared=prepared, budget=budget, pred_bytes=pred_bytes,
                                  dense_bytes=dense_bytes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help=".gguf file or HF directory (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    ap.add_argument("--budget", type=int, default=None,
                    help="GPU budget in bytes (on cuda this or --budget-fraction; CPU default: fixed bytes + 1, "
                         "every neuron cold)")
    ap.add_argument("--budget-fraction", type=float, default=None,
                    help="budget as a fraction of the model's planned bytes at the device dtype")
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--cpu-bandwidth", type=float, default=None, help="bytes/s (default: measured)")
    ap.add_argument("--engines", default=DEFAULT_CPU_ENGINES,
                    help=f"CPU engines, comma-separated, from {', '.join(CPU_ENGINES)} (default {DEFAULT_CPU_ENGINES}); "
                         "dense-auto / hybrid-auto keep a GGUF's quantized blocks as stored (x rounded to int8 in "
                         "their products, as llama.cpp does); dense-autox32 the same with activations='float32'")
    ap.add_argument("--busy-core", action="store_true",
                    help="also measure our fastest engine and llama.cpp with another process spinning on one core")
    ap.add_argument("--busy-threads", type=int, default=1, help="threads for the --busy-core runs (default 1)")
    ap.add_argument("--rss", action="store_true",
                    help="also measure the peak RSS of loading and generating with the weights as stored")
    import baselines as bl  # benchmarks/ is on sys.path

    bl.add_prepare_options(ap)
    ap.add_argument("-o", "--output", choices=("md", "json"), default="md")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from offload.checkpoint import default_model_path
    from offload.place.memory import plan_memory
    from offload.place.report import build_report, measure_cpu_bandwidth

    def log(msg):
        if args.output == "md":
            print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    path = str(args.model or default_model_path())
    name = os.path.basename(os.path.normpath(path))
    if args.cpu_bandwidth:
        bw, bw_src = args.cpu_bandwidth, "given"
    else:
        bw, bw_src = measure_cpu_bandwidth(), "measured"
    log(f"CPU bandwidth {bw / 1e9:.2f} GB/s ({bw_src}); loading {name}")
    if args.device == "cpu":
        return main_cpu(args, path, name, bw, bw_src, t_start, log)
    meter = bl.DevicePeak(args.device == "cuda")
    engines, skipped, ctx = build_engines(args, path, log, meter)
    dense = ctx["dense"]
    params = sum(p.numel() for p in dense.model.parameters())
    log(f"engines: {', '.join(e.name for e in engines)}")

    cuda = args.device == "cuda"
    with torch.inference_mode():
        runs = run_reps(engines, args, log, meter)
    bpt = {e.name: e.bytes_per_token() for e in engines}
    rows = []
    cpu_only = args.device == "cpu"
    for test, n in (("pp", args.pp), ("tg", args.tg)):
        base = mean_sd(runs[(engines[0].name, test)])[0]
        for e in engines:
            rows.append(make_row(model=name, size=ctx["dense_bytes"], params=params, backend=e.name, budget=e.budget,
                                 test=f"{test}{n}", runs=runs[(e.name, test)], base_mean=base,
                                 bytes_per_token=bpt[e.name], bandwidth=bw if cpu_only else None,
                                 peak_gpu_bytes=meter.peak.get(e.name)))

    # The report's roofline for the headline hybrid (fp16 cold rows on the CPU). On a CPU-only machine its
    # "GPU" side is the CPU too: give it the CPU bandwidth and add the two sides (serial on one CPU).
    head = engines[-1]
    gpu = None if cpu_only else detected_gpu(torch.cuda.get_device_name())
    n_layers = len(dense.model.layers)
    fp16 = not cpu_only or "fp16" in head.name  # weights the 'GPU' side reads are fp16
    report_budget = ctx["budget"]
    if cpu_only and args.budget is None and args.budget_fraction is None:
        # every neuron cold, as in the run: fixed bytes at the report's dtype
        report_budget = plan_memory(dense.checkpoint.config, dtype="float16" if fp16 else "float32", device="cpu",
                                    context=args.context, predictor_bytes=ctx["pred_bytes"] // n_layers,
                                    shapes=dense.checkpoint.shapes).fixed_bytes + 1
    rep = build_report(dense.checkpoint.config, budget=report_budget, frequencies=ctx["prepared"].profile.frequencies,
                       context=args.context, dtype="float16" if fp16 else "float32",
                       cpu_dtype="float16" if "fp16" in head.name else "float32",
                       predictor_bytes=ctx["pred_bytes"] // n_layers, shapes=dense.checkpoint.shapes,
                       device=args.device, cpu_bw=bw, gpu_bw=bw if cpu_only else None, gpu="CPU" if cpu_only else gpu)
    rf = rep["roofline"]
    serial = bw / (rf["gpu_bytes_per_token"] + rf["cpu_bytes_per_token"])
    hyb_tg = mean_sd(runs[(head.name, "tg")])[0]
    roof = {"engine": head.name, "report_tokens_per_s": rf["tokens_per_s"], "report_serial_cpu_tokens_per_s": serial,
            "report_bytes_per_token": rf["gpu_bytes_per_token"] + rf["cpu_bytes_per_token"],
            "measured_bytes_per_token": bpt[head.name],
            "measured_roofline_tokens_per_s": roofline_tokens_per_s(bw, bpt[head.name]),
            "tg_tokens_per_s": hyb_tg, "misses_by_pct_vs_serial": 100 * (1 - hyb_tg / serial),
            "misses_by_pct_vs_report": 100 * (1 - hyb_tg / rf["tokens_per_s"]),
            "density": ctx["prepared"].operating_point.get("density")}
    wall = time.perf_counter() - t_start
    info = machine_info(args.threads, bw, bw_src)
    info["device"] = torch.cuda.get_device_name() if cuda else args.device
    info["wall_s"] = round(wall, 1)
    if args.output == "json":
        print(format_json(rows, skipped, info, {"roofline": roof, "pp": args.pp, "tg": args.tg, "reps": args.reps}))
    else:
        side = ("the 'GPU' side on the CPU" if cpu_only else
                f"GPU side at {rf['gpu_bandwidth'] / 1e9:.0f} GB/s ({rf['gpu']})")
        notes = [
            f"roofline of {head.name} (report, budget {human_bytes(report_budget)}, context {args.context}, CPU "
            f"{bw / 1e9:.2f} GB/s): {rf['tokens_per_s']:.1f} t/s as max(side) [{human_bytes(rf['gpu_bytes_per_token'])} "
            f"{side} + {human_bytes(rf['cpu_bytes_per_token'])} cold]"
            + (f", {serial:.1f} t/s with both sides serial on the CPU; from measured bytes "
               f"({human_bytes(bpt[head.name])}/token): {roof['measured_roofline_tokens_per_s']:.1f} t/s"
               if cpu_only else ""),
            f"measured {head.name} tg: {hyb_tg:.1f} t/s → misses "
            + (f"the serial roofline by {roof['misses_by_pct_vs_serial']:.0f}% (the report's max-side figure by "
               f"{roof['misses_by_pct_vs_report']:.0f}%)" if cpu_only else
               f"the report's max-side figure by {roof['misses_by_pct_vs_report']:.0f}%")]
        budgeted = [(e.name, meter.peak[e.name], e.budget) for e in engines if e.budget and e.name in meter.peak]
        if budgeted:  # CUDA: did each budgeted engine stay within its budget?
            notes.append("peak GPU memory against the budget: " + "; ".join(
                f"{n} {human_bytes(p)} of {human_bytes(b)} ({'within' if p <= b else 'OVER'})" for n, p, b in budgeted))
        print(format_markdown(rows, skipped, info, notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
