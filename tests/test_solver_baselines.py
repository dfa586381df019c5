"""Baselines: golden layouts, DeepSeek EPLB's published worked example, every baseline plan valid
(hypothesis), topology files, and the anchor table on the real DeepSeek-V2-Lite trace."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from vllm_moeplace.plan import Topology, parse_plan, validate_plan
from vllm_moeplace.solver import eplb
from vllm_moeplace.solver.baselines import (
    BaselineError,
    available_baselines,
    baseline_layers,
    baseline_plan,
    linear,
    round_robin,
)
from vllm_moeplace.metrics import evaluate_layers, evaluate_plan
from vllm_moeplace.trace_stats import expert_load
from vllm_moeplace.solver.topology_file import TopologyError, dragonfly, fat_tree, load_topology, parse_topology, save_topology
from vllm_moeplace.trace import Trace, load_trace


def random_trace(T: int, L: int, E: int, K: int, seed: int, skew: float = 1.2) -> Trace:
    rng = np.random.default_rng(seed)
    p = rng.pareto(skew, size=(L, E)) + 0.05
    p /= p.sum(axis=1, keepdims=True)
    ids = np.empty((T, L, K), dtype=np.int16)
    for l in range(L):
        # Gumbel top-k: K distinct experts per token, popularity-weighted.
        g = np.log(p[l])[None, :] - np.log(-np.log(rng.random((T, E))))
        ids[:, l, :] = np.argsort(-g, axis=1)[:, :K]
    return Trace(
        topk_ids=ids,
        layer_ids=np.arange(1, L + 1, dtype=np.int32),
        request_ids=(np.arange(T) // 4).astype(np.int32),
        is_prefill=np.ones(T, dtype=bool),
        num_experts=E,
        meta={"model": "random"},
    )


def test_vllm_layouts_golden():
    assert linear(8, 4, 2).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert round_robin(8, 4, 2).tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # one redundant slot per rank: linear wraps around, round-robin takes the next residue class
    assert linear(8, 4, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 0], [1, 2, 3]]
    assert round_robin(8, 4, 3).tolist() == [[0, 4, 1], [1, 5, 2], [2, 6, 3], [3, 7, 0]]


def test_eplb_reproduces_published_worked_example():
    """deepseek-ai/EPLB README: 2 layers x 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs.
    Its printed phy2log, read as two slots per GPU (slot order is irrelevant to a plan)."""
    W = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                  [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]], float)
    published = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                 [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    nodes = [[0, 1, 2, 3], [4, 5, 6, 7]]
    for w, phy2log in zip(W, published):
        got = eplb.eplb_layer(w, nodes, slots_per_rank=2, num_groups=4)
        want = np.sort(np.array(phy2log).reshape(8, 2), axis=1)
        assert got.tolist() == want.tolist()


def test_balanced_packing_lpt():
    # LPT into 2 packs of 2: 10 -> p0, 7 -> p1, 5 -> p1 (lighter), 1 -> p0.
    assert eplb.balanced_packing(np.array([5.0, 10.0, 1.0, 7.0]), 2).tolist() == [1, 0, 0, 1]
    assert eplb.replicate(np.array([9.0, 3.0, 4.0]), 5, max_copies=3).tolist() == [3, 1, 1]
    assert eplb.replicate(np.array([9.0, 3.0, 4.0]), 5, max_copies=2).tolist() == [2, 1, 2]


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([(16, 4, 2), (16, 8, 4), (12, 6, 3), (8, 8, 1), (8, 4, 4), (24, 8, 2)]),
    st.integers(0, 2),
    st.integers(0, 2**31),
)
def test_every_baseline_plan_is_valid(shape, red, seed):
    E, R, G = shape
    tr = random_trace(40, 2, E, 2, seed)
    topo = Topology.uniform(R, G)
    for name in available_baselines():
        if red and (name == "eplb" and G == 1):
            with pytest.raises(eplb.EplbError, match="eplb_global"):
                baseline_layers(name, tr, topo, red)
            continue
        if name == "greedy" and red:
            continue  # greedy.py's own redundancy path is the CP-SAT engineer's; tested there
        plan = baseline_plan(name, tr, topo, red)
        validate_plan(plan)
        assert plan.slots_per_rank() == E // R + red
        back = parse_plan(json.loads(json.dumps(plan.to_json())))  # round-trips through the file format
        assert all(np.array_equal(back.layers[l], plan.layers[l]) for l in plan.layers) and back.ep_size == R
        m = evaluate_plan(plan, tr)
        # imbalance is max/mean >= 1 by definition; sends are fractions of the top-k pairs
        assert m.num_tokens == tr.num_tokens and m.imbalance >= 1.0 - 1e-9
        assert 0.0 <= m.node_sends <= m.rank_sends + 1e-9 and m.rank_sends <= tr.topk_ids.shape[2] + 1e-9


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31))
def test_eplb_at_least_as_balanced_as_linear_in_sample(seed):
    """With two slots per rank, balanced packing pairs the i-th heaviest with the i-th lightest,
    which minimises the heaviest pair: no layout (linear included) is better balanced, in sample.
    Hierarchical EPLB keeps linear's node composition and does this inside each 2-rank node."""
    tr = random_trace(200, 2, 16, 2, seed)
    topo = Topology.uniform(8, 2)
    lin = evaluate_layers(baseline_layers("linear", tr, topo, 0), topo, tr).imbalance_per_layer
    for name in ("eplb", "eplb_global"):
        m = evaluate_layers(baseline_layers(name, tr, topo, 0), topo, tr)
        assert np.all(m.imbalance_per_layer <= lin + 1e-9), name


