"""offload.kernels.shadow_scores (Triton) against its torch references.

Same scheme as tests/test_kernels.py:
* the Triton kernels on CPU run in Triton's interpreter, which must be on (TRITON_INTERPRET=1)
  before triton is imported: the interpreter cases run in one child process (this file as a script)
  and report back one result per case; in-process when the session already interprets;
* argument checks, references, dispatch and the torch.library registration (opcheck, which
  also checks the fake kernel torch.compile uses) run in-process;
* the kernels are compiled ahead of time for sm_90 (no GPU needed; skipped without ptxas);
* @pytest.mark.cuda tests run the compiled kernels at LLaMA-7B shape; skipped without a GPU.
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import (assert_no_spills, case_result, compile_sm90, interpreter_worker_results, patched_config,
                     report_interpreter_results)

from offload.kernels import shadow_scores as ss_mod
from offload.kernels.gather_gemv import interpreter_active
from offload.models.ffn_kind import activation
from offload.kernels.shadow_scores import (
    KINDS,
    shadow_scores_int4,
    shadow_scores_int4_reference,
    shadow_scores_int4_triton,
    shadow_scores_int8,
    shadow_scores_int8_reference,
    shadow_scores_int8_triton,
)
from offload.predict.quant import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

N, D = 37, 72  # not multiples of BLOCK_N, of the int4 group (32) or of BLOCK_H


pytestmark = pytest.mark.usefixtures("one_torch_thread")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make(bits: int, b: int, dtype=torch.float32, seed: int = 0, n: int = N, d: int = D, group: int = 32,
         bias: bool = False):
    """(x, q_gate, s_gate, q_up, s_up, gate_bias, up_bias) with quant.py's formats."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, d, generator=g) * (0.3 + 2 * torch.rand(1, d, generator=g))).to(dtype)
    wg = torch.randn(n, d, generator=g) / d ** 0.5
    wu = torch.randn(n, d, generator=g) / d ** 0.5
    if bits == 4:
        (qg, sg), (qu, su) = quantize_int4(wg, group), quantize_int4(wu, group)
    else:
        (qg, sg), (qu, su) = quantize_int8(wg), quantize_int8(wu)
    bg = bu = None
    if bias:
        bg, bu = 0.3 * torch.randn(n, generator=g), 0.3 * torch.randn(n, generator=g)
    return x, qg, sg, qu, su, bg, bu


# --------------------------------------------------------------------------------------------------
# Interpreter cases
# --------------------------------------------------------------------------------------------------
CASES: dict[str, dict] = {}
for _kind, _b in (("swiglu", 1), ("swiglu", 3), ("swiglu", 8), ("relu", 3), ("drelu", 8)):
    CASES[f"int4-{_kind}-fp32-b{_b}"] = dict(bits=4, kind=_kind, dt="fp32", b=_b)
for _kind in KINDS:
    CASES[f"int8-{_kind}-fp32-b3"] = dict(bits=8, kind=_kind, dt="fp32", b=3)
CASES["int4-swiglu-fp16-b2"] = dict(bits=4, kind="swiglu", dt="fp16", b=2)
CASES["int4-swiglu-bf16-b1-bias"] = dict(bits=4, kind="swiglu", dt="bf16", b=1, bias=True)
CASES["int4-relu-fp32-b2-group16"] = dict(bits=4, kind="relu", dt="fp32", b=2, group=16)
CASES["int4-swiglu-fp32-b5-group64-d40"] = dict(bits=4, kind="swiglu", dt="fp32", b=5, group=64, d=40)
# gate and up bytes interleaved in one [n, 2, H] buffer (row stride 2H): views of one tensor
CASES["int4-swiglu-fp32-b2-interleaved"] = dict(bits=4, kind="swiglu", dt="fp32", b=2, interleaved=True)
# small tiles: several programs and loop steps, ragged last tiles
CASES["int4-drelu-fp32-b3-smallblocks"] = dict(bits=4, kind="drelu", dt="fp32", b=3,
                                               config={"BLOCK_N": 8, "BLOCK_H": 8})
