"""Co-activation greedy: valid layouts, and it does use co-activation."""

from __future__ import annotations


import numpy as np

from vllm_moeplace.plan import Plan, Topology, validate_plan
from vllm_moeplace.solver.greedy import coactivation_greedy, lpt_partition
from vllm_moeplace.trace import Trace


def clustered_trace(E=16, K=2, T=400, clusters=4, seed=0) -> Trace:
    """Tokens pick both experts inside one of `clusters` hidden groups (shuffled ids)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(E)
    size = E // clusters
    rows = []
    for _ in range(T):
        c = rng.integers(clusters)
        rows.append(perm[c * size + rng.choice(size, K, replace=False)])
    ids = np.array(rows, dtype=np.int16)[:, None, :]
    return Trace(
        topk_ids=ids,
        layer_ids=np.array([3], dtype=np.int32),
        request_ids=np.arange(T, dtype=np.int32) // 10,
        is_prefill=np.ones(T, dtype=bool),
        num_experts=E,
        meta={"model": "synthetic"},
    ), perm.reshape(clusters, size)


def test_greedy_recovers_hidden_clusters():
    trace, groups = clustered_trace()
    topo = Topology.uniform(8, 2)  # 4 nodes x 2 ranks x 2 slots = one cluster per node
    layout = coactivation_greedy(trace, 0, topo)
    plan = Plan(model_name="t", num_experts=16, moe_layers=[3], ep_size=8, topology=topo, layers={3: layout})
    validate_plan(plan)
    node_sets = sorted(sorted(layout[topo.nodes[n]].ravel().tolist()) for n in range(4))
    assert node_sets == sorted(sorted(g.tolist()) for g in groups)


def test_greedy_redundant_slots_hold_copies_on_other_ranks():
    trace, _ = clustered_trace()
    topo = Topology.uniform(8, 2)
    layout = coactivation_greedy(trace, 0, topo, slots_per_rank=3)
    assert layout.shape == (8, 3)
    plan = Plan(model_name="t", num_experts=16, moe_layers=[3], ep_size=8, topology=topo, layers={3: layout})
    validate_plan(plan)  # includes: no expert twice on one rank, every expert somewhere


def test_lpt_partition_balances_and_keeps_every_expert():
    load = np.array([9, 8, 7, 6, 5, 4, 3, 2.0])
    out = lpt_partition(np.arange(8), load, 2, 4)
    assert sorted(out.ravel().tolist()) == list(range(8))
    assert load[out].sum(axis=1).tolist() == [22.0, 22.0]
