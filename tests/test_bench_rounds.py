"""The serving benchmark's protocol, without vLLM: interleaved serving order, aggregation over
rounds (median, min-max, worst-round checks), warm-up requests kept out of every number, and the
per-round reference (a plan run is compared with the default run of its own round)."""

import json
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import vllm_moeplace.bench.serve_bench as sb
from vllm_moeplace.bench.load import LoadResult, RequestResult
from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.plan import Plan, Topology


def test_round_order_golden():
    # the A B B A A B ...
    assert [i for _, i in sb.round_order(2, 3)] == [0, 1, 1, 0, 0, 1]
    assert sb.round_order(3, 2) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0)]
    assert sb.round_order(2, 1) == [(0, 0), (0, 1)]
    with pytest.raises(MoeplaceError, match="round"):
        sb.round_order(2, 0)


@given(st.integers(1, 5), st.integers(1, 8))
def test_round_order_invariants(n, rounds):
    order = sb.round_order(n, rounds)
    assert len(order) == n * rounds
    for r in range(rounds):  # every round serves every layout exactly once, contiguously
        assert sorted(i for rr, i in order[r * n:(r + 1) * n] if rr == r) == list(range(n))
    if n > 1 and rounds > 1:  # no layout is always first in its round
        firsts = {order[r * n][1] for r in range(rounds)}
        assert len(firsts) == 2
    if n == 2 and rounds % 2 == 0:  # balanced: each layout first in half of the rounds
        assert sum(order[r * n][1] == 0 for r in range(rounds)) == rounds // 2


def test_spread_and_overlap():
    sp = sb.spread([30.0, 10.0, 20.0, 1000.0])
    assert sp == {"median": 25.0, "min": 10.0, "max": 1000.0, "n": 4}
    assert sb.spread([7.0])["median"] == 7.0
    assert sb.overlaps({"min": 1, "max": 3}, {"min": 3, "max": 9})
    assert not sb.overlaps({"min": 1, "max": 2.9}, {"min": 3, "max": 9})
    with pytest.raises(MoeplaceError):
        sb.spread([])


def _entry(tput, ttft, same=True, agree=True, rule=None, traffic=None):
    return {"plan": "p", "startup_s": 30.0, "requests": 4, "output_tokens": 40, "wall_s": 1.0,
            "throughput_tok_s": tput, "ttft_p50_ms": ttft, "ttft_p99_ms": 2 * ttft, "tpot_p50_ms": 3.0,
            "tpot_p99_ms": 4.0, "traffic": {"node_sends": 0.5, "rank_sends": 0.5, "imbalance": 1.0, "rank_load": [1, 2], **(traffic or {})},
            "evaluate": {}, "agreement_rel_err": {"node_sends": 0.0 if agree else 0.5},
            "agrees_within_1pct": agree, "tokens_identical_to_default": same,
            "routing_identical_fraction": 1.0 if same else 0.9, "mechanism": "permute",
            "replica_rule_honoured": rule}


def test_aggregate_rounds_medians_ranges_and_worst_round_checks():
    agg = sb.aggregate_rounds([_entry(100.0, 20.0), _entry(90.0, 80.0, rule=1.0), _entry(120.0, 22.0, rule=0.99)])
    assert agg["throughput_tok_s"] == 100.0 and agg["ttft_p50_ms"] == 22.0  # medians, not means (41.3)
    assert agg["spread"]["throughput_tok_s"] == {"median": 100.0, "min": 90.0, "max": 120.0, "n": 3}
    assert agg["spread"]["ttft_p99_ms"]["max"] == 160.0
    assert agg["tokens_identical_to_default"] is True and agg["agrees_within_1pct"] is True
    assert agg["replica_rule_honoured"] == 0.99 and len(agg["rounds"]) == 3
    assert agg["traffic_identical_across_rounds"] is True
    # one bad round fails the layout's checks
    bad = sb.aggregate_rounds([_entry(1, 1), _entry(1, 1, same=False, agree=False), _entry(1, 1)])
    assert bad["tokens_identical_to_default"] is False and bad["agrees_within_1pct"] is False
    assert bad["routing_identical_fraction"] == 0.9 and bad["agreement_rel_err"]["node_sends"] == 0.5
    ref = sb.aggregate_rounds([{**_entry(1, 1), "tokens_identical_to_default": None,
                                "routing_identical_fraction": None}] * 2)
    assert ref["tokens_identical_to_default"] is None and ref["routing_identical_fraction"] is None
    moved = sb.aggregate_rounds([_entry(1, 1), _entry(1, 1, traffic={"node_sends": 0.6, "rank_load": [1, 2]})])
    assert moved["traffic_identical_across_rounds"] is False


