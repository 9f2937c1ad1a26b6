#!/usr/bin/env bash
# One device call on a machine of several GPUs (nvidia-h200-x2): build the extension in place, run
# the multi-GPU tests (the NCCL ring, Ulysses and packed sequences over NCCL, the stuck-peer
# watchdog, the transformers adapter over NCCL) and the main job
# (python3 -m ring_attn_ext), then the ring benchmark with ring-flash-attn side by side (torchrun,
# one process per GPU) and its plot, then GPU timelines of the two configurations furthest from a
# perfect ring (benchmarks/trace_ring.py); summary last.
#
#   bash scripts/ring_gpu_suite.sh [extra bench_ring.py arguments, e.g. --quick or --configs all]
#
# Expects .carry/nvidia_cutlass-*.whl and, for ring-flash-attn, a copy of shared/peers in
# .carry/peers (shared/ does not travel to the device): e.g. `cp -r ../shared/peers .carry/peers &&
# chmod -R u+w .carry/peers`. Without it only our rows are measured. Results and logs go to $OUT
# (flat, at most 8 files). Later stages run even when earlier ones fail, except that nothing runs
# without a working build; the exit code is non-zero if any stage failed. Every stage has its own
# time limit inside SUITE_BUDGET_S (default 570 s).
#
# Environment (defaults): RING_ATTN_CUDA_ARCHS=90a, RING_ATTN_HEAD_DIMS=128, RING_ATTN_DTYPES=bf16
# (what the ring benchmark needs), MAX_JOBS=16, NPROC=every GPU, SUITE_BUDGET_S=570.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
# shellcheck source=scripts/suite_lib.sh
source scripts/suite_lib.sh

export RING_ATTN_HEAD_DIMS="${RING_ATTN_HEAD_DIMS:-128}"
export RING_ATTN_DTYPES="${RING_ATTN_DTYPES:-bf16}"
NPROC="${NPROC:-$(nvidia-smi --list-gpus | wc -l)}"

suite_header
nvidia-smi topo -m
if [ ! -f .carry/peers/peers.py ] && [ -z "${PEERS_DIR:-}" ]; then
    echo "warning: no .carry/peers/peers.py and no PEERS_DIR: ring-flash-attn will not be measured"
fi
install_cutlass_wheel
if build_stage 330 200; then
    run_stage tests_ring "$(stage_limit 210 150)" "$OUT/tests_ring.log" python3 -m pytest -q -rs tests/test_ring_gpu.py \
        tests/test_ring_timeout.py tests/test_hf_attention_gpu.py
    run_stage main_job "$(stage_limit 90 120)" "$OUT/main_job.log" python3 -m ring_attn_ext
    stamp="$(mktemp)"
    run_stage bench_ring "$(stage_limit 600 150)" "$OUT/bench_ring.log" \
        python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" benchmarks/bench_ring.py "$@"
    copy_new_results "$stamp" "ring_*_w${NPROC}.json"
    # Plots every ring_*_w*.json in benchmarks/results (earlier runs included); its log joins the bench's.
    run_stage plot "$(stage_limit 60 120)" "$OUT/bench_ring.log" python3 benchmarks/plot_ring.py \
        && cp benchmarks/results/ring_efficiency.png "$OUT/"
    # Where the time goes (log joins the bench's, to stay within $OUT's eight files).
    stamp="$(mktemp)"
    run_stage trace_causal "$(stage_limit 60 60)" "$OUT/bench_ring.log" \
        python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" benchmarks/trace_ring.py \
        --config s8k_h32_kv32_causal --layout zigzag --mode fwd_bwd
    run_stage trace_full "$(stage_limit 60 0)" "$OUT/bench_ring.log" \
        python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" benchmarks/trace_ring.py \
        --config s8k_h32_kv32_full --layout ring --mode fwd_bwd
    copy_new_results "$stamp" "trace_ring_*.json"
else
    skip_stage tests_ring "the extension did not build"
    skip_stage main_job "the extension did not build"
    skip_stage bench_ring "the extension did not build"
    skip_stage trace_causal "the extension did not build"
    skip_stage trace_full "the extension did not build"
fi
suite_summary
