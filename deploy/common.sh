#!/usr/bin/env bash
# Shared settings of the deploy recipes. UNTESTED HERE: this project has no GPUs; the recipes follow
# vLLM 0.32/0.33's documented multi-node flags (vllm/engine/arg_utils.py) and the plugin's checks.
# Every <PLACEHOLDER> must be replaced (or the variable exported) before use.
set -euo pipefail

MODEL=${MODEL:-<MODEL_DIR>}                   # local checkpoint folder, same path on every node (validate reads its config.json)
PLAN=${PLAN:-<ABSOLUTE_PATH>/plan.json}       # SAME absolute path on every node (shared FS or copied)
PLAN_SHA256=${PLAN_SHA256:-<SHA256_OF_PLAN>}  # `sha256sum plan.json` on the machine that wrote it
HEAD_IP=${HEAD_IP:-<HEAD_NODE_IP>}            # address every node can reach
RPC_PORT=${RPC_PORT:-13345}                   # same on all nodes
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-2}
TP=${TP:-1}                                   # EP size = DP x TP (x PCP); the plan's ep_size must equal it
DP=$(( NNODES * GPUS_PER_NODE / TP ))
DP_LOCAL=$(( GPUS_PER_NODE / TP ))
ALL2ALL=${ALL2ALL:-deepep_high_throughput}     # or deepep_low_latency / allgather_reducescatter / ...
LOG_DIR=${LOG_DIR:-/tmp/vllm-moeplace-logs}

die() { echo "deploy: $*" >&2; exit 1; }

# Refuse to start with a plan that is missing, different from the one signed off, or invalid.
preflight() {
    [[ "$MODEL" != *"<"* && "$PLAN" != *"<"* && "$PLAN_SHA256" != *"<"* ]] || die "replace the <PLACEHOLDERS> in deploy/common.sh (or export MODEL, PLAN, PLAN_SHA256, HEAD_IP)"
    [[ -f "$PLAN" ]] || die "$PLAN: no plan file on $(hostname)"
    local sha
    sha=$(sha256sum "$PLAN" | cut -d' ' -f1)
    [[ "$sha" == "$PLAN_SHA256" ]] || die "$PLAN on $(hostname) has sha256 $sha, expected $PLAN_SHA256 (stale copy?)"
    # Structure + fit to the model's config.json (num_experts, MoE layers).
    moeplace validate --model "$MODEL" "$PLAN" || die "moeplace validate refused $PLAN"
    local ep
    ep=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['ep_size'])" "$PLAN")
    [[ "$ep" == "$(( DP * TP ))" ]] || die "plan ep_size $ep != DP x TP = $DP x $TP"
    mkdir -p "$LOG_DIR"
}
