"""Hot-side kernels (offload.kernels.gather_gemv / sparse_down) against their torch references.

* Triton kernels on CPU run in Triton's interpreter, which must be switched on (TRITON_INTERPRET=1)
  *before* triton is first imported. So that this neither depends on import order nor turns the
  interpreter on for the whole session (other tests, and the CUDA tests here, must run compiled),
  the interpreter cases run in one child process (this file run as a script with
  TRITON_INTERPRET=1) and each case reports back as its own test. When the session itself already
  runs under the interpreter they run in-process instead.
* Argument checks, the torch references, the dispatch and the torch.library/torch.compile
  integration are tested in-process.
* @pytest.mark.cuda tests run the compiled kernels on a GPU at LLaMA-7B shape; skipped without one.
"""
from __future__ import annotations

import functools
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import (assert_no_spills, case_result, compile_sm90, interpreter_worker_results, patched_config,
                     report_interpreter_results)

from offload.kernels import gather_gemv as gg_mod
from offload.kernels import sparse_down as sd_mod
from offload.models.ffn_kind import activation as activation_of
from offload.kernels.gather_gemv import (
    ACTIVATIONS,
    gather_gemv,
    gather_gemv_reference,
    gather_gemv_triton,
    interpreter_active,
    resolve_backend,
)
from offload.kernels.sparse_down import (
    ffn_hot_forward,
    sparse_down,
    sparse_down_reference,
    sparse_down_triton,
    split_plan,
)

