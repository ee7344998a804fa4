"""``offload generate [MODEL] --prompt TEXT``: stream the new text to stdout, then timings on stderr.

The decode rate printed is the steady state: the median time of a decode step after the first one
(the first pays one-time costs: first touches of buffers and weights, thread wake-ups), so a short
answer of a few tokens does not report a rate dominated by warm-up. It says what it measured.
"""
from __future__ import annotations

import statistics
import sys
import time

from offload.cli.common import (add_model_options, add_sampling_options, info, load_model, sampling_options,
                                subcommand_main)

DESCRIPTION = "Generate text from a prompt, streamed to stdout; then prefill and steady-state decode rates."
WARMUP_STEPS = 1  # decode steps left out of the steady-state rate
MIN_STEADY_STEPS = 2  # fewer timed steps than this: no rate is claimed


def add_arguments(p) -> None:
    add_model_options(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sampling_options(p)
    p.add_argument("--echo", action="store_true", help="print the prompt too")


class StepTimer:
    """A streamer wrapper that notes when each put() arrives: the prompt, then one per new token (the
    first right after the prefill, each later one after a decode step)."""

    def __init__(self, inner=None):
        self.inner, self.times = inner, []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()

    @property
    def decode_steps(self) -> list[float]:
        """Seconds of each decode step (the forward that made the next token), in order."""
        return [b - a for a, b in zip(self.times[1:], self.times[2:])]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def timing_summary(stats, steps: list[float]) -> str:
    """The stderr line: prefill rate, then the steady-state decode rate and what it was measured on."""
    if stats.new_tokens == 0:
        return f"prompt: {_plural(stats.prompt_tokens, 'token')}; nothing generated (--max-new-tokens 0), nothing timed"
    prefill = (f"prefill: {_plural(stats.prompt_tokens, 'token')} in {stats.prefill_seconds * 1e3:.0f} ms "
               f"({stats.prefill_tokens_per_second:.1f} tok/s)")
    steady = steps[WARMUP_STEPS:]
    if len(steady) < MIN_STEADY_STEPS:
        return (f"{prefill} | decode: {_plural(stats.new_tokens, 'token')}, too few to time a steady state (it "
                f"needs {WARMUP_STEPS + MIN_STEADY_STEPS + 1}; raise --max-new-tokens or ask for a longer answer)")
    median = statistics.median(steady)
    return (f"{prefill} | decode: {_plural(stats.new_tokens, 'token')}, {1 / median:.1f} tok/s steady state (median "
            f"of {len(steady)} decode steps, {median * 1e3:.1f} ms; the first step, {steps[0] * 1e3:.0f} ms, is "
            f"warm-up and left out)")


def hybrid_summary(h, new_tokens: int) -> str | None:
    if h is None or not h.decode_calls:
        return None
    steps = max(new_tokens - 1, 1)
    # CPU-only decode runs each block in one call (offload.cpu.step): no cold time of its own to report
    cpu_time = (f" | CPU time/token {1e3 * h.cold_seconds / steps:.2f} ms, of which waited "
                f"{1e3 * h.cold_wait_seconds / steps:.2f} ms") if h.cold_seconds else ""
    return (f"hybrid: GPU share of active neurons {h.gpu_share:.1%} | FFN bytes/token: device "
            f"{h.bytes_hot / steps / 2**20:.2f} MiB, CPU {h.bytes_cold / steps / 2**20:.2f} MiB{cpu_time}")


def run(args) -> int:
    from transformers import TextStreamer

    from offload.generation import check_prompt_fits

    sampling = sampling_options(args)
    prompt = {}

    def encode_prompt(m) -> None:  # before any hybrid preparation: a prompt that cannot fit fails first
        ids = m.chat_ids(args.prompt) if args.chat else m.tokenizer(args.prompt, return_tensors="pt")["input_ids"]
        check_prompt_fits(ids.shape[1], args.max_new_tokens, m.max_context)
        prompt["ids"] = ids

    m = load_model(args, before_offload=encode_prompt)
    timer = StepTimer(TextStreamer(m.tokenizer, skip_prompt=not args.echo, skip_special_tokens=True))
    m.generate(prompt["ids"], streamer=timer, **sampling)
    sys.stdout.flush()
    info(timing_summary(m.last_stats, timer.decode_steps))
    line = hybrid_summary(m.hybrid_stats, m.last_stats.new_tokens)
    if line:
        info(line)
    return 0


def main(argv=None) -> int:
    return subcommand_main("generate", DESCRIPTION, add_arguments, run, argv)
