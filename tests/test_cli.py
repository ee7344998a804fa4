"""The `offload` command as a new user meets it (issue 12): one-line errors with exit code 2 for every
subcommand, cheap checks before the first-run prepare, budgets, hub errors, steady-state timing, help,
--version, and `offload chat`. In-process through offload.cli.main on the tiny models, except where
a fresh process is the point."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from offload.cli import SUBCOMMANDS, build_parser, main


@pytest.fixture(scope="module")
def chat_ckpt(tiny_checkpoint):
    return tiny_checkpoint("llama_chat")


def run_cli(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors exit, as the installed script does
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, prog, *names):
    """Exactly one line besides progress bars (tqdm redraws with carriage returns)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"offload {prog}: error: ") and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------- item 5: one-line errors
@pytest.mark.parametrize("argv, culprit", [
    (["--device", "tpu"], "--device"),
    (["--dtype", "int8"], "--dtype"),
    (["--weights", "float16", "--dtype", "float16"], "dtype='float32'"),
    (["--kv-cache", "int8"], "--kv-cache"),
    (["--gpu-memory", "0", "--context", "0"], "--context"),
    (["--gpu-memory", "lots"], "--gpu-memory"),
    (["--max-new-tokens", "-1"], "max_new_tokens"),
    (["--min-p", "2"], "min_p"),
])
def test_generate_user_errors_are_one_line(capsys, chat_ckpt, argv, culprit):
    rc, _, err = run_cli(capsys, "generate", chat_ckpt, "--prompt", "hi", *argv)
    one_line_error(rc, err, "generate", culprit)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(capsys, chat_ckpt):
    rc, _, err = run_cli(capsys, "generate", chat_ckpt, "--prompt", "hi", "--device", "cuda")
    one_line_error(rc, err, "generate", "device='cuda'", "no CUDA GPU")


@pytest.mark.parametrize("command, argv, culprit", [
    ("chat", ["--device", "tpu"], "--device"),
    ("chat", ["--top-p", "0"], "top_p"),
    ("report", ["--gpu-memory", "abc"], "--gpu-memory"),
    ("report", ["--gpu-memory", "1GiB", "--context", "0"], "--context"),
    ("report", ["--gpu-memory", "1GiB", "--dtype", "int8"], "--dtype"),
    ("prepare", ["--text", "/nonexistent/t.txt"], "t.txt"),
    ("prepare", ["--bits", "3"], "--bits"),
    ("eval", ["--density", "2"], "density=2.0"),
    ("eval", ["--weights", "int3"], "--weights"),
])
def test_every_subcommand_reports_user_errors_on_one_line(capsys, chat_ckpt, command, argv, culprit):
    rc, _, err = run_cli(capsys, command, chat_ckpt, *argv)
    one_line_error(rc, err, command, culprit)


def test_api_argument_errors_are_offload_errors(chat_ckpt):
    from offload import OffloadedModel
    from offload.errors import OffloadError

    for kw in (dict(device="tpu"), dict(dtype="int8"), dict(weights="float16", dtype="float16"),
               dict(gpu_memory=0, context=0), dict(weights="int3")):
        with pytest.raises(OffloadError):
            OffloadedModel.from_pretrained(chat_ckpt, progress=False, **kw)


def test_hub_without_network_says_what_failed(capsys, monkeypatch, tmp_path):
    """Nothing turned downloads off: the message must say the hub could not be reached (here: connection
    refused), not that downloads are off."""
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    rc, _, err = run_cli(capsys, "generate", "some-org/some-model", "--prompt", "hi")
    line = one_line_error(rc, err, "generate", "some-org/some-model", "could not be reached", "127.0.0.1:9")
    assert "downloads are off" not in line and "HF_HUB_OFFLINE" not in line
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    rc, _, err = run_cli(capsys, "generate", "some-org/some-model", "--prompt", "hi")
    one_line_error(rc, err, "generate", "HF_HUB_OFFLINE=1 is set")
    rc, _, err = run_cli(capsys, "generate", "some-org/some-model", "--prompt", "hi", "--local-files-only")
    one_line_error(rc, err, "generate", "--local-files-only")


