#!/usr/bin/env bash
# Multi-node data-parallel + expert-parallel serving on a Ray cluster. UNTESTED HERE (no GPUs).
#
#   ROLE=head   bash deploy/multinode_ray.sh     # on the head node: ray start --head, then vllm serve
#   ROLE=worker bash deploy/multinode_ray.sh     # on every other node: ray start --address HEAD:6379
#
# With --data-parallel-backend ray, vLLM places the DP engine cores through Ray placement groups
# (one process launches everything; do NOT pass --nnodes/--node-rank, vLLM refuses them with ray).
# Rank-to-node assignment is Ray's choice: check it in the logs (check_applied.sh prints the host of
# every rank) and make sure each node holds GPUS_PER_NODE consecutive EP ranks, the plan's topology.
# Every node needs the same Python env (vllm + vllm-moeplace) and the plan at the same path: the
# plugin validates on the head and ships the absolute path + SHA-256 to every worker through
# additional_config; a worker whose copy differs refuses to load ("plan file changed after the
# server validated it").
source "$(dirname "$0")/common.sh"
ROLE=${ROLE:?set ROLE=head or ROLE=worker}
preflight
# Ray workers do not inherit the head's environment; the plan request reaches them in vLLM's own
# config (docs/serving.md, "How the request reaches the workers"), so nothing needs exporting here.
# vllm-moeplace must be installed on every node (preflight checks it on this one).

if [[ "$ROLE" == worker ]]; then
    exec ray start --address "$HEAD_IP:${RAY_PORT:-6379}" --num-gpus "$GPUS_PER_NODE" --block
fi
ray start --head --port "${RAY_PORT:-6379}" --num-gpus "$GPUS_PER_NODE"
echo "waiting for $NNODES nodes to join the Ray cluster..."
until [[ $(python -c "import ray; ray.init(address='auto'); print(len([n for n in ray.nodes() if n['Alive']]))" 2>/dev/null) -ge $NNODES ]]; do sleep 5; done
vllm serve "$MODEL" \
    --enable-expert-parallel \
    --data-parallel-backend ray \
    --data-parallel-size "$DP" \
    --data-parallel-size-local "$DP_LOCAL" \
    --data-parallel-address "$HEAD_IP" \
    --tensor-parallel-size "$TP" \
    --all2all-backend "$ALL2ALL" \
    --moe-placement-plan "$PLAN" \
    --port "${PORT:-8000}" 2>&1 | tee "$LOG_DIR/head.log"
