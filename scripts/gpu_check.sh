#!/usr/bin/env bash
# One prepared check for a short GPU window (~15 min of device time, start-up included, on a bare
# H100/H200 machine with torch and triton): every GPU-side claim of the project, in a fixed order,
# each step under its own time limit (LIMIT_* below: 570 s in all), results written as they come.
#
#   bash scripts/gpu_check.sh              # on a CUDA machine; results in $OUT, else gpu_results/
#   bash scripts/gpu_check.sh --dry-run    # the same steps on the CPU at tiny shapes (< 3 min; a test)
#
# Steps (a failed or timed-out step is recorded and the next one runs):
#   1. environment: GPU, driver, CUDA, torch, triton, the modules the steps import     → env.txt
#   2. pytest -m cuda -x -q: compiled kernels against their references at LLaMA shapes, the hybrid
#      equal to dense on the GPU, peak max_memory_allocated <= the plan <= the budget   → pytest.log
#   3. benchmarks/kernels_gpu.py: gather-GEMV, sparse-down, int4 shadow scores at 4096 x 11008
#      and 8192 x 28672, GB/s against torch's dense GEMV and the GPU's peak           → kernels.md
#   4. a random-weight LLaMA of TinyLlama-1.1B's shape (fp16, BPE tokenizer trained on the spot),
#      then benchmarks/decode.py at 0.6 of the model's planned bytes: our hybrid vs accelerate
#      device_map="auto" vs the layer split vs the whole model on the GPU; t/s, peak memory → decode.md
#   5. benchmarks/sweep.py: t/s against the budget, and its plot                        → sweep.md, sweep.png
# After every step summary.md is rewritten (markdown for benchmarks/RESULTS.md). Nothing is installed
# and nothing is downloaded: a missing module makes the steps that need it "skipped: ... missing".
# The model and the prepared artifacts live in a temporary folder, removed at exit.
set -uo pipefail  # no -e: a failing step must not stop the others
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: bash scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/{env.txt,pytest.log,kernels.md,decode.md,sweep.md,sweep.png,summary.md}
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python
else PY=python3
fi
# Seconds per step; together under the 600 s one command may run on the device machine.
LIMIT_ENV=20 LIMIT_PYTEST=175 LIMIT_KERNELS=60 LIMIT_MODEL=45 LIMIT_DECODE=160 LIMIT_SWEEP=110
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.tsv"
THREADS=$(nproc)

