#!/usr/bin/env bash
# Reproduce every figure in benchmarks/results/ and docs/analysis/ on this machine, in order.
# Each step takes the shared lock so timings are not polluted by other heavy jobs.
# Total on the 2-core reference machine: roughly 45 minutes (serving benchmark ~10 min of it).
#   bash benchmarks/run_all.sh            # everything
#   bash benchmarks/run_all.sh serving    # one step (names below)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
. "${MOEPLACE_VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
SHARED=${MOEPLACE_SHARED_DATA:-../shared/data}
LOCK=/tmp/moeplace-heavy.lock
ONLY=${1:-}
step() { local name=$1; shift; if [ -z "$ONLY" ] || [ "$ONLY" = "$name" ]; then echo "=== $name: $*"; flock "$LOCK" "$@"; fi; }

step analysis   moeplace analyze "$SHARED/traces/dsv2lite_puffin_a.npz" --out docs/analysis/dsv2lite-puffin --ranks 8,16
step analysis   moeplace import --format orders-in-chaos "$SHARED/raw/orders-in-chaos-llama4-mmlu-abstract_algebra" \
                  --out /tmp/llama4-mmlu-abstract_algebra.npz --num-experts 128 --label mmlu/abstract_algebra
step analysis   moeplace analyze /tmp/llama4-mmlu-abstract_algebra.npz \
                  --out docs/analysis/llama4-maverick-mmlu-abstract-algebra --ranks 8,16
step synth      python benchmarks/synth_calibration.py
step solver     python benchmarks/solver_heldout.py
step scale      python benchmarks/solver_scale.py
step scale      python benchmarks/solver_scale.py --only-sweep
step simulate   python benchmarks/simulate.py
step load       python benchmarks/load_time.py --repeats 7
step profile    python benchmarks/profile_overhead.py --repeats 5 --out benchmarks/results/profile_overhead.md
step request   python benchmarks/request_aware.py
step request   python benchmarks/router_signature_cost.py
step serving    python benchmarks/serve_bench.py
step serving    python benchmarks/router_overhead.py
echo "done: see benchmarks/results/ and docs/analysis/"
