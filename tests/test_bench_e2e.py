"""The serving benchmark end to end on the real `vllm serve` (CPU, TP2 + EP): default layout vs a
permutation plan and a plan with redundant copies, the same workload; tokens and routing
identical; counted traffic == `moeplace evaluate`; the engine's copy choices == the replica rule."""

import json

import numpy as np
import pytest

from _builders import solver_plan
from vllm_moeplace.bench.serve_bench import run_benchmark
from vllm_moeplace.cli.random_plan import random_plan
from vllm_moeplace.plan import Plan, Topology, linear_layout
from vllm_moeplace.metrics import evaluate_plan
from vllm_moeplace.trace import load_trace

pytestmark = pytest.mark.vllm


def test_bench_default_vs_plan(tiny_model_factory, tmp_path):
    model = tiny_model_factory(arch="qwen3_moe", num_layers=2, num_experts=8, top_k=2)
    plan = random_plan(model, ep_size=2, seed=3, ranks_per_node=1)
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    copies = solver_plan(model, 2)  # `moeplace solve --redundant-per-rank 2` for EP2 over two nodes
    assert copies.has_redundancy() and copies.slots_per_rank() == 6
    copies_path = tmp_path / "copies.json"
    copies.save(copies_path)
    prompts = ["def f(x): return x * 2", "The mitochondria is", "Hello! How are you", "Solve 3x + 7 = 22"] * 2
    res = run_benchmark(str(model), [plan_path, copies_path], prompts, out_dir=tmp_path / "bench", max_tokens=8,
                        concurrency=2)

    default, planned, mapped = res["layouts"]["default"], res["layouts"]["plan0:plan"], res["layouts"]["plan1:copies"]
    assert (default["mechanism"], planned["mechanism"], mapped["mechanism"]) == ("permute", "permute", "map")
    assert mapped["tokens_identical_to_default"] and mapped["routing_identical_fraction"] == 1.0
    assert mapped["replica_rule_honoured"] == 1.0  # every (token, layer, k) choice is the rule's
    assert mapped["agrees_within_1pct"], mapped["agreement_rel_err"]
    # copies: 6 slots per rank, every slot that holds a hot expert's copy served some pairs
    assert sum(mapped["traffic"]["rank_load"]) == sum(default["traffic"]["rank_load"])
    for x in (default, planned):
        assert x["tokens_identical_to_default"]
        assert x["agrees_within_1pct"], x["agreement_rel_err"]
        assert x["output_tokens"] == 8 * len(prompts)
        assert x["ttft_p50_ms"] > 0 and x["throughput_tok_s"] > 0
    assert planned["routing_identical_fraction"] == 1.0
    # the plan moved experts, so the per-rank loads it counted are the plan's, not the default's
    assert default["traffic"]["rank_load"] != planned["traffic"]["rank_load"]

    # The logical traces of both runs are the same routing; scored with each layout they give
    # exactly what the serving path counted.
    t_def = load_trace(tmp_path / "bench" / "trace-default.npz")
    t_plan = load_trace(tmp_path / "bench" / "trace-plan0_plan.npz")
    assert np.array_equal(np.sort(t_def.topk_ids, axis=2), np.sort(t_plan.topk_ids, axis=2))
    assert evaluate_plan(plan, t_def).node_sends == pytest.approx(planned["traffic"]["node_sends"], rel=1e-9)
    lin = Plan(model_name="m", num_experts=8, moe_layers=plan.moe_layers, ep_size=2, topology=Topology.uniform(2, 1),
               layers={l: linear_layout(8, 2) for l in plan.moe_layers})
    assert evaluate_plan(lin, t_plan).imbalance == pytest.approx(default["traffic"]["imbalance"], rel=1e-9)
    # `vllm serve` (torch.compile on) logged one placement line per EP rank with the plan's hash
    # and mechanism (what deploy/check_applied.sh verifies)
    import hashlib
    import re

    for name, path, mech in (("plan0:plan", plan_path, "permute"), ("plan1:copies", copies_path, "map")):
        log = (tmp_path / "bench" / f"server-{name}.log").read_text()
        placed = [ln for ln in log.splitlines() if "vllm-moeplace: placed experts of 2 layers" in ln]
        assert sorted(re.search(r"ep_rank=(\d+)/2", ln).group(1) for ln in placed) == ["0", "1"], name
        sha = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        assert all(f"sha256={sha}" in ln and f"(mechanism {mech}," in ln for ln in placed), name
    report = (tmp_path / "bench" / "serving_report.md").read_text()
    assert "| default |" in report and "| plan0:plan |" in report and "| plan1:copies |" in report
    assert "origin-node-spread/v1" in report
    assert json.loads((tmp_path / "bench" / "serving_results.json").read_text())["prompts"] == len(prompts)
