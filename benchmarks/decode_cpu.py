"""benchmarks/decode.py on the CPU: the engines (--engines), their runs in alternation, --busy-core and --rss.

Engines: ``transformers`` (fp32, the baseline of the ratio column), ``llama.cpp`` (llama-cpp-python on the
same GGUF, ``--threads``), and ours: ``dense-<w>`` and ``hybrid-<w>`` (every FFN neuron cold on the CPU)
with weights fp32, fp16 or auto (what the checkpoint stores: a GGUF's quantized blocks).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

from table import format_json, format_markdown, hybrid_bytes_per_token, make_row, mean_sd


def unique_param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())  # parameters() dedupes tied


@dataclass
class Engine:
    """One row group: ``pp()`` and ``tg(n)`` return tokens/s; ``bytes_per_token()`` is read after the runs."""

    name: str
    pp: Callable[[], float]
    tg: Callable[[int], float]
    bytes_per_token: Callable[[], float | None]
    budget: int | None = None
    kind: str | None = None  # the --engines name of our engines (what --busy-core rebuilds)


CPU_ENGINES = ("transformers", "llama.cpp", "dense-fp32", "dense-fp16", "dense-auto", "dense-autox32", "hybrid-fp16",
               "hybrid-auto")
DEFAULT_CPU_ENGINES = "transformers,llama.cpp,dense-fp32,dense-fp16,dense-auto,dense-autox32,hybrid-fp16"
# weights= of each engine name's second part; "autox32": as stored, activations="float32"
WEIGHTS_OF = {"fp32": "float32", "fp16": "float16", "auto": "auto", "autox32": "auto"}


def gguf_decode_bytes(path: str) -> int:
    """Bytes of a GGUF a decode token reads: every tensor but an untied embedding table (one row of it)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    untied = "output.weight" in tensors
    return sum(n for name, n in tensors.items() if not (untied and name == "token_embd.weight"))


