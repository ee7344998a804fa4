"""OffloadedModel.offload: prepared artifacts → placement under the budget → hybrid FFNs → generate."""
from __future__ import annotations

import pytest
import torch

from offload import OffloadedModel
from offload.errors import BudgetError
from offload.loading import build_model

from helpers import rand_ids  # the tiny_prepared fixture (conftest) is built from these ids


def test_offload_places_within_budget_and_generates(tiny_prepared):
    ckpt, prep = tiny_prepared
    m = OffloadedModel(build_model(ckpt, progress=False), None, ckpt, device=torch.device("cpu"))
    # The non-FFN part needs ~200 KB (context 64); 260 KB leaves room for ~40 % of the FFN rows.
    m.offload(260_000, device=torch.device("cpu"), context=64, prepared=prep, progress=False)
    p = m.placement
    assert p.total_bytes <= 260_000 and 0 < p.share < 1
    ids = rand_ids(6, 9)[None]
    out = m.generate(ids, max_new_tokens=5, eos_token_id=[])
    assert out.shape == (1, 11)
    s = m.hybrid_stats
    assert s.decode_calls == 4 * 2 and s.prefill_calls == 2 and s.active_hot > 0 and s.active_cold > 0 and 0 < s.gpu_share < 1
    m.model.hybrid_worker.close()


def test_quantized_model_places_packed_hot_rows(tiny_prepared):
    """FFN weights stored int4 on the CPU: offload() packs the hot rows (offload.packed_hot), the plan counts
    the packed bytes (so the budget holds several times the neurons of fp32 rows) and they equal the built
    tensors' bytes."""
    ckpt, prep = tiny_prepared
    BUDGET = 215_000  # ~15 KB past the fixed part: ~20 fp32 neurons
    dense = OffloadedModel(build_model(ckpt, progress=False), None, ckpt, device=torch.device("cpu"))
    dense.offload(BUDGET, device=torch.device("cpu"), context=64, prepared=prep, progress=False)
    m = OffloadedModel(build_model(ckpt, progress=False, weights="int4", activations="float32"), None, ckpt,
                       device=torch.device("cpu"))
    m.offload(BUDGET, device=torch.device("cpu"), context=64, prepared=prep, progress=False)
    p = m.placement
    assert p.total_bytes <= BUDGET and 192 > sum(p.hot_counts) >= 3 * sum(dense.placement.hot_counts) > 0
    mlps = [layer.mlp for layer in m.model.layers]
    assert all(mlp.hot_format == "int4" for mlp in mlps)
    assert sum(mlp.hot_nbytes for mlp in mlps) == sum(p.layer_hot_bytes)
    m.generate(rand_ids(6, 9)[None], max_new_tokens=4, eos_token_id=[])
    assert m.hybrid_stats.active_hot > 0
    for model in (dense, m):
        model.model.hybrid_worker.close()


def test_zero_budget_on_the_cpu_leaves_every_neuron_cold(tiny_prepared):
    ckpt, prep = tiny_prepared
    m = OffloadedModel(build_model(ckpt, progress=False), None, ckpt, device=torch.device("cpu"))
    m.offload(0, device=torch.device("cpu"), context=64, prepared=prep, progress=False)
    assert sum(m.placement.hot_counts) == 0
    m.generate(rand_ids(6, 9)[None], max_new_tokens=4, eos_token_id=[])
    s = m.hybrid_stats
    assert s.active_hot == 0 and s.active_cold > 0 and s.decode_calls == 3 * 2
    m.model.hybrid_worker.close()
    with pytest.raises(BudgetError, match="only for device='cpu'"):
        OffloadedModel(build_model(ckpt, progress=False), None, ckpt, device=torch.device("cpu")).offload(
            0, device=torch.device("cuda"), context=64, prepared=prep, progress=False)


def test_all_cold_cpu_decode_through_block_calls(tiny_prepared):
    """A fused CPU model offloaded with every neuron cold decodes each block of a token in one numba call
    over prepared arguments (offload.cpu.step): the same logits and the same hybrid statistics as the
    torch-module path (LlamaLayers, HybridFFN.residual)."""
    from offload.cpu.decode import FusedLlamaLayers, FusedRMSNorm, fuse_decode_blocks
    from offload.formats import apply_weight_format
    from offload.models.llama import LlamaLayers

    from helpers import greedy_logits

    ckpt, prep = tiny_prepared
    runs = {}
    for one_call in (True, False):
        net = fuse_decode_blocks(apply_weight_format(build_model(ckpt, progress=False), "float16", 2))
        m = OffloadedModel(net, None, ckpt, device=torch.device("cpu"))
        m.offload(0, device=torch.device("cpu"), context=64, prepared=prep, progress=False)
        assert all(layer.mlp.step_half(layer.ffn_norm) is not None for layer in m.model.layers)
        if not one_call:
            m.model.layers = LlamaLayers(list(m.model.layers))
        assert isinstance(m.model.layers, FusedLlamaLayers) == one_call and isinstance(m.model.norm, FusedRMSNorm)
        runs[one_call] = (greedy_logits(m.model, rand_ids(6, 9)[None], 4), m.hybrid_stats)
        m.model.hybrid_worker.close()
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-5)
    fields = ("decode_calls", "active_cold", "bytes_cold", "active_hot")
    assert [getattr(runs[True][1], f) for f in fields] == [getattr(runs[False][1], f) for f in fields]
    assert runs[True][1].decode_calls > 0 and runs[True][1].active_cold > 0


def test_offload_budget_below_fixed_part_is_refused(tiny_prepared):
    ckpt, prep = tiny_prepared
    m = OffloadedModel(build_model(ckpt, progress=False), None, ckpt, device=torch.device("cpu"))
    with pytest.raises(BudgetError, match="too small"):
        m.offload(10_000, device=torch.device("cpu"), context=64, prepared=prep, progress=False)


def test_device_selector_matches_the_predictor(tiny_prepared):
    """The GPU-side selector (scoring op + top-k, −1-padded ids), run here through the op's CPU reference,
    picks the same neurons as the predictor's own mask, for one token and for a batch."""
    from offload.select import DeviceSelector

    _, prep = tiny_prepared
    pred = prep.predictors[0]
    select = DeviceSelector(pred, prep.predictors.selector(0), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for b in (1, 3):
        x = torch.randn(b, 64, generator=g)
        ids = select.device_ids(x)
        expected = pred.mask(x).any(0).nonzero().flatten()
        assert torch.equal(torch.sort(ids[ids >= 0]).values, expected)


def test_offload_twice_is_refused(tiny_prepared):
    ckpt, prep = tiny_prepared
    m = OffloadedModel(build_model(ckpt, progress=False), None, ckpt, device=torch.device("cpu"))
    m.offload(0, device=torch.device("cpu"), context=64, prepared=prep, progress=False)
    with pytest.raises(BudgetError, match="already placed"):
        m.offload(0, device=torch.device("cpu"), context=64, prepared=prep, progress=False)
    m.model.hybrid_worker.close()
