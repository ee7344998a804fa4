"""``offload chat [MODEL]``: a multi-turn conversation in the terminal, answers streamed.

Each turn re-applies the chat template to the whole conversation (system prompt, every user turn and
every answer so far), so the model sees exactly what its template makes of the history. Lines
starting with ``/`` are commands: ``/reset`` forgets the conversation, ``/exit`` (or the end of the
input, Ctrl-D) ends it. A turn that fails (e.g. the conversation outgrew the context) prints one
line and leaves the conversation as it was before that turn. Standard input may be a pipe: one user
turn per line.
"""
from __future__ import annotations

import sys

from offload.cli.common import (add_model_options, add_sampling_options, info, load_model, sampling_options,
                                subcommand_main)
from offload.errors import OffloadError

DESCRIPTION = "Chat with a model in the terminal: one user turn per line; /reset clears, /exit or Ctrl-D ends."
COMMANDS = "/reset (forget the conversation), /exit (end; so does end of input)"


def add_arguments(p) -> None:
    add_model_options(p)
    p.add_argument("--system", default=None, help="a system prompt put before the conversation")
    add_sampling_options(p)


def read_turn(stream, interactive: bool) -> str | None:
    """The next input line without its newline, or None at the end of the input."""
    if interactive:
        print("> ", end="", file=sys.stderr, flush=True)
    line = stream.readline()
    return None if line == "" else line.rstrip("\r\n")


class Conversation:
    """The messages so far, and one turn: template → generate (streamed) → the answer appended."""

    def __init__(self, model, sampling: dict, system: str | None = None):
        self.model, self.sampling, self.system = model, sampling, system
        self.messages: list[dict] = []

    def reset(self) -> None:
        self.messages.clear()

    def turn(self, text: str, streamer) -> str:
        from offload.generation import check_prompt_fits

        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.model.chat_ids(messages, system=self.system)
        try:
            check_prompt_fits(ids.shape[1], self.sampling["max_new_tokens"], self.model.max_context)
        except OffloadError as e:
            raise type(e)(f"{e} (the conversation so far is {ids.shape[1]} tokens; /reset starts over)") from None
        out = self.model.generate(ids, streamer=streamer, **self.sampling)
        answer = self.model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        self.messages = messages + [{"role": "assistant", "content": answer}]
        return answer


def run(args, stdin=None) -> int:
    from transformers import TextStreamer

    stdin = stdin or sys.stdin
    sampling = sampling_options(args)
    # A tokenizer without a chat template (or without any) fails here, before a hybrid's preparation.
    m = load_model(args, before_offload=lambda model: model.chat_ids("hi", system=args.system))
    chat = Conversation(m, sampling, args.system)
    interactive = stdin.isatty()
    if interactive:
        info(f"chat with {args.model or 'SmolLM2-135M-Instruct'}; commands: {COMMANDS}")
    while True:
        text = read_turn(stdin, interactive)
        if text is None or text.strip() == "/exit":
            break
        text = text.strip()
        if not text:
            continue
        if text == "/reset":
            chat.reset()
            info("(conversation cleared)")
            continue
        if text.startswith("/"):
            info(f"unknown command {text.split()[0]}; commands: {COMMANDS}")
            continue
        try:
            chat.turn(text, TextStreamer(m.tokenizer, skip_prompt=True, skip_special_tokens=True))
        except OffloadError as e:
            info(f"offload chat: error: {' '.join(str(e).split())}")
        sys.stdout.flush()
    return 0


def main(argv=None) -> int:
    return subcommand_main("chat", DESCRIPTION, add_arguments, run, argv)
