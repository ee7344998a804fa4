"""A CPU-only install (``pip install -e .``, no extras) has no Triton: every CPU path must work without it.
A child process makes ``import triton`` fail, then loads a model in each CPU weight format, generates,
and runs the all-cold hybrid (prepare on a tiny model included)."""
from __future__ import annotations

import subprocess
import sys

_SCRIPT = r"""
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, NoTriton())
import torch
from offload import OffloadedModel
from offload.checkpoint import open_checkpoint
from offload.cpu.decode import fuse_decode_blocks
from offload.formats import apply_weight_format
from offload.loading import build_model
from offload.prepare import prepare_from_tokens

path = sys.argv[1]
ckpt = open_checkpoint(path)
ids = torch.tensor([[1, 2, 3, 4]])
for weights in ("float32", "float16"):
    net = fuse_decode_blocks(apply_weight_format(build_model(ckpt, progress=False), weights, 2))
    m = OffloadedModel(net, None, ckpt, device=torch.device("cpu"))
    assert m.generate(ids, max_new_tokens=3, eos_token_id=[]).shape == (1, 7)
    g = torch.Generator().manual_seed(0)
    cal, val = torch.randint(0, 97, (1024,), generator=g), torch.randint(0, 97, (512,), generator=g)
    prep = prepare_from_tokens(m.model, cal, val, identity=ckpt.identity, window=64, tune_tokens=128,
                               profile_tokens=256, report_tokens=64, progress=False)
    m.offload(0, device=torch.device("cpu"), context=64, prepared=prep, progress=False)
    assert m.generate(ids, max_new_tokens=3, eos_token_id=[]).shape == (1, 7)
    assert m.hybrid_stats.active_cold > 0
assert "triton" not in sys.modules
print("ok")
"""


def test_cpu_paths_without_triton(tiny_checkpoint):
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, tiny_checkpoint("llama")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
