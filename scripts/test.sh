#!/usr/bin/env bash
# Set-up plus the whole test suite. GPU tests run where a CUDA GPU is present and skip otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m pytest -q -rs tests "$@"