CASES["int8-swiglu-fp16-b8-bias"] = dict(bits=8, kind="swiglu", dt="fp16", b=8, bias=True)
CASES["int8-relu-fp32-b1-smallblocks"] = dict(bits=8, kind="relu", dt="fp32", b=1,
                                              config={"BLOCK_N": 8, "BLOCK_D": 16})


def _run_case(c: dict) -> None:
    bits = c["bits"]
    x, qg, sg, qu, su, bg, bu = make(bits, c["b"], DTYPES[c["dt"]], seed=c["b"], d=c.get("d", D),
                                     group=c.get("group", 32), bias=c.get("bias", False))
    if c.get("interleaved"):
        buf = torch.stack([qg, qu], dim=1)  # [n, 2, H]
        qg, qu = buf[:, 0], buf[:, 1]
        assert qg.stride(0) == 2 * qg.shape[1]
    launcher, reference = ((shadow_scores_int4_triton, shadow_scores_int4_reference) if bits == 4 else
                           (shadow_scores_int8_triton, shadow_scores_int8_reference))
    cfg_name = "INTERPRETER_CONFIG_INT4" if bits == 4 else "INTERPRETER_CONFIG_INT8"
    with patched_config(ss_mod, cfg_name, c.get("config")):
        out = launcher(x, qg, sg, qu, su, bg, bu, c["kind"])
    ref = reference(x, qg, sg, qu, su, bg, bu, c["kind"])
    assert out.dtype == torch.float32 and tuple(out.shape) == (c["b"], N), (out.dtype, out.shape)
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, atol=1e-4 * scale + 1e-6, rtol=1e-4)


def run_case(name: str) -> str:
    return case_result(_run_case, CASES[name])


_MARKER = "@@shadow-interpreter-results@@"


@pytest.fixture(scope="module")
def interpreter_results():
    if interpreter_active():
        return None  # this process already interprets Triton: run the cases in-process
    return interpreter_worker_results(__file__, _MARKER)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name, interpreter_results):
    result = run_case(name) if interpreter_results is None else interpreter_results[name]
    assert result == "ok", result


# --------------------------------------------------------------------------------------------------
# References against quant.py's dequantizers and the shadow formula
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [4, 8])
def test_references_match_quant_dequantize(bits, kind):
    x, qg, sg, qu, su, bg, bu = make(bits, 3, bias=True)
    if bits == 4:
        wg, wu = dequantize_int4(qg, sg, D), dequantize_int4(qu, su, D)
        got = shadow_scores_int4_reference(x, qg, sg, qu, su, bg, bu, kind)
    else:
        wg, wu = dequantize_int8(qg, sg), dequantize_int8(qu, su)
        got = shadow_scores_int8_reference(x, qg, sg, qu, su, bg, bu, kind)
    g, u = F.linear(x, wg, bg), F.linear(x, wu, bu)
    want = activation(kind, g, u).abs()
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(interpreter_active(), reason="checks the non-interpreter CPU path")
def test_cpu_auto_is_reference_and_triton_needs_interpreter():
    for bits, fn, ref, launcher in ((4, shadow_scores_int4, shadow_scores_int4_reference, shadow_scores_int4_triton),
                                    (8, shadow_scores_int8, shadow_scores_int8_reference, shadow_scores_int8_triton)):
        args = make(bits, 2)
        assert torch.equal(fn(*args), ref(*args))
        assert torch.equal(getattr(torch.ops.offload, f"shadow_scores_int{bits}")(*args), ref(*args))
        assert torch.equal(fn(*args, backend="torch"), ref(*args))
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            launcher(*args)
        with pytest.raises(ValueError, match="backend must be one of"):
            fn(*args, backend="cuda")


