"""Helpers shared by test modules (pytest puts tests/ on sys.path: ``from helpers import ...``)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from offload.generation import SamplingConfig, generate


def rand_ids(n: int, seed: int) -> torch.Tensor:
    """n token ids below 97 (the tiny models' vocabulary), the same for the same seed."""
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed))


def hf_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits of one forward over ids, from the checkpoint at ``path``."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(ids).logits


def hf_gguf_model(path: str):
    """transformers' dense reference on a GGUF file (dequantized to fp32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=path, dtype=torch.float32).eval()


def greedy_logits(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Logits [b, t + steps, V] of a prefill over ids, then ``steps`` cached greedy decode steps: the
    engine's decode loop (offload.generation.generate)."""
    out: list = []
    generate(model, ids, SamplingConfig(max_new_tokens=steps + 1), max_context=ids.shape[1] + steps + 1, logits=out)
    return torch.cat([o.to("cpu", torch.float32) for o in out], dim=1)


# Our quantized models against transformers on the same GGUF (tests/test_gguf_packed.py says why these).
TOL = 1e-3
INT8_MAX_ABS, INT8_RMS, INT8_ARGMAX_AGREEMENT = 2.5, 0.4, 0.9


def check_against_transformers(ours, hf, ids: torch.Tensor, steps: int = 32, exact: bool = True) -> dict:
    """Our logits of a prompt ``ids`` [1, t] and of ``steps`` greedy decode steps (offload.generation) against
    transformers' (teacher-forced over the same tokens). exact: within TOL and the same greedy tokens;
    otherwise (int8 activations, in prompts as in decode) every position within INT8_MAX_ABS / INT8_RMS,
    argmax agreeing at ≥ INT8_ARGMAX_AGREEMENT of the steps. Returns what was measured."""
    logits: list = []
    out, _ = generate(ours.model, ids, SamplingConfig(max_new_tokens=steps), max_context=4096, logits=logits)
    with torch.no_grad():
        ref_greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                                 min_new_tokens=steps, do_sample=False)
        ref = hf(out[:, :-1]).logits  # the same tokens, teacher-forced
    got = torch.cat(logits, dim=1)
    assert got.shape == ref.shape
    n = ids.shape[1]
    decode = got[:, n:] - ref[:, n:]
    measured = {"prompt_max_abs": (got[:, :n] - ref[:, :n]).abs().max().item(),
                "decode_max_abs": decode.abs().max().item(), "decode_rms": decode.pow(2).mean().sqrt().item(),
                "rms": (got - ref).pow(2).mean().sqrt().item(),
                "argmax_agreement": (got[:, n - 1:].argmax(-1) == ref[:, n - 1:].argmax(-1)).float().mean().item()}
    if exact:
        assert measured["prompt_max_abs"] <= TOL and measured["decode_max_abs"] <= TOL, measured
        assert torch.equal(out, ref_greedy)
        return measured
    assert max(measured["prompt_max_abs"], measured["decode_max_abs"]) <= INT8_MAX_ABS, measured
    assert measured["rms"] <= INT8_RMS, measured
    assert measured["argmax_agreement"] >= INT8_ARGMAX_AGREEMENT, measured
    return measured


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


# 4-bit layout name (offload.formats.packed_rows) → the GGUF type of a source matrix in it (None: int4, RTN)
Q4_SOURCES = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k": "Q4_K", "int4": None}


def q4_source(layout: str, rows: int, cols: int, seed: int = 0):
    """A random packed matrix [rows, cols] in a 4-bit layout: GGUF blocks with random codes and scales
    (gguf_blocks.random_rows), or for "int4" a standard normal matrix quantized round-to-nearest."""
    import numpy as np
    from gguf import GGMLQuantizationType as QT

    from offload.formats import packed as pk
    from offload.formats.gguf_blocks import random_rows

    rng = np.random.default_rng(seed)
    if Q4_SOURCES[layout] is None:
        return pk.quantize(rng.standard_normal((rows, cols)).astype(np.float32), bits=4)
    qtype = QT[Q4_SOURCES[layout]]
    return pk.pack_gguf(random_rows(qtype, rows, cols, rng), qtype, cols)


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


@contextlib.contextmanager
def patched_config(module, name: str, value: dict | None):
    """Temporarily update the dict ``module.name`` (a kernel module's INTERPRETER_CONFIG or SPLIT_CONFIG)
    with ``value``; the kernels read it at launch."""
    config = getattr(module, name)
    old = dict(config)
    config.update(value or {})
    try:
        yield
    finally:
        config.clear()
        config.update(old)


def compile_sm90(fn, signature: dict, constants: dict, num_warps: int = 4, num_stages: int | None = None):
    """A Triton kernel compiled ahead of time for an H100 (sm_90), no GPU needed: what the interpreter lets
    through (types, layouts, unsupported ops) fails here. Skips the test where Triton has no CUDA backend
    or no usable ptxas. ``signature``: argument → type, constexprs included (as "constexpr")."""
    import triton
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        pytest.skip("this Triton build has no CUDA backend")
    options = dict(num_warps=num_warps, enable_fp_fusion=True)
    if num_stages is not None:
        options["num_stages"] = num_stages
    try:
        return triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32), options=options)
    except RuntimeError as e:
        if "ptxas" in str(e) or "No such file" in str(e):
            pytest.skip(f"no usable ptxas: {e}")
        raise


def assert_no_spills(kernels) -> None:
    """Every compiled kernel has a cubin, and (where cuobjdump exists) no register spills to local memory."""
    import triton

    try:
        cuobjdump = triton.knobs.nvidia.cuobjdump.path
    except Exception:  # pragma: no cover - older Triton
        cuobjdump = None
    for kernel in kernels:
        assert kernel.asm.get("cubin"), "no cubin produced"
        if cuobjdump:  # spills show up as LOCAL bytes in the cubin's resource usage
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                       text=True).stdout
            assert "LOCAL:0 " in usage, f"register spills to local memory:\n{usage}"
