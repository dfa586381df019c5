#!/usr/bin/env bash
# Set up (idempotent) and run the main job end to end on the embedded default
# (tiny random-weight MoE model + the shared real DeepSeek-V2-Lite trace).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${MOEPLACE_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec moeplace demo --out "${1:-out/demo}"