# --------------------------------------------------------------------------------------------------
# Bad inputs raise, naming the argument (every backend)
# --------------------------------------------------------------------------------------------------
def _bad_cases():
    x, qg, sg, qu, su, bg, bu = make(4, 2, bias=True)
    ok = dict(x=x, q_gate=qg, s_gate=sg, q_up=qu, s_up=su, gate_bias=None, up_bias=None, kind="swiglu")
    x8, q8, s8, _, _, _, _ = make(8, 2)
    return [
        (4, "kind", dict(ok, kind="relu_fc"), ValueError, r"kind must be one of"),
        (4, "x-1d", dict(ok, x=x[0]), ValueError, r"x must be 2-D"),
        (4, "x-int", dict(ok, x=x.int()), TypeError, r"x must be float16, bfloat16 or float32"),
        (4, "x-batch9", dict(ok, x=torch.randn(9, D)), ValueError, r"x must have 1\.\.8 rows"),
        (4, "x-width", dict(ok, x=torch.randn(2, 50)), ValueError, r"x has d=50 columns"),
        (4, "q-dtype", dict(ok, q_gate=qg.to(torch.int8)), TypeError, r"q_gate must be torch.uint8"),
        (4, "s-shape", dict(ok, s_gate=sg[:, [0, 1, 2, 0, 1]]), ValueError, r"s_gate must have shape \[n=37, d_pad/group\]"),
        (4, "s-dtype", dict(ok, s_gate=sg.double()), TypeError, r"s_gate must be float16"),
        (4, "up-shape", dict(ok, q_up=qu[:-1], s_up=su[:-1]), ValueError, r"q_up/s_up must have the shapes"),
        (4, "q-strided", dict(ok, q_gate=qg.T.contiguous().T), ValueError, r"q_gate must be contiguous along"),
        (4, "bias-one", dict(ok, gate_bias=bg), ValueError, r"gate_bias and up_bias must be given together"),
        (4, "bias-shape", dict(ok, gate_bias=bg[:-1], up_bias=bu[:-1]), ValueError, r"gate_bias must have shape"),
        (4, "device", dict(ok, q_up=qu.to("meta")), ValueError, r"q_up must be on cpu"),
        (8, "q8-dtype", dict(ok, q_gate=qg, s_gate=s8, q_up=q8, s_up=s8, x=x8), TypeError, r"q_gate must be torch.int8"),
        (8, "q8-width", dict(ok, q_gate=q8[:, :-1], s_gate=s8, q_up=q8[:, :-1], s_up=s8, x=x8), ValueError,
         r"q_gate must have shape \[n, d=72\]"),
        (8, "s8-shape", dict(ok, q_gate=q8, s_gate=s8[:-1], q_up=q8, s_up=s8, x=x8), ValueError,
         r"s_gate must have shape \[n=37\]"),
    ]


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[1])
def test_rejects(case, backend):
    bits, _, kw, exc, msg = case
    fn = shadow_scores_int4 if bits == 4 else shadow_scores_int8
    with pytest.raises(exc, match=msg):
        fn(**kw, backend=backend)


def test_inference_only():
    x, qg, sg, qu, su, _, _ = make(4, 1)
    with pytest.raises(ValueError, match="x requires grad, but .* inference-only"):
        shadow_scores_int4(x.requires_grad_(), qg, sg, qu, su)
    with torch.no_grad():
        shadow_scores_int4(x, qg, sg, qu, su)


# --------------------------------------------------------------------------------------------------
# torch.library and torch.compile (CPU reference path)
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(interpreter_active(), reason="the interpreter path is eager-only")
def test_opcheck():
    x, qg, sg, qu, su, bg, bu = make(4, 2, bias=True)
    torch.library.opcheck(torch.ops.offload.shadow_scores_int4.default, (x, qg, sg, qu, su, bg, bu, "relu"))
    x8, q8g, s8g, q8u, s8u, _, _ = make(8, 2)
    torch.library.opcheck(torch.ops.offload.shadow_scores_int8.default, (x8, q8g, s8g, q8u, s8u, None, None, "swiglu"))


