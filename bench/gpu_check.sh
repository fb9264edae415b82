#!/usr/bin/env bash
# The first-GPU check in one command (issue 17): the CUDA test suite
# (tests/cuda, Triton kernels compiled for the GPU, no interpreter), then
# `fastformers bench --device cuda` (every op against its GPU peers, TFLOP/s
# beside every time, the whole models against labml_nn), with the environment
# (GPU, driver, torch, triton) recorded; everything in one JSON whose path is
# printed at the end. Budget: under 8 minutes on one H100 (each half has its
# own time limit, and keeps what it measured if cut short).
#
#   bench/gpu_check.sh [--dry-run] [--out DIR]
#
# --dry-run: the same code on CPU through the Triton interpreter at tiny
# shapes (the tests marked `dry`, the benchmark's dry-run cases): proves the
# check runs, measures nothing. CI runs it (tests/test_gpu_check_dry_run.py).
set -uo pipefail

dry_run=0
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) out="$2"; shift ;;
        *) echo "usage: bench/gpu_check.sh [--dry-run] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")/.."
python=${PYTHON:-python}
out=${out:-$(mktemp -d "${TMPDIR:-/tmp}/fastformers-gpu-check.XXXXXX")}
mkdir -p "$out"

if [ "$dry_run" = 1 ]; then
    export FASTFORMERS_GPU_CHECK_DRY_RUN=1 TRITON_INTERPRET=1
    suite_args=(-m dry)
    bench_args=(--dry-run --min-time 0 --threads 1)
    suite_limit=240
    bench_limit=240
else
    # The suite must compile its kernels for the GPU: no interpreter.
    unset TRITON_INTERPRET FASTFORMERS_GPU_CHECK_DRY_RUN
    suite_args=()
    bench_args=(--dtype bfloat16 --min-time 0.2)
    suite_limit=300
    bench_limit=170
fi

echo "== CUDA suite (limit ${suite_limit}s)"
timeout -s INT -k 15 "$suite_limit" "$python" -m pytest tests/cuda -q -rfE -p no:cacheprovider \
    --junitxml="$out/cuda_suite.xml" "${suite_args[@]}"
suite_exit=$?

echo "== GPU benchmark (limit ${bench_limit}s)"
timeout -s INT -k 15 "$bench_limit" "$python" -m fastformers.cli bench --device cuda --json "$out/bench.json" \
    "${bench_args[@]}"
bench_exit=$?

echo "== report"
"$python" -m fastformers.benchmarks.gpu report "$out/gpu_check.json" "$out/cuda_suite.xml" "$out/bench.json" \
    "$suite_exit" "$bench_exit"
echo "gpu_check JSON: $out/gpu_check.json"
[ "$suite_exit" = 0 ] && [ "$bench_exit" = 0 ]
