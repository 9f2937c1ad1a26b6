#!/usr/bin/env bash
# Installs what ring_attn_ext needs and builds it in place. Used by scripts/run.sh and
# scripts/test.sh, so either one is the whole set-up on a fresh machine.
#
# The CUDA extension is compiled when torch is a CUDA build and nvcc is found (CUDA_HOME, default
# /usr/local/cuda); otherwise the package installs as pure Python and runs on CPU tensors.
# MAX_JOBS bounds parallel nvcc jobs (default: 2, about 4 GB of RAM each).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install -q torch pybind11 ninja "nvidia-cutlass==4.2.0.0" pytest setuptools wheel
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS="${MAX_JOBS:-2}"
start=$(date +%s)
# Compile in place first: ninja keeps its objects under build/, so a second run (run.sh after
# test.sh, or after an edit) recompiles only what changed. `pip install -e .` alone would compile
# everything again in a fresh temporary folder each time.
python3 setup.py -q build_ext --inplace
# Then an editable install of the package around the extension just built, compiling nothing.
RING_ATTN_SKIP_CUDA_BUILD=1 python3 -m pip install -q --no-build-isolation -e .
echo "ring_attn_ext installed in $(( $(date +%s) - start )) s; CUDA extension: $(python3 -c 'import ring_attn_ext; print("built" if ring_attn_ext.has_extension() else "not built")')"
