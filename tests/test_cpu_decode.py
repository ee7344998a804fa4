"""The numba one-token decode ops (offload.cpu.attention, offload.cpu.ffn_block) against the torch paths
they replace (models.common, models.ffn_kind)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from offload.cpu.attention import attend_one, attention_block, exp_f32, rms_norm_row
from offload.cpu.ffn_block import gated_ffn_block
from offload.cpu.pool import start_pool
from offload.models.common import KVCache, RMSNorm, apply_rope, cached_attention, rope_inv_freq, rope_tables
from offload.models.ffn_kind import FFNKind, activation

pytestmark = pytest.mark.usefixtures("numba_pool")


@pytest.fixture(scope="module")
def numba_pool():
    start_pool()  # the kernels below may reach a parallel region


@pytest.mark.parametrize("d", [1, 64, 577])
def test_rms_norm_row_matches_rmsnorm(d):
    g = torch.Generator().manual_seed(d)
    norm = RMSNorm(d, 1e-5)
    norm.weight.data = torch.randn(d, generator=g)
    x = torch.randn(d, generator=g) * 3
    out = np.empty(d, np.float32)
    rms_norm_row(x.numpy(), norm.weight.detach().numpy(), norm.eps, out)
    torch.testing.assert_close(torch.from_numpy(out), norm(x[None, None])[0, 0].detach(), rtol=1e-5, atol=1e-6)



def test_fused_final_norm_matches_rmsnorm():
    """The final-norm swap: one CPU token through the numba norm, within fp32 rounding of RMSNorm; prompts
    (several tokens) take RMSNorm's own path, bit for bit."""
    from offload.cpu.decode import FusedRMSNorm

    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = torch.randn(576, generator=g)
    fused = FusedRMSNorm.of(norm)
    assert fused.weight is norm.weight and list(dict(fused.named_parameters())) == ["weight"]
    x = torch.randn(1, 1, 576, generator=g) * 3
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), norm(x), rtol=1e-5, atol=1e-6)
        prompt = torch.randn(1, 5, 576, generator=g)
        assert torch.equal(fused(prompt), norm(prompt))

def test_exp_f32_matches_exp():
    """The softmax's vectorizable exp against float64 exp: relative error ≤ 1e-6 on [-87, 0]; below -87 it
    gives e^-87 (a weight nothing beside the maximum's 1 can notice)."""
    from numba import njit

    @njit
    def run(x, out):
        for i in range(x.shape[0]):
            out[i] = exp_f32(x[i])

    x = np.concatenate([np.linspace(-87, 0, 200001, dtype=np.float32), np.float32([-0.0, -1e-30, -1e-7])])
    out = np.empty_like(x)
    run(x, out)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - ref) / ref) <= 1e-6
    low = np.float32([-87.5, -100.0, -1e4])
    out = np.empty_like(low)
    run(low, out)
    assert np.all(out <= np.exp(np.float64(-87)) * (1 + 1e-6))


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h,kvh,hd,steps,threads", [(4, 2, 16, 11, 1), (9, 3, 64, 11, 1), (4, 4, 8, 11, 1),
                                                     (14, 2, 64, 11, 1), (8, 2, 16, 11, 1),
                                                     (9, 3, 64, 180, 2), (4, 2, 32, 520, 2), (14, 2, 64, 90, 2)])