def test_autotuners_construct():
    for bits in (4, 8):
        for bp in (1, 2, 4, 8):
            block = "BLOCK_H" if bits == 4 else "BLOCK_D"
            blocks = (32, 64, 128, 256) if bits == 4 else (64, 128, 256, 512)
            assert ss_mod._cuda_configs(bp, block, blocks)
            ss_mod._tuned_kernel(bits, bp)


@pytest.mark.skipif(interpreter_active(), reason="needs compiled (non-interpreted) kernels")
def test_kernels_compile_for_sm90():
    """Compile ahead of time for an H100 (sm_90) without a GPU, with the largest tiles the tuner may
    pick, and check that nothing spills to local memory. Skipped where Triton has no CUDA backend."""
    common = dict(x_ptr="*{dt}", qg_ptr="*{q}", sg_ptr="*fp16", qu_ptr="*{q}", su_ptr="*fp16", bg_ptr="*fp32",
                  bu_ptr="*fp32", out_ptr="*fp32", B="i32", N="i32", D="i32")
    kernels = []
    for bits, dt, bp, kind, bias in ((4, "bf16", 8, "swiglu", True), (8, "fp16", 1, "relu", False)):
        sig = {k: v.format(dt=dt, q="u8" if bits == 4 else "i8") for k, v in common.items()}
        if bits == 4:
            sig.update(H="i32", GROUP_BYTES="i32", stride_xb="i32", stride_qn="i32", stride_sn="i32", stride_ob="i32")
            cfgs = ss_mod._cuda_configs(bp, "BLOCK_H", (32, 64, 128, 256))
            fn = ss_mod._shadow_int4_kernel
        else:
            sig.update(stride_xb="i32", stride_qn="i32", stride_ob="i32")
            cfgs = ss_mod._cuda_configs(bp, "BLOCK_D", (64, 128, 256, 512))
            fn = ss_mod._shadow_int8_kernel
        sig.update(KIND="constexpr", HAS_BIAS="constexpr", BATCH_PAD="constexpr", BLOCK_N="constexpr",
                   **{k: "constexpr" for k in cfgs[0].kwargs if k != "BLOCK_N"})
        cfg = max(cfgs, key=lambda c: c.kwargs["BLOCK_N"] * list(c.kwargs.values())[1] / c.num_warps)
        const = dict(KIND=kind, HAS_BIAS=bias, BATCH_PAD=bp, **cfg.kwargs)
        kernels.append(compile_sm90(fn, sig, const, cfg.num_warps, cfg.num_stages))
    assert_no_spills(kernels)


# --------------------------------------------------------------------------------------------------
# CUDA: the compiled kernels at LLaMA-7B FFN shape
# --------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("b", [1, 8])
@pytest.mark.parametrize("bits", [4, 8])
def test_cuda_matches_reference(bits, b):
    x, qg, sg, qu, su, _, _ = make(bits, b, torch.float16, n=11008, d=4096)
    args = [t.cuda() for t in (x, qg, sg, qu, su)]
    fn, ref = ((shadow_scores_int4, shadow_scores_int4_reference) if bits == 4 else
               (shadow_scores_int8, shadow_scores_int8_reference))
    out = fn(*args)  # auto → torch.ops.offload.shadow_scores_int* → Triton
    want = ref(*args)
    torch.testing.assert_close(out, want, atol=1e-3 * want.abs().max().item(), rtol=1e-3)


# --------------------------------------------------------------------------------------------------
# Child process: run the interpreter cases
# --------------------------------------------------------------------------------------------------
if __name__ == "__main__" and sys.argv[1:2] == ["--interpreter-worker"]:
    assert interpreter_active(), "run with TRITON_INTERPRET=1 set before triton is imported"
    torch.set_num_threads(1)
    report_interpreter_results(_MARKER, {name: run_case(name) for name in CASES})
