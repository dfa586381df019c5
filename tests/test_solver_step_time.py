"""The step_time objective: its surrogate (`solver/step_search.py`) and its solves."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _builders import trace_from_ids
from hypothesis import given, settings
from hypothesis import strategies as st
from test_solver_guard import FAST_LINKS, SHAPE, pair_trace

from vllm_moeplace.plan import Topology
from vllm_moeplace.solver.instance import LayerInstance
from vllm_moeplace.solver.instance import node_weights
from vllm_moeplace.solver.objectives.step_time import StepTimeError, layout_of, rank_of_layout
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.pipeline import solve
from vllm_moeplace.solver.step_search import StepDescent, blom_max, phase_cost
from vllm_moeplace.solver.swap_search import SwapSearch

R, E = 8, 16


def test_activation_probability_and_blom():
    ph = phase_cost(np.array([0.0, 0.01, 0.5, 1.0]), 1.0, 100, 1e-9, 1e-3, 0.0, 8)
    np.testing.assert_allclose(ph.q, [0.0, 1 - 0.99**100, 1 - 0.5**100, 1.0])
    np.testing.assert_allclose(ph.flop, 100 * np.array([0.0, 0.01, 0.5, 1.0]) * 1e-9)
    # Expected largest of n standard normals: 0 for one, ~1.42 for 8, ~1.77 for 16 (tabulated values).
    assert blom_max(1) == 0.0
    assert blom_max(8) == pytest.approx(1.42, abs=0.02) and blom_max(16) == pytest.approx(1.77, abs=0.02)


def _descent(seed: int, ranks_per_node: int = 2):
    rng = np.random.default_rng(seed)
    T = 300
    ids = np.stack([rng.choice(E, size=2, replace=False, p=rng.dirichlet(np.ones(E))) for _ in range(T)])
    inst = LayerInstance.from_trace(trace_from_ids(ids, E), 0)
    topo = Topology.uniform(R, ranks_per_node)
    p = inst.expert_load() / inst.total
    phases = [phase_cost(p, 0.4, 64 * R, 1e-6, 2e-4, 3e-4, R), phase_cost(p, 0.6, 4 * R, 1e-6, 2e-4, 1e-5, R)]
    rank_of = rng.permutation(np.repeat(np.arange(R), E // R))
    ns = SwapSearch(inst, topo.node_of_rank[rank_of], node_weights(topo.ranks_per_node, R))
    return StepDescent(phases, rank_of, topo.node_of_rank, ns, norm=R * inst.total), inst, topo


def _value_from_scratch(d: StepDescent, inst: LayerInstance, topo: Topology) -> float:
    fresh_ns = SwapSearch(inst, topo.node_of_rank[d.rank_of], node_weights(topo.ranks_per_node, R))
    return StepDescent(d.phases, d.rank_of, topo.node_of_rank, fresh_ns, d.norm).value()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_candidate_deltas_are_exact(seed):
    """The vectorised compute delta of every candidate swap equals re-computing the surrogate
    (without the node_sends term) after it."""
    d, inst, topo = _descent(seed)
    d.phases = [type(ph)(**{**ph.__dict__, "comm_per_node_send": 0.0}) for ph in d.phases]
    base = d.value()
    e, f, delta = d._candidates()
    assert len(e) > 0
    for i in np.random.default_rng(seed).choice(len(e), size=min(25, len(e)), replace=False):
        r = d.rank_of.copy()
        r[e[i]], r[f[i]] = r[f[i]], r[e[i]]
        ns = SwapSearch(inst, topo.node_of_rank[r], node_weights(topo.ranks_per_node, R))
        after = StepDescent(d.phases, r, topo.node_of_rank, ns, d.norm).value()
        assert after - base == pytest.approx(delta[i], abs=1e-12)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), g=st.sampled_from([1, 2, 4]))
def test_descent_lowers_the_surrogate_and_keeps_its_state_exact(seed, g):
    d, inst, topo = _descent(seed, g)
    before = d.value()
    after = d.descend(200)
    assert after <= before + 1e-15
    # The incremental state (rank sums, node counts) equals a fresh build on the final assignment.
    assert after == pytest.approx(_value_from_scratch(d, inst, topo), rel=1e-12)
    assert np.bincount(d.rank_of, minlength=R).tolist() == [E // R] * R
    np.testing.assert_array_equal(d.ns.a, topo.node_of_rank[d.rank_of])


def test_layout_round_trip():
    a = np.random.default_rng(0).permutation(E).reshape(R, E // R)
    b = layout_of(rank_of_layout(a, E), R, E // R)
    for x, y in zip(a, b):
        assert sorted(x) == list(y)


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "shape.json").write_text(json.dumps(SHAPE))
    (tmp_path / "hw.json").write_text(json.dumps(FAST_LINKS))
    return tmp_path


def _opts(files, **kw) -> SolveOptions:
    base = dict(time_limit=2, train_fraction=0.5, deterministic=True, model_shape=str(files / "shape.json"))
    return SolveOptions(**{**base, **kw})


def test_step_time_trades_node_sends_for_compute_when_links_are_free(files):
    """The guard's slower-plan case (co-locating hot pairs nearly doubles the slowest rank's FLOPs,
    and communication is free): node_sends co-locates; step_time balances instead. Held out, its
    own plan is as fast as linear up to sampling noise (every hot+cold pairing is equally balanced in
    expectation; the train half picks among them by its own sample), far faster than node_sends'."""
    t, topo = pair_trace(), Topology.uniform(R, 1)
    hw = str(files / "hw.json")
    ns = solve(t, topo, _opts(files, hardware=hw, phase_mix=1.0, max_imbalance=2.0, keep_plan=True))
    stp = solve(t, topo, _opts(files, hardware=hw, phase_mix=1.0, max_imbalance=2.0, objective="step_time", keep_plan=True))
    a, b = ns.solver["step_time"]["predicted_ms"], stp.solver["step_time"]["predicted_ms"]
    assert b["plan"]["prefill"] <= 1.05 * b["linear"]["prefill"]
    assert b["plan"]["prefill"] < 0.7 * a["plan"]["prefill"]
    for layer in stp.layers.values():  # every rank one hot (even id < 8 or its partner) and one cold expert
        hot = lambda x: (x % 8) % 2 == 0  # noqa: E731
        assert all(hot(int(r[0])) != hot(int(r[1])) for r in layer)