def test_attend_one_matches_rope_and_cached_attention(h, kvh, hd, steps, threads, kv_dtype):
    """Decode steps at positions 0..steps-1 after a 0-token start: output and cache contents equal torch's
    apply_rope + cached_attention (SDPA) at every step. Groups of 2, 3, 4 and 7 q heads per kv head (7: the
    passes of offload.cpu.attention.HEADS_PER_PASS leave 3, 3 and 1). threads=2: from the position where
    the cache read is long enough (offload.cpu.attention.attention_parts) the kv heads split over the pool.
    An fp16 cache (uint16 bits to the kernel) holds the same rounded values as torch's fp16 cache."""
    from offload.cpu.attention import attention_parts

    itemsize = torch.tensor([], dtype=kv_dtype).element_size()
    if threads > 1:  # the split happens within the steps tested (an fp16 cache splits at twice the length)
        steps = steps * 4 // itemsize
        assert attention_parts(h, kvh, steps, hd, itemsize, threads) >= 2
    g = torch.Generator().manual_seed(h * hd)
    max_len = steps + 5
    cos_t, sin_t = rope_tables(*rope_inv_freq(hd, 10000.0, None, max_len), max_len)
    ref = KVCache.allocate(1, 1, kvh, max_len, hd, kv_dtype)
    ours = KVCache.allocate(1, 1, kvh, max_len, hd, kv_dtype)
    view = (lambda t: t.numpy().view(np.uint16)) if kv_dtype == torch.float16 else (lambda t: t.numpy())
    for pos in range(steps):
        qkv = torch.randn((h + 2 * kvh) * hd, generator=g)
        heads = qkv.view(1, 1, h + 2 * kvh, hd).transpose(1, 2)  # [1, heads, 1, hd]
        cos, sin = cos_t[pos:pos + 1], sin_t[pos:pos + 1]
        qk = apply_rope(heads[:, : h + kvh], cos, sin)
        expected = cached_attention(qk[:, :h], qk[:, h:], heads[:, h + kvh:], ref, 0, pos)
        out = np.empty(h * hd, np.float32)
        attend_one(qkv.numpy(), cos[0].numpy(), sin[0].numpy(), view(ours.k[0, 0]), view(ours.v[0, 0]),
                   pos, h, kvh, out, threads)
        # fp16: a rotated k a few fp32 ulp apart can round to neighbouring fp16 values, and move the output
        tol = 1e-5 if kv_dtype == torch.float32 else 1e-4
        torch.testing.assert_close(torch.from_numpy(out), expected.transpose(1, 2).reshape(-1), rtol=tol, atol=tol)
        k_tol = 1e-6 if kv_dtype == torch.float32 else 1e-3
        torch.testing.assert_close(ours.k, ref.k, rtol=k_tol, atol=k_tol)
        torch.testing.assert_close(ours.v, ref.v, rtol=0, atol=0)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fp16", [False, True])
def test_attention_block_matches_torch_path(bias, fp16):
    """x + o(attention(rope(qkv(rms_norm(x))))) in one call against RMSNorm, matmuls and attend_one."""
    h, kvh, hd, d, pos, max_len = 4, 2, 16, 40, 5, 8
    g = torch.Generator().manual_seed(int(bias) + 2 * int(fp16))
    nq = (h + 2 * kvh) * hd
    wqkv, wo = torch.randn(nq, d, generator=g) * 0.2, torch.randn(d, h * hd, generator=g) * 0.2
    if fp16:
        wqkv, wo = wqkv.half(), wo.half()
    bq = torch.randn(nq, generator=g) if bias else torch.zeros(0)
    bo = torch.randn(d, generator=g) if bias else torch.zeros(0)
    x, norm_w = torch.randn(d, generator=g), torch.rand(d, generator=g) + 0.5
    cos_t, sin_t = rope_tables(*rope_inv_freq(hd, 10000.0, None, max_len), max_len)
    kc = torch.randn(kvh, max_len, hd, generator=g)
    vc = torch.randn(kvh, max_len, hd, generator=g)
    # reference
    norm = RMSNorm(d, 1e-5)
    norm.weight.data = norm_w
    with torch.no_grad():
        qkv = wqkv.float() @ norm(x[None, None])[0, 0] + (bq if bias else 0)
    k_ref, v_ref = kc.clone().numpy(), vc.clone().numpy()
    a = np.empty(h * hd, np.float32)
    attend_one(qkv.numpy(), cos_t[pos].numpy(), sin_t[pos].numpy(), k_ref, v_ref, pos, h, kvh, a)
    expected = x + wo.float() @ torch.from_numpy(a) + (bo if bias else 0)
    out = np.empty(d, np.float32)
    view = (lambda w: w.numpy().view(np.uint16)) if fp16 else (lambda w: w.numpy())
    k_got, v_got = kc.clone().numpy(), vc.clone().numpy()
    attention_block(x.numpy(), norm_w.numpy(), 1e-5, view(wqkv), bq.numpy(), cos_t[pos].numpy(), sin_t[pos].numpy(),
                    k_got, v_got, pos, h, kvh, view(wo), bo.numpy(), 2, out)
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(k_got, k_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v_got, v_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [FFNKind.SWIGLU, FFNKind.RELU, FFNKind.DRELU])
@pytest.mark.parametrize("fp16", [False, True])
def test_gated_ffn_block_matches_torch(kind, fp16):
    d, n = 40, 70
    g = torch.Generator().manual_seed(kind.code + 3 * int(fp16))
    wgu, wd = torch.randn(2 * n, d, generator=g) * 0.2, torch.randn(d, n, generator=g) * 0.2
    if fp16:
        wgu, wd = wgu.half(), wd.half()
    x, norm_w = torch.randn(d, generator=g), torch.rand(d, generator=g) + 0.5
    xn = x * torch.rsqrt(x.pow(2).mean() + 1e-5) * norm_w
    gate, up = (wgu.float() @ xn).split(n)
    expected = x + wd.float() @ activation(kind, gate, up)
    view = (lambda w: w.numpy().view(np.uint16)) if fp16 else (lambda w: w.numpy())
    out = np.empty(d, np.float32)
    gated_ffn_block(x.numpy(), norm_w.numpy(), 1e-5, view(wgu), view(wd), n, kind.code, 2, out)
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4)


