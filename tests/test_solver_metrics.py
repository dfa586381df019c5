"""Metrics: golden hand-computed cases, the fast scorer against the slow reference (hypothesis),
invariances, and the anchor numbers on the real DeepSeek-V2-Lite trace."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from vllm_moeplace.plan import Topology, linear_layout
from vllm_moeplace.metrics import (
    METRIC_NAMES,
    MetricsError,
    evaluate_layers,
    evaluate_layers_reference,
)
from vllm_moeplace.replica import candidate_table, select
from vllm_moeplace import trace_stats as stats
from vllm_moeplace.trace import Trace, load_trace
from _builders import trace_from_ids


def make_trace(ids, num_experts, layer_ids=None, request_ids=None) -> Trace:
    return trace_from_ids(ids, num_experts, layer_ids=layer_ids, request_ids=request_ids)


# ---- golden cases ------------------------------------------------------------------------------


def test_golden_two_nodes_no_redundancy():
    # 4 experts, 2 ranks, one rank per node; linear layout [[0, 1], [2, 3]].
    topo = Topology.uniform(2, 1)
    tr = make_trace([[[0, 2]], [[0, 1]]], 4)
    m = evaluate_layers({}, topo, tr)
    # token {0,2}: 2 ranks, 2 nodes -> 2 * (1 - 1/2) = 1; token {0,1}: 1 rank -> 0.5.
    assert m.rank_sends == pytest.approx(0.75)
    assert m.node_sends == pytest.approx(0.75)
    # each pair costs 1 from the other node, 0 from its own: 0.5 per pair, 2 pairs per token.
    assert m.hop_cost == pytest.approx(1.0)
    # loads: rank 0 holds 0,1 -> 3 pairs; rank 1 holds 2,3 -> 1 pair; max/mean = 3/2.
    assert m.imbalance == pytest.approx(1.5)


def test_golden_redundancy_replica_rule():
    # 2 nodes {0,1},{2,3}; every expert has two copies. Physical ids p = r*2 + s.
    topo = Topology.uniform(4, 2)
    a = np.array([[0, 1], [2, 0], [3, 1], [2, 3]])
    tab = candidate_table(a, 4, topo.node_of_rank)
    # origin 0 holds 0 and 1 (p0, p1); expert 2 is on node 0 at rank 1 (p2); expert 3 only on
    # node 1: both copies (p4 on rank 2, p7 on rank 3) are candidates.
    assert [tab.cand[0, e, : tab.count[0, e]].tolist() for e in range(4)] == [[0], [1], [2], [4, 7]]
    # origin 3 holds 2 and 3; expert 1 has a copy on its node (p5); expert 0 is on node 0 only.
    assert [tab.cand[3, e, : tab.count[3, e]].tolist() for e in range(4)] == [[0, 3], [5], [6], [7]]
    tr = make_trace([[[0, 3]], [[1, 2]], [[0, 1]]], 4)
    # spread key = row: token 0 picks expert 3 (k=1) by (0*2+1) mod 2 = 1 -> p7 (rank 3);
    # token 2 picks expert 0 (k=0) by (2*2+0) mod 2 = 0 -> p0 (rank 0).
    assert select(tab, tr.topk_ids[:, 0], 0, np.arange(3))[0].tolist() == [0, 7]
    assert select(tab, tr.topk_ids[:, 0], 3, np.arange(3))[2].tolist() == [0, 5]
    m = evaluate_layers({1: a}, topo, tr)
    # hand-computed per origin (see docs/metrics.md worked example):
    # {0,3}: rank 1, node 1, hop 1; {1,2}: rank 1, node 0, hop 0; {0,1}: rank 1, node 0.5, hop 0.5.
    assert m.rank_sends == pytest.approx(1.0)
    assert m.node_sends == pytest.approx(0.5)
    assert m.hop_cost == pytest.approx(0.5)
    # expected pairs served, mean over origins: r0 2.5, r1 1, r2 1.25, r3 1.25 -> 2.5 / 1.5.
    assert m.imbalance == pytest.approx(5 / 3)
    ref = evaluate_layers_reference({1: a}, topo, tr)
    for k in METRIC_NAMES:
        assert getattr(m, k) == pytest.approx(ref[k])


def test_golden_inter_layer():
    topo = Topology.uniform(2, 1)
    # token 0: layer 1 on node 0 only, layer 2 on node 1 only -> 1 new node.
    # token 1: both layers touch both nodes -> 0.
    tr = make_trace([[[0, 1], [2, 3]], [[0, 2], [1, 3]]], 4)
    m = evaluate_layers({}, topo, tr)
    assert m.inter_layer_node_sends == pytest.approx(0.5)
    assert m.inter_layer_per_pair.tolist() == pytest.approx([0.5])
    # swapping layer 2's ranks keeps token 0 on node 0 at both layers.
    m2 = evaluate_layers({2: np.array([[2, 3], [0, 1]])}, topo, tr)
    assert m2.inter_layer_node_sends == pytest.approx(0.0)


def test_missing_layer_scores_as_linear_and_per_layer_arrays():
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)]) for _ in range(20)])
    tr = make_trace(ids, 8)
    topo = Topology.uniform(4, 2)
    full = {int(l): linear_layout(8, 4) for l in tr.layer_ids}
    a, b = evaluate_layers({}, topo, tr), evaluate_layers(full, topo, tr)
    for k in METRIC_NAMES:
        assert getattr(a, k) == getattr(b, k)
    assert a.node_sends_per_layer.shape == (3,) and a.inter_layer_per_pair.shape == (2,)
    assert a.node_sends == pytest.approx(a.node_sends_per_layer.mean())
    json.dumps(a.as_dict())  # plain floats


def test_bad_inputs_name_the_value():
    tr = make_trace([[[0, 1]]], 4)
    with pytest.raises(MetricsError, match="layer"):
        evaluate_layers({7: linear_layout(4, 2)}, Topology.uniform(2, 1), tr)
    with pytest.raises(MetricsError, match=r"ep_size=2"):
        evaluate_layers({1: linear_layout(4, 4)}, Topology.uniform(2, 1), tr)
    with pytest.raises(MetricsError, match="9"):
        evaluate_layers({1: np.array([[0, 1], [2, 9]])}, Topology.uniform(2, 1), tr)
    with pytest.raises(MetricsError, match=r"\[3\]"):
        evaluate_layers({1: np.array([[0, 1], [2, 2]])}, Topology.uniform(2, 1), tr)


# ---- fast vs reference -----------------------------------------------------------------------


@st.composite
def instances(draw):
    """Small random instances: topology (uneven nodes, random costs), placements with redundancy."""
    R = draw(st.integers(1, 5))
    E = draw(st.integers(2, 7))
    K = draw(st.integers(1, min(3, E)))
    L = draw(st.integers(1, 3))
    T = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(R)
    cuts = sorted(rng.choice(np.arange(1, R), size=rng.integers(0, R), replace=False).tolist()) if R > 1 else []
    nodes = [sorted(p.tolist()) for p in np.split(perm, cuts)]
    n = len(nodes)
    cost = rng.integers(0, 4, size=(n, n)).astype(float)
    topo = Topology(R, nodes, cost)
    S = -(-E // R) + draw(st.integers(0, 2))
    S = min(S, E)
    layers = {}
    for lid in range(1, L + 1):
        # every expert once, then fill remaining slots with random extra copies (distinct per rank)
        rows = [[] for _ in range(R)]
        for i, e in enumerate(rng.permutation(E)):
            rows[i % R].append(int(e))
        for r in range(R):
            extra = [e for e in rng.permutation(E).tolist() if e not in rows[r]]
            rows[r] += extra[: S - len(rows[r])]
        # ranks with fewer experts (E not divisible) filled above; shuffle slot order
        layers[lid] = np.array([rng.permutation(row) for row in rows])
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])
    return topo, layers, make_trace(ids, E)


@settings(max_examples=60, deadline=None)
@given(instances())
def test_fast_agrees_with_reference(inst):
    topo, layers, tr = inst
    fast = evaluate_layers(layers, topo, tr)
    ref = evaluate_layers_reference(layers, topo, tr)
    for k in METRIC_NAMES:
        assert getattr(fast, k) == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(2, 8), st.integers(0, 2**32 - 1))
def test_candidate_table_is_the_rule_written_per_origin(R, E, seed):
    """replica.candidate_table (built from the per-node table) equals the rule written literally per
    origin: own copy, else the node's copies, else all copies, each in ascending physical id."""
    from vllm_moeplace.replica import physical_copies

    rng = np.random.default_rng(seed)
    S = int(rng.integers(-(-E // R), E + 1))
    rows = [[] for _ in range(R)]
    for i, e in enumerate(rng.permutation(E)):
        rows[i % R].append(int(e))
    rows = [(row + [int(e) for e in rng.permutation(E) if e not in row])[:S] for row in rows]
    a = np.array(rows)
    node_of_rank = np.unique(np.sort(rng.integers(0, R, R)), return_inverse=True)[1]
    tab = candidate_table(a, E, node_of_rank)
    copies = physical_copies(a, E)
    for o in range(R):
        for e in range(E):
            c = copies[e]
            own = c[c // S == o]
            same = c[node_of_rank[c // S] == node_of_rank[o]]
            want = own[:1] if own.size else (same if same.size else c)
            assert tab.cand[o, e, : tab.count[o, e]].tolist() == want.tolist()


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_fast_agrees_with_reference_with_copies(R, S, extra, seed):
    """Every instance has copies (1-3 extra slots per rank) and enough tokens for the spread key
    to cycle through several copies: the vectorised scorer equals the oracle built on select()."""
    rng = np.random.default_rng(seed)
    E = R * S
    G = next(g for g in (3, 2, 1) if R % g == 0 and (g < R or R == 1))
    topo = Topology.uniform(R, G)
    layers = {}
    for lid in (1, 2):
        base = rng.permutation(E).reshape(R, S)
        rows = [row.tolist() + [int(e) for e in rng.permutation(E) if e not in row][: min(extra, E - S)] for row in base]
        layers[lid] = np.array(rows)
    K = min(3, E)
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(2)]) for _ in range(12)])
    tr = make_trace(ids, E)
    fast = evaluate_layers(layers, topo, tr)
    ref = evaluate_layers_reference(layers, topo, tr)
    for k in METRIC_NAMES:
        assert getattr(fast, k) == pytest.approx(ref[k], rel=1e-9, abs=1e-12), k


@settings(max_examples=30, deadline=None)
@given(instances(), st.integers(0, 2**32 - 1))
def test_invariant_under_relabelling_ranks_within_a_node(inst, seed):
    """Permuting ranks inside each node (contiguous uniform nodes) changes no node-level metric;
    rank_sends and imbalance are invariant too when there is no redundancy. With copies, the rule's
    ascending-rank order among a node's copies decides which copy a token picks, so relabelling
    can merge or split rank messages and move load between the ranks of a node."""
    _, layers, tr = inst
    R = next(iter(layers.values())).shape[0]
    G = next(g for g in (2, 1) if R % g == 0)
    topo = Topology.uniform(R, G)
    rng = np.random.default_rng(seed)
    pi = np.concatenate([rng.permutation(np.arange(s, s + G)) for s in range(0, R, G)])
    moved = {l: a[np.argsort(pi)] for l, a in layers.items()}  # rank pi[r] now holds a[r]
    m0, m1 = evaluate_layers(layers, topo, tr), evaluate_layers(moved, topo, tr)
    for k in ("node_sends", "hop_cost", "inter_layer_node_sends"):
        assert getattr(m1, k) == pytest.approx(getattr(m0, k), rel=1e-12), k
    if all(a.size == tr.num_experts for a in layers.values()):
        assert m1.rank_sends == pytest.approx(m0.rank_sends, rel=1e-12)
        assert m1.imbalance == pytest.approx(m0.imbalance, rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_hop_cost_placement_invariant_on_symmetric_topology(seed):
    """Uniform origin, one copy per expert, every node equally far from the others on average:
    the expected cost of a pair is the same wherever the expert lives (placement-anchors note)."""
    rng = np.random.default_rng(seed)
    E, R = 16, 8
    topo = Topology(R, [[0, 1], [2, 3], [4, 5], [6, 7]], np.array([[0, 1, 2, 2], [1, 0, 2, 2], [2, 2, 0, 1], [2, 2, 1, 0]], float))
    ids = np.stack([np.stack([rng.choice(E, 3, replace=False) for _ in range(2)]) for _ in range(10)])
    tr = make_trace(ids, E)
    a = evaluate_layers({}, topo, tr)
    b = evaluate_layers({l: rng.permutation(E).reshape(R, E // R) for l in (1, 2)}, topo, tr)
    assert a.hop_cost == pytest.approx(b.hop_cost) == pytest.approx(3 * (0 + 1 + 2 + 2) / 4)


# ---- stats ------------------------------------------------------------------------------------


def test_stats_small_golden():
    tr = make_trace([[[0, 1], [2, 3]], [[1, 0], [3, 1]], [[2, 3], [0, 1]]], 4)
    assert stats.expert_load(tr).tolist() == [[2, 2, 1, 1], [1, 2, 1, 2]]
    c = stats.coactivation(tr, 0)
    assert c[0, 1] == c[1, 0] == 2 and c[2, 3] == 1 and c[0, 2] == 0
    assert c.diagonal().tolist() == [2, 2, 1, 1]
    p, n = stats.unique_patterns(tr, 0)
    assert p.tolist() == [[0, 1], [2, 3]] and n.tolist() == [2, 1]
    m = stats.transitions(tr, 0)
    assert m[0, 2] == 1 and m[0, 1] == 1 and m[2, 0] == 1 and m.sum() == 3 * 4


# ---- real trace anchors ----------------------------------------------------------------------

ANCHORS = {  # placement-anchors note: held-out node_sends / imbalance of vLLM's layouts
    (16, 4): {"linear": (2.515, 1.246), "round_robin": (2.495, 1.262)},
    (8, 1): {"linear": (3.985, 1.133), "round_robin": (3.976, 1.137)},
}


def test_real_trace_reproduces_anchor_layouts(dsv2_trace_path):
    tr = load_trace(dsv2_trace_path)
    _, test = tr.split_by_request(0.5)
    for (R, G), rows in ANCHORS.items():
        topo = Topology.uniform(R, G)
        layouts = {"linear": {}, "round_robin": {int(l): np.arange(64).reshape(64 // R, R).T for l in tr.layer_ids}}
        for name, (ns, imb) in rows.items():
            m = evaluate_layers(layouts[name], topo, test)
            assert m.node_sends == pytest.approx(ns, rel=0.005), (R, name)
            assert m.imbalance == pytest.approx(imb, rel=0.005), (R, name)


@settings(max_examples=30, deadline=None)
@given(instances())
def test_stats_agree_with_loops(inst):
    _, _, tr = inst
    T, L, K = tr.topk_ids.shape
    E = tr.num_experts
    for l in range(L):
        c = np.zeros((E, E), dtype=np.int64)
        for t in range(T):
            for i in tr.topk_ids[t, l].tolist():
                for j in tr.topk_ids[t, l].tolist():
                    c[i, j] += 1
        assert np.array_equal(stats.coactivation(tr, l), c)
        pats, counts = stats.unique_patterns(tr, l)
        want: dict[tuple, int] = {}
        for t in range(T):
            key = tuple(sorted(tr.topk_ids[t, l].tolist()))
            want[key] = want.get(key, 0) + 1
        assert {tuple(p): int(n) for p, n in zip(pats.tolist(), counts)} == want
        assert pats.tolist() == sorted(pats.tolist())
        if l + 1 < L:
            m = np.zeros((E, E), dtype=np.int64)
            for t in range(T):
                for i in tr.topk_ids[t, l].tolist():
                    for j in tr.topk_ids[t, l + 1].tolist():
                        m[i, j] += 1
            assert np.array_equal(stats.transitions(tr, l), m)
    assert np.array_equal(stats.expert_load(tr), np.stack([stats.coactivation(tr, l).diagonal() for l in range(L)]))