D, N = 72, 130  # not multiples of any block size
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def make_idx(kind: str, n: int = N, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return torch.empty(0, dtype=torch.int32)
    if kind == "one":
        return torch.tensor([n // 3], dtype=torch.int32)
    if kind == "all":
        return torch.arange(n, dtype=torch.int32)
    if kind == "rand":  # sorted subset, ~40 %
        return torch.randperm(n, generator=g)[: (2 * n) // 5].sort().values.int()
    if kind == "padded":  # fixed capacity: out-of-range slots (-1, n, ...) are inactive
        sub = torch.randperm(n, generator=g)[:40].sort().values
        return torch.cat([sub, torch.tensor([-1, n, -7, n + 100, -1])]).int()
    if kind == "dups":  # unsorted with repeats (sparse_down sums repeats)
        return torch.randint(0, n, (50,), generator=g).int()
    raise ValueError(kind)


def make_ffn(b: int, dtype: torch.dtype, seed: int = 0, d: int = D, n: int = N):
    """x [b, d], w1/w2/w3t [n, d] (scaled so that activations are O(1)), b1 [n]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g).to(dtype)
    w1 = (torch.randn(n, d, generator=g) / d ** 0.5).to(dtype)
    w2 = (torch.randn(n, d, generator=g) / d ** 0.5).to(dtype)
    w3t = (torch.randn(n, d, generator=g) / n ** 0.5).to(dtype)
    b1 = (0.5 * torch.randn(n, generator=g)).to(dtype)
    return x, w1, w2, w3t, b1


def act_args(activation: str, w2, b1) -> dict:
    """relu_fc (OPT) has a bias and no up projection; give the gated kinds no bias."""
    if activation == "relu_fc":
        return dict(w2=None, b1=b1, activation=activation)
    return dict(w2=w2, b1=None, activation=activation)


# --------------------------------------------------------------------------------------------------
# Interpreter cases: name -> parameters. Each runs the Triton launcher and compares it with the
# reference; run_case returns "ok" or the failure text.
# --------------------------------------------------------------------------------------------------
CASES: dict[str, dict] = {}
_PAIRS = [(1, "all"), (2, "rand"), (5, "one"), (8, "rand")]  # (batch, idx kind) per activation/dtype
for _act in ACTIVATIONS:
    for _dt in ("fp32", "fp16"):
        for _b, _k in _PAIRS:
            CASES[f"gather-{_act}-{_dt}-b{_b}-{_k}"] = dict(op="gather", act=_act, dt=_dt, b=_b, idx=_k)
CASES["gather-swiglu-fp32-b2-none"] = dict(op="gather", act="swiglu", dt="fp32", b=2, idx="none")
CASES["gather-swiglu-bf16-b3-rand"] = dict(op="gather", act="swiglu", dt="bf16", b=3, idx="rand")
CASES["gather-relu_fc-bf16-b8-all"] = dict(op="gather", act="relu_fc", dt="bf16", b=8, idx="all")
CASES["gather-swiglu-fp32-b5-padded"] = dict(op="gather", act="swiglu", dt="fp32", b=5, idx="padded")
CASES["gather-relu_fc-fp32-b2-padded"] = dict(op="gather", act="relu_fc", dt="fp32", b=2, idx="padded")
CASES["gather-drelu-fp16-b2-dups"] = dict(op="gather", act="drelu", dt="fp16", b=2, idx="dups")
CASES["gather-swiglu-fp32-b2-bias"] = dict(op="gather", act="swiglu", dt="fp32", b=2, idx="rand", bias=True)
CASES["gather-swiglu-x32-w16-b2"] = dict(op="gather", act="swiglu", dt="fp16", b=2, idx="rand", x_dt="fp32")
# gate and up rows interleaved in one [n, 2, d] buffer: row stride 2d, views of one tensor
CASES["gather-swiglu-fp16-b2-strided"] = dict(op="gather", act="swiglu", dt="fp16", b=2, idx="rand",
                                              interleaved=True)
# small tiles: many programs, many d-steps, ragged last tiles in both dimensions
CASES["gather-swiglu-fp32-b5-smallblocks"] = dict(op="gather", act="swiglu", dt="fp32", b=5, idx="all",
                                                  config={"BLOCK_K": 8, "BLOCK_D": 16})
for _dt in ("fp32", "fp16"):
    for _b, _k in [(1, "all"), (2, "rand"), (5, "one"), (8, "all"), (3, "none")]:
        CASES[f"down-{_dt}-b{_b}-{_k}"] = dict(op="down", dt=_dt, b=_b, idx=_k)
CASES["down-fp32-b2-padded"] = dict(op="down", dt="fp32", b=2, idx="padded")
CASES["down-fp32-b3-dups"] = dict(op="down", dt="fp32", b=3, idx="dups")
CASES["down-bf16-b2-rand-h16"] = dict(op="down", dt="bf16", b=2, idx="rand", h_dt="fp16")
# 4 splits of 40 rows with BLOCK_K = 16: chunks that BLOCK_K does not tile, ragged d tiles
CASES["down-fp32-b5-all-splits"] = dict(op="down", dt="fp32", b=5, idx="all",
                                        split={"MIN_ROWS_PER_SPLIT": 8, "MAX_SPLITS": 4},
                                        config={"BLOCK_K": 16, "BLOCK_D": 32})
CASES["ffn-swiglu-fp16-b2-rand"] = dict(op="ffn", act="swiglu", dt="fp16", b=2, idx="rand")
CASES["ffn-relu_fc-fp32-b1-padded"] = dict(op="ffn", act="relu_fc", dt="fp32", b=1, idx="padded")


def _run_case(c: dict) -> None:
    dtype = DTYPES[c["dt"]]
    x, w1, w2, w3t, b1 = make_ffn(c["b"], dtype, seed=len(c["idx"]) + c["b"])
    idx = make_idx(c["idx"])
    k = idx.numel()
    tol = TOL[dtype]
    if c["op"] == "gather":
        if "x_dt" in c:
            x = x.to(DTYPES[c["x_dt"]])
        if c.get("interleaved"):
            gu = torch.stack([w1, w2], dim=1)  # [n, 2, d]
            w1, w2 = gu[:, 0], gu[:, 1]
            assert w1.stride() == (2 * D, 1)
        kw = act_args(c["act"], w2, b1)
        if c.get("bias"):
            kw["b1"] = b1
        with patched_config(gg_mod, "INTERPRETER_CONFIG", c.get("config")):
            out = gather_gemv_triton(x, w1, idx, **kw)
        ref = gather_gemv_reference(x, w1, idx, **kw)
        expected_shape = (c["b"], k)
    elif c["op"] == "down":
        g = torch.Generator().manual_seed(1)
        h = torch.randn(c["b"], k, generator=g).to(DTYPES[c.get("h_dt", "fp32")])
        with patched_config(sd_mod, "INTERPRETER_CONFIG", c.get("config")), \
                patched_config(sd_mod, "SPLIT_CONFIG", c.get("split")):
            if "split" in c:
                assert split_plan(k)[1] > 1
            out = sparse_down_triton(h, w3t, idx)
        ref = sparse_down_reference(h, w3t, idx)
        expected_shape = (c["b"], D)
    else:
        kw = act_args(c["act"], w2, b1)
        out = ffn_hot_forward(x, idx, w1=w1, w3t=w3t, backend="triton", **kw)
        ref = ffn_hot_forward(x, idx, w1=w1, w3t=w3t, backend="torch", **kw)
        expected_shape = (c["b"], D)
    assert out.dtype == torch.float32, out.dtype
    assert tuple(out.shape) == expected_shape, (tuple(out.shape), expected_shape)
    torch.testing.assert_close(out, ref, **tol)
    if c["idx"] == "padded" and c["op"] == "gather":
        assert torch.all(out[:, -5:] == 0), "padding slots must give h == 0"


def run_case(name: str) -> str:
    return case_result(_run_case, CASES[name])


_MARKER = "@@interpreter-results@@"


@pytest.fixture(scope="module")
def interpreter_results():
    """name -> "ok" | failure text, from one child process running with TRITON_INTERPRET=1."""
    if interpreter_active():
        return None  # this process already interprets Triton: run the cases in-process
    return interpreter_worker_results(__file__, _MARKER)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference(name, interpreter_results):
    result = run_case(name) if interpreter_results is None else interpreter_results[name]
    assert result == "ok", result


# --------------------------------------------------------------------------------------------------
# The references against an independent dense formulation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_dense_ffn(activation):
    x, w1, w2, w3t, b1 = make_ffn(3, torch.float32)
    kw = act_args(activation, w2, b1)
    g = F.linear(x, w1, kw["b1"])
    h = activation_of(activation, g, F.linear(x, w2)) if activation != "relu_fc" else activation_of(activation, None, g)
    y = F.linear(h, w3t.T)  # down_proj.weight = w3t.T
    idx = make_idx("all")
    torch.testing.assert_close(gather_gemv_reference(x, w1, idx, **kw), h)
    torch.testing.assert_close(ffn_hot_forward(x, idx, w1=w1, w3t=w3t, backend="torch", **kw), y)
    # a subset equals the dense FFN with the other neurons masked out
    sub = make_idx("rand")
    mask = torch.zeros(N)
    mask[sub.long()] = 1
    torch.testing.assert_close(ffn_hot_forward(x, sub, w1=w1, w3t=w3t, backend="torch", **kw),
                               F.linear(h * mask, w3t.T))


def test_reference_padding_and_empty():
    x, w1, w2, w3t, _ = make_ffn(2, torch.float32)
    idx = make_idx("padded")
    h = gather_gemv_reference(x, w1, idx, w2)
    assert torch.all(h[:, -5:] == 0)
    y = sparse_down_reference(torch.ones(2, idx.numel()), w3t, idx)
    torch.testing.assert_close(y, w3t[idx[:-5].long()].sum(0).expand(2, D))
    none = make_idx("none")
    assert gather_gemv(x, w1, none, w2).shape == (2, 0)
    assert torch.equal(sparse_down(torch.empty(2, 0), w3t, none), torch.zeros(2, D))


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------
def test_dispatch_rule():
    assert resolve_backend(torch.device("cuda")) == "triton"
    assert resolve_backend("cpu") == ("triton" if interpreter_active() else "torch")
    assert resolve_backend("cpu", "torch") == "torch"
    assert resolve_backend("cpu", "triton") == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cpu", "cuda")
    with pytest.raises(ValueError, match="CUDA or CPU"):
        resolve_backend("meta")


@pytest.mark.skipif(interpreter_active(), reason="checks the non-interpreter CPU path")
def test_cpu_auto_is_reference_and_triton_needs_interpreter():
    x, w1, w2, w3t, _ = make_ffn(2, torch.float32)
    idx = make_idx("rand")
    assert torch.equal(gather_gemv(x, w1, idx, w2), gather_gemv_reference(x, w1, idx, w2))
    assert torch.equal(torch.ops.offload.gather_gemv(x, w1, idx, w2),
                       gather_gemv_reference(x, w1, idx, w2))
    h = gather_gemv_reference(x, w1, idx, w2)
    assert torch.equal(torch.ops.offload.sparse_down(h, w3t, idx), sparse_down_reference(h, w3t, idx))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        gather_gemv(x, w1, idx, w2, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sparse_down_triton(h, w3t, idx)


# --------------------------------------------------------------------------------------------------
# Bad inputs raise, naming the argument
# --------------------------------------------------------------------------------------------------
def _bad_gather_cases():
    x, w1, w2, _, b1 = make_ffn(2, torch.float32)
    idx = make_idx("rand")
    ok = dict(x=x, w1=w1, idx=idx, w2=w2, b1=None, activation="swiglu")
    return [
        ("activation", dict(ok, activation="gelu"), ValueError, r"activation must be one of"),
        ("x-list", dict(ok, x=x.tolist()), TypeError, r"x must be a torch.Tensor"),
        ("x-1d", dict(ok, x=x[0]), ValueError, r"x must be 2-D"),
        ("x-int", dict(ok, x=x.int()), TypeError, r"x must be float16, bfloat16 or float32"),
        ("x-batch9", dict(ok, x=torch.randn(9, D)), ValueError, r"x must have 1\.\.8 rows"),
        ("x-strided", dict(ok, x=torch.randn(D, 2).T), ValueError, r"x must be contiguous along"),
        ("w1-d", dict(ok, w1=w1[:, :70]), ValueError, r"w1 must have shape \[n, d=72\]"),
        ("w1-fp64", dict(ok, w1=w1.double()), TypeError, r"w1 must be float16"),
        ("w1-transposed", dict(ok, w1=torch.randn(D, N).T), ValueError, r"w1 must be contiguous along"),
        ("w1-device", dict(ok, w1=w1.to("meta")), ValueError, r"w1 must be on cpu"),
        ("w2-missing", dict(ok, w2=None), ValueError, r"w2 \(up_proj rows, shape \[n, d\]\) is required"),
        ("w2-relu_fc", dict(ok, activation="relu_fc"), ValueError, r"w2 must be None for activation"),
        ("w2-shape", dict(ok, w2=w2[:-1]), ValueError, r"w2 must have the shape of w1"),
        ("b1-shape", dict(ok, b1=b1[:-1]), ValueError, r"b1 must have shape \[n=130\]"),
        ("b1-int", dict(ok, b1=b1.int()), TypeError, r"b1 must be float16"),
        ("idx-int64", dict(ok, idx=idx.long()), TypeError, r"idx must be torch.int32"),
        ("idx-2d", dict(ok, idx=idx[None]), ValueError, r"idx must be 1-D"),
        ("idx-strided", dict(ok, idx=idx[::2]), ValueError, r"idx must be contiguous"),
    ]


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("case", _bad_gather_cases(), ids=lambda c: c[0])
def test_gather_gemv_rejects(case, backend):
    _, kw, exc, msg = case
    with pytest.raises(exc, match=msg):
        gather_gemv(**kw, backend=backend)


def _bad_down_cases():
    _, _, _, w3t, _ = make_ffn(2, torch.float32)
    idx = make_idx("rand")
    h = torch.randn(2, idx.numel())
    ok = dict(h=h, w3t=w3t, idx=idx)
    return [
        ("h-k", dict(ok, h=h[:, :-1]), ValueError, r"h must have one column per index"),
        ("h-batch9", dict(ok, h=torch.randn(9, idx.numel())), ValueError, r"h must have 1\.\.8 rows"),
        ("h-int", dict(ok, h=h.int()), TypeError, r"h must be float16"),
        ("w3t-int", dict(ok, w3t=w3t.int()), TypeError, r"w3t must be float16"),
        ("w3t-1d", dict(ok, w3t=w3t[0]), ValueError, r"w3t must be 2-D"),
        ("w3t-transposed", dict(ok, w3t=torch.randn(D, N).T), ValueError, r"w3t must be contiguous along"),
        ("idx-int64", dict(ok, idx=idx.long()), TypeError, r"idx must be torch.int32"),
        ("idx-device", dict(ok, idx=idx.to("meta")), ValueError, r"idx must be on cpu"),
    ]


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
@pytest.mark.parametrize("case", _bad_down_cases(), ids=lambda c: c[0])
def test_sparse_down_rejects(case, backend):
    _, kw, exc, msg = case
    with pytest.raises(exc, match=msg):
        sparse_down(**kw, backend=backend)


def test_inference_only():
    x, w1, w2, w3t, _ = make_ffn(1, torch.float32)
    idx = make_idx("rand")
    w1p = torch.nn.Parameter(w1)
    with pytest.raises(ValueError, match="w1 requires grad, but .* inference-only"):
        gather_gemv(x, w1p, idx, w2)
    with pytest.raises(ValueError, match="w3t requires grad"):
        torch.ops.offload.sparse_down(torch.randn(1, idx.numel()), torch.nn.Parameter(w3t), idx)
    with torch.no_grad():
        gather_gemv(x, w1p, idx, w2)
    with torch.inference_mode():
        ffn_hot_forward(x, idx, w1=w1p, w2=w2, w3t=torch.nn.Parameter(w3t))


def test_ffn_hot_forward_rejects_untransposed_down():
    x, w1, w2, w3t, _ = make_ffn(1, torch.float32)
    with pytest.raises(ValueError, match=r"w3t must be down_proj.weight.T.contiguous\(\)"):
        ffn_hot_forward(x, make_idx("rand"), w1=w1, w2=w2, w3t=torch.randn(D, N))
    with pytest.raises(ValueError, match="backend must be one of"):
        ffn_hot_forward(x, make_idx("rand"), w1=w1, w2=w2, w3t=w3t, backend="cuda")
    for backend in ("auto", "torch", "triton"):
        with pytest.raises(TypeError, match="w3t must be float16"):
            ffn_hot_forward(x, make_idx("rand"), w1=w1, w2=w2, w3t=w3t.int(), backend=backend)


# --------------------------------------------------------------------------------------------------
# torch.library registration and torch.compile (CPU, reference path)
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(interpreter_active(), reason="the interpreter path is eager-only")
def test_opcheck():
    x, w1, w2, w3t, b1 = make_ffn(2, torch.float32)
    idx = make_idx("padded")
    torch.library.opcheck(torch.ops.offload.gather_gemv.default, (x, w1, idx, w2, None, "swiglu"))
    torch.library.opcheck(torch.ops.offload.gather_gemv.default, (x, w1, idx, None, b1, "relu_fc"))
    h = gather_gemv_reference(x, w1, idx, w2)
    torch.library.opcheck(torch.ops.offload.sparse_down.default, (h, w3t, idx))


@pytest.mark.skipif(interpreter_active(), reason="the interpreter path is eager-only")
def test_torch_compile_cpu_dynamic_k():
    """fullgraph (no graph breaks), one compilation for every k, same result as eager."""
    torch._dynamo.reset()
    x, w1, w2, w3t, _ = make_ffn(2, torch.float32)

    def hot(x, idx):
        return ffn_hot_forward(x, idx, w1=w1, w2=w2, w3t=w3t, activation="swiglu")

    compiled = torch.compile(hot, fullgraph=True, dynamic=True, backend="aot_eager")
    for kind in ("rand", "all", "padded"):
        idx = make_idx(kind)
        torch.testing.assert_close(compiled(x, idx), hot(x, idx), atol=0, rtol=0)
    with pytest.raises(Exception, match="w2"):  # argument checks also run when traced
        torch.compile(lambda x, idx: gather_gemv(x, w1, idx), fullgraph=True, backend="aot_eager")(
            x, make_idx("rand"))


def test_autotuners_construct():
    """Autotune keys name real kernel arguments and every batch size has candidates (no GPU)."""
    for bp in (1, 2, 4, 8):
        assert gg_mod._cuda_configs(bp) and sd_mod._cuda_configs(bp)
        gg_mod._tuned_kernel(bp)
        sd_mod._tuned_kernel(bp)


def test_split_plan():
    assert split_plan(0) == (64, 0)
    assert split_plan(1) == (64, 1)
    assert split_plan(64) == (64, 1)
    assert split_plan(65) == (64, 2)
    for k in (550, 1100, 5504, 11008, 100_000):
        rows, splits = split_plan(k)
        assert rows % 64 == 0 and splits <= 64 and (splits - 1) * rows < k <= splits * rows


@pytest.mark.skipif(interpreter_active(), reason="needs compiled (non-interpreted) kernels")
def test_kernels_compile_for_sm90():
    """Compile the kernels ahead of time for an H100 (sm_90) without a GPU: catches what the
    interpreter lets through (types, layouts, unsupported ops) and checks that nothing spills to
    local memory (cuobjdump's resource usage). Skipped where Triton has no CUDA backend."""
    def compile_(fn, sig, const, cfg=None):
        return compile_sm90(fn, sig, const, cfg.num_warps if cfg else 4, cfg.num_stages if cfg else None)

    def gg_sig(dt):
        return dict(x_ptr=f"*{dt}", w1_ptr=f"*{dt}", w2_ptr=f"*{dt}", b1_ptr=f"*{dt}", idx_ptr="*i32",
                    h_ptr="*fp32", B="i32", K="i32", N="i32", D="i32", stride_xb="i32", stride_w1n="i32",
                    stride_w2n="i32", stride_hb="i32", K_BUCKET="i32", ACTIVATION="constexpr",
                    HAS_W2="constexpr", HAS_B1="constexpr", BATCH_PAD="constexpr", BLOCK_K="constexpr",
                    BLOCK_D="constexpr")

    def sd_sig(dt):
        return dict(h_ptr="*fp32", w_ptr=f"*{dt}", idx_ptr="*i32", out_ptr="*fp32", B="i32", K="i32",
                    N="i32", D="i32", ROWS_PER_SPLIT="i32", stride_hb="i32", stride_wn="i32",
                    stride_os="i32", stride_ob="i32", K_BUCKET="i32", BATCH_PAD="constexpr",
                    BLOCK_K="constexpr", BLOCK_D="constexpr")

    kernels = []
    for act, dt, bp in (("swiglu", "fp16", 1), ("relu_fc", "bf16", 8), ("drelu", "fp32", 2)):
        cfg = gg_mod._cuda_configs(bp)[-1]
        const = dict(ACTIVATION=act, HAS_W2=act != "relu_fc", HAS_B1=act == "relu_fc", BATCH_PAD=bp,
                     **cfg.kwargs)
        kernels.append(compile_(gg_mod._gather_gemv_kernel, gg_sig(dt), const, cfg))
    for dt, bp in (("fp16", 1), ("fp32", 8)):
        cfg = sd_mod._cuda_configs(bp)[-1]
        kernels.append(compile_(sd_mod._sparse_down_kernel, sd_sig(dt), dict(BATCH_PAD=bp, **cfg.kwargs), cfg))
    kernels.append(compile_(sd_mod.sum_splits_kernel,
                            dict(part_ptr="*fp32", y_ptr="*fp32", NUMEL="i32", SPLIT="i32", BLOCK="constexpr"),
                            dict(BLOCK=1024)))
    assert_no_spills(kernels)


# --------------------------------------------------------------------------------------------------
# CUDA: the compiled kernels at LLaMA-7B FFN shape
# --------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@functools.lru_cache(maxsize=2)
def _cuda_ffn(b, dtype, d=4096, n=11008):
    """LLaMA-7B FFN-sized inputs made on the GPU (x [b, d], w1/w2/w3t [n, d], b1 [n])."""
    g = torch.Generator(device="cuda").manual_seed(b)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    return (randn(b, d), randn(n, d, scale=d ** -0.5), randn(n, d, scale=d ** -0.5),
            randn(n, d, scale=n ** -0.5), randn(n, scale=0.5))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("density", [0.1, 0.5])
@pytest.mark.parametrize("b", [1, 8])
@pytest.mark.parametrize("activation", ["swiglu", "relu_fc"])
def test_cuda_kernels_match_reference(density, b, activation):
    x, w1, w2, w3t, b1 = _cuda_ffn(b, torch.float16)
    n = w1.shape[0]
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(n, generator=g)[: int(density * n)].sort().values.int().cuda()
    kw = act_args(activation, w2, b1)
    h = gather_gemv(x, w1, idx, **kw)  # auto → torch.ops.offload.gather_gemv → Triton
    h_ref = gather_gemv_reference(x, w1, idx, **kw)
    torch.testing.assert_close(h, h_ref, atol=2e-2, rtol=2e-2)
    y = sparse_down(h_ref, w3t, idx)
    torch.testing.assert_close(y, sparse_down_reference(h_ref, w3t, idx), atol=2e-2, rtol=2e-2)
    assert torch.equal(sparse_down(h_ref, w3t, idx), y), "split-K reduction must be deterministic"


@pytest.mark.cuda
@cuda
def test_cuda_graph_capture_with_padded_idx():
    """Fixed-capacity idx padded with -1: capture once, replay with other active sets."""
    x, w1, w2, w3t, _ = _cuda_ffn(1, torch.float16)
    n, cap = w1.shape[0], 2048
    idx = torch.full((cap,), -1, dtype=torch.int32, device="cuda")

    def fill(seed, k):
        g = torch.Generator().manual_seed(seed)
        idx.fill_(-1)
        idx[:k] = torch.randperm(n, generator=g)[:k].sort().values.int().cuda()

    def hot():
        return ffn_hot_forward(x, idx, w1=w1, w2=w2, w3t=w3t)

    fill(0, 1500)
    hot()  # autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = hot()
    for seed, k in ((1, 700), (2, 2048)):
        fill(seed, k)
        graph.replay()
        torch.testing.assert_close(y, ffn_hot_forward(x, idx, w1=w1, w2=w2, w3t=w3t, backend="torch"),
                                   atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------------
# Child process: run the interpreter cases
# --------------------------------------------------------------------------------------------------
if __name__ == "__main__" and sys.argv[1:2] == ["--interpreter-worker"]:
    assert interpreter_active(), "run with TRITON_INTERPRET=1 set before triton is imported"
    torch.set_num_threads(1)
    report_interpreter_results(_MARKER, {name: run_case(name) for name in CASES})
