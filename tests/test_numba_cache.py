"""numba's on-disk cache shared by processes: kernels a factory makes per mode (offload.cpu.packed_gemv,
offload.cpu.intdot) must not be confused with each other when a later process loads several of them.

numba names a compiled function's symbol by its qualified name, argument types and a counter that restarts
in every process; the per-mode kernels take the same argument types, so without a name of their own
(offload.cpu.own_name) two processes that compile two modes in the same order give them the same symbol,
and a third process that loads both from the cache runs one mode's kernel for the other's matrices (the
Qwen slow test once saw decode logits off by 29.7 that way: its suite's cache held the Q5_0 and Q8_0
parallel kernels under one symbol). Without the names, the test below fails on every run: in the
third process the second type's product is off by ~0.4 to ~40 times its scale, or crashes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# One-token products through offload.cpu.matvec (compiled callers that link the per-mode kernels), as
# decode runs them: "int8" (row quads, the serial kernel) or "float32" on two threads (column planes, the
# parallel kernel). Prints each type's error relative to its reference.
CHILD = r"""
import json, sys
import numpy as np
from gguf import GGMLQuantizationType as QT
from offload.cpu import intdot
from offload.cpu.matvec import matvec_into
from offload.formats import packed as pk, quads as qd
from offload.formats.gguf_blocks import random_rows
from offload.formats.quantized import packed_operand

R, C = 512, 1024  # the float32 path splits over 2 threads from 256 KB of planes
out = {}
for name in sys.argv[1].split(","):
    qt = QT[name]
    blocks = random_rows(qt, R, C, np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal(C).astype(np.float32)
    y = np.empty(R, np.float32)
    if sys.argv[2] == "int8":
        Q = qd.quads_from_gguf(blocks, qt, C)
        matvec_into(intdot.quad_operand(Q), x, y, 1)
        ref, scale = intdot.reference(Q, x)
        out[name] = float(np.abs(y - ref).max() / scale.max())
    else:
        P = pk.pack_gguf(blocks, qt, C, tile=64)
        matvec_into(packed_operand(P), x, y, 2)
        ref = pk.dequantize(P).astype(np.float64) @ x
        out[name] = float(np.abs(y - ref).max() / np.abs(ref).max())
print(json.dumps(out))
"""


def run_child(script, kinds: str, activations: str, cache) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    proc = subprocess.run([sys.executable, str(script), kinds, activations], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# float32 (the parallel column-plane kernels, where the bug was first seen) compiles for ~75 s in two fresh
# caches on a 2-core Zen 3: slow. int8 runs the same three-process check on intdot's factory in ~30 s, and
# test_factory_kernels_have_names_of_their_own checks both factories' names without compiling.
@pytest.mark.parametrize("activations", ["int8", pytest.param("float32", marks=pytest.mark.slow)])
def test_kernels_of_two_processes_stay_apart(tmp_path, activations):
    """Process 1 compiles the Q4_0 kernels, process 2 the Q8_0 ones (the same steps: the same counter
    values), both into a fresh cache; process 3 loads both. Each must still compute its own type."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    cache = tmp_path / "numba"
    for kinds in ("Q4_0", "Q8_0", "Q4_0,Q8_0"):
        errs = run_child(script, kinds, activations, cache)
        assert all(e < 1e-5 for e in errs.values()), (kinds, errs)


def test_factory_kernels_have_names_of_their_own():
    """Every per-mode kernel a factory makes is named apart (cheap: no compile)."""
    from offload.cpu import intdot, packed_gemv

    kernels = [k for pair in packed_gemv.KERNELS.values() for k in pair]
    for bits, group, flags in intdot.QUAD_OPERANDS:
        for tmax in (1, 4):
            kernels += intdot.kernels(bits, group, flags, tmax)
    names = [f"{k.py_func.__module__}.{k.py_func.__qualname__}" for k in kernels]
    assert len(set(names)) == len(names)


def test_old_version_folders_are_pruned(tmp_path):
    """Each source version compiles into a folder of its own; the one in use is touched, siblings unused for
    30 days go, recent ones (another install's) and folders that are not versions stay."""
    import time

    from offload.cache import prune_versions

    month = time.time() - 31 * 86400
    for name in ("0123456789abcdef", "fedcba9876543210", "00000000000000aa", "not-a-version"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "kernel.nbi").write_bytes(b"x")
    for name in ("0123456789abcdef", "fedcba9876543210", "not-a-version"):
        os.utime(tmp_path / name, (month, month))
    removed = prune_versions(str(tmp_path), "0123456789abcdef")
    assert removed == [str(tmp_path / "fedcba9876543210")]
    assert sorted(os.listdir(tmp_path)) == ["00000000000000aa", "0123456789abcdef", "not-a-version"]
    assert os.stat(tmp_path / "0123456789abcdef").st_mtime > time.time() - 60  # the current one: touched
    assert prune_versions(str(tmp_path / "missing" / "deeper"), "0123456789abcdef") == []  # made, nothing to prune
    assert (tmp_path / "missing" / "deeper" / "0123456789abcdef").is_dir()


def test_importing_the_backend_uses_and_prunes_its_version_folder(tmp_path):
    """A fresh process with NUMBA_CACHE_DIR set: numba's cache goes to a version folder under it, and a
    month-old sibling is gone after the import."""
    import time

    old = tmp_path / "ffffffffffffffff"
    old.mkdir()
    month = time.time() - 31 * 86400
    os.utime(old, (month, month))
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", "import offload.cpu; from numba.core import config; "
                          "print(config.CACHE_DIR)"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    folder = out.stdout.strip()
    assert os.path.dirname(folder) == str(tmp_path) and os.path.isdir(folder)
    assert not old.exists()
