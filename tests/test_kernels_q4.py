"""Packed 4-bit hot-side kernels (offload.kernels.gather_gemv_q4 / sparse_down_q4) against their references.

As in test_kernels.py: the Triton cases run in Triton's interpreter in one child process (this file run as a
script with TRITON_INTERPRET=1), each case reporting back as its own test; argument checks, the references,
dispatch and registration run in-process; @pytest.mark.cuda tests run the compiled kernels at LLaMA-7B shape.
The sources are GGUF Q4_0 / Q4_1 / Q4_K blocks and int4 (round-to-nearest) matrices, so every layout the
format holds is exercised, at several group counts.
"""
from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import (Q4_SOURCES, assert_no_spills, case_result, compile_sm90, interpreter_worker_results,
                     patched_config, q4_source, report_interpreter_results)

from offload.formats import packed as pk
from offload.formats.packed_rows import down_from_packed, rows_from_packed
from offload.kernels import gather_gemv_q4 as gq_mod
from offload.kernels import sparse_down as sd_mod
from offload.kernels import sparse_down_q4 as sq_mod
from offload.kernels.gather_gemv import ACTIVATIONS, interpreter_active
from offload.kernels.gather_gemv_q4 import gather_gemv_q4, gather_gemv_q4_reference
from offload.kernels.sparse_down import split_plan
from offload.kernels.sparse_down_q4 import ffn_hot_forward_q4, sparse_down_q4
from offload.models.ffn_kind import activation as activation_of

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (layout, d): d/32 = 2, 3, 5 groups per row; the K type 8 and 16 (one and two 256-column super-blocks)
SHAPES = {"q4_0": 64, "q4_0-d96": 96, "q4_1": 160, "int4": 64, "q4_k": 256, "q4_k-d512": 512}


