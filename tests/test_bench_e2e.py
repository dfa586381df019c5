"""The serving benchmark end to end on the real `vllm serve` (CPU, TP2 + EP): default layout vs a
plan with redundant copies, the same workload; tokens and routing identical; counted traffic ==
`moeplace evaluate`; the engine's copy choices == the replica rule."""

import json

import numpy as np
import pytest

from _builders import solver_plan
from vllm_moeplace.bench.serve_bench import run_benchmark
from vllm_moeplace.plan import Plan, Topology, linear_layout
from vllm_moeplace.metrics import evaluate_plan
from vllm_moeplace.trace import load_trace

pytestmark = pytest.mark.vllm


def test_bench_default_vs_plan_with_copies(tiny_model_factory, tmp_path):
    """Default layout vs the solver's plan with 2 copies per rank over `vllm serve` (torch.compile
    on). The permutation path of the same benchmark is covered by the demo test (test_demo_e2e.py),
    which serves the solver's EP2 permutation plan."""
    model = tiny_model_factory(arch="qwen3_moe", num_layers=2, num_experts=8, top_k=2)
    copies = solver_plan(model, 2)  # `moeplace solve --redundant-per-rank 2` for EP2 over two nodes
    assert copies.has_redundancy() and copies.slots_per_rank() == 6
    copies_path = tmp_path / "copies.json"
    copies.save(copies_path)
    prompts = ["def f(x): return x * 2", "The mitochondria is", "Hello! How are you", "Solve 3x + 7 = 22"] * 2
    res = run_benchmark(str(model), [copies_path], prompts, out_dir=tmp_path / "bench", max_tokens=8, concurrency=2)

    default, mapped = res["layouts"]["default"], res["layouts"]["plan0:copies"]
    assert (default["mechanism"], mapped["mechanism"]) == ("permute", "map")
    # the default layout is the reference, never compared with itself
    assert default["tokens_identical_to_default"] is None and default["routing_identical_fraction"] is None
    assert mapped["tokens_identical_to_default"] is True and mapped["routing_identical_fraction"] == 1.0
    assert mapped["replica_rule_honoured"] == 1.0  # every (token, layer, k) choice is the rule's
    for x in (default, mapped):
        assert x["agrees_within_1pct"], x["agreement_rel_err"]
        assert x["output_tokens"] == 8 * len(prompts)
        assert x["ttft_p50_ms"] > 0 and x["throughput_tok_s"] > 0
    # the same (token, expert) pairs, counted where the plan put them
    assert sum(mapped["traffic"]["rank_load"]) == sum(default["traffic"]["rank_load"])
    assert default["traffic"]["rank_load"] != mapped["traffic"]["rank_load"]

    # The logical traces of both runs are the same routing; the default's, scored with vLLM's
    # linear layout, gives exactly what the serving path counted.
    t_def = load_trace(tmp_path / "bench" / "trace-default.npz")
    t_map = load_trace(tmp_path / "bench" / "trace-plan0_copies.npz")
    assert np.array_equal(np.sort(t_def.topk_ids, axis=2), np.sort(t_map.topk_ids, axis=2))
    lin = Plan(model_name="m", num_experts=8, moe_layers=copies.moe_layers, ep_size=2, topology=Topology.uniform(2, 1),
               layers={l: linear_layout(8, 2) for l in copies.moe_layers})
    assert evaluate_plan(lin, t_def).imbalance == pytest.approx(default["traffic"]["imbalance"], rel=1e-9)
    assert evaluate_plan(lin, t_def).node_sends == pytest.approx(default["traffic"]["node_sends"], rel=1e-9)
    # `vllm serve` (torch.compile on) logged one placement line per EP rank with the plan's hash
    # and mechanism (what deploy/check_applied.sh verifies)
    import hashlib
    import re

    log = (tmp_path / "bench" / "server-plan0:copies.log").read_text()
    placed = [ln for ln in log.splitlines() if "vllm-moeplace: placed experts of 2 layers" in ln]
    assert sorted(re.search(r"ep_rank=(\d+)/2", ln).group(1) for ln in placed) == ["0", "1"]
    sha = hashlib.sha256(copies_path.read_bytes()).hexdigest()[:12]
    assert all(f"sha256={sha}" in ln and "(mechanism map," in ln for ln in placed)
    report = (tmp_path / "bench" / "serving_report.md").read_text()
    assert "| default |" in report and "| plan0:copies |" in report
    assert "origin-node-spread/v1" in report
    assert json.loads((tmp_path / "bench" / "serving_results.json").read_text())["prompts"] == len(prompts)