# The package maps kernels/ and models/ into offload/ (pyproject.toml). Where this interpreter already
# imports offload from this checkout (an editable install: the tests) nothing more is needed; elsewhere
# (the bare device machine) a tree of links gives Python that layout without installing anything. The
# tree lies at a fixed path (build/, ignored by git): numba keys its cache by the source file's path,
# so a tree in a new temporary folder each run recompiled every kernel.
if [ "$(cd / && "$PY" -c 'import os, offload; print(os.path.dirname(os.path.dirname(os.path.abspath(offload.__file__))))' \
        2>/dev/null)" != "$ROOT" ]; then
    PKG="$ROOT/build/gpu_check_pkg"
    rm -rf "$PKG" && mkdir -p "$PKG/offload"
    ln -s "$ROOT"/offload/* "$PKG/offload/"
    ln -s "$ROOT/kernels" "$PKG/offload/kernels"
    ln -s "$ROOT/models" "$PKG/offload/models"
    export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
fi
# Per-run model artifacts (prepare's), but numba's compiled kernels in the user's usual cache (offload.cpu
# puts them under $OFFLOAD_CACHE/numba unless NUMBA_CACHE_DIR is set): with the artifacts' temporary folder
# every run recompiled every kernel (~90 s of the dry run's decode step on two cores).
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-${OFFLOAD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/offload}/numba}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OFFLOAD_CACHE="$WORK/cache"
export MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false

if [ "$DRY_RUN" = 1 ]; then
    # CPU, tiny shapes: the kernels in Triton's interpreter, the CUDA tests skip, CUDA-only engines
    # are listed as skipped with their reason by the benchmarks themselves. A GPU, if any, is hidden.
    export CUDA_VISIBLE_DEVICES=""
    SHAPE=tiny
    KERNELS_ARGS=(--dry-run)
    DECODE_ARGS=(--device cpu --pp 16 --tg 8 --reps 1)
    SWEEP_ARGS=(--device cpu --fractions 0.6,1.0 --tg 8 --reps 1)
else
    SHAPE=1b
    KERNELS_ARGS=()
    DECODE_ARGS=(--device cuda --budget-fraction 0.6 --pp 64 --tg 32 --reps 2)
    SWEEP_ARGS=(--device cuda --fractions 0.5,0.75,1.0 --tg 32 --reps 1)
fi
# Fewer prepare tokens than its defaults: the operating point of a random-weight model only sets the
# density, and 1024 + 512 tokens keep prepare under a minute for the 1b shape. Both scripts pass the
# same values, so the sweep reuses decode's artifacts.
COMMON_ARGS=(--profile-tokens 1024 --tune-tokens 512 --threads "$THREADS")
MODEL="$WORK/random-llama-$SHAPE"

summarize() {
    "$PY" scripts/gpu_check_report.py summary "$OUT" "$STEPS" $([ "$DRY_RUN" = 1 ] && echo --dry-run) \
        || echo "warning: summary.md could not be written" >&2
}

record() {  # record NUM TITLE STATUS SECONDS LOG
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$STEPS"
    echo "== step $1 ($2): $3${4:+ in $4 s}"
    summarize
}

# step NUM TITLE LIMIT_S LOG CMD...: run CMD under `timeout` (its whole process group), its output
# appended to OUT/LOG as it comes, and record how it ended.
step() {
    local num=$1 title=$2 limit=$3 log=$4 t0=$SECONDS rc status
    shift 4
    echo "== step $num ($title), limit $limit s: $*" | tee -a "$OUT/$log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124|137) status="timed out after $limit s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    record "$num" "$title" "$status" $((SECONDS - t0)) "$log"
}

# skip_unless NUM TITLE LOG MODULE...: true when every module imports; else records the step as skipped.
skip_unless() {
    local num=$1 title=$2 log=$3 missing
    shift 3
    missing=$("$PY" scripts/gpu_check_report.py missing "$@")
    [ -z "$missing" ] && return 0
    echo "skipped: $missing missing" >> "$OUT/$log"
    record "$num" "$title" "skipped: $missing missing (nothing is installed here)" "" "$log"
    return 1
}

CORE=(torch triton numpy numba safetensors transformers tokenizers)

step 1 "environment" $LIMIT_ENV env.txt "$PY" scripts/gpu_check_report.py env

if skip_unless 2 "pytest -m cuda" pytest.log "${CORE[@]}" pytest; then
    # From tests/: `python -m pytest` puts the working directory on sys.path, and the repository root
    # there would make transformers take kernels/ for Hugging Face's `kernels` package.
    # -rfEs: the reasons of failures, errors and skips in the log.
    step 2 "pytest -m cuda" $LIMIT_PYTEST pytest.log \
        bash -c "cd tests && '$PY' -m pytest -m cuda -x -q -rfEs -p no:cacheprovider"
fi

if skip_unless 3 "kernels" kernels.md torch triton numpy numba; then
    step 3 "kernels" $LIMIT_KERNELS kernels.md "$PY" benchmarks/kernels_gpu.py "${KERNELS_ARGS[@]}"
fi

if skip_unless 4a "random LLaMA ($SHAPE)" decode.md "${CORE[@]}"; then
    step 4a "random LLaMA ($SHAPE)" $LIMIT_MODEL decode.md \
        "$PY" benchmarks/random_llama.py "$MODEL" --shape "$SHAPE" --tokenizer bpe
fi
if [ ! -f "$MODEL/config.json" ]; then
    record 4b "decode" "skipped: no model (step 4a)" "" decode.md
    record 5 "budget sweep" "skipped: no model (step 4a)" "" sweep.md
    exit 0
fi
step 4b "decode" $LIMIT_DECODE decode.md \
    "$PY" benchmarks/decode.py --model "$MODEL" "${DECODE_ARGS[@]}" "${COMMON_ARGS[@]}"

step 5 "budget sweep" $LIMIT_SWEEP sweep.md "$PY" benchmarks/sweep.py --model "$MODEL" --weights float16 \
    --plot "$OUT/sweep.png" "${SWEEP_ARGS[@]}" "${COMMON_ARGS[@]}"
echo "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
