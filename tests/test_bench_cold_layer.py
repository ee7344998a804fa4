"""benchmarks/cold_layer.py on a tiny random LLaMA with fp16 weights: the rows it times and the bytes it
counts for the dense and all-cold FFN halves."""
import importlib.util
import os

import pytest
import torch

from offload import OffloadedModel
from offload.cpu.decode import fuse_decode_blocks
from offload.formats import apply_weight_format
from offload.loading import build_model

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cold_layer.py")
_spec = importlib.util.spec_from_file_location("bench_cold_layer", _PATH)
cl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cl)


@pytest.fixture(scope="module")
def halves(tiny_prepared):
    """(dense halves, all-cold halves) of the tiny LLaMA with fp16 weights on 2 threads."""
    ckpt, prep = tiny_prepared
    nets = [fuse_decode_blocks(apply_weight_format(build_model(ckpt, progress=False), "float16", 2)) for _ in range(2)]
    m = OffloadedModel(nets[1], None, ckpt, device=torch.device("cpu"))
    m.offload(0, device=torch.device("cpu"), context=64, prepared=prep, progress=False)
    yield cl.ffn_halves(nets[0]), cl.ffn_halves(m.model)
    m.model.hybrid_worker.close()


def test_rows_and_bytes(halves):
    dense, cold = halves
    rows = cl.time_ffn_parts(dense, cold, reps=2)
    assert list(rows) == [cl.DENSE, cl.COLD, cl.SCORES, cl.TOPK, cl.GATHER]
    assert all(seconds > 0 for seconds, _ in rows.values())
    assert rows[cl.DENSE][1] == sum(h.gate_up.nbytes + h.down.nbytes for h in dense)
    d = dense[0].norm_w.shape[0]
    # one token selects exactly k neurons a layer; a neuron's bundle is its gate row, up row and down column
    assert rows[cl.GATHER][1] == sum(h.k for h in cold) * 3 * d * 2
    assert rows[cl.COLD][1] == rows[cl.SCORES][1] + rows[cl.GATHER][1]
    assert rows[cl.TOPK][1] is None


def test_refuses_halves_that_are_not_all_cold(halves):
    dense, _ = halves
    with pytest.raises(SystemExit, match="no all-cold path"):
        cl.time_ffn_parts(dense, dense, reps=1)
