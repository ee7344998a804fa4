"""The numba one-token decode ops (offload.cpu_ops) against the torch paths they replace."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from offload.cpu_ops import attend_one, rms_norm_row
from offload.models.common import KVCache, RMSNorm, apply_rope, cached_attention, rope_inv_freq, rope_tables


@pytest.mark.parametrize("d", [1, 64, 577])
def test_rms_norm_row_matches_rmsnorm(d):
    g = torch.Generator().manual_seed(d)
    norm = RMSNorm(d, 1e-5)
    norm.weight.data = torch.randn(d, generator=g)
    x = torch.randn(d, generator=g) * 3
    out = np.empty(d, np.float32)
    rms_norm_row(x.numpy(), norm.weight.detach().numpy(), norm.eps, out)
    torch.testing.assert_close(torch.from_numpy(out), norm(x[None, None])[0, 0].detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("h,kvh,hd", [(4, 2, 16), (9, 3, 64), (4, 4, 8)])
def test_attend_one_matches_rope_and_cached_attention(h, kvh, hd):
    """Decode steps at positions 0..10 after a 0-token start: output and cache contents equal torch's
    apply_rope + cached_attention (SDPA) at every step."""
    g = torch.Generator().manual_seed(h * hd)
    steps, max_len = 11, 16
    cos_t, sin_t = rope_tables(*rope_inv_freq(hd, 10000.0, None, max_len), max_len)
    ref = KVCache.allocate(1, 1, kvh, max_len, hd, torch.float32)
    ours = KVCache.allocate(1, 1, kvh, max_len, hd, torch.float32)
    for pos in range(steps):
        qkv = torch.randn((h + 2 * kvh) * hd, generator=g)
        heads = qkv.view(1, 1, h + 2 * kvh, hd).transpose(1, 2)  # [1, heads, 1, hd]
        cos, sin = cos_t[pos:pos + 1], sin_t[pos:pos + 1]
        qk = apply_rope(heads[:, : h + kvh], cos, sin)
        expected = cached_attention(qk[:, :h], qk[:, h:], heads[:, h + kvh:], ref, 0, pos)
        out = np.empty(h * hd, np.float32)
        attend_one(qkv.numpy(), cos[0].numpy(), sin[0].numpy(), ours.k[0, 0].numpy(), ours.v[0, 0].numpy(),
                   pos, h, kvh, out)
        torch.testing.assert_close(torch.from_numpy(out), expected.transpose(1, 2).reshape(-1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.k, ref.k, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.v, ref.v, rtol=0, atol=0)
