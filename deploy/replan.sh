#!/usr/bin/env bash
# Re-profile and re-plan when the workload drifts, then roll the new plan out. UNTESTED on a GPU
# cluster (no GPUs here); every moeplace command below runs on CPU except the profiling run.
#
#   NEW_TRACE=fresh.npz CURRENT_PLAN=/shared/plans/plan.json bash deploy/replan.sh
#
# 1. Get a fresh trace of the current workload (either way gives LOGICAL expert ids):
#    a) `moeplace profile` on a replica taken out of rotation, fed a sample of recent prompts
#       (the capture plugin maps ids back through the active plan itself), or
#    b) vLLM's own `enable_return_routed_experts` on the GPU servers, saved as in docs/formats.md
#       and converted with `moeplace import --format vllm-routed-experts`. With a plan active the
#       router emits PHYSICAL ids: map each layer through
#       vllm_moeplace.serving.remap.physical_to_logical(load_plan(CURRENT_PLAN)) first.
# 2. Solve a candidate on the fresh trace and compare it with the current plan on held-out
#    requests of the same trace; roll out only if it is better by more than THRESHOLD.
# 3. Rolling restart, one serving replica (= one whole EP group) at a time; see deploy/README.md.
source "$(dirname "$0")/common.sh"
NEW_TRACE=${NEW_TRACE:?fresh trace (.npz, logical ids)}
CURRENT_PLAN=${CURRENT_PLAN:-$PLAN}
WORK=${WORK:-$(mktemp -d)}
THRESHOLD=${THRESHOLD:-0.03}   # relative node_sends gain needed to bother restarting

# Same EP size and node shape as the running plan (its topology block is copied as it is).
EP=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['ep_size'])" "$CURRENT_PLAN")
RPN=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['topology'].get('ranks_per_node', ''))" "$CURRENT_PLAN")
[[ -n "$RPN" ]] || die "$CURRENT_PLAN has an explicit node list: pass it to moeplace solve by hand"

# Plan from the first half of the fresh trace's requests; the plan is validated when written.
moeplace solve --trace "$NEW_TRACE" --ep-size "$EP" --ranks-per-node "$RPN" --train-fraction 0.5 \
    --time-limit "${SOLVE_SECONDS:-300}" --out "$WORK/candidate.json"
moeplace validate --model "$MODEL" --trace "$NEW_TRACE" "$WORK/candidate.json"

# Held-out comparison (second half of the fresh trace's requests), JSON for the decision below.
moeplace evaluate --plan "$CURRENT_PLAN" --plan "$WORK/candidate.json" --trace "$NEW_TRACE" \
    --train-fraction 0.5 --baselines none --json > "$WORK/eval.json"
python - "$WORK/eval.json" "$CURRENT_PLAN" "$WORK/candidate.json" "$THRESHOLD" <<'PY'
import json, sys
scores = json.load(open(sys.argv[1]))
cur, new = (scores[p]["held_out"]["node_sends"] for p in sys.argv[2:4])
imb_cur, imb_new = (scores[p]["held_out"]["imbalance"] for p in sys.argv[2:4])
gain = 1 - new / cur
print(f"held-out node_sends {cur:.3f} -> {new:.3f} ({gain:+.1%}), imbalance {imb_cur:.3f} -> {imb_new:.3f}")
if gain <= float(sys.argv[4]):
    print(f"gain below the threshold {float(sys.argv[4]):.1%}: keep the current plan (exit 3)")
    sys.exit(3)
PY
# Optional: estimated step time on a cluster like yours
#   python benchmarks/simulate.py --trace "$NEW_TRACE" --model <key in sim_params.json> --topologies "${EP}x$((EP / RPN))"

sha=$(sha256sum "$WORK/candidate.json" | cut -d' ' -f1)
echo "candidate $WORK/candidate.json sha256 $sha is better: publish it under a NEW file name, e.g."
echo "  cp $WORK/candidate.json /shared/plans/plan-$(date +%Y%m%d)-${sha:0:12}.json"
echo "then restart one replica at a time with PLAN=<that path> PLAN_SHA256=$sha (deploy/README.md)."