def ours_engine(name, m, pp_ids, tg_ids, *, hybrid=False, pred_bytes=0, kind=None):
    """An Engine over an OffloadedModel; bytes/token from what its storage formats read (offload.formats)."""
    import baselines as bl
    from offload.formats import decode_bytes

    n_layers = len(m.model.layers)

    def nbytes():
        if not hybrid:
            return decode_bytes(m.model)
        h = m.hybrid_stats  # counted over the last tg run's decode steps
        return hybrid_bytes_per_token(decode_bytes(m.model), h.bytes_hot + h.bytes_cold,
                                      max(h.decode_calls // n_layers, 1), pred_bytes)
    return Engine(name, lambda: bl.offload_rates(m, pp_ids, 1)[1], lambda n: bl.offload_rates(m, tg_ids, n)[0],
                  nbytes, kind=kind)


def load_ours(path, kind: str, threads: int, args, log):
    """An OffloadedModel for an engine name: dense-<w> or hybrid-<w> (every neuron cold, on the CPU)."""
    import baselines as bl
    from offload import OffloadedModel
    from offload.prepare import prepare

    mode, w = kind.split("-")
    m = OffloadedModel.from_pretrained(path, weights=WEIGHTS_OF[w], threads=threads, progress=False,
                                       activations="float32" if w.endswith("x32") else "int8")
    if mode == "dense":
        return m, 0
    log(f"{kind}: preparing (cached after the first run) and placing every FFN neuron on the CPU")
    prepared = prepare(m, progress=False, **bl.prepare_options(args))
    m.offload(0, device=m.device, context=args.context, prepared=prepared, progress=False)
    return m, int(prepared.predictors.nbytes)


def build_cpu_engines(args, path, log):
    """(engines, skipped, context) on the CPU: the engines --engines names that this machine can run."""
    import torch

    import baselines as bl

    wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in wanted if e not in CPU_ENGINES]
    if unknown:
        raise SystemExit(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(CPU_ENGINES)}")
    first = None
    engines, skipped, models, preds = [], [], {}, {}
    for kind in wanted:
        if kind in ("transformers", "llama.cpp"):
            continue
        models[kind], preds[kind] = load_ours(path, kind, args.threads, args, log)
        first = first or models[kind]
        log(f"loaded {kind}")
    if first is None:
        from offload import OffloadedModel

        first = OffloadedModel.from_pretrained(path, weights="auto", threads=args.threads, progress=False)
    gen = torch.Generator().manual_seed(0)
    pp_ids = torch.randint(0, first.config.vocab_size, (1, args.pp), generator=gen)
    tg_ids = first.chat_ids(bl.PROMPT)
    for kind in wanted:
        if kind == "transformers":
            hf = bl.load_transformers(path, "cpu", torch.float32)
            fp32_bytes = sum(p.numel() * p.element_size() for n, p in hf.named_parameters() if "embed_tokens" not in n
                             or hf.config.tie_word_embeddings)
            engines.append(Engine("transformers (cpu)", lambda hf=hf: bl.transformers_pp(hf, pp_ids),
                                  lambda n, hf=hf: bl.transformers_tg(hf, tg_ids, n), lambda b=fp32_bytes: b))
        elif kind == "llama.cpp":
            if not path.endswith(".gguf"):
                skipped.append(("llama.cpp", "the model is not a GGUF file"))
            elif not bl.importable("llama_cpp"):
                skipped.append(("llama.cpp", "llama_cpp (llama-cpp-python) is not installed: pip install llama-cpp-python"))
            else:
                lc = bl.LlamaCpp(path, args.threads, n_ctx=max(args.context, args.pp + args.tg + 64))
                nb = gguf_decode_bytes(path)
                engines.append(Engine("llama.cpp (ngl 0)", lambda lc=lc: lc.pp(pp_ids), lambda n, lc=lc: lc.tg(tg_ids, n),
                                      lambda nb=nb: nb))
        else:
            m = models[kind]
            label = f"offload {kind.replace('-', ' ')}"
            if "auto" in kind:
                label = f"offload {kind.split('-')[0]} as stored ({m.weights}, " + \
                    ("float32 x)" if kind.endswith("x32") else "int8 x)")
            engines.append(ours_engine(label, m, pp_ids, tg_ids, hybrid=kind.startswith("hybrid"),
                                       pred_bytes=preds[kind], kind=kind))
    skipped.append(("accelerate", "needs CUDA (device_map='auto' with a GPU max_memory)"))
    skipped.append(("layer-split", "needs CUDA: without a GPU every layer stays on the CPU (= offload dense)"))
    return engines, skipped, dict(first=first, models=models, pp_ids=pp_ids, tg_ids=tg_ids)


def run_reps(engines, args, log, meter=None):
    """{(engine, "pp"|"tg"): [t/s per rep]}: a warm-up of each, then reps alternating between engines."""
    run = meter.run if meter is not None else (lambda name, fn, *a: fn(*a))
    runs = {(e.name, t): [] for e in engines for t in ("pp", "tg")}
    for e in engines:  # warm-up
        run(e.name, e.pp)
        run(e.name, e.tg, 4)
    for rep in range(args.reps):
        for e in engines:
            runs[(e.name, "pp")].append(run(e.name, e.pp))
            runs[(e.name, "tg")].append(run(e.name, e.tg, args.tg))
        log(f"rep {rep + 1}/{args.reps}: tg t/s " + ", ".join(f"{e.name} {runs[(e.name, 'tg')][-1]:.1f}"
                                                           for e in engines))
    return runs


def busy_core_rows(args, path, engines, runs, ctx, log) -> list[str]:
    """--busy-core: our fastest engine (rebuilt with --busy-threads) and llama.cpp (same threads), tg
    quiet then with another process spinning on one core, alternating; one note line each."""
    import baselines as bl
    from machine import BusyCore

    ours = [e for e in engines if e.name.startswith("offload")]
    if not ours:
        return ["--busy-core: no offload engine in --engines"]
    best = max(ours, key=lambda e: statistics.mean(runs[(e.name, "tg")]))
    t = args.busy_threads
    m, _ = load_ours(path, best.kind, t, args, log)
    subjects = [(f"{best.name} --threads {t}", lambda n: bl.offload_rates(m, ctx["tg_ids"], n)[0])]
    subjects.append((f"{best.name} --threads {args.threads}", best.tg))
    lc = [e for e in engines if e.name.startswith("llama.cpp")]
    if lc:
        lct = bl.LlamaCpp(path, t, n_ctx=max(args.context, args.pp + args.tg + 64))
        subjects.append((f"llama.cpp --threads {t}", lambda n: lct.tg(ctx["tg_ids"], n)))
        subjects.append((f"llama.cpp --threads {args.threads}", lc[0].tg))
    rates = {name: {"quiet": [], "busy": []} for name, _ in subjects}
    for name, tg in subjects:
        tg(4)
    for rep in range(args.reps):
        for name, tg in subjects:
            rates[name]["quiet"].append(tg(args.tg))
            with BusyCore():
                rates[name]["busy"].append(tg(args.tg))
        log(f"busy-core rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{n} {r['quiet'][-1]:.1f} → {r['busy'][-1]:.1f}" for n, r in rates.items()))
    lines = []
    for name, r in rates.items():
        q, b = statistics.mean(r["quiet"]), statistics.mean(r["busy"])
        lines.append(f"busy core: {name}: tg{args.tg} {q:.1f} t/s quiet, {b:.1f} t/s with another process spinning on "
                     f"one core ({b / q:.2f}× quiet)")
    return lines