def test_eplb_redundancy_replicates_the_hottest_expert():
    tr = random_trace(500, 1, 16, 2, 3, skew=0.8)
    topo = Topology.uniform(8, 4)
    a = baseline_layers("eplb_global", tr, topo, 1)[1]
    hot = int(np.argmax(expert_load(tr)[0]))
    assert int((a == hot).sum()) >= 2


def test_bad_shapes_name_the_value():
    tr = random_trace(10, 1, 12, 2, 0)
    with pytest.raises(BaselineError, match="ep_size=8"):
        baseline_layers("linear", tr, Topology.uniform(8, 2), 0)
    with pytest.raises(BaselineError, match="'nope'"):
        baseline_layers("nope", tr, Topology.uniform(4, 2), 0)


# ---- topology files -----------------------------------------------------------------------------


def test_topology_file_roundtrip_and_errors(tmp_path):
    topo = fat_tree(num_nodes=5, ranks_per_node=2, nodes_per_leaf=2)
    assert topo.ep_size == 10 and topo.link_cost[0, 1] == 2 and topo.link_cost[0, 4] == 4 and topo.link_cost[3, 3] == 0
    p = tmp_path / "t.json"
    save_topology(p, topo)
    back = load_topology(p)
    assert back.nodes == topo.nodes and np.array_equal(back.link_cost, topo.link_cost)
    with pytest.raises(TopologyError, match="ep_size is 12"):
        load_topology(p, ep_size=12)
    p.write_text('{"nodes": [[0, 1], [1, 2]]}')
    with pytest.raises(TopologyError, match="rank 1 already in node 0"):
        load_topology(p)
    p.write_text('{"nodes": [[0], [1]], "link_cost": [[0, 1]]}')
    with pytest.raises(TopologyError, match=r"shape \[1, 2\]"):
        load_topology(p)
    p.write_text('{"nodes": [[0], [1]], "hops": 1}')
    with pytest.raises(TopologyError, match=str(p)):
        load_topology(p)
    assert parse_topology({"ranks_per_node": 2}, ep_size=4).nodes == [[0, 1], [2, 3]]


def test_dragonfly_hops():
    topo = dragonfly(num_groups=3, nodes_per_group=2, ranks_per_node=1)
    c = topo.link_cost
    assert np.all(np.diag(c) == 0) and c[0, 1] == 1  # same group: one local hop
    assert set(np.unique(c[0, 2:])) <= {1.0, 2.0, 3.0} and c.max() == 3
    assert np.array_equal(c, c.T)  # minimal routing is symmetric here
    # ...and every node is equally far from the rest on average: hop_cost is placement-invariant
    assert np.ptp(c.mean(axis=0)) == 0


def test_hop_cost_separates_placements_only_on_asymmetric_topologies():
    tr = random_trace(100, 1, 12, 2, 1, skew=0.7)
    moved = {1: np.arange(12)[::-1].reshape(6, 2)}
    sym = dragonfly(num_groups=3, nodes_per_group=2, ranks_per_node=1)
    assert evaluate_layers({}, sym, tr).hop_cost == pytest.approx(evaluate_layers(moved, sym, tr).hop_cost)
    sparse = fat_tree(num_nodes=3, ranks_per_node=2, nodes_per_leaf=2)  # node 2 alone on its leaf
    assert np.ptp(sparse.link_cost.mean(axis=0)) > 0
    assert evaluate_layers({}, sparse, tr).hop_cost != pytest.approx(evaluate_layers(moved, sparse, tr).hop_cost)


# ---- anchor table on the real trace --------------------------------------------------------------

ANCHORS = {  # placement-anchors note: held-out node_sends / imbalance, plan from the first half
    (16, 4): {"linear": (2.515, 1.246), "round_robin": (2.495, 1.262), "eplb": (2.515, 1.145)},
    (8, 1): {"linear": (3.985, 1.133), "round_robin": (3.976, 1.137), "eplb": (3.985, 1.133)},
}


def test_real_trace_baselines_reproduce_anchor_table(dsv2_trace_path):
    tr = load_trace(dsv2_trace_path)
    train, test = tr.split_by_request(0.5)
    for (R, G), rows in ANCHORS.items():
        topo = Topology.uniform(R, G)
        for name, (ns, imb) in rows.items():
            m = evaluate_plan(baseline_plan(name, train, topo), test)
            assert m.node_sends == pytest.approx(ns, rel=0.005), (R, name, m.node_sends)
            assert m.imbalance == pytest.approx(imb, rel=0.005), (R, name, m.imbalance)
