#!/usr/bin/env bash
# The GPU check: one run, about 8 minutes on an H100/H200.
#
#   * the full-size bf16 train step at batch 8, row-major state vs state_layout=auto, with the kernel table
#     (--profile), the kernels / memory-bound GiB proxy of each case and the optimized HLO (gzipped);
#   * the GPU-only tests (cuDNN attention and its head-dim-160 fallback).
#
# It needs jax with CUDA, flax, optax, orbax, torch, diffusers and ml_collections (requirements.txt). On a GPU
# machine without package access, put the last two as wheels in .whl/ and they are installed from there:
#   pip download --no-deps -d .whl diffusers==0.39.0 ml-collections==1.1.0
# Run:
#   OUT=results/ bash benchmarks/gpu_check.sh
# Everything lands in $OUT (8 files). A smoke run on any machine:
#   OUT=/tmp/gpu_check PY=.venv/bin/python BENCH="--model tiny --size 64 --batch 2 --steps 2" TESTS=0 \
#       bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
PY=${PY:-python3}
BENCH=${BENCH:-"--batch 8 --model_flops 31546146816000"}  # XLA's FLOPs of the bf16 step at batch 8 without remat
TESTS=${TESTS:-1}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
mkdir -p "$OUT/logs"

if ! "$PY" -c "import diffusers, ml_collections" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "error: diffusers or ml_collections missing and no wheels in .whl/ (see the header of $0)" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-deps --no-index --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi

{
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax',
optax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/machine.txt"

# shellcheck disable=SC2086  # BENCH is a list of flags
"$PY" benchmarks/bench_train_step.py $BENCH --profile --logdir "$OUT/logs" \
    --cases jax:bf16,jax:bf16:autolayout --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
gzip -f "$OUT"/logs/*.hlo.txt 2>/dev/null

if [ "$TESTS" = 1 ]; then
    "$PY" -m pytest -q -p no:cacheprovider tests/test_backbone.py tests/test_layers.py -k "gpu or attention or norm or bf16" \
        2>&1 | tail -15 | tee "$OUT/tests.txt"
fi
ls -la "$OUT" "$OUT/logs"
