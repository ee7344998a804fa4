"""Helpers shared by test modules (pytest puts tests/ on sys.path: ``from helpers import ...``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from offload.generation import SamplingConfig, generate


def greedy_logits(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits [b, t + steps, V] of a prefill over ids, then ``steps`` cached greedy decode steps: the
    engine's decode loop (offload.generation.generate)."""
    out: list = []
    generate(model, ids, SamplingConfig(max_new_tokens=steps + 1), max_context=ids.shape[1] + steps + 1, logits=out)
    return torch.cat([o.to("cpu", torch.float32) for o in out], dim=1)


def interpreter_worker_results(test_file: str, marker: str) -> dict:
    """Run ``test_file --interpreter-worker`` in a child process with TRITON_INTERPRET=1 (the flag must be
    set before triton is imported) and return the JSON dict it prints after ``marker`` (case name →
    "ok" or failure text); fail the test with the child's output otherwise."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, test_file, "--interpreter-worker"], env=env, capture_output=True,
                          text=True, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith(marker):
            return json.loads(line[len(marker):])
    pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def oracle_relu(mlp):
    """Exact activity of a ReLU-family FFN as a selector (offload.select): neurons whose activation is
    non-zero for any token of x [b, d]."""
    from offload.select import CallableSelector

    return CallableSelector(lambda x: torch.nonzero((mlp.intermediate(x) != 0).any(0)).flatten(), mlp.n)


def case_result(run, case) -> str:
    """"ok", or the failure as text, of ``run(case)``: how interpreter cases report to the parent test."""
    try:
        run(case)
        return "ok"
    except Exception as e:  # reported back to the parent test
        return f"{type(e).__name__}: {e}"


def report_interpreter_results(marker: str, results: dict) -> None:
    """The child side of interpreter_worker_results: print the results after ``marker``."""
    print(marker + json.dumps(results), flush=True)
