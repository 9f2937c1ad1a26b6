#!/usr/bin/env bash
# Set-up plus the main job: ring attention across the GPUs present (one process per GPU, NCCL), or
# across 4 CPU processes (gloo) where there is none, checked against full attention.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m ring_attn_ext "$@"
