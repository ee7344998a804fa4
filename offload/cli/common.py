"""What the ``offload`` subcommands share: the parser (one-line usage errors, defaults in the help), the
model and sampling options, loading, and the error boundary (OffloadError → one line, exit code 2)."""
from __future__ import annotations

import argparse
import sys

from offload.errors import OffloadError

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")
MODEL_HELP = "hub repo id, local HF directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter with every option's default in its help (unless the help already says it)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and default is not None and default is not False and default != argparse.SUPPRESS
                and "default" not in text and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (the culprit and where to look), exit code 2.
    Subcommand parsers made by add_subparsers are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_model_argument(p) -> None:
    p.add_argument("model", nargs="?", default=None, help=MODEL_HELP)


def add_model_options(p, *, hybrid: bool = True) -> None:
    """MODEL and how to load it: --device, --dtype, --weights, --revision, --local-files-only, and with
    ``hybrid`` the GPU budget options --gpu-memory and --context."""
    from offload.cpu.decode import KV_CACHE_DTYPES
    from offload.formats import ACTIVATIONS, WEIGHT_FORMATS

    add_model_argument(p)
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help=("where attention and the hot FFN rows run; with --gpu-memory 0 on cpu, every FFN neuron is "
                         "on the CPU's sparse cold path") if hybrid else "where the model runs")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="activation and device weight dtype (default: float32 on cpu, float16 on cuda)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default="auto",
                   help="CPU weight storage: auto = as the checkpoint stores them (a GGUF's quantized blocks); "
                        "float32 = transformers' numbers; float16, int8, int4 = fewer bytes a token reads")
    p.add_argument("--activations", choices=ACTIVATIONS, default=ACTIVATIONS[0],
                   help="how quantized weights take a token's input: int8 = rounded per group of 32 as llama.cpp "
                        "does (fast); float32 = as is (transformers' numbers)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for decode (default: every CPU; on a machine shared with busy processes, 1)")
    p.add_argument("--kv-cache", choices=tuple(KV_CACHE_DTYPES), default="float32",
                   help="KV cache dtype for CPU decode: float16 (LLaMA family) halves the bytes attention reads "
                        "a token, which counts at long contexts; float32 = transformers' numbers")
    if hybrid:
        p.add_argument("--gpu-memory", default=None, metavar="SIZE",
                       help="device memory budget for the hybrid runtime, e.g. 8GiB (2^30) or 8GB (10^9); 0 (or "
                            "0GB) with --device cpu: every FFN neuron cold. Omitted: the dense model")
        p.add_argument("--context", type=positive_int, default=4096,
                       help="tokens of KV cache the budget reserves")
    p.add_argument("--revision", default=None, help="hub revision: branch, tag or commit (default: main)")
    p.add_argument("--local-files-only", action="store_true", help="never download; use the local hub cache")


def add_sampling_options(p) -> None:
    """transformers' generate() options, with its defaults."""
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens at most; 0 generates nothing")
    p.add_argument("--temperature", type=float, default=0.0, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens whose mass "
                                                             "reaches p (nucleus); 1 = all")
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than min-p times the most likely one (e.g. 0.05; default: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="divide the logits of seen tokens by this "
                                                                         "(1 = none)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible (default: random)")


def sampling_options(args) -> dict:
    """generate() keywords from the sampling options, checked here so that bad values fail before the
    model loads (GenerationError naming the option)."""
    from offload.generation import SamplingConfig

    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
              seed=args.seed)
    SamplingConfig(**kw)
    return kw


def load_model(args, *, before_offload=None):
    """OffloadedModel.from_pretrained with the model options in ``args``."""
    from offload import OffloadedModel
    from offload.units import parse_memory_size

    if getattr(args, "gpu_memory", None) is not None:  # named as the user wrote it, before anything loads
        parse_memory_size(args.gpu_memory, name="--gpu-memory", allow_zero=True)
    return OffloadedModel.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, gpu_memory=getattr(args, "gpu_memory", None),
        context=getattr(args, "context", 4096), revision=args.revision, local_files_only=args.local_files_only,
        weights=args.weights, threads=getattr(args, "threads", None),
        activations=getattr(args, "activations", "int8"), kv_cache=getattr(args, "kv_cache", "float32"),
        before_offload=before_offload)


def info(message: str) -> None:
    """A progress or status line: stderr, so that stdout holds only the command's output."""
    print(message, file=sys.stderr, flush=True)


def execute(prog: str, run, args) -> int:
    """``run(args)`` with the error boundary: an OffloadError is one line on stderr and exit code 2."""
    try:
        return run(args)
    except OffloadError as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def subcommand_main(name: str, description: str, add_arguments, run, argv=None) -> int:
    """``offload <name>`` as a program of its own (each subcommand module's ``main(argv)``)."""
    parser = Parser(prog=f"offload {name}", description=description)
    add_arguments(parser)
    return execute(parser.prog, run, parser.parse_args(argv))
