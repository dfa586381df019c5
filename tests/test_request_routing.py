"""Request-aware placement (issue 12): signatures, grouping, the router, the plan section, the
routed metrics and the solver's request_node_sends objective."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from _builders import trace_from_ids
from vllm_moeplace.metrics import evaluate_layers
from vllm_moeplace.plan import Plan, PlanError, Topology, parse_plan
from vllm_moeplace.request_routing import (
    RequestRouting,
    Router,
    RoutingError,
    allowed,
    balanced_assign,
    fit_groups,
    group_ranks,
    route_trace,
    signatures,
)
from vllm_moeplace.routed_metrics import evaluate_routed, score_routing
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.pipeline import SolveError, solve
from vllm_moeplace.solver.request_groups import RequestGroupOptions


def two_populations(n_req: int = 40, prefill: int = 4, decode: int = 6, L: int = 2, E: int = 8, K: int = 1,
                    seed: int = 0, noise: float = 0.0):
    """Even requests use experts 0..E/2-1, odd ones E/2..E-1 (each token K distinct experts of its
    half, every layer), in prefill and decode; `noise`: share of tokens from the other half."""
    rng = np.random.default_rng(seed)
    ids, req, pre = [], [], []
    half = E // 2
    for r in range(n_req):
        for t in range(prefill + decode):
            base = (r % 2) * half
            if rng.random() < noise:
                base = half - base
            ids.append([rng.choice(half, K, replace=False) + base for _ in range(L)])
            req.append(r)
            pre.append(t < prefill)
    return trace_from_ids(np.array(ids), E, request_ids=req, is_prefill=pre)


# ---- signatures -------------------------------------------------------------------------------


def test_signature_is_the_prefill_histogram_per_layer_at_unit_norm():
    # request 0: prefill picks expert 1 twice at layer 1, experts 2 and 3 at layer 2; decode ignored
    ids = [[[1], [2]], [[1], [3]], [[0], [0]]]
    t = trace_from_ids(ids, 4, request_ids=[0, 0, 0], is_prefill=[True, True, False])
    reqs, X, ok = signatures(t, [1, 2])
    assert reqs.tolist() == [0] and ok.tolist() == [True]
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(X[0], [0, s, 0, 0, 0, 0, 0.5, 0.5])
    assert np.linalg.norm(X[0]) == pytest.approx(1.0)


def test_signature_never_reads_decode_routing():
    t = two_populations(n_req=6)
    other = t.topk_ids.copy()
    other[~t.is_prefill] = (other[~t.is_prefill] + 3) % 8  # decode routing changed, prefill kept
    t2 = trace_from_ids(other, 8, request_ids=t.request_ids, is_prefill=t.is_prefill)
    np.testing.assert_array_equal(signatures(t, [1, 2])[1], signatures(t2, [1, 2])[1])


def test_request_without_prefill_has_no_signature():
    t = trace_from_ids([[0], [1], [2]], 4, request_ids=[0, 0, 1], is_prefill=[True, False, False])
    _, X, ok = signatures(t, [1])
    assert ok.tolist() == [True, False] and not X[1].any()


# ---- grouping ----------------------------------------------------------------------------------


def test_balanced_assign_respects_capacity_and_lets_the_most_decided_choose_first():
    sim = np.array([[0.9, 0.1], [0.8, 0.7], [0.6, 0.0]])
    out = balanced_assign(sim, np.array([2, 1]))
    # rows 0 and 2 lose most by not getting group 0: they take it; row 1 goes to group 1
    assert out.tolist() == [0, 1, 0]


def test_fit_groups_recovers_two_populations_with_equal_sizes():
    t = two_populations(n_req=40)
    _, X, _ = signatures(t, [1, 2])
    labels, C = fit_groups(X, 2, seed=3)
    assert np.bincount(labels).tolist() == [20, 20]
    assert len(set(labels[0::2])) == 1 and len(set(labels[1::2])) == 1 and labels[0] != labels[1]
    np.testing.assert_allclose(np.linalg.norm(C, axis=1), 1.0)


def test_group_ranks_split_nodes_and_refuse_what_does_not_fit():
    nodes = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert group_ranks(nodes, 2) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert group_ranks(nodes, 4) == ((0, 1), (2, 3), (4, 5), (6, 7))
    with pytest.raises(RoutingError, match="multiple of the 2 node"):
        group_ranks(nodes, 3)
    with pytest.raises(RoutingError, match="not divisible"):
        group_ranks(nodes, 6)


# ---- the router -------------------------------------------------------------------------------


def _routing(G: int = 2, D: int = 4, share: float = 1.10) -> RequestRouting:
    C = np.eye(G, D)
    return RequestRouting((1,), C, tuple((g,) for g in range(G)), share)


@pytest.mark.parametrize("share", [1.0, 1.10, 1.5])
def test_router_never_lets_a_group_exceed_its_share_cap(share):
    rng = np.random.default_rng(0)
    router = Router(_routing(3, share=share))
    for n in range(1, 400):
        # everybody prefers group 0: only the cap spreads them
        sig = np.array([1.0, 0.1 * rng.random(), 0.1 * rng.random(), 0.0])
        router.route(sig / np.linalg.norm(sig))
        assert router.counts.max() <= allowed(n, 3, share)
    assert router.counts.max() <= max(math.ceil(399 / 3), share * 399 / 3)


def test_router_sends_each_request_to_its_nearest_centroid_when_there_is_room():
    router = Router(_routing(2, share=2.0))
    assert [router.route(np.array(v, float)) for v in ([0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0])] == [1, 0, 1]


def test_router_falls_back_to_the_emptiest_group_and_logs_why(caplog):
    router = Router(_routing(2, share=2.0))
    router.route(np.array([1.0, 0, 0, 0]))
    with caplog.at_level(logging.INFO, logger="vllm_moeplace.request_routing"):
        assert router.route(None, "request 7 has no prefill tokens") == 1
    assert "request 7 has no prefill tokens" in caplog.text


def test_route_trace_uses_the_fallback_for_requests_without_prefill():
    t = trace_from_ids([[0], [1], [1]], 4, request_ids=[0, 1, 2], is_prefill=[True, False, True])
    routing = RequestRouting((1,), np.eye(2, 4), ((0,), (1,)), 2.0)
    tok, req = route_trace(routing, t)
    assert req.tolist() == [0, 1, 1]  # request 1 (decode only) -> fallback, the emptier group 1
    assert tok.tolist() == [0, 1, 1]


# ---- the plan section ------------------------------------------------------------------------


def _plan_json(**routing_overrides) -> dict:
    routing = RequestRouting((1,), np.eye(2, 4), ((0, 1), (2, 3)), 1.1).to_json()
    routing.update(routing_overrides)
    return {"format": "vllm-moeplace/plan", "version": 1,
            "model": {"name": "t", "num_experts": 4, "moe_layers": [1, 2]}, "ep_size": 4,
            "topology": {"ranks_per_node": 2}, "layers": {"1": [[0], [1], [2], [3]]},
            "request_routing": routing}


def test_plan_with_request_routing_round_trips_and_plans_without_it_stay_valid():
    data = _plan_json()
    plan = parse_plan(data)
    assert plan.request_routing.group_ranks == ((0, 1), (2, 3))
    np.testing.assert_allclose(plan.request_routing.centroids, np.eye(2, 4))
    again = parse_plan(json.loads(json.dumps(plan.to_json())))
    assert again.to_json()["request_routing"] == plan.to_json()["request_routing"]
    del data["request_routing"]
    assert parse_plan(data).request_routing is None
    assert "request_routing" not in parse_plan(data).to_json()


@pytest.mark.parametrize("override, field, words", [
    ({"signature": {"kind": "decode_histogram", "layers": [1]}}, "request_routing.signature.kind", "unknown signature"),
    ({"groups": [{"ranks": [0, 1], "centroid": [1, 0, 0, 0]}]}, "request_routing.groups", "ranks [2, 3] in no group"),
    ({"groups": [{"ranks": [0, 1], "centroid": [float("nan"), 0, 0, 0]}, {"ranks": [2, 3], "centroid": [0, 1, 0, 0]}]},
     "request_routing.groups[0].centroid[0]", "not finite"),
    ({"groups": [{"ranks": [0, 1], "centroid": [1, 0]}, {"ranks": [2, 3], "centroid": [0, 1, 0, 0]}]},
     "request_routing.groups[0].centroid", "2 values, expected 4"),
    ({"groups": [{"ranks": [0, 2], "centroid": [1, 0, 0, 0]}, {"ranks": [1, 3], "centroid": [0, 1, 0, 0]}]},
     "request_routing.groups[0].ranks", "span several nodes"),
    ({"signature": {"kind": "prefill_expert_histogram", "layers": [5]}}, "request_routing.signature.layers",
     "not MoE layers"),
    ({"version": 9}, "request_routing.version", "unsupported version 9"),
])
def test_bad_request_routing_sections_are_refused_naming_the_field(override, field, words):
    with pytest.raises(PlanError) as e:
        parse_plan(_plan_json(**override), source="p.json")
    assert f"p.json: field '{field}'" in str(e.value) and words in str(e.value)


def test_validate_cli_refuses_a_nan_centroid_file(tmp_path, capsys):
    from vllm_moeplace.cli.main import main

    text = json.dumps(_plan_json()).replace('"centroid": [1.0', '"centroid": [NaN', 1)
    f = tmp_path / "p.json"
    f.write_text(text)
    assert main(["validate", str(f)]) != 0
    assert "NaN" in capsys.readouterr().err


# ---- routed metrics ---------------------------------------------------------------------------


@pytest.mark.parametrize("copies", [False, True])
def test_spread_origins_give_exactly_the_uniform_metrics(copies):
    rng = np.random.default_rng(1)
    t = trace_from_ids(np.array([[rng.choice(8, 2, replace=False) for _ in range(2)] for _ in range(60)]), 8)
    topo = Topology.uniform(4, 2)
    lay = {1: np.array([[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 0]]) if copies else np.arange(8).reshape(4, 2),
           2: np.array([[7, 1, 3], [6, 0, 5], [2, 4, 3], [5, 1, 7]]) if copies else np.array([[7, 1], [6, 0], [2, 4], [5, 3]])}
    m = evaluate_layers(lay, topo, t)
    r = evaluate_routed(lay, topo, t, np.full(t.num_tokens, -1), ())
    assert r.node_sends == pytest.approx(m.node_sends)
    assert r.rank_sends == pytest.approx(m.rank_sends)
    assert r.imbalance == pytest.approx(m.imbalance)


def test_routed_node_sends_counts_nodes_other_than_the_groups_by_phase():
    # 2 nodes x 1 rank; experts 0 on rank 0, 1 on rank 1; top-1, one layer
    t = trace_from_ids([[0], [1], [1], [0]], 2, request_ids=[0, 0, 1, 1], is_prefill=[True, False, True, False])
    topo = Topology.uniform(2, 1)
    lay = {1: np.array([[0], [1]])}
    r = evaluate_routed(lay, topo, t, np.array([0, 0, 1, 1]), ((0,), (1,)))
    # group 0 on node 0: prefill expert 0 local, decode expert 1 remote; group 1 on node 1: the opposite
    assert (r.node_sends_prefill, r.node_sends_decode) == (0.0, 1.0)
    assert r.node_sends == 0.5 and r.imbalance == 1.0


# ---- the solver -------------------------------------------------------------------------------


def test_request_node_sends_patterns_are_keyed_by_home_with_zero_cost_at_home():
    from vllm_moeplace.solver.objectives.request_sends import RequestNodeSends

    t = trace_from_ids([[0], [0], [1]], 4, request_ids=[0, 1, 2])
    topo = Topology.uniform(4, 2)
    obj = RequestNodeSends(np.array([0, 1, -1]), ((0, 1), (2, 3)), topo.node_of_rank)
    inst, w = obj.layer_patterns(t, 0, topo)
    rows = sorted((tuple(p), float(c), tuple(x)) for p, c, x in zip(inst.patterns.tolist(), inst.counts, w.tolist()))
    # keyed (expert 0, home 0), (expert 0, home 1), (expert 1, no home): weights x R = 4
    assert rows == [((0,), 1.0, (0.0, 4.0)), ((0,), 1.0, (4.0, 0.0)), ((1,), 1.0, (2.0, 2.0))]
    with pytest.raises(ValueError, match="needs the train tokens' home nodes"):
        RequestNodeSends().layer_patterns(t, 0, topo)


def test_solve_with_request_groups_puts_each_population_on_its_groups_node():
    trace = two_populations(n_req=40, E=8, K=2, noise=0.05)
    topo = Topology.uniform(4, 2)
    opts = SolveOptions(time_limit=2.0, deterministic=True, max_imbalance=1.3)
    plan = solve(trace, topo, opts, request_groups=RequestGroupOptions(2))
    assert plan.request_routing is not None and plan.solver["options"]["objective"] == "request_node_sends"
    parse_plan(json.loads(json.dumps(plan.to_json())))  # the file it writes is valid
    sc = score_routing(plan, trace)
    assert sc.share_imbalance <= 1.10
    # with origins on the group's node nearly every token is local; spread evenly, half of them are not
    assert sc.routed.node_sends_decode < 0.2 < 0.4 < sc.spread.node_sends_decode
    plain = solve(trace, topo, opts)
    base = evaluate_routed(plain.layers, topo, trace, np.full(trace.num_tokens, -1), ())
    assert sc.routed.node_sends_decode < 0.5 * base.node_sends_decode


def test_solve_with_request_groups_and_copies_keeps_slots_and_validates():
    trace = two_populations(n_req=30, E=8, K=1, noise=0.1)
    topo = Topology.uniform(4, 2)
    plan = solve(trace, topo, SolveOptions(time_limit=2.0, deterministic=True, max_imbalance=1.2, redundant_per_rank=1),
                 request_groups=RequestGroupOptions(2))
    assert plan.slots_per_rank() == 3 and plan.has_redundancy()
    assert score_routing(plan, trace).routed.node_sends_decode <= score_routing(plan, trace).spread.node_sends_decode


def test_everywhere_copies_put_the_hottest_experts_on_every_node_only_when_asked():
    # Separated populations: locality alone gives a group's experts no reason to sit on the other
    # node; the option seeds the plain solver's structure (the hottest experts on every node) first.
    from vllm_moeplace import trace_stats
    from vllm_moeplace.solver.replicas import everywhere_set

    trace = two_populations(n_req=30, E=16, K=1)
    topo = Topology.uniform(4, 2)
    opts = SolveOptions(time_limit=2.0, deterministic=True, max_imbalance=1.2, redundant_per_rank=2, keep_plan=True)
    load = trace_stats.expert_load(trace)

    def on_every_node(plan: Plan) -> int:
        n = 0
        for l, lid in enumerate(trace.layer_ids.tolist()):
            lay = np.asarray(plan.layers[lid])
            n += sum(all(np.isin(e, lay[rs]).any() for rs in topo.nodes) for e in everywhere_set(load[l], topo, 2))
        return n

    with_flag = solve(trace, topo, opts, request_groups=RequestGroupOptions(2, everywhere_copies=True))
    without = solve(trace, topo, opts, request_groups=RequestGroupOptions(2))
    assert on_every_node(with_flag) == 2 * 8 > on_every_node(without)
    assert with_flag.solver["request_groups"]["everywhere_copies"] is True
    assert "everywhere_copies" not in without.solver["request_groups"]


@pytest.mark.parametrize("kw, words", [
    (dict(inter_layer_weight=0.5), "--inter-layer-weight"),
    (dict(objective="hop_cost"), "--objective hop_cost"),
    (dict(preserve_groups=2), "--preserve-groups"),
])
def test_request_groups_refuse_what_they_do_not_combine_with(kw, words):
    trace = two_populations(n_req=8)
    with pytest.raises(SolveError, match=words):
        solve(trace, Topology.uniform(4, 2), SolveOptions(time_limit=1.0, **kw), request_groups=RequestGroupOptions(2))


def test_request_node_sends_without_groups_is_refused():
    with pytest.raises(SolveError, match="needs request groups"):
        solve(two_populations(n_req=8), Topology.uniform(4, 2), SolveOptions(time_limit=1.0, objective="request_node_sends"))


# ---- command line --------------------------------------------------------------------------


def test_cli_solve_and_evaluate_with_request_groups(tmp_path, capsys):
    from vllm_moeplace.cli.main import main
    from vllm_moeplace.trace import save_trace

    tr = tmp_path / "t.npz"
    save_trace(tr, two_populations(n_req=40, E=8, K=2, noise=0.05))
    out = tmp_path / "p.json"
    assert main(["solve", "--trace", str(tr), "--ep-size", "4", "--ranks-per-node", "2", "--out", str(out),
                 "--request-groups", "--train-fraction", "0.5", "--max-imbalance", "1.3", "--time-limit", "2",
                 "--deterministic"]) == 0
    assert "routed by the plan's router" in capsys.readouterr().out
    assert main(["evaluate", "--plan", str(out), "--trace", str(tr), "--baselines", "none", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)[str(out)]["request_routing"]["held_out"]
    assert rep["routed"]["node_sends_decode"] < rep["spread"]["node_sends_decode"]
    assert rep["share_imbalance"] <= 1.10
    assert main(["solve", "--trace", str(tr), "--ep-size", "4", "--ranks-per-node", "2", "--out",
                 str(tmp_path / "q.json"), "--request-groups", "3"]) != 0
    assert "multiple of the 2 node" in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()
    assert main(["solve", "--trace", str(tr), "--ep-size", "4", "--ranks-per-node", "2", "--out",
                 str(tmp_path / "q.json"), "--signature-layers", "1"]) != 0
    assert "only with --request-groups" in capsys.readouterr().err


# ---- analysis (moeplace analyze) -------------------------------------------------------------


def test_request_analysis_sees_the_populations_and_their_label_shift():
    from vllm_moeplace.profiling.requests import analyze_requests, tv_distance

    t = two_populations(n_req=40, L=2, E=8, K=1, noise=0.0)
    labels = np.array(["a" if r % 2 == 0 else "b" for r in range(40)])
    t = trace_from_ids(t.topk_ids, 8, request_ids=t.request_ids, is_prefill=t.is_prefill, labels=labels)
    ra = analyze_requests(t)
    assert ra.target.startswith("decode")
    g2 = [r for r in ra.rows if r.groups == 2]
    assert g2 and all(r.hit == pytest.approx(1.0) and r.oracle_hit == pytest.approx(1.0) for r in g2)
    assert all(r.self_cosine > r.other_cosine for r in g2)
    # each label uses one half of the experts: its shares are 1/4 where the whole trace's are 1/8
    assert ra.label_tv == {"a": pytest.approx(0.5), "b": pytest.approx(0.5)}
    assert tv_distance(np.array([1.0, 0]), np.array([0, 2.0])) == 1.0


def test_request_analysis_of_a_prefill_only_trace_predicts_later_layers():
    from vllm_moeplace.profiling.requests import analyze_requests

    t = two_populations(n_req=20, prefill=6, decode=0, L=3, E=8)
    ra = analyze_requests(t)
    assert ra.target.startswith("prefill")
    assert {r.depth for r in ra.rows} == {1, 2}  # the all-layer signature leaves nothing to predict
    assert any("no later layers" in n for n in ra.notes)
    assert all(r.hit == pytest.approx(1.0) for r in ra.rows if r.groups == 2)


def test_analyze_report_has_the_request_section(tmp_path):
    from vllm_moeplace.profiling.analyze import write_report

    write_report(two_populations(n_req=20), tmp_path, ["moeplace analyze t.npz --out x"], "t.npz")
    text = (tmp_path / "report.md").read_text()
    assert "## Request-level routing" in text and (tmp_path / "request_groups.png").exists()


def test_copy_model_prices_every_addition_on_a_rank_exactly():
    from vllm_moeplace.routed_metrics import origin_weights
    from vllm_moeplace.solver.request_copies import CopyModel

    rng = np.random.default_rng(4)
    t = trace_from_ids(np.array([rng.choice(8, 2, replace=False) for _ in range(80)]), 8)
    topo = Topology.uniform(4, 2)
    W = origin_weights(rng.integers(-1, 2, t.num_tokens), ((0, 1), (2, 3)), 4)
    model = CopyModel(t, 0, W, topo, 1.05)
    holds = np.zeros((4, 8), dtype=bool)
    holds[[0, 0, 1, 1, 2, 2, 3, 3, 2], [0, 1, 2, 3, 4, 5, 6, 7, 0]] = True
    for r in range(4):
        got = model.add_costs(holds, r)
        for e in range(8):
            if holds[r, e]:
                assert got[e] == np.inf
                continue
            h = holds.copy()
            h[r, e] = True
            assert got[e] == pytest.approx(model.cost(h))
    # loads are the expected pairs: they add up to every pair of the layer
    assert model.loads_and_remote(holds)[0].sum() == pytest.approx(t.num_tokens * 2)



def test_window_router_moves_the_least_decided_request_and_keeps_the_cap():
    routing = RequestRouting((1,), np.eye(2, 4), ((0,), (1,)), 1.0)
    s = lambda a, b: np.array([a, b, 0.0, 0.0]) / np.hypot(a, b)  # noqa: E731
    sigs = [s(1, 0.9), s(1, 0), s(1, 0.1), s(0.2, 1)]  # the first is the least sure of group 0
    one = Router(routing)
    # one at a time, the cap (1 each after 2 requests) pushes request 1, very sure of group 0, to 1
    assert [one.route(x) for x in sigs] == [0, 1, 0, 1]
    win = Router(routing)
    # as a window of 4 (cap 2 each at its end) the least decided request 0 takes the second choice
    assert win.route_window(sigs) == [1, 0, 0, 1]
    assert win.counts.tolist() == [2, 2]
    with pytest.raises(RoutingError, match="window 0"):
        route_trace(RequestRouting((1, 2), np.eye(2, 16), ((0,), (1,)), 1.1), two_populations(n_req=4), window=0)


def test_one_group_per_dp_rank_with_copies_uses_per_rank_origins():
    trace = two_populations(n_req=32, E=8, K=1, noise=0.1)
    topo = Topology.uniform(4, 2)
    plan = solve(trace, topo, SolveOptions(time_limit=2.0, deterministic=True, max_imbalance=1.3, redundant_per_rank=1),
                 request_groups=RequestGroupOptions(4))
    assert plan.request_routing.group_ranks == ((0,), (1,), (2,), (3,))
    sc = score_routing(plan, trace)
    assert sc.share_imbalance <= 1.10
    assert sc.routed.node_sends_decode < sc.spread.node_sends_decode


def test_the_published_schema_accepts_a_request_routing_section_and_refuses_a_bad_one():
    jsonschema = pytest.importorskip("jsonschema")
    from vllm_moeplace.plan_schema import plan_json_schema

    v = jsonschema.Draft202012Validator(plan_json_schema())
    v.validate(_plan_json())
    bad = _plan_json()
    bad["request_routing"]["groups"][0]["colour"] = "red"
    assert not v.is_valid(bad)


def test_copy_state_with_uniform_origin_weights_is_the_unweighted_state():
    from vllm_moeplace.solver.replicas import CopyState

    rng = np.random.default_rng(7)
    ids = np.array([rng.choice(8, 2, replace=False) for _ in range(120)])
    topo = Topology(6, [[0, 1, 2], [3, 4], [5]])  # uneven nodes: g = 3, 2, 1
    layout = np.array([[0, 6], [1, 7], [2, 3], [3, 4], [5, 0], [6, 1]])
    plain = CopyState(ids, layout, topo, 8, 1e9)
    g = topo.ranks_per_node.astype(np.float64)
    weighted = CopyState(ids, layout, topo, 8, 1e9, origin=np.repeat(g[:, None], len(ids), axis=1))
    assert weighted.node_cost() == pytest.approx(plain.node_cost())
    np.testing.assert_allclose(weighted.RL, plain.RL)
    for u in range(3):
        np.testing.assert_allclose(weighted.local_gain(u), plain.local_gain(u))
    for e, hold in ((2, [2, 5]), (4, [0, 3, 5]), (7, [4])):
        assert weighted.delta(e, hold) == pytest.approx(plain.delta(e, hold))
        np.testing.assert_allclose(weighted.expert_load(e, hold), plain.expert_load(e, hold))


def test_copy_state_with_group_origins_matches_the_routed_metrics():
    from vllm_moeplace.routed_metrics import origin_weights
    from vllm_moeplace.solver.replicas import CopyState

    rng = np.random.default_rng(8)
    ids = np.array([rng.choice(8, 2, replace=False) for _ in range(90)])
    t = trace_from_ids(ids, 8)
    topo = Topology.uniform(4, 2)
    layout = np.array([[0, 1, 4], [2, 3, 0], [4, 5, 2], [6, 7, 1]])  # with copies
    groups = rng.integers(-1, 2, len(ids))
    W = origin_weights(groups, ((0, 1), (2, 3)), 4)
    Wn = np.stack([W[[0, 1]].sum(axis=0), W[[2, 3]].sum(axis=0)]) * 4
    st = CopyState(ids, layout, topo, 8, 1e9, origin=Wn)
    m = evaluate_routed({1: layout}, topo, t, groups, ((0, 1), (2, 3)))
    assert st.node_cost() / (len(ids) * 4) == pytest.approx(m.node_sends)
    load = np.zeros(4)
    for e in range(8):
        load += st.expert_load(e, sorted(st.holders[e]))
    assert load.max() / load.mean() == pytest.approx(m.imbalance)


def test_routed_batches_keep_every_rank_full_and_origins_in_the_tokens_group():
    from vllm_moeplace.sim.network import BatchSpec
    from vllm_moeplace.sim.run import sample_routed_batches

    t = two_populations(n_req=10)
    groups = np.where(t.request_ids % 2 == 0, 0, 1)
    groups[t.request_ids == 9] = -1  # spread by the router: any rank
    spec = BatchSpec(tokens_per_rank=5, phase="decode", steps=3, seed=0)
    for b in sample_routed_batches(t, spec, groups, ((0, 1), (2, 3)), 4):
        assert np.bincount(b.origins, minlength=4).tolist() == [5, 5, 5, 5]
        assert not t.is_prefill[b.tokens].any()
        g = groups[b.tokens]
        home = np.where(b.origins < 2, 0, 1)
        assert ((g == home) | (g < 0)).all()
