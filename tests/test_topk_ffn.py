"""TopKDownFFN (offload.cpu.topk_ffn): exact packed gate/up, the top-k neurons by |h|, a sparse packed down,
against the same semantics in torch (dense prompt, the oracle top-k for each decode token)."""
from __future__ import annotations

import copy

import pytest
import torch

from offload.checkpoint import open_checkpoint
from offload.cpu.decode import fuse_decode_blocks
from offload.cpu.topk_ffn import TopKDownFFN, apply_topk_down
from offload.loading import build_model
from offload.models.common import FFNModule
from offload.sparse import topk_count

from helpers import greedy_logits


class OracleTopK(FFNModule):
    """The reference: prompts dense; one token computes only its k neurons of largest |h|."""

    def __init__(self, mlp, density):
        super().__init__()
        self.mlp, self.k = mlp, topk_count(density, mlp.n)

    def forward(self, x):
        if x.numel() != x.shape[-1]:
            return self.mlp(x)
        h = self.mlp.intermediate(x)
        keep = torch.zeros_like(h).scatter_(-1, h.abs().topk(self.k, dim=-1).indices, 1.0)
        return self.mlp.down(h * keep)


@pytest.mark.parametrize("kind", ["llama", "llama_relu"])
@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_topk_down_equals_the_oracle_semantics(tiny_checkpoint, kind, weights):
    model = fuse_decode_blocks(build_model(open_checkpoint(tiny_checkpoint(kind)), weights=weights, threads=2,
                                           activations="float32", progress=False))
    ref = copy.deepcopy(model)
    for layer in ref.layers:
        layer.mlp = OracleTopK(layer.mlp, 0.4)
    swapped = apply_topk_down(model, 0.4)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(greedy_logits(model, ids, 6), greedy_logits(ref, ids, 6), rtol=1e-4, atol=1e-4)
    assert all(m.tokens == 6 and m.selected == 6 * m.k for m in swapped)


def test_topk_down_refuses_unpacked_weights(tiny_checkpoint):
    model = build_model(open_checkpoint(tiny_checkpoint("llama")), weights="float16", progress=False)
    with pytest.raises(TypeError, match="packed"):
        TopKDownFFN(model.layers[0].mlp, 0.5)
    model = build_model(open_checkpoint(tiny_checkpoint("llama")), weights="int4", progress=False)
    with pytest.raises(TypeError, match="float32"):
        TopKDownFFN(model.layers[0].mlp, 0.5)  # row quads (int8 activations) have no column-sparse kernel
