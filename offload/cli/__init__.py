"""The ``offload`` command: thin subcommands over the library, one module each.

    offload generate [MODEL] --prompt TEXT [--chat] [--max-new-tokens N] [--weights float16] [--gpu-memory SIZE]
    offload chat     [MODEL] [--system TEXT] [same model and sampling options as generate]
    offload report   [MODEL] --gpu-memory 8GiB [--context 4096] [--json] [--plot FILE.png]
    offload prepare  [MODEL] [--weights float16] [--text FILE] [--rebuild]
    offload eval     [MODEL] [--weights float16] [--text FILE] [--density D] [--json]

Every user error is one line on stderr (``offload <command>: error: …``) and exit code 2.
"""
from __future__ import annotations

import importlib

from offload.cli.common import Parser, execute

# subcommand → module (each has DESCRIPTION, add_arguments(parser), run(args) and main(argv))
SUBCOMMANDS = {"generate": "generate", "chat": "chat", "report": "report", "prepare": "prepare", "eval": "evaluate"}


def build_parser() -> Parser:
    from offload import __version__

    parser = Parser(prog="offload", description="Hot/cold neuron offloading for LLM inference.")
    parser.add_argument("--version", action="version", version=f"offload {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(f"offload.cli.{module_name}")
        p = sub.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return execute(f"offload {args.command}", args.run, args)