def test_warmup_prompts_share_no_prefix_with_the_measured_ones():
    prompts = ["The cat sat.", "A dog ran far away."]
    w = sb.warmup_prompts(prompts, 3)
    assert len(w) == 3 and w[2].endswith(prompts[0])
    assert all(not x.startswith(p[:8]) for x in w for p in prompts)


# ---- the whole run_benchmark with a fake server ---------------------------------------------------
E, LAYERS, K = 4, [0, 1], 2


def _fake_run(spec, prompts, tokens, ttft_s, phys_seed=0):
    """A LayoutRun as run_layout would return it for `prompts`, routing by a seeded rng."""
    rng = np.random.default_rng(phys_seed)
    n, per = len(prompts), 3  # three captured tokens per prompt
    logical = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in LAYERS]) for _ in range(n * per)])
    phys = logical.copy()
    if spec.plan is not None:  # permutation mechanism: the router emits physical ids
        from vllm_moeplace.plan import load_plan

        plan = load_plan(spec.plan)
        for li, l in enumerate(LAYERS):
            inv = np.argsort(plan.layers[l].reshape(-1))
            phys[:, li] = inv[logical[:, li]]
    reqs = tuple(RequestResult(i, tuple(tokens[i]), float(i), float(i) + ttft_s, float(i) + ttft_s + 0.01 * 3)
                 for i in range(n))
    return sb.LayoutRun(spec=spec, load=LoadResult(reqs, float(n)), startup_s=1.0, physical_ids=phys.astype(np.int16),
                        prompt_index=np.repeat(np.arange(n), per).astype(np.int32),
                        positions=np.tile(np.arange(per), n).astype(np.int32), is_prefill=np.ones(n * per, bool),
                        layer_ids=np.array(LAYERS, np.int32), num_experts=E)


def test_run_benchmark_interleaves_compares_per_round_and_excludes_warmup(tmp_path, monkeypatch):
    plan_path = tmp_path / "perm.json"
    Plan(model_name="m", num_experts=E, moe_layers=LAYERS, ep_size=2, topology=Topology.uniform(2, 1),
         layers={l: np.array([[3, 1], [0, 2]]) for l in LAYERS}).save(plan_path)
    prompts = ["p0", "p1", "p2"]
    served, warm_seen = [], []
    ttft = {("default", 0): 0.020, ("plan0:perm", 0): 0.030, ("plan0:perm", 1): 0.010, ("default", 1): 0.040,
            ("default", 2): 0.025, ("plan0:perm", 2): 0.015}

    def fake_run_layout(model, spec, ps, *, max_tokens, concurrency, out_dir, engine_args, warmup, tag):
        r = int(tag[2:]) if tag else 0
        served.append((r, spec.name))
        warm_seen.append(warmup)
        tokens = [[i, 7] for i in range(len(ps))]
        if spec.name != "default" and r == 1:
            tokens[2] = [2, 8]  # one round differs from ITS default: must be caught
        return _fake_run(spec, ps, tokens, ttft[(spec.name, r)])

    monkeypatch.setattr(sb, "run_layout", fake_run_layout)
    res = sb.run_benchmark("m", [plan_path], prompts, out_dir=tmp_path / "out", rounds=3, concurrency=2)
    assert served == [(0, "default"), (0, "plan0:perm"), (1, "plan0:perm"), (1, "default"), (2, "default"),
                      (2, "plan0:perm")]
    assert warm_seen == [2] * 6 and res["warmup_requests"] == 2  # default: one batch (= concurrency)
    d, p = res["layouts"]["default"], res["layouts"]["plan0:perm"]
    # medians over rounds, with every round kept; the keys a single run had are still there
    assert d["ttft_p50_ms"] == pytest.approx(25.0) and p["ttft_p50_ms"] == pytest.approx(15.0)
    assert p["spread"]["ttft_p50_ms"]["min"] == pytest.approx(10.0)
    assert [x["round"] for x in p["rounds"]] == [0, 1, 2] and [x["position"] for x in p["rounds"]] == [1, 2, 5]
    assert p["tokens_identical_to_default"] is False  # round 1's tokens differ
    assert [x["tokens_identical_to_default"] for x in p["rounds"]] == [True, False, True]
    assert p["routing_identical_fraction"] == 1.0 and p["agrees_within_1pct"]
    assert d["tokens_identical_to_default"] is None and res["default_rounds_identical"] is True
    # measured requests only: the warm-up never reaches the LoadResult the numbers come from
    assert d["rounds"][0]["requests"] == len(prompts)
    on_disk = json.loads((tmp_path / "out" / "serving_results.json").read_text())
    assert on_disk["order"] == ["default", "plan0:perm", "plan0:perm", "default", "default", "plan0:perm"]
    per_req = json.loads((tmp_path / "out" / "serving_requests.json").read_text())
    assert len(per_req["default"]) == 3 and [x["ttft_ms"] for x in per_req["default"][1]] == [40.0] * 3
    report = (tmp_path / "out" / "serving_report.md").read_text()
    assert "2 warm-up request(s)" in report and "default layout's run of the same round" in report
    assert "| plan0:perm | " in report and "15.0 [10.0-30.0]" in report
    assert "plan0:perm TTFT p50: inside the spread" in report
    assert "| tokens = default |" in report and "| NO |" in report


