"""offload.cpu.cold_step.shadow_topk_cold (the all-cold decode step in one call: norm, int4 scores, top-k,
gather, residual) against the separate path it fuses: Int4Shadow.scores → topk_indices → the float64
reference FFN over those neurons."""
import numpy as np
import pytest
import torch

from offload.cpu.attention import rms_norm_row
from offload.cpu.cold_step import shadow_topk_cold
from offload.cpu.pool import start_pool
from offload.cpu.shadow import Int4Shadow
from offload.cpu.topk import topk_indices
from offload.models.ffn_kind import FFNKind, reference_ffn
from offload.predict.quant import quantize_int4


def layer(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    gate, up = torch.randn(n, d, generator=g) / d ** 0.5, torch.randn(n, d, generator=g) / d ** 0.5
    down = torch.randn(d, n, generator=g) / n ** 0.5
    return gate, up, down


@pytest.mark.parametrize("threads", [1, 2, 3, 5])  # 3 and 5: more parts than the pool's 2 threads
@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("norm", [False, True])
def test_all_cold_step_equals_the_separate_path(threads, fp16, norm):
    """Same neurons and output as the separate path, with the norm before and the residual after when a
    norm is given; any number of parts (per-thread outputs), also more than the pool's threads."""
    start_pool(2)
    n, d, density = 203, 96, 0.45
    gate, up, down = layer(n, d, seed=threads)
    shadow = Int4Shadow(*quantize_int4(gate), *quantize_int4(up), d=d, threads=2, pool="numba")
    dtype = np.float16 if fp16 else np.float32
    bundle = np.ascontiguousarray(np.stack([gate.numpy(), up.numpy(), down.T.numpy()], 1).astype(dtype))
    W = bundle.view(np.uint16) if fp16 else bundle
    k = round(density * n)
    norm_w = (1 + 0.1 * torch.randn(d, generator=torch.Generator().manual_seed(7))).numpy() if norm \
        else np.zeros(0, np.float32)
    parts = np.full((threads, 1, d), 5.0, np.float32)  # stale values: the kernel zeroes them
    scratch = np.empty((threads, 5, 1), np.float32)
    for seed in range(3):
        x = (torch.randn(1, d, generator=torch.Generator().manual_seed(seed)) * 2).numpy()
        xn = x.copy()
        if norm:
            rms_norm_row(x[0], norm_w, 1e-5, xn[0])
        idx = topk_indices(shadow.scores(xn), k)
        w = torch.from_numpy(bundle.astype(np.float64))
        want = reference_ffn(FFNKind.SWIGLU.value, torch.from_numpy(xn).double(), w[:, 0], w[:, 1], w[:, 2].T,
                             torch.from_numpy(idx), None).float().numpy()[0]
        if norm:
            want = want + x[0]
        out, count, bad = shadow_topk_cold(x, norm_w, 1e-5, shadow.W, shadow.B, shadow.code, n, k, W, 1,
                                           FFNKind.SWIGLU.code, np.zeros(0, np.float32), parts, scratch)
        assert (count, bad) == (k, 0)
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