def main_cpu(args, path, name, bw, bw_src, t_start, log) -> int:
    """The CPU table: --engines in alternation, then --busy-core and --rss notes, the machine last."""
    from machine import cpu_description, describe, machine_info, peak_rss

    from offload.checkpoint import open_checkpoint

    engines, skipped, ctx = build_cpu_engines(args, path, log)
    log(f"engines: {', '.join(e.name for e in engines)}")
    import torch

    with torch.inference_mode():
        runs = run_reps(engines, args, log)
    ckpt = open_checkpoint(path)
    params = sum(int(torch.Size(s).numel()) for s in ckpt.shapes.values())
    size = os.path.getsize(path) if os.path.isfile(path) else sum(os.path.getsize(f) for f in set(ckpt.files.values()))
    bpt = {e.name: e.bytes_per_token() for e in engines}
    rows = []
    base_name = next((e.name for e in engines if e.name.startswith("transformers")), None)
    for test, n in (("pp", args.pp), ("tg", args.tg)):
        base = mean_sd(runs[(base_name, test)])[0] if base_name else None
        for e in engines:
            rows.append(make_row(model=name, size=size, params=params, backend=e.name, budget=None,
                                 test=f"{test}{n}", runs=runs[(e.name, test)], base_mean=base,
                                 bytes_per_token=bpt[e.name], bandwidth=bw))
    notes = []
    if args.busy_core:
        notes += busy_core_rows(args, path, engines, runs, ctx, log)
    if args.rss:
        code = ("import sys\nfrom offload import OffloadedModel\n"
                "m = OffloadedModel.from_pretrained(sys.argv[1], threads=int(sys.argv[2]), progress=False)\n"
                "m.generate(m.chat_ids('Write a short story about a robot who learns to paint.'), max_new_tokens=32)\n")
        peak = peak_rss(code, path, str(args.threads))
        notes.append(f"peak RSS loading and generating 32 tokens, weights as stored (a fresh process): "
                     f"{peak / 1e6:.0f} MB; the file is {size / 1e6:.0f} MB (1.3 × file + 300 MB = "
                     f"{(1.3 * size + 300e6) / 1e6:.0f} MB)")
    machine = cpu_description()
    info = machine_info(args.threads, bw, bw_src)
    info["wall_s"] = round(time.perf_counter() - t_start, 1)
    if args.output == "json":
        print(format_json(rows, skipped, {**info, **machine}, {"notes": notes, "pp": args.pp, "tg": args.tg,
                                                                "reps": args.reps}))
    else:
        print(format_markdown(rows, skipped, info, notes + [describe(machine)]))
    return 0
