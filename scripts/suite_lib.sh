# Shared by scripts/gpu_suite.sh and scripts/ring_gpu_suite.sh, which source it from the repo root:
# the environment of a device call, stages with time limits inside one budget, and the summary.
# shellcheck shell=bash

export PYTHONUNBUFFERED=1
# NVLink multicast stays off: a program using it can put a shared host's GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CUDA_HOME=/usr/local/cuda
export MAX_JOBS="${MAX_JOBS:-16}"
export RING_ATTN_CUDA_ARCHS="${RING_ATTN_CUDA_ARCHS:-90a}"
# The extension is built in place (incremental on a machine that is still warm), so the tree itself
# is the package: torchrun'd scripts and subprocesses must find it too.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

OUT="${OUT:-/tmp/ring_attn_suite}"
mkdir -p "$OUT"
SUITE_BUDGET_S="${SUITE_BUDGET_S:-570}"
SUITE_FAILED=0
SUITE_LINES=()

# stage_limit CAP RESERVE: seconds a stage may take: at most CAP, and never so long that fewer than
# RESERVE seconds of the budget remain for the stages after it.
stage_limit() {
    local cap=$1 reserve=$2 left
    left=$(( SUITE_BUDGET_S - SECONDS - reserve ))
    (( left < cap )) && cap=$left
    echo $(( cap > 0 ? cap : 0 ))
}

# record NAME RC SECONDS: one line of the summary; any failure makes the suite's exit code 1.
record() {
    local name=$1 rc=$2 took=$3 status
    case "$rc" in
        0) status="ok" ;;
        124|137) status="TIMEOUT" ;;
        *) status="FAILED (rc $rc)" ;;
    esac
    [ "$rc" -ne 0 ] && SUITE_FAILED=1
    SUITE_LINES+=("$(printf '%-14s %-16s %5d s' "$name" "$status" "$took")")
}

skip_stage() {
    SUITE_FAILED=1
    SUITE_LINES+=("$(printf '%-14s %-16s (%s)' "$1" "SKIPPED" "$2")")
    echo "=== $1: skipped: $2 ==="
}

# run_stage NAME LIMIT LOG COMMAND...: runs COMMAND under `timeout`, its output shown and appended
# to LOG; returns COMMAND's exit code (124 on timeout).
run_stage() {
    local name=$1 limit=$2 log=$3 start rc
    shift 3
    if (( limit < 10 )); then
        skip_stage "$name" "no time left in the ${SUITE_BUDGET_S} s budget"
        return 1
    fi
    echo "=== $name (limit ${limit} s): $* ==="
    start=$SECONDS
    timeout -k 20 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    record "$name" "$rc" $(( SECONDS - start ))
    return "$rc"
}

suite_header() {
    echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname), $(nproc) cores, budget ${SUITE_BUDGET_S} s"
    nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
    "$CUDA_HOME/bin/nvcc" --version | tail -n 1
    python3 -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "GPUs", torch.cuda.device_count())'
    echo "build: RING_ATTN_CUDA_ARCHS=$RING_ATTN_CUDA_ARCHS RING_ATTN_HEAD_DIMS=${RING_ATTN_HEAD_DIMS:-all}" \
         "RING_ATTN_DTYPES=${RING_ATTN_DTYPES:-all} MAX_JOBS=$MAX_JOBS"
}

install_cutlass_wheel() {
    local wheels=(.carry/nvidia_cutlass-*.whl)
    if [ ! -e "${wheels[0]}" ]; then
        echo "no .carry/nvidia_cutlass-*.whl: the build will use an installed nvidia-cutlass or CUTLASS_PATH"
        return 0
    fi
    python3 -m pip install -q --no-deps --disable-pip-version-check --root-user-action=ignore "${wheels[0]}"
}

# build_stage CAP RESERVE: compiles the extension in place (log in $OUT/build.log, its tail shown
# on failure) and checks that the module imports, since setup.py silently builds pure Python when
# it finds no CUDA.
build_stage() {
    local limit start rc
    limit=$(stage_limit "$1" "$2")
    if (( limit < 10 )); then  # `timeout 0` would mean no limit at all
        skip_stage build "no time left in the ${SUITE_BUDGET_S} s budget"
        return 1
    fi
    echo "=== build (limit ${limit} s): python3 setup.py build_ext --inplace ==="
    start=$SECONDS
    timeout -k 20 "$limit" python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        python3 -c 'import ring_attn_ext._C as C; print("ring_attn_ext._C imports; head dims", C.supported_head_dims())' \
            2>&1 | tee -a "$OUT/build.log"
        rc=${PIPESTATUS[0]}
    fi
    record build "$rc" $(( SECONDS - start ))
    echo "build: rc $rc in $(( SECONDS - start )) s"
    [ "$rc" -ne 0 ] && tail -n 40 "$OUT/build.log"
    return "$rc"
}

# copy_new_results STAMP PATTERN: copies benchmarks/results files matching PATTERN written after
# STAMP was created into $OUT.
copy_new_results() {
    find benchmarks/results -maxdepth 1 -name "$2" -newer "$1" -exec cp {} "$OUT/" \;
    rm -f "$1"
}

suite_summary() {
    {
        echo "=== summary ($(( SECONDS )) s of ${SUITE_BUDGET_S} s)"
        printf '%s\n' "${SUITE_LINES[@]}"
        local log line
        for log in "$OUT"/tests*.log; do
            [ -e "$log" ] || continue
            line=$(grep -E '(passed|failed|error|skipped|no tests ran)' "$log" | tail -n 1)
            echo "$(basename "$log"): ${line:-(no pytest summary line)}"
        done
        echo "files in \$OUT: $(cd "$OUT" && echo ./*)"
    } | tee "$OUT/summary.txt"
    exit "$SUITE_FAILED"
}
