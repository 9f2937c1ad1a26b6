#!/usr/bin/env bash
# One device call on a 1-GPU machine: build the extension in place, run the whole test suite (GPU
# tests included), then the single-GPU kernel benchmark, and print a short summary last.
#
#   bash scripts/gpu_suite.sh [extra bench_kernels.py arguments, e.g. --quick]
#
# Expects .carry/nvidia_cutlass-*.whl (the device has no internet). Logs and results go to $OUT
# (the device tool's folder; /tmp/ring_attn_suite elsewhere): at most 8 files, flat, as the tool
# returns no more. The benchmark runs even when tests fail, so one call gives both; the exit code is
# non-zero if any stage failed. Each stage has its own time limit inside SUITE_BUDGET_S (default 570 s,
# under the tool's 600 s per command), so a hang cannot eat the whole call.
#
# Environment (defaults): RING_ATTN_CUDA_ARCHS=90a, RING_ATTN_HEAD_DIMS=64,128 and
# RING_ATTN_DTYPES=fp16,bf16 (what the benchmark needs; the full set takes longer than one call),
# MAX_JOBS=16, SUITE_BUDGET_S=570.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=scripts/suite_lib.sh
source scripts/suite_lib.sh

export RING_ATTN_HEAD_DIMS="${RING_ATTN_HEAD_DIMS:-64,128}"
export RING_ATTN_DTYPES="${RING_ATTN_DTYPES:-fp16,bf16}"

suite_header
install_cutlass_wheel
if build_stage 360 150; then
    run_stage tests "$(stage_limit 180 100)" "$OUT/tests.log" python3 -m pytest -q -rs tests
    stamp="$(mktemp)"
    run_stage bench_kernels "$(stage_limit 600 15)" "$OUT/bench_kernels.log" \
        python3 benchmarks/bench_kernels.py "$@"
    copy_new_results "$stamp" 'kernels_*.json'
else
    # Without the extension the CPU tests still say something; the benchmark cannot run.
    run_stage tests "$(stage_limit 180 10)" "$OUT/tests.log" python3 -m pytest -q -rs tests
    skip_stage bench_kernels "the extension did not build"
fi
suite_summary