def test_step_time_co_locates_when_messages_cost(files):
    """Equal pair loads on the default hardware (slow RDMA): co-locating (e, e + 8) pairs saves
    remote nodes per token at little balance cost; step_time does it, beats linear in both phases
    and is at least as fast as the node_sends plan for the mix."""
    from vllm_moeplace.metrics import evaluate_layers

    rng = np.random.default_rng(1)
    e = rng.integers(0, 8, size=4000)
    t = trace_from_ids(np.stack([e, e + 8], axis=1), E, request_ids=np.arange(4000) // 20)
    topo = Topology.uniform(R, 1)
    plan = solve(t, topo, _opts(files, phase_mix=0.5, objective="step_time"))
    ns = solve(t, topo, _opts(files, phase_mix=0.5, keep_plan=True))
    st = plan.solver["step_time"]
    assert st["written"] == "plan"
    for k in ("prefill", "decode"):
        assert st["predicted_ms"]["plan"][k] < st["predicted_ms"]["linear"][k]
    assert st["predicted_ms"]["plan"]["mix"] <= ns.solver["step_time"]["predicted_ms"]["plan"]["mix"] * (1 + 1e-9)
    held = t.split_by_request(0.5)[1]
    lin = {1: np.arange(E).reshape(R, E // R)}
    assert evaluate_layers(plan.layers, topo, held).node_sends < evaluate_layers(lin, topo, held).node_sends


def test_step_time_refuses_what_it_does_not_support(files):
    t = pair_trace(400)
    with pytest.raises(StepTimeError, match="--redundant-per-rank"):
        solve(t, Topology.uniform(R, 1), _opts(files, objective="step_time", redundant_per_rank=1))
    with pytest.raises(Exception, match="--model-shape"):
        solve(t, Topology.uniform(R, 1), SolveOptions(objective="step_time", time_limit=1))
