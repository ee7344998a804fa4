"""The hybrid runtime on a real GPU: compiled Triton kernels on the hot side, equality with the dense
model for a ReLU model (oracle selector), peak device memory within the placement's budget, and
OffloadedModel.offload (shadow predictors, fp32 or fp16 cold rows) on CUDA. Skipped without CUDA."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from offload.checkpoint import open_checkpoint
from offload.hybrid import apply_placement
from offload.loading import build_model
from offload.select import CallableSelector

from helpers import greedy_logits, rand_ids  # tiny_prepared (the tiny model, prepared): conftest

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _greedy(model, ids, steps, device):
    return greedy_logits(model, ids, steps)


@pytest.mark.parametrize("kind", ["llama_relu", "opt"])
def test_relu_model_on_gpu_equals_dense(tiny_checkpoint, kind):
    dense = build_model(open_checkpoint(tiny_checkpoint(kind)), progress=False)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    expected = _greedy(dense, ids, 6, "cpu")
    n = dense.config.intermediate_size
    rng = np.random.default_rng(0)
    hot = [np.sort(rng.choice(n, size=n // 2, replace=False)) for _ in dense.layers]
    oracles = [copy.deepcopy(layer.mlp).cuda() for layer in dense.layers]
    selectors = [CallableSelector(lambda x, m=m: torch.nonzero((m.intermediate(x) != 0).any(0)).flatten(), n)
                 for m in oracles]
    model = copy.deepcopy(dense)
    apply_placement(model, hot, selectors, device="cuda", hot_dtype=torch.float32)
    got = _greedy(model, ids, 6, "cuda")
    assert (got - expected).abs().max().item() <= 1e-4  # TF32 off by default for these kernels; fp32 accumulate
    model.hybrid_worker.close()


@pytest.mark.parametrize("hot_format", [None, "int4"])
@pytest.mark.parametrize("batch", [1, 3])
def test_swiglu_gpu_step_equals_cpu_hybrid(tiny_checkpoint, batch, hot_format):
    """The GPU step (−1-padded ids on the device, hot kernels queued first, one copy each way) against
    the same placement and selection with the "device" on the CPU, for one token and for a batch; with
    packed 4-bit hot rows too (the Triton q4 kernels against their torch references)."""
    dense = build_model(open_checkpoint(tiny_checkpoint("llama")), progress=False)
    n = dense.config.intermediate_size
    rng = np.random.default_rng(1)
    hot = [np.sort(rng.choice(n, size=n // 3, replace=False)) for _ in dense.layers]
    ids = torch.randint(0, 97, (batch, 8), generator=torch.Generator().manual_seed(2))
    runs = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(dense)
        mlps = [copy.deepcopy(layer.mlp).to(device) for layer in dense.layers]
        sel = [CallableSelector(lambda x, m=m: m.intermediate(x).abs().topk(n // 2, dim=-1).indices.flatten(), n)
               for m in mlps]
        stats = apply_placement(model, hot, sel, device=device, hot_dtype=torch.float32, hot_format=hot_format)
        if hot_format:
            assert model.layers[0].mlp.hot_rows.codes.device.type == device
        runs[device] = (greedy_logits(model, ids, 5), stats.active_hot, stats.active_cold)
        model.hybrid_worker.close()
    torch.testing.assert_close(runs["cuda"][0], runs["cpu"][0], rtol=1e-4, atol=1e-4)
    assert runs["cuda"][1:] == runs["cpu"][1:]


def test_device_shadow_selector_on_gpu_matches_the_predictor(tiny_checkpoint):
    from offload.predict.shadow import ShadowPredictor
    from offload.select import DeviceSelector

    dense = build_model(open_checkpoint(tiny_checkpoint("llama")), progress=False)
    pred = ShadowPredictor.from_ffn(dense.layers[0].mlp, density=0.5)
    select = DeviceSelector(copy.deepcopy(pred), None, torch.device("cuda"))
    for b in (1, 3):
        x = torch.randn(b, 64, generator=torch.Generator().manual_seed(b))
        got = select.device_ids(x.cuda()).cpu()
        assert torch.equal(torch.sort(got[got >= 0]).values, pred.mask(x).any(0).nonzero().flatten())


def test_peak_memory_within_budget(tiny_checkpoint):
    from offload.place.report import plan_and_place

    ckpt = open_checkpoint(tiny_checkpoint("llama_relu"))
    dense = build_model(ckpt, progress=False)
    torch.cuda.reset_peak_memory_stats()
    freqs = [np.linspace(1, 0.01, dense.config.intermediate_size)] * len(dense.layers)
    budget = 400 * 2**20  # the 300 MiB CUDA context reserve + the tiny model + some hot rows
    _, placement, _ = plan_and_place(ckpt.config, budget=budget, frequencies=freqs, context=64, dtype="float32",
                                     device="cuda", shapes=ckpt.shapes)
    apply_placement(dense, placement.hot, None, device="cuda", hot_dtype=torch.float32)
    _greedy(dense, torch.tensor([[1, 2, 3]]), 4, "cuda")
    assert torch.cuda.max_memory_allocated() <= placement.total_bytes <= budget
    dense.hybrid_worker.close()


def test_fp16_hybrid_peak_memory_within_the_plan(tiny_checkpoint):
    """An fp32 dense model offloaded with fp16 hot rows: the non-FFN part moves in fp16 too, as the plan
    counts it, and what torch allocates stays within the plan minus its CUDA-context reserve."""
    from offload.place.report import plan_and_place

    ckpt = open_checkpoint(tiny_checkpoint("llama"))
    dense = build_model(ckpt, progress=False)
    freqs = [np.linspace(1, 0.01, dense.config.intermediate_size)] * len(dense.layers)
    plan, placement, _ = plan_and_place(ckpt.config, budget=300 * 2**20 + 150_000, frequencies=freqs, context=64,
                                        dtype="float16", device="cuda", shapes=ckpt.shapes)
    assert 0 < sum(placement.hot_counts) < sum(plan.neurons)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    apply_placement(dense, placement.hot, None, device="cuda", hot_dtype=torch.float16)
    assert {p.dtype for p in dense.parameters()} == {torch.float16} and dense.dtype == torch.float16
    _greedy(dense, torch.tensor([[1, 2, 3]]), 4, "cuda")
    used = torch.cuda.max_memory_allocated() - base
    # The caching allocator rounds each of the ~40 small tensors up to 512 bytes and the forward keeps a
    # few activations alive: allow 64 KiB on ~150 KB. An fp32 non-FFN part (the bug this guards) is ~2x.
    planned = placement.total_bytes - plan.device_bytes["context_reserve"]
    assert used <= planned + 64 * 1024, (used, planned)
    dense.hybrid_worker.close()


@pytest.mark.parametrize("weights", ["float32", "float16"])
def test_offloaded_model_on_gpu_within_budget(tiny_prepared, weights):
    """The user's path, OffloadedModel.offload on CUDA: int4 shadow scores and hot rows through the compiled
    kernels, cold rows on the CPU (fp32, or fp16 as from_pretrained(weights="float16") stores them).
    Both sides compute, and the peak allocated memory stays within the plan, the plan within the budget."""
    from offload import OffloadedModel
    from offload.formats import store_ffn_weights_fp16

    ckpt, prep = tiny_prepared
    net = build_model(ckpt, progress=False)
    if weights == "float16":
        store_ffn_weights_fp16(net)
    m = OffloadedModel(net, None, ckpt, device=torch.device("cpu"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    budget = 300 * 2**20 + 140_000  # the CUDA context reserve, the ~108 KB fp16 non-FFN part, ~half the rows
    m.offload(budget, device=torch.device("cuda"), context=64, prepared=prep, progress=False)
    assert 0 < m.placement.share < 1 and m.placement.total_bytes <= budget
    out = m.generate(rand_ids(6, 9)[None], max_new_tokens=5, eos_token_id=[])
    assert out.shape == (1, 11)
    s = m.hybrid_stats
    assert s.active_hot > 0 and s.active_cold > 0
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= m.placement.total_bytes <= budget
    m.model.hybrid_worker.close()