# ---------------------------------------------------------------------------- item 2: cheap checks first
def test_prompt_too_long_fails_before_the_first_run_prepare(capsys, chat_ckpt, fast_prepare, monkeypatch):
    import offload.prepare

    def no_prepare(*a, **k):
        raise AssertionError("prepare ran before the prompt was checked")

    monkeypatch.setattr(offload.prepare, "prepare", no_prepare)
    rc, _, err = run_cli(capsys, "generate", chat_ckpt, "--gpu-memory", "0", "--prompt", "x" * 600)
    one_line_error(rc, err, "generate", "prompt has 600 tokens")
    rc, _, err = run_cli(capsys, "generate", chat_ckpt, "--gpu-memory", "1KB", "--prompt", "hi")
    one_line_error(rc, err, "generate", "too small")


def test_first_run_message_then_float32_builds_its_own(capsys, chat_ckpt, fast_prepare):
    common = ["generate", chat_ckpt, "--device", "cpu", "--gpu-memory", "0", "--prompt", "hi", "--max-new-tokens", "4"]
    rc, _, err = run_cli(capsys, *common, "--weights", "float16")
    assert rc == 0 and "First use of this model with float16 weights" in err, err[-2000:]
    rc, _, err = run_cli(capsys, *common, "--weights", "float32")
    assert rc == 0 and "First use of this model with float32 weights" in err, err[-2000:]
    rc, _, err = run_cli(capsys, *common, "--weights", "float16")
    assert rc == 0 and "First use" not in err and "float16-shadow-int4" in err


# ---------------------------------------------------------------------------- item 7: budgets
def test_zero_budget_spellings_and_cpu_suggestions(capsys, chat_ckpt, fast_prepare):
    from offload import OffloadedModel
    from offload.errors import BudgetError
    from offload.units import parse_memory_size

    assert {parse_memory_size(v, allow_zero=True) for v in (0, "0", "0GB", "0GiB", "0 MiB")} == {0}
    m = OffloadedModel.from_pretrained(chat_ckpt, device="cpu", gpu_memory="0GiB", progress=False)
    assert sum(m.placement.hot_counts) == 0
    m.model.hybrid_worker.close()
    with pytest.raises(BudgetError) as e:
        OffloadedModel.from_pretrained(chat_ckpt, device="cpu", gpu_memory="1KB", progress=False)
    msg = str(e.value)
    assert "gpu_memory=0 / --gpu-memory 0" in msg and "or device='cpu'" not in msg and "no CUDA context" in msg
    need = int(msg.split(" needs ")[1].split("(")[1].split(" bytes")[0])
    # the report says when it counts a CUDA context, and what the CPU run needs instead: the same bytes
    rc, out, _ = run_cli(capsys, "report", chat_ckpt, "--gpu-memory", "1GiB", "--context", "512",
                         "--cpu-bandwidth", "10GB", "--gpu", "H100")
    assert rc == 0 and "CUDA context" in out and "counted on a GPU only" in out
    import json

    rc, out, _ = run_cli(capsys, "report", chat_ckpt, "--gpu-memory", "1GiB", "--context", "512",
                         "--cpu-bandwidth", "10GB", "--gpu", "H100", "--json")
    memory = json.loads(out)["memory"]
    assert memory["cpu_device_fixed_bytes"] == need and memory["gpu"]["context_reserve"] == 300 * 2**20


# ---------------------------------------------------------------------------- item 8: timing
def test_timing_is_the_steady_state_and_says_so():
    from offload.cli.generate import StepTimer, timing_summary
    from offload.generation import GenerationStats

    timer = StepTimer()
    for t in (0.0, 1.0, 1.5, 1.6, 1.7, 1.8):  # prompt, first token, then decode steps of 0.5 (warm-up), 0.1 …
        timer.times.append(t)
    stats = GenerationStats(prompt_tokens=3, new_tokens=5, prefill_seconds=1.0, decode_seconds=0.8)
    line = timing_summary(stats, timer.decode_steps)
    assert "10.0 tok/s steady state" in line and "first step, 500 ms, is warm-up" in line
    short = timing_summary(GenerationStats(1, 2, 0.1, 0.1), [0.05])
    assert "too few to time a steady state" in short and "tok/s steady" not in short
    assert "nothing generated" in timing_summary(GenerationStats(1, 0, 0.0, 0.0), [])


