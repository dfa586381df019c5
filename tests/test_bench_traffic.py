"""The serving benchmark's traffic counter (physical ids) against the solver's evaluator (logical
ids + plan): two independent implementations that must agree on the same routing."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_moeplace.bench.serve_bench import LayoutRun, LayoutSpec, _routing_agreement, logical_trace
from vllm_moeplace.bench.traffic import count_traffic
from vllm_moeplace.plan import Plan, Topology
from vllm_moeplace.metrics import evaluate_plan


def _routing(rng, T, L, K, E):
    return np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)]).astype(np.int16)


def _run(phys, E, layer_ids, plan_path=None):
    T = phys.shape[0]
    return LayoutRun(
        spec=LayoutSpec("x", plan_path), load=None, startup_s=0.0, physical_ids=phys,
        prompt_index=np.repeat(np.arange((T + 3) // 4), 4)[:T].astype(np.int32),
        positions=np.tile(np.arange(4), (T + 3) // 4)[:T].astype(np.int32),
        is_prefill=np.ones(T, bool), layer_ids=np.asarray(layer_ids, np.int32), num_experts=E,
    )


def test_golden_one_token():
    # 8 experts over 4 ranks (2 slots each), nodes {0,1} {2,3}; token picks experts 0, 1, 5
    # -> ranks {0, 2} -> nodes {0, 1}
    t = count_traffic(np.array([[[0, 1, 5]]]), 8, [[0, 1], [2, 3]])
    assert t.rank_sends == pytest.approx(2 * (1 - 1 / 4))
    assert t.node_sends == pytest.approx(2 * (1 - 2 / 4))
    assert t.pairs_remote == pytest.approx(3 * 0.75)
    assert t.rank_load == (2, 0, 1, 0)
    assert t.imbalance == pytest.approx(2 / 0.75)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ranks=st.sampled_from([2, 4]), rpn=st.sampled_from([1, 2]))
def test_counted_traffic_equals_evaluate_on_the_logical_trace(seed, ranks, rpn):
    rng = np.random.default_rng(seed)
    E, L, K, T = 8, 3, 3, 40
    layer_ids = [1, 2, 4]
    topo = Topology.uniform(ranks, rpn)
    layers = {l: rng.permutation(E).reshape(ranks, E // ranks) for l in layer_ids}
    plan = Plan(model_name="m", num_experts=E, moe_layers=layer_ids, ep_size=ranks, topology=topo, layers=layers)
    phys = _routing(rng, T, L, K, E)
    counted = count_traffic(phys, E, topo.nodes)
    trace = logical_trace(_run(phys, E, layer_ids), plan, None, "m")
    scored = evaluate_plan(plan, trace)
    assert counted.node_sends == pytest.approx(scored.node_sends, rel=1e-9)
    assert counted.rank_sends == pytest.approx(scored.rank_sends, rel=1e-9)
    assert counted.imbalance == pytest.approx(scored.imbalance, rel=1e-9)


def test_logical_trace_inverts_the_plan_permutation():
    E, layer_ids = 4, [0]
    plan = Plan(model_name="m", num_experts=E, moe_layers=layer_ids, ep_size=2, topology=Topology.uniform(2, 1),
                layers={0: np.array([[3, 0], [2, 1]])})
    phys = np.array([[[0, 1]], [[2, 3]]], np.int16)  # physical 0,1 = logical 3,0; physical 2,3 = logical 2,1
    tr = logical_trace(_run(phys, E, layer_ids), plan, None, "m")
    assert tr.topk_ids[:, 0].tolist() == [[3, 0], [2, 1]]
    # agreement with another run: the same expert sets in another order agree; one changed
    # (token, layer) of two does not
    other = logical_trace(_run(phys[:, :, ::-1].copy(), E, layer_ids), plan, None, "m")
    assert _routing_agreement(tr, other) == 1.0
    changed = logical_trace(_run(np.array([[[0, 1]], [[2, 0]]], np.int16), E, layer_ids), plan, None, "m")
    assert _routing_agreement(tr, changed) == 0.5


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([(2, 1), (4, 2), (4, 1), (6, 3)]), st.integers(1, 3))
def test_copies_counted_from_physical_ids_equal_evaluate_at_the_same_origins(seed, shape, extra):
    """With redundant copies: physical ids chosen by the replica rule from virtual origins (what the
    engine's table does), counted by the plain counter, equal the evaluator's view of the same
    tokens and origins (a separate, vectorised implementation in vllm_moeplace.metrics)."""
    from vllm_moeplace.replica import candidate_table, replicated_origin, select
    from vllm_moeplace.metrics import evaluate_layers_at_origins
    from vllm_moeplace.trace import Trace

    R, g = shape
    rng = np.random.default_rng(seed)
    per, T, K, L = 2, 30, 2, 2
    E = R * per
    extra = min(extra, E - per)
    layers = {}
    for l in range(L):
        a = rng.permutation(E).reshape(R, per)
        layers[l] = np.stack([np.concatenate([a[r], rng.choice(np.setdiff1d(np.arange(E), a[r]), extra, replace=False)])
                              for r in range(R)])
    topo = Topology.uniform(R, g)
    ids = _routing(rng, T, L, K, E)
    origin, spread = replicated_origin(T, R)
    phys = np.stack([select(candidate_table(layers[l], E, topo.node_of_rank), ids[:, l], origin, spread)
                     for l in range(L)], axis=1)
    counted = count_traffic(phys, R * (per + extra), topo.nodes, origin=origin)
    trace = Trace(topk_ids=ids, layer_ids=np.arange(L, dtype=np.int32), request_ids=np.zeros(T, np.int32),
                  is_prefill=np.ones(T, bool), num_experts=E)
    scored = evaluate_layers_at_origins(layers, topo, trace, origin, spread)
    for k in ("node_sends", "rank_sends", "imbalance"):
        assert getattr(counted, k) == pytest.approx(scored[k], rel=1e-12, abs=1e-12), k


def test_compare_to_reference_sees_different_tokens_and_routing():
    """The benchmark's default-vs-plan comparison, on runs that really differ (a self-comparison
    or a constant would pass the end-to-end tests, where the tokens are identical)."""
    import types

    from vllm_moeplace.bench.serve_bench import compare_to_reference

    E, layer_ids = 4, [0]
    plan = Plan(model_name="m", num_experts=E, moe_layers=layer_ids, ep_size=2, topology=Topology.uniform(2, 1),
                layers={0: np.array([[0, 1], [2, 3]])})

    def run(tokens, phys):
        r = _run(np.array(phys, np.int16), E, layer_ids)
        r.load = types.SimpleNamespace(requests=[types.SimpleNamespace(token_ids=t) for t in tokens])
        return r, logical_trace(r, plan, None, "m")

    ref, ref_tr = run([[5, 6], [7]], [[[0, 1]], [[2, 3]]])
    same, same_tr = run([[5, 6], [7]], [[[1, 0]], [[3, 2]]])
    other, other_tr = run([[5, 6], [8]], [[[0, 1]], [[2, 0]]])
    assert compare_to_reference(ref, ref_tr, None, ref_tr) == (None, None)  # the reference itself
    assert compare_to_reference(same, same_tr, ref, ref_tr) == (True, 1.0)
    assert compare_to_reference(other, other_tr, ref, ref_tr) == (False, 0.5)
