"""Copies placed for locality under the replica rule (solver/replicas.py), and group-preserving mode."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from vllm_moeplace.plan import Topology, validate_plan
from vllm_moeplace.metrics import evaluate_layers
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.pipeline import SolveError, solve
from vllm_moeplace.solver.replicas import CopyState, everywhere_set, place_copies, project_out
from vllm_moeplace.solver.instance import LayerInstance
from vllm_moeplace.trace import Trace
from _builders import trace_from_ids


def make_trace(ids, num_experts, request_ids=None) -> Trace:
    return trace_from_ids(ids, num_experts, request_ids=request_ids)


def _random_layout(rng, R, S, n, E):
    base = rng.permutation(E).reshape(R, S)
    rows = [row.tolist() + [int(e) for e in rng.permutation(E) if e not in row][:n] for row in base]
    return np.array(rows)


# ---- golden -------------------------------------------------------------------------------------


def test_golden_copy_on_the_origins_node_saves_every_send():
    # Two nodes of one rank; rank 0 holds {0, 1}, rank 1 {2, 3}; every token picks {0, 2}: without
    # copies every origin sends to the other node (node_sends 1). One extra slot per rank: a copy
    # of 2 on rank 0 and of 0 on rank 1 makes every token local (node_sends 0), and each rank
    # then serves exactly its own origins' pairs (imbalance 1). The cap must let the first copy
    # through alone (1.5 x mean: rank 0 then carries 30 of 40 pairs): the greedy adds one copy at
    # a time and has no pair move, so at a 1.05 cap it would keep the primaries' sends.
    topo = Topology.uniform(2, 1)
    layout = np.array([[0, 1], [2, 3]])
    ids = np.array([[0, 2], [2, 0]] * 10)
    res = place_copies(layout, ids, topo, 4, 1, 1.5)
    assert res.start_node_cost == pytest.approx(20 * 2 * 1)  # T x (sum over origin nodes of g_m x sends)
    assert res.node_cost == 0
    assert res.layout[0].tolist()[2] == 2 and res.layout[1].tolist()[2] == 0
    m = evaluate_layers({1: res.layout}, topo, make_trace(ids, 4))
    assert m.node_sends == 0 and m.imbalance == pytest.approx(1.0)


def test_golden_copy_goes_to_the_node_that_would_send():
    # 4 ranks in 2 nodes; node 0 = ranks {0,1} holds experts 0-3, node 1 = {2,3} holds 4-7. Tokens
    # {0, 4}: each node's origins send for the other one's expert. The hottest pair is replicated
    # across nodes and node_sends drops to 0 (4 extra slots: 0 and 4 get a copy on the far node).
    topo = Topology.uniform(4, 2)
    layout = np.arange(8).reshape(4, 2)
    rng = np.random.default_rng(0)
    ids = np.array([[0, 4]] * 30 + [rng.choice(8, 2, replace=False).tolist() for _ in range(6)])
    res = place_copies(layout, ids, topo, 8, 1, 2.0)
    nodes_of = lambda e: {int(r) // 2 for r in range(4) if e in res.layout[r].tolist()}  # noqa: E731
    assert nodes_of(0) == {0, 1} and nodes_of(4) == {0, 1}
    assert res.node_cost < res.start_node_cost


# ---- exactness against the metric ---------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.integers(1, 3), st.integers(1, 2), st.integers(0, 2**32 - 1))
def test_copy_state_equals_the_metric_and_deltas_are_exact(R, S, n, seed):
    rng = np.random.default_rng(seed)
    E = R * S
    G = next(g for g in (3, 2, 1) if R % g == 0 and g < R) if R > 1 else 1
    topo = Topology.uniform(R, G)
    layout = _random_layout(rng, R, S, min(n, E - S), E)
    K = min(3, E)
    T = 15
    ids = np.array([rng.choice(E, K, replace=False) for _ in range(T)])
    st_ = CopyState(ids, layout, topo, E, np.inf)
    m = evaluate_layers({1: layout}, topo, make_trace(ids, E))
    assert st_.node_cost() / (T * R) == pytest.approx(m.node_sends)
    assert st_.RL.max() / st_.RL.mean() == pytest.approx(m.imbalance)
    # change one expert's copy set; the delta equals the recomputed cost difference
    e = int(rng.integers(E))
    others = [r for r in range(R) if r not in st_.holders[e]]
    if others:
        new = sorted(st_.holders[e] + [int(rng.choice(others))])
        before = st_.node_cost()
        d = st_.delta(e, new)
        st_.apply(e, new)
        assert st_.node_cost() - before == pytest.approx(d)
        fresh = CopyState(ids, np.array([[x for x in row] for row in layout]), topo, E, np.inf)
        fresh.apply(e, new)
        assert np.allclose(fresh.RL, st_.RL)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 6), st.integers(1, 3), st.integers(1, 2), st.integers(0, 2**32 - 1))
def test_place_copies_gives_valid_layouts_never_worse_than_primaries(R, S, n, seed):
    rng = np.random.default_rng(seed)
    E = R * S
    n = min(n, E - S)
    topo = Topology.uniform(R, next(g for g in (2, 1) if R % g == 0))
    layout = rng.permutation(E).reshape(R, S)
    ids = np.array([rng.choice(E, min(2, E), replace=False) for _ in range(20)])
    res = place_copies(layout, ids, topo, E, n, 10.0, everywhere=everywhere_set(np.bincount(ids.ravel(), minlength=E), topo, n))
    assert res.layout.shape == (R, S + n)
    assert all(len(set(row.tolist())) == S + n for row in res.layout)
    assert set(res.layout.ravel().tolist()) == set(range(E))
    assert res.node_cost <= res.start_node_cost + 1e-9 or res.overflow > 0
    m = evaluate_layers({1: res.layout}, topo, make_trace(ids, E))
    assert res.node_cost / (20 * R) == pytest.approx(m.node_sends)


def test_project_out_drops_experts_from_the_cost():
    inst = LayerInstance(np.array([[0, 1], [0, 2], [1, 2]]), np.array([3.0, 2.0, 1.0]), 3)
    p = project_out(inst, np.array([0]))
    # patterns {0,1} and {0,2} become {1, phantom 3} and {2, phantom 3}; {1,2} is kept
    assert sorted(map(tuple, p.patterns.tolist())) == [(1, 2), (1, 3), (2, 3)]
    assert p.num_experts == 5 and p.counts.sum() == 6


# ---- the pipeline -------------------------------------------------------------------------------


def _synthetic(E=16, K=4, T=600, seed=0, skew=1.2):
    rng = np.random.default_rng(seed)
    w = rng.pareto(skew, E) + 0.2
    ids = np.array([rng.choice(E, K, replace=False, p=w / w.sum()) for _ in range(T)])
    return make_trace(np.stack([ids, np.roll(ids, 1, axis=1)], axis=1), E, request_ids=np.arange(T) // 10)


@pytest.mark.parametrize("G", [1, 2])
def test_ep2_one_copy_per_rank_works(G):
    tr = _synthetic(E=8, K=2)
    topo = Topology.uniform(2, G)
    plan = solve(tr, topo, SolveOptions(redundant_per_rank=1, time_limit=2, deterministic=True, max_imbalance=1.2))
    validate_plan(plan)
    for a in plan.layers.values():
        assert a.shape == (2, 5) and all(len(set(r.tolist())) == 5 for r in a)


def test_locality_copies_beat_balance_copies_on_train_node_sends():
    tr = _synthetic()
    topo = Topology.uniform(8, 2)
    kw = dict(redundant_per_rank=1, time_limit=4, deterministic=True, max_imbalance=1.2)
    loc = solve(tr, topo, SolveOptions(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bal = solve(tr, topo, SolveOptions(copy_placement="balance", **kw))
    ml, mb = evaluate_layers(loc.layers, topo, tr), evaluate_layers(bal.layers, topo, tr)
    assert ml.node_sends < mb.node_sends
    assert ml.imbalance <= 1.2 + 1e-9
    again = solve(tr, topo, SolveOptions(**kw))  # deterministic
    assert all((again.layers[l] == loc.layers[l]).all() for l in loc.layers)


def test_one_very_hot_expert_top1_still_gets_copies():
    # Llama-4-like: top-1, one expert carries most pairs; primaries are balanced on per-copy shares.
    rng = np.random.default_rng(1)
    E, T = 16, 800
    ids = np.where(rng.random(T) < 0.5, 0, rng.integers(0, E, T))[:, None]
    tr = make_trace(ids, E, request_ids=np.arange(T) // 20)
    topo = Topology.uniform(8, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = solve(tr, topo, SolveOptions(redundant_per_rank=1, time_limit=3, deterministic=True, max_imbalance=1.3))
    a = plan.layers[1]
    assert (a == 0).sum() >= 4  # the hot expert is replicated widely
    assert evaluate_layers(plan.layers, topo, tr).imbalance < 2.0


# ---- group-preserving mode ----------------------------------------------------------------------


@pytest.mark.parametrize("n_group,R,G", [(2, 8, 2), (4, 8, 2), (2, 4, 1), (8, 4, 2)])
def test_preserve_groups_keeps_every_expert_in_its_groups_slots(n_group, R, G):
    tr = _synthetic(E=16, skew=4.0)
    topo = Topology.uniform(R, G)
    plan = solve(tr, topo, SolveOptions(preserve_groups=n_group, time_limit=2, deterministic=True, max_imbalance=3.0))
    size, S = 16 // n_group, 16 // R
    for a in plan.layers.values():
        assert sorted(a.ravel().tolist()) == list(range(16))
        for r in range(R):
            for s in range(S):
                assert a[r, s] // size == (r * S + s) // size


def test_preserve_groups_still_optimises_inside_groups():
    tr = _synthetic(E=16, skew=4.0)
    topo = Topology.uniform(8, 2)  # groups of 8 span 2 nodes: experts may move between those nodes
    free_in_group = solve(tr, topo, SolveOptions(preserve_groups=2, time_limit=2, deterministic=True, max_imbalance=3.0))
    lin = evaluate_layers({}, topo, tr)
    assert evaluate_layers(free_in_group.layers, topo, tr).node_sends < lin.node_sends


def test_preserve_groups_refuses_copies_and_uneven_groups():
    tr = _synthetic(E=16, skew=4.0)
    with pytest.raises(SolveError, match="extra slots p >= 16 belong to no group"):
        solve(tr, Topology.uniform(4, 2), SolveOptions(preserve_groups=2, redundant_per_rank=1, time_limit=1))
    with pytest.raises(SolveError, match="--preserve-groups 3 does not divide num_experts 16"):
        solve(tr, Topology.uniform(4, 2), SolveOptions(preserve_groups=3, time_limit=1))


def test_cli_reads_n_group_from_the_model_config(tmp_path, capsys):
    from vllm_moeplace.cli.main import main
    from vllm_moeplace.plan import load_plan
    from vllm_moeplace.trace import save_trace

    tr = _synthetic(E=16, skew=4.0)
    save_trace(tmp_path / "t.npz", tr)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"n_group": 4, "topk_group": 2}))
    out = tmp_path / "p.json"
    args = ["solve", "--trace", str(tmp_path / "t.npz"), "--ep-size", "8", "--ranks-per-node", "2", "--time-limit", "2",
            "--max-imbalance", "3.0", "--preserve-groups", "--model", str(tmp_path / "model"), "--out", str(out)]
    assert main(args) == 0
    plan = load_plan(out)
    assert plan.solver["options"]["preserve_groups"] == 4
    for a in plan.layers.values():
        assert all(a[r, s] // 4 == (r * 2 + s) // 4 for r in range(8) for s in range(2))
    (tmp_path / "model" / "config.json").write_text("{}")
    assert main(args) != 0
    assert "has no positive integer n_group" in capsys.readouterr().err
