"""benchmarks/kv_cache.py on a tiny random LLaMA: the decode rates it collects per cache dtype and prompt,
and the K/V bytes it counts."""
import importlib.util
import os

import torch

from offload import OffloadedModel

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "kv_cache.py")
_spec = importlib.util.spec_from_file_location("bench_kv_cache", _PATH)
kvb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kvb)


def test_decode_rates_and_kv_bytes(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    models = {kv: OffloadedModel.from_pretrained(path, weights="float16", threads=2, kv_cache=kv, progress=False)
              for kv in ("float32", "float16")}
    prompts = [torch.arange(1, 1 + n).view(1, -1) for n in (5, 9)]
    rates = kvb.decode_rates(models, prompts, new_tokens=4, reps=2)
    assert sorted(rates) == [(kv, n) for kv in ("float16", "float32") for n in (5, 9)]
    assert all(len(v) == 2 and min(v) > 0 for v in rates.values())
    c = models["float32"].config
    assert kvb.kv_bytes_per_token(models["float32"], 10.0, 2) == 2 * c.num_hidden_layers * c.num_key_value_heads \
        * c.head_dim * 10 * 2