# --------------------------------------------------------------------------------------------------
# Inputs: a layer of n neurons, h of them hot, in a 4-bit layout
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def hot_layer(shape: str, projections: int = 2, seed: int = 0):
    """(rows, down, x scale, dense fp32 gate/up [P, h, d] and down columns [h, d]) of a random layer."""
    layout, d = shape.split("-")[0], SHAPES[shape]
    n = 256 if layout == "q4_k" else 96  # groups of 32 (and super-blocks of 256) across the down's neurons
    mats = [q4_source(layout, n, d, seed + p) for p in range(projections)]
    down = q4_source(layout, d, n, seed + 7)
    hot = np.sort(np.random.default_rng(seed).choice(n, size=2 * n // 3, replace=False))
    rows = rows_from_packed(mats, [hot] * projections)
    w = np.stack([pk.dequantize_rows(P, hot) for P in mats])
    w3t = pk.dequantize(down)[:, hot].T
    scale = 1.0 / (float(np.abs(w).mean()) * d)  # keeps x·w of order 1 whatever the source's scales
    return rows, down_from_packed(down, hot), scale, torch.from_numpy(w), torch.from_numpy(np.ascontiguousarray(w3t))


def make_idx(kind: str, h: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return torch.empty(0, dtype=torch.int32)
    if kind == "one":
        return torch.tensor([h // 3 | 1], dtype=torch.int32)  # an odd position
    if kind == "all":
        return torch.arange(h, dtype=torch.int32)
    if kind == "rand":  # sorted subset, ~40 %
        return torch.randperm(h, generator=g)[: (2 * h) // 5].sort().values.int()
    if kind == "padded":  # fixed capacity: out-of-range slots are inactive
        sub = torch.randperm(h, generator=g)[:30].sort().values
        return torch.cat([sub, torch.tensor([-1, h, -7, h + 100, -1])]).int()
    if kind == "dups":  # unsorted with repeats
        return torch.randint(0, h, (45,), generator=g).int()
    raise ValueError(kind)


def tolerance(ref: torch.Tensor) -> dict:
    # fp32 accumulation in another order than the reference's matmul
    peak = float(ref.abs().max()) if ref.numel() else 0.0
    return dict(rtol=1e-4, atol=1e-5 * max(1.0, peak))


# --------------------------------------------------------------------------------------------------
# Interpreter cases
# --------------------------------------------------------------------------------------------------
CASES: dict[str, dict] = {}
_GATHER = [("swiglu", 1, "all"), ("relu", 2, "rand"), ("drelu", 5, "dups"), ("relu_fc", 8, "padded")]
for _shape in SHAPES:
    for _act, _b, _k in _GATHER:
        CASES[f"gather-{_shape}-{_act}-b{_b}-{_k}"] = dict(op="gather", shape=_shape, act=_act, b=_b, idx=_k)
    for _b, _k in [(1, "all"), (3, "padded"), (8, "dups")]:
        CASES[f"down-{_shape}-b{_b}-{_k}"] = dict(op="down", shape=_shape, b=_b, idx=_k)
CASES["gather-q4_k-swiglu-fp16-b3-rand"] = dict(op="gather", shape="q4_k", act="swiglu", b=3, idx="rand", x_dt="fp16")
CASES["gather-q4_0-swiglu-bf16-b2-one"] = dict(op="gather", shape="q4_0", act="swiglu", b=2, idx="one", x_dt="bf16")
CASES["gather-q4_1-relu_fc-b2-none"] = dict(op="gather", shape="q4_1", act="relu_fc", b=2, idx="none")
CASES["gather-q4_1-relu_fc-b4-fp16bias"] = dict(op="gather", shape="q4_1", act="relu_fc", b=4, idx="rand",
                                                      bias_dt="fp16")
# small tiles: many programs, many steps, ragged last tiles (5 groups = 80 bytes, BLOCK_H 16)
CASES["gather-q4_1-swiglu-b5-smallblocks"] = dict(op="gather", shape="q4_1", act="swiglu", b=5, idx="all",
                                                  config={"BLOCK_K": 8, "BLOCK_H": 16})
CASES["down-q4_k-b2-rand-h16"] = dict(op="down", shape="q4_k", b=2, idx="rand", h_dt="fp16")
CASES["down-int4-b3-none"] = dict(op="down", shape="int4", b=3, idx="none")
# several split-K chunks that BLOCK_K does not tile, ragged output tiles (80 bytes, BLOCK_H 32)
CASES["down-q4_1-b5-all-splits"] = dict(op="down", shape="q4_1", b=5, idx="all",
                                        split={"MIN_ROWS_PER_SPLIT": 8, "MAX_SPLITS": 4},
                                        config={"BLOCK_K": 16, "BLOCK_H": 32})
CASES["down-q4_k-b8-dups-splits"] = dict(op="down", shape="q4_k", b=8, idx="dups",
                                         split={"MIN_ROWS_PER_SPLIT": 8, "MAX_SPLITS": 3})
CASES["ffn-q4_0-swiglu-b2-padded"] = dict(op="ffn", shape="q4_0", act="swiglu", b=2, idx="padded")
CASES["ffn-q4_k-relu_fc-b1-rand"] = dict(op="ffn", shape="q4_k", act="relu_fc", b=1, idx="rand")


def _inputs(c: dict):
    projections = 1 if c.get("act") == "relu_fc" else 2
    rows, down, scale, _, _ = hot_layer(c["shape"], projections)
    g = torch.Generator().manual_seed(c["b"])
    x = (torch.randn(c["b"], rows.cols, generator=g) * scale).to(DTYPES[c.get("x_dt", "fp32")])
    b1 = None
    if c.get("act") == "relu_fc":
        b1 = (0.5 * torch.randn(rows.rows, generator=g)).to(DTYPES[c.get("bias_dt", "fp32")])
    return rows, down, x, b1, make_idx(c["idx"], rows.rows, c["b"])


def _run_case(c: dict) -> None:
    rows, down, x, b1, idx = _inputs(c)
    b, k = c["b"], idx.numel()
    if c["op"] == "gather":
        with patched_config(gq_mod, "INTERPRETER_CONFIG", c.get("config")):
            out = gather_gemv_q4(x, rows, idx, b1, c["act"], backend="triton")
        ref = gather_gemv_q4(x, rows, idx, b1, c["act"], backend="torch")
        shape = (b, k)
    elif c["op"] == "down":
        h = torch.randn(b, k, generator=torch.Generator().manual_seed(1)).to(DTYPES[c.get("h_dt", "fp32")])
        with patched_config(sq_mod, "INTERPRETER_CONFIG", c.get("config")), \
                patched_config(sd_mod, "SPLIT_CONFIG", c.get("split")):
            if "split" in c:
                assert split_plan(k)[1] > 1
            out = sparse_down_q4(h, down, idx, backend="triton")
        ref = sparse_down_q4(h, down, idx, backend="torch")
        shape = (b, down.out_features)
    else:
        out = ffn_hot_forward_q4(x, idx, rows=rows, down=down, b1=b1, activation=c["act"], backend="triton")
        ref = ffn_hot_forward_q4(x, idx, rows=rows, down=down, b1=b1, activation=c["act"], backend="torch")
        shape = (b, rows.cols)
    assert out.dtype == torch.float32 and tuple(out.shape) == shape, (out.dtype, tuple(out.shape), shape)
    torch.testing.assert_close(out, ref, **tolerance(ref))
    if c["idx"] == "padded" and c["op"] == "gather":
        assert torch.all(out[:, -5:] == 0), "padding slots must give h == 0"


def run_case(name: str) -> str:
    return case_result(_run_case, CASES[name])


_MARKER = "@@interpreter-results-q4@@"


@pytest.fixture(scope="module")
def interpreter_results():
    """name -> "ok" | failure text, from one child process running with TRITON_INTERPRET=1."""
    if interpreter_active():
        return None
    return interpreter_worker_results(__file__, _MARKER)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name, interpreter_results):
    result = run_case(name) if interpreter_results is None else interpreter_results[name]
    assert result == "ok", result


# --------------------------------------------------------------------------------------------------
# The references against the dense maths over the source's dequantized weights (lossless end to end)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_dense(shape, activation):
    projections = 1 if activation == "relu_fc" else 2
    rows, down, scale, w, w3t = hot_layer(shape, projections)
    x = torch.randn(3, rows.cols, generator=torch.Generator().manual_seed(2)) * scale
    b1 = torch.randn(rows.rows) if activation == "relu_fc" else None
    g = F.linear(x, w[0], b1)
    u = None if activation == "relu_fc" else F.linear(x, w[1])
    h = activation_of(activation, None, g) if u is None else activation_of(activation, g, u)
    idx = make_idx("padded", rows.rows)
    valid = idx[idx >= 0]
    valid = valid[valid < rows.rows].long()
    got = gather_gemv_q4_reference(x, rows.codes, rows.d, rows.m, rows.sc, rows.mc, idx, b1, activation,
                                   rows.layout.sub, rows.layout.zero)
    torch.testing.assert_close(got[:, :-5], h[:, valid], **tolerance(h))
    assert torch.all(got[:, -5:] == 0)
    y = ffn_hot_forward_q4(x, idx, rows=rows, down=down, b1=b1, activation=activation, backend="torch")
    torch.testing.assert_close(y, h[:, valid] @ w3t[valid], **tolerance(y))


@pytest.mark.skipif(interpreter_active(), reason="checks the non-interpreter CPU path")
def test_cpu_auto_is_reference_and_triton_needs_interpreter():
    rows, down, scale, _, _ = hot_layer("q4_1")
    x = torch.randn(2, rows.cols) * scale
    idx = make_idx("rand", rows.rows)
    h = gather_gemv_q4(x, rows, idx)
    assert torch.equal(h, gather_gemv_q4(x, rows, idx, backend="torch"))
    assert torch.equal(sparse_down_q4(h, down, idx), sparse_down_q4(h, down, idx, backend="torch"))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        gather_gemv_q4(x, rows, idx, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sparse_down_q4(h, down, idx, backend="triton")


# --------------------------------------------------------------------------------------------------
# Bad inputs raise, naming the argument
# --------------------------------------------------------------------------------------------------
def _replace(obj, **kw):
    from dataclasses import replace
    return replace(obj, **kw)


def _bad_gather_cases():
    rows, _, scale, _, _ = hot_layer("q4_k")
    r0 = hot_layer("q4_0")[0]
    x = torch.randn(2, rows.cols) * scale
    idx = make_idx("rand", rows.rows)
    ok = dict(x=x, rows=rows, idx=idx, b1=None, activation="swiglu")
    return [
        ("activation", dict(ok, activation="gelu"), ValueError, r"activation must be one of"),
        ("x-d", dict(ok, x=x[:, :128]), ValueError, r"codes must have shape \[P=2, h, d/2=64\]"),
        ("x-batch9", dict(ok, x=torch.randn(9, rows.cols)), ValueError, r"x must have 1\.\.8 rows"),
        ("codes-int8", dict(ok, rows=_replace(rows, codes=rows.codes.view(torch.int8))), TypeError,
         r"codes must be torch.uint8"),
        ("codes-P", dict(ok, activation="relu_fc"), ValueError, r"codes must have shape \[P=1"),
        ("codes-strided", dict(ok, rows=_replace(rows, codes=rows.codes.transpose(0, 1).contiguous().transpose(0, 1))),
         ValueError, r"codes must be contiguous"),
        ("d-shape", dict(ok, rows=_replace(rows, d=rows.d[:, :-1])), ValueError, r"d must have shape"),
        ("d-int", dict(ok, rows=_replace(rows, d=rows.d.view(torch.int16))), TypeError, r"d must be float16"),
        ("sc-dtype", dict(ok, rows=_replace(rows, sc=rows.sc.float())), TypeError, r"sc must be torch.int8"),
        ("mc-missing", dict(ok, rows=_replace(rows, mc=rows.mc[:, :, :0])), ValueError, r"mc must be given exactly"),
        ("m-missing", dict(ok, rows=_replace(rows, m=rows.m[:, :, :0])), ValueError, r"m must be given with zero=0"),
        ("m-with-zero", dict(ok, x=x[:, :64], rows=_replace(r0, m=r0.d)), ValueError, r"absent with zero > 0"),
        ("sub", dict(ok, rows=_replace(rows, layout=_replace(rows.layout, sub=3))), ValueError,
         r"sub=3 must be ≥ 1 and divide"),
        ("b1-shape", dict(ok, activation="relu_fc", rows=hot_layer("q4_k", 1)[0], b1=torch.ones(3)), ValueError,
         r"b1 must be a contiguous \[h="),
        ("idx-int64", dict(ok, idx=idx.long()), TypeError, r"idx must be torch.int32"),
        ("device", dict(ok, rows=_replace(rows, sc=rows.sc.to("meta"))), ValueError, r"sc must be on cpu"),
    ]


def _bad_down_cases():
    _, down, _, _, _ = hot_layer("q4_1")
    idx = make_idx("rand", down.rows)
    h = torch.randn(2, idx.numel())
    ok = dict(h=h, down=down, idx=idx)
    return [
        ("h-k", dict(ok, h=h[:, :-1]), ValueError, r"h must have one column per index"),
        ("h-int", dict(ok, h=h.int()), TypeError, r"h must be float16"),
        ("codes-1d", dict(ok, down=_replace(down, codes=down.codes[0])), ValueError, r"codes must be 2-D"),
        ("group-int64", dict(ok, down=_replace(down, group=down.group.long())), ValueError,
         r"group must be a contiguous int32"),
        ("table-width", dict(ok, down=_replace(down, d=down.d[:, :-2])), ValueError, r"d must have shape"),
        ("table-m", dict(ok, down=_replace(down, m=down.m[:1])), ValueError, r"m must have shape"),
        ("idx-device", dict(ok, idx=idx.to("meta")), ValueError, r"idx must be on cpu"),
    ]


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("case", [(gather_gemv_q4, *c) for c in _bad_gather_cases()] +
                         [(sparse_down_q4, *c) for c in _bad_down_cases()], ids=lambda c: f"{c[0].__name__}-{c[1]}")
def test_rejects(case, backend):
    op, _, kw, exc, msg = case
    with pytest.raises(exc, match=msg):
        op(**kw, backend=backend)


def test_ffn_hot_forward_q4_rejects_mismatched_halves():
    rows, down, scale, _, _ = hot_layer("q4_0")
    x = torch.randn(1, rows.cols) * scale
    with pytest.raises(ValueError, match="down must hold the 64 hot neurons"):
        ffn_hot_forward_q4(x, make_idx("rand", rows.rows), rows=rows, down=down.select(torch.arange(3)))
    with pytest.raises(ValueError, match="backend must be one of"):
        ffn_hot_forward_q4(x, make_idx("rand", rows.rows), rows=rows, down=down, backend="cuda")
    w = torch.nn.Parameter(rows.d.float())
    with pytest.raises(ValueError, match="d requires grad"):
        gather_gemv_q4(x, _replace(rows, d=w), make_idx("rand", rows.rows))


# --------------------------------------------------------------------------------------------------
# Registration, autotuners, ahead-of-time compilation for sm_90
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(interpreter_active(), reason="the interpreter path is eager-only")
def test_opcheck():
    rows, down, scale, _, _ = hot_layer("q4_k")
    x = torch.randn(2, rows.cols) * scale
    idx = make_idx("padded", rows.rows)
    torch.library.opcheck(torch.ops.offload.gather_gemv_q4.default,
                          (x, rows.codes, rows.d, rows.m, rows.sc, rows.mc, idx, None, "swiglu", 8, 0))
    h = gather_gemv_q4(x, rows, idx)
    torch.library.opcheck(torch.ops.offload.sparse_down_q4.default,
                          (h, down.codes, down.group, down.d, down.m, down.sc, down.mc, idx, 8, 0))


def test_autotuners_construct():
    for bp in (1, 2, 4, 8):
        assert gq_mod._tuned_kernel(bp).configs and sq_mod._tuned_kernel(bp).configs


@pytest.mark.skipif(interpreter_active(), reason="needs compiled (non-interpreted) kernels")
def test_kernels_compile_for_sm90():
    """Compile both kernels ahead of time for an H100 (sm_90) at every layout's flags, with the last tiles
    the autotuners list: catches what the interpreter lets through, and register spills."""
    common = dict(d_ptr="*fp16", m_ptr="*fp16", sc_ptr="*i8", mc_ptr="*i8", idx_ptr="*i32", q_ptr="*u8",
                  B="i32", K="i32", N="i32", D="i32", K_BUCKET="i32")
    gg = dict(x_ptr="*fp16", b1_ptr="*fp16", h_ptr="*fp32", stride_xb="i32", stride_hb="i32", **common)
    sd = dict(h_ptr="*fp32", grp_ptr="*i32", out_ptr="*fp32", ROWS_PER_SPLIT="i32", stride_hb="i32",
              stride_os="i32", stride_ob="i32", **common)
    flags = [dict(HAS_M=False, HAS_SC=False, ZERO=8, SUB=1), dict(HAS_M=True, HAS_SC=False, ZERO=0, SUB=1),
             dict(HAS_M=True, HAS_SC=True, ZERO=0, SUB=8)]
    kernels = []
    for f, (act, bp) in zip(flags, (("swiglu", 1), ("relu_fc", 8), ("drelu", 2))):
        for fn, sig, tuner, const in (
                (gq_mod._gather_gemv_q4_kernel, gg, gq_mod._tuned_kernel(bp),
                 dict(ACTIVATION=act, HAS_W2=act != "relu_fc", HAS_B1=act == "relu_fc", BATCH_PAD=bp, **f)),
                (sq_mod._sparse_down_q4_kernel, sd, sq_mod._tuned_kernel(bp), dict(BATCH_PAD=bp, **f))):
            cfg = tuner.configs[-1]
            const = {**const, **cfg.kwargs}
            kernels.append(compile_sm90(fn, {**sig, **dict.fromkeys(const, "constexpr")}, const, cfg.num_warps,
                                        cfg.num_stages))
    assert_no_spills(kernels)


# --------------------------------------------------------------------------------------------------
# CUDA: the compiled kernels at LLaMA-7B FFN shape (d = 4096, n = 11008), every layout
# --------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@functools.lru_cache(maxsize=4)
def _cuda_layer(layout: str, d: int = 4096, n: int = 11008, hot: int = 5504):
    from offload.formats.gguf_blocks import random_rows

    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(n, size=hot, replace=False))
    if Q4_SOURCES[layout] is None:
        gate = pk.quantize(rng.standard_normal((n, d)).astype(np.float32) / d ** 0.5, bits=4)
        up = pk.quantize(rng.standard_normal((n, d)).astype(np.float32) / d ** 0.5, bits=4)
        down = pk.quantize(rng.standard_normal((d, n)).astype(np.float32) / n ** 0.5, bits=4)
    else:
        from gguf import GGMLQuantizationType as QT

        qt = QT[Q4_SOURCES[layout]]
        n = n // 256 * 256 if layout == "q4_k" else n
        ids = ids[ids < n]
        gate, up = (pk.pack_gguf(random_rows(qt, n, d, rng), qt, d) for _ in range(2))
        down = pk.pack_gguf(random_rows(qt, d, n, rng), qt, n)
    return rows_from_packed([gate, up], [ids, ids]).to("cuda"), down_from_packed(down, ids).to("cuda")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("layout", ["q4_0", "q4_1", "q4_k", "int4"])
@pytest.mark.parametrize("b", [1, 8])
def test_cuda_kernels_match_reference(layout, b):
    rows, down = _cuda_layer(layout)
    g = torch.Generator(device="cuda").manual_seed(b)
    x = torch.randn(b, rows.cols, device="cuda", generator=g, dtype=torch.float16)
    ref_scale = gather_gemv_q4(x, rows, torch.arange(64, device="cuda", dtype=torch.int32), backend="torch")
    x = (x.float() / max(1.0, float(ref_scale.abs().max()))).half()
    k = rows.rows // 5
    idx = torch.randperm(rows.rows, device="cuda", generator=g)[:k].sort().values.int()
    idx = torch.cat([idx, torch.full((7,), -1, device="cuda", dtype=torch.int32)])
    h = gather_gemv_q4(x, rows, idx)
    h_ref = gather_gemv_q4(x, rows, idx, backend="torch")
    torch.testing.assert_close(h, h_ref, **tolerance(h_ref))
    y = sparse_down_q4(h_ref, down, idx)
    torch.testing.assert_close(y, sparse_down_q4(h_ref, down, idx, backend="torch"), **tolerance(y))
    assert torch.equal(sparse_down_q4(h_ref, down, idx), y), "split-K reduction must be deterministic"


@pytest.mark.cuda
@cuda
def test_cuda_graph_capture_q4():
    rows, down = _cuda_layer("q4_1")
    x = torch.randn(1, rows.cols, device="cuda", dtype=torch.float16) * 1e-2
    idx = torch.full((2048,), -1, dtype=torch.int32, device="cuda")
    idx[:1500] = torch.arange(0, 3000, 2, device="cuda", dtype=torch.int32)

    def hot():
        return ffn_hot_forward_q4(x, idx, rows=rows, down=down)

    hot()  # autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = hot()
    idx[:700] = torch.arange(1, 1401, 2, device="cuda", dtype=torch.int32)
    graph.replay()
    ref = ffn_hot_forward_q4(x, idx, rows=rows, down=down, backend="torch")
    torch.testing.assert_close(y, ref, **tolerance(ref))


# --------------------------------------------------------------------------------------------------
# Child process: run the interpreter cases
# --------------------------------------------------------------------------------------------------
if __name__ == "__main__" and sys.argv[1:2] == ["--interpreter-worker"]:
    assert interpreter_active(), "run with TRITON_INTERPRET=1 set before triton is imported"
    torch.set_num_threads(1)
    report_interpreter_results(_MARKER, {name: run_case(name) for name in CASES})
