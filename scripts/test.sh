#!/usr/bin/env bash
# Set-up plus the whole test suite. GPU tests run where a CUDA GPU is present and skip otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The transformers adapter's tests (tests/test_hf_attention_*.py) need transformers; nothing else does.
python3 -m pip install -q "transformers>=4.53"
python3 -m pytest -q -rs tests "$@"
