#!/usr/bin/env bash
# Multi-node data-parallel + expert-parallel serving with vLLM's own multiprocessing runtime
# (no Ray). UNTESTED HERE (no GPUs). Run once per node, the head first:
#
#   NODE_RANK=0 bash deploy/multinode_mp.sh      # head: API server + DP ranks 0..DP_LOCAL-1
#   NODE_RANK=1 bash deploy/multinode_mp.sh      # node 1: headless, DP ranks DP_LOCAL..2*DP_LOCAL-1
#
# vLLM numbers EP ranks dp_rank * TP + tp_rank (FusedMoEParallelConfig.flatten_tp_across_dp_and_pcp),
# and --data-parallel-start-rank gives node n the DP ranks n*DP_LOCAL..: so node n holds EP ranks
# n*GPUS_PER_NODE .. (n+1)*GPUS_PER_NODE-1, which is exactly a plan with
# "topology": {"ranks_per_node": GPUS_PER_NODE}.
source "$(dirname "$0")/common.sh"
NODE_RANK=${NODE_RANK:?set NODE_RANK (0 = head)}
preflight

args=(
    "$MODEL"
    --enable-expert-parallel
    --data-parallel-size "$DP"
    --data-parallel-size-local "$DP_LOCAL"
    --data-parallel-address "$HEAD_IP"
    --data-parallel-rpc-port "$RPC_PORT"
    --tensor-parallel-size "$TP"
    --all2all-backend "$ALL2ALL"
    --moe-placement-plan "$PLAN"      # added by the vllm-moeplace plugin (pip install vllm-moeplace on every node)
)
# Do NOT add --enable-eplb, --enable-ep-weight-filter or --expert-placement-strategy round_robin:
# the plugin refuses them (they assume vLLM's own layout).
if [[ "$NODE_RANK" == 0 ]]; then
    vllm serve "${args[@]}" --port "${PORT:-8000}" 2>&1 | tee "$LOG_DIR/node$NODE_RANK.log"
else
    vllm serve "${args[@]}" --headless --data-parallel-start-rank $(( NODE_RANK * DP_LOCAL )) \
        2>&1 | tee "$LOG_DIR/node$NODE_RANK.log"
fi