def test_run_layout_sends_warmup_before_capture_and_times_only_the_measured_load(tmp_path, monkeypatch):
    """The warm-up requests go out first, are not captured and are not in the returned timings."""
    calls = []

    class FakeServer:
        def __init__(self, model, args, env, log_path):
            self.base_url = "http://127.0.0.1:1"

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def model_name(self):
            return "m"

    def fake_load(url, model, prompts, *, max_tokens, concurrency):
        calls.append(("load", list(prompts)))
        reqs = tuple(RequestResult(i, (1, 2), 0.0, 0.5, 1.0) for i in range(len(prompts)))
        return LoadResult(reqs, 1.0)

    def fake_rpc(server, method, *args):
        calls.append(("rpc", method))
        if method == "moeplace_bench_dump":
            np.savez(args[0], req_names=np.array(["moeplace-0", "moeplace-1"]), req_index=np.array([0, 1]),
                     ids=np.zeros((2, 1, 2), np.int16), positions=np.zeros(2, np.int32),
                     is_prefill=np.ones(2, bool), layer_ids=np.array([0], np.int32), num_experts=np.array(4))
            return [True]
        return []

    monkeypatch.setattr(sb, "VllmServer", FakeServer)
    monkeypatch.setattr(sb, "run_load", fake_load)
    monkeypatch.setattr(sb, "_rpc", fake_rpc)
    monkeypatch.setattr(sb, "_prefix_cache_counts", lambda s: None)
    run = sb.run_layout("m", sb.LayoutSpec("default", None), ["a", "b"], max_tokens=2, concurrency=2,
                        out_dir=tmp_path, warmup=3, tag="-r1")
    assert [c[0] if c[0] == "load" else c[1] for c in calls] == ["load", "moeplace_capture_start", "load",
                                                                 "moeplace_bench_dump"]
    assert len(calls[0][1]) == 3 and all(p.startswith("Warm-up") for p in calls[0][1])
    assert calls[2][1] == ["a", "b"] and run.load.summary()["requests"] == 2
    assert (tmp_path / "routed-default-r1.npz").exists()
    calls.clear()
    sb.run_layout("m", sb.LayoutSpec("default", None), ["a", "b"], max_tokens=2, concurrency=2, out_dir=tmp_path,
                  warmup=0)
    assert [c[0] for c in calls].count("load") == 1  # no warm-up at all when asked for none


@pytest.mark.parametrize("flag,value", [("--rounds", "0"), ("--warmup", "-1")])
def test_bad_rounds_or_warmup_refused_before_any_server(tmp_path, flag, value):
    import subprocess
    import sys

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "vllm_moeplace", "bench", str(tmp_path), flag, value, "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and f"{flag} must be >= " in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_report_states_traffic_that_moves_between_rounds():
    agg = sb.aggregate_rounds([_entry(1, 1), _entry(1, 1, traffic={"node_sends": 0.6, "rank_load": [1, 2]})])
    res = {"model": "m", "prompts": 1, "max_tokens": 1, "concurrency": 1, "virtual_topology": [[0], [1]],
           "rounds": 2, "warmup_requests": 1, "order": [], "layouts": {"default": agg}, "default_rounds_identical": True}
    for i, x in enumerate(agg["rounds"]):
        x.update(round=i, position=i)
    report = sb.render_report(res)
    assert "Traffic columns are round 0's" in report and "default: node_sends 0.5000-0.6000" in report
    agg_same = sb.aggregate_rounds([_entry(1, 1), _entry(1, 1)])
    for i, x in enumerate(agg_same["rounds"]):
        x.update(round=i, position=i)
    assert "Traffic columns are round 0's" not in sb.render_report({**res, "layouts": {"default": agg_same}})