def test_cpu_engine_in_a_fresh_process(tiny_checkpoint):
    """A fresh process that loads a model for CPU decode and generates (no pool started by anyone else):
    compiled code reaching a parallel kernel before numba's pool existed used to crash it."""
    code = ("import sys, torch\n"
            "from offload.checkpoint import open_checkpoint\n"
            "from offload.cpu.decode import fuse_decode_blocks\n"
            "from offload.formats import apply_weight_format\n"
            "from offload.generation import SamplingConfig, generate\n"
            "from offload.loading import build_model\n"
            "m = build_model(open_checkpoint(sys.argv[1]), progress=False)\n"
            "fuse_decode_blocks(apply_weight_format(m, 'float16', 2))\n"
            "ids, _ = generate(m, torch.tensor([[1, 2, 3]]), SamplingConfig(max_new_tokens=4), max_context=64)\n"
            "print(ids.shape[1])")
    proc = subprocess.run([sys.executable, "-c", code, tiny_checkpoint("llama")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "7", (proc.returncode, proc.stderr[-2000:])


def test_fp16_kv_cache_decode(tiny_checkpoint):
    """kv_cache='float16': the cache holds fp16, the fused one-token path (numba, uint16 views) gives the
    logits of the torch path over the same fp16 cache, and both stay close to an fp32 cache. Refusals name
    the argument: an unknown dtype, a GPU device (where one is), a family without the fused path (OPT)."""
    from offload import OffloadedModel
    from offload.errors import UsageError
    from offload.models.llama import LlamaLayers

    from helpers import greedy_logits

    path = tiny_checkpoint("llama")
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    runs = {}
    for kv, fused in (("float32", True), ("float16", True), ("float16", False)):
        m = OffloadedModel.from_pretrained(path, weights="float16", threads=2, kv_cache=kv, progress=False)
        assert m.model.new_cache(1, 4).k.dtype == getattr(torch, kv)
        if not fused:
            m.model.layers = LlamaLayers(list(m.model.layers))
        runs[(kv, fused)] = greedy_logits(m.model, ids, 6)
    torch.testing.assert_close(runs[("float16", True)], runs[("float16", False)], rtol=1e-5, atol=1e-5)
    assert (runs[("float16", True)] - runs[("float32", True)]).abs().max() < 2e-2
    assert (runs[("float16", True)] - runs[("float32", True)]).abs().max() > 0  # the cache did round
    with pytest.raises(UsageError, match="kv_cache='bfloat16'"):
        OffloadedModel.from_pretrained(path, kv_cache="bfloat16", progress=False)
    if torch.cuda.is_available():  # without one, device='cuda' is refused first
        with pytest.raises(UsageError, match="kv_cache='float16' is for CPU decode"):
            OffloadedModel.from_pretrained(path, device="cuda", kv_cache="float16", progress=False)
    with pytest.raises(UsageError, match="LLaMA-family"):
        OffloadedModel.from_pretrained(tiny_checkpoint("opt"), kv_cache="float16", progress=False)
