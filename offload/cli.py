"""The ``offload`` command: thin subcommands over the library.

    offload generate [MODEL] --prompt TEXT [--chat] [--max-new-tokens N] [--seed S] [--weights float16]
    offload report [MODEL] --gpu-memory 8GiB [--context 4096] [--json] [--plot FILE.png]
    offload prepare [MODEL] [--text FILE] [--rebuild]
    offload eval [MODEL] [--text FILE] [--density D] [--weights float16] [--json]
"""
from __future__ import annotations

import argparse
import sys

from offload.errors import OffloadError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="hub repo id, local HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: float32 on cpu)")
    p.add_argument("--gpu-memory", default=None, help="GPU budget, e.g. 8GiB or 8GB")
    p.add_argument("--weights", choices=("float32", "float16"), default="float32",
                   help="CPU weight storage: float16 halves the bytes a token reads (fp32 math; default float32)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for decode (default: every CPU; on a machine shared with busy processes, 1)")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--local-files-only", action="store_true", help="never download; use the local hub cache")


def cmd_generate(args) -> int:
    from transformers import TextStreamer

    from offload import OffloadedModel

    if args.max_new_tokens < 0:
        raise OffloadError(f"--max-new-tokens={args.max_new_tokens}: expected an integer >= 0")
    m = OffloadedModel.from_pretrained(args.model, device=args.device, dtype=args.dtype, gpu_memory=args.gpu_memory,
                                       revision=args.revision, local_files_only=args.local_files_only,
                                       context=args.context, weights=args.weights, threads=args.threads)
    if args.chat:
        ids = m.chat_ids(args.prompt)
    else:
        ids = m.tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    streamer = TextStreamer(m.tokenizer, skip_prompt=not args.echo, skip_special_tokens=True)
    m.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature,
               top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
               streamer=streamer)
    s = m.last_stats
    print(f"prefill: {s.prompt_tokens} tokens, {s.prefill_tokens_per_second:.1f} tok/s | "
          f"decode: {s.new_tokens} tokens, {s.decode_tokens_per_second:.1f} tok/s", file=sys.stderr)
    h = m.hybrid_stats
    steps = max(s.new_tokens - 1, 1)
    if h is not None and h.decode_calls:
        print(f"hybrid: GPU share of active neurons {h.gpu_share:.1%} | FFN bytes/token: device "
              f"{h.bytes_hot / steps / 2**20:.2f} MiB, CPU {h.bytes_cold / steps / 2**20:.2f} MiB | "
              f"CPU time/token {1e3 * h.cold_seconds / steps:.2f} ms, of which waited "
              f"{1e3 * h.cold_wait_seconds / steps:.2f} ms", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offload", description="Hot/cold neuron offloading for LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text, streamed to stdout; then prefill/decode tokens/s")
    _add_model_args(g)
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--echo", action="store_true", help="print the prompt too")
    g.add_argument("--context", type=int, default=4096, help="KV cache the GPU budget reserves (default 4096)")
    g.set_defaults(func=cmd_generate)

    from offload.place.report_cli import add_report_arguments, run_report

    r = sub.add_parser("report", help="placement under a GPU budget: per-layer hot neurons, memory, roofline")
    add_report_arguments(r)
    r.set_defaults(func=run_report)

    from offload.evaluate import add_eval_arguments, run_eval
    from offload.prepare import add_prepare_arguments, run_prepare

    p = sub.add_parser("prepare", help="profile + predictors + operating point (cached per model)")
    add_prepare_arguments(p)
    p.set_defaults(func=run_prepare)
    e = sub.add_parser("eval", help="perplexity of dense / oracle-sparse / predicted-sparse, agreement, FFN bytes")
    add_eval_arguments(e)
    e.set_defaults(func=run_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except OffloadError as e:
        print(f"offload {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