def test_max_new_tokens_zero_prints_no_rate(capsys, chat_ckpt):
    rc, out, err = run_cli(capsys, "generate", chat_ckpt, "--prompt", "hi", "--max-new-tokens", "0")
    assert rc == 0 and "nothing generated (--max-new-tokens 0)" in err and "0.0 tok/s" not in err
    rc, out, err = run_cli(capsys, "generate", chat_ckpt, "--prompt", "hi", "--max-new-tokens", "6")
    assert rc == 0 and "tok/s steady state (median of 4 decode steps" in err, err
    rc, out, err = run_cli(capsys, "generate", chat_ckpt, "--prompt", "hi", "--max-new-tokens", "6",
                           "--kv-cache", "float16")  # an fp16 KV cache (tests/test_cpu_decode.py checks its numbers)
    assert rc == 0 and "tok/s steady state (median of 4 decode steps" in err, err


# ---------------------------------------------------------------------------- item 9: help
def test_help_has_text_defaults_and_choices_everywhere(capsys):
    import importlib

    from offload import __version__
    from offload.cli.common import Parser

    class Recorder(Parser):
        def __init__(self):
            self.options = []  # before argparse's own add_argument (-h) in __init__
            super().__init__(prog="offload x")

        def add_argument(self, *names, **kw):
            if names[0].startswith("--"):
                self.options.append((names[0], kw))
            return super().add_argument(*names, **kw)

    for name, module in SUBCOMMANDS.items():
        p = Recorder()
        importlib.import_module(f"offload.cli.{module}").add_arguments(p)
        lines, key = {}, None  # option → its help entry (the option line and the help lines under it)
        for ln in p.format_help().split("options:")[1].splitlines():
            if ln.strip().startswith("-"):
                key = ln.split()[0].rstrip(",")
            if key:
                lines[key] = lines.get(key, "") + " " + ln.strip()
        for option, kw in p.options:
            assert kw.get("help"), f"{name} {option}: no help"
            if kw.get("default") not in (None, False):
                assert "default" in lines[option], (name, lines[option])
        if name in ("generate", "chat", "prepare", "eval"):
            assert "{cpu,cuda}" in lines["--device"] and "{float32,float16,bfloat16}" in lines["--dtype"]
    gen = build_parser().parse_args(["generate", "--prompt", "x"])
    assert (gen.max_new_tokens, gen.top_k, gen.top_p, gen.repetition_penalty, gen.min_p) == (128, 50, 1.0, 1.0, None)
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"offload {__version__}"


# ---------------------------------------------------------------------------- chat
def test_chat_applies_the_template_to_the_whole_conversation(capsys, chat_ckpt, monkeypatch):
    from offload import OffloadedModel
    from offload.tokenizer import load_tokenizer
    from offload.checkpoint import open_checkpoint

    seen = []
    original = OffloadedModel.generate

    def spy(self, input_ids, **kw):
        seen.append(input_ids.clone())
        return original(self, input_ids, **kw)

    monkeypatch.setattr(OffloadedModel, "generate", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nsecond turn\n/reset\nthird\n/exit\nnever read\n"))
    rc, out, err = run_cli(capsys, "chat", chat_ckpt, "--max-new-tokens", "3", "--system", "be brief")
    assert rc == 0 and len(seen) == 3 and "(conversation cleared)" in err, err
    tok = load_tokenizer(open_checkpoint(chat_ckpt))
    first = tok.decode(seen[0][0])
    assert first == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    second = tok.decode(seen[1][0])
    assert second.startswith(first) and second.endswith("<|im_start|>user\nsecond turn<|im_end|>\n"
                                                        "<|im_start|>assistant\n")
    assert "<|im_start|>assistant\n" in second[len(first):]  # the first answer is in the history
    third = tok.decode(seen[2][0])
    assert "hello" not in third and "third" in third  # /reset forgot the conversation


def test_chat_answers_two_piped_turns_in_a_fresh_process(smollm2_gguf):
    """`offload chat` with two turns on a pipe: the second question only makes sense with the first. With
    transformers' numbers (--activations float32): rounded like llama.cpp's, this 135M model answers the
    first question as llama.cpp does, with a list of Paris places that never says "Paris"."""
    script = os.path.join(os.path.dirname(sys.executable), "offload")
    proc = subprocess.run([script, "chat", "--max-new-tokens", "12", "--activations", "float32"],
                          input="What is the capital of France?\nAnd of Italy?\n", capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout and "Rome" in proc.stdout, (proc.stdout, proc.stderr[-1000:])
    assert proc.stdout.index("Paris") < proc.stdout.index("Rome")
