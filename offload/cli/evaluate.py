"""``offload eval [MODEL]``: perplexity of the dense, oracle-sparse and predicted-sparse model on
held-out text, greedy token agreement, density and FFN bytes. A model (and weight format) not yet
prepared is prepared first, as ``from_pretrained(gpu_memory=…)`` does."""
from __future__ import annotations

import json
import time

from offload.cli.common import add_model_options, info, load_model, subcommand_main

DESCRIPTION = ("Perplexity of dense / oracle-sparse / predicted-sparse on held-out text, greedy token agreement, "
               "density and FFN bytes; prepares the model first if needed.")


def add_arguments(p, model_arg: bool = True) -> None:
    if model_arg:
        add_model_options(p, hybrid=False)
    p.add_argument("--text", default=None, help="evaluation text file (default: the held-out part of "
                   "pydoc_data.topics; the held-out part of FILE when FILE was the prepare text)")
    p.add_argument("--density", type=float, default=None,
                   help="fraction of FFN neurons computed (default: the prepared operating point)")
    p.add_argument("--max-tokens", type=int, default=4096, help="perplexity tokens")
    p.add_argument("--window", type=int, default=256, help="perplexity window")
    p.add_argument("--generate", type=int, default=32, help="greedy tokens per prompt for token agreement")
    p.add_argument("--prompts", type=int, default=3, help="prompts for token agreement")
    p.add_argument("--token-by-token", action="store_true",
                   help="also the dense perplexity with every token through the decode path (its numbers: int8 "
                        "activations for quantized weights)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _text_and_predictors(om, args, log):
    """(evaluation text, what it is, prepared artifacts): the held-out part of --text when that text was
    prepared on, else the whole of it with the default artifacts (built now if missing)."""
    from offload.corpus import load_corpus, read_text
    from offload.prepare import cached_prepared, prepare

    if args.text is None:
        return load_corpus().evaluation, "pydoc_data.topics (evaluation topics)", prepare(om, log=log)
    own = cached_prepared(om, args.text)
    if own is not None:
        return load_corpus(args.text).evaluation, f"{args.text} (held-out part: it is the prepare text)", own
    return read_text(args.text), args.text, prepare(om, log=log)


def run(args) -> int:
    from offload.corpus import read_text, tokenize
    from offload.evaluate import evaluate
    from offload.sparse import check_density

    t0 = time.perf_counter()
    check_density(args.density)  # bad arguments fail before the model loads
    if args.text is not None:
        read_text(args.text)
    om = load_model(args)
    t_load = time.perf_counter() - t0
    text, what, prep = _text_and_predictors(om, args, None if args.json else info)
    ids = tokenize(om.tokenizer, text)
    r = evaluate(om, ids, density=args.density, predictors=prep.predictors, n_generate=args.generate,
                 n_prompts=args.prompts, window=args.window, max_tokens=args.max_tokens, progress=not args.json,
                 token_by_token=args.token_by_token)
    r["text"], r["weights"] = what, om.weights
    if args.json:
        print(json.dumps({k: v for k, v in r.items() if k != "layer_density"}, indent=1, default=float))
        return 0
    print(f"text: {what}; {r['tokens']} tokens in {r['windows']} windows of {r['window']}; weights {om.weights}")
    print(f"perplexity: dense {r['dense_ppl']:.3f} | oracle {r['oracle_ppl']:.3f} (x{r['oracle_ratio']:.4f}, "
          f"density {r['oracle_density']:.3f}) | predicted {r['predicted_ppl']:.3f} (x{r['predicted_ratio']:.4f}, "
          f"density {r['predicted_density']:.3f})")
    if args.token_by_token:
        print(f"dense perplexity token by token (the decode path): {r['dense_ppl_token_by_token']:.3f} "
              f"(x{r['dense_ppl_token_by_token'] / r['dense_ppl']:.4f} of dense over whole windows)")
    print(f"FFN bytes per token: {r['bytes_fraction']:.3f} of dense counted at fp32, {r['stored_bytes_fraction']:.3f} "
          f"as stored (predictor {r['predictor_bytes_per_token'] / 2**20:.2f} MiB; dense FFN "
          f"{r['dense_ffn_bytes_per_token'] / 2**20:.2f} MiB as stored)")
    if r["token_agreement"] is not None:
        print(f"greedy token agreement with dense: predicted {r['token_agreement']:.3f} (first divergence at "
              f"{r['first_divergence']}), oracle {r['oracle_token_agreement']:.3f}, over {r['generated_tokens']} "
              f"tokens; teacher-forced top-1 agreement: predicted {r['top1_agreement']:.3f}, oracle "
              f"{r['oracle_top1_agreement']:.3f}")
    print(f"evaluation took {r['seconds']:.0f} s; wall time {time.perf_counter() - t0:.0f} s "
          f"(model load {t_load:.0f} s)")
    return 0


def main(argv=None) -> int:
    return subcommand_main("eval", DESCRIPTION, add_arguments, run, argv)
