#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, including end-to-end runs of the real vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${MOEPLACE_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec python -m pytest -q -ra --durations=15 "$@"
