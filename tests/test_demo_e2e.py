"""The README's main job, end to end: `moeplace demo` runs every stage as the command a user would
type (tiny-model, profile, solve, bench, and the real-trace solve + evaluate), on the real vLLM
(`vllm serve`, CPU, TP2 + EP). Reduced sizes (4 output tokens, short solver budgets) keep it to a
few minutes; the flags are the demo's own, so renaming one breaks this test as it would break the
README.

It also carries the serving benchmark's checks (one shared pair of `vllm serve` runs, torch.compile
on): the demo's plan has one redundant copy per rank, so it is served by the mapping mechanism; its
tokens and routing equal the default layout's, every copy choice the engine made is the replica
rule's, the counted traffic equals `moeplace evaluate` on the trace captured in the same run, and
each EP rank logs one placement line with the plan's hash. The permutation mechanism is served in
tests/test_serving_e2e.py on four architectures."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import NEEDED
from vllm_moeplace.metrics import evaluate_plan
from vllm_moeplace.plan import Plan, Topology, linear_layout, load_plan
from vllm_moeplace.trace import load_trace

pytestmark = pytest.mark.vllm


def test_demo_main_job(tmp_path):
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_MOEPLACE_", "MOEPLACE_RUNTIME"))}
    # an empty cache: without ../shared the real-trace half must say how to fetch the trace
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", MOEPLACE_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "vllm_moeplace", "demo", "--out", str(out), "--max-tokens", "4",
           "--solve-time", "2", "--real-solve-time", "5"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert f"report: {out / 'report.md'}" in r.stdout
    report = (out / "report.md").read_text()

    # every stage ran as the README's command, with the demo's flags
    for expected in (
        "moeplace tiny-model --arch qwen3_moe --layers 4 --experts 16 --top-k 4 --out",
        "moeplace profile ",
        "--tensor-parallel-size 2 --enable-expert-parallel --dtype float32 --moe-cpu-ep-fix --enforce-eager",
        "moeplace solve --trace ",
        "--ep-size 2 --ranks-per-node 1 --redundant-per-rank 1",
        "--model-name",
        "moeplace bench ",
        "--concurrency 4 --repeat 4 --out",
    ):
        assert expected in report, expected
    assert "## Serving benchmark" in report and "| plan0:plan |" in report

    # the benchmark: the plan's tokens and routing are the default layout's; its traffic was
    # counted inside the engine and equals `moeplace evaluate` on the same run's trace
    res = json.loads((out / "serving" / "serving_results.json").read_text())
    default, planned = res["layouts"]["default"], res["layouts"]["plan0:plan"]
    assert (default["mechanism"], planned["mechanism"]) == ("permute", "map")
    assert planned["tokens_identical_to_default"] is True and planned["routing_identical_fraction"] == 1.0
    assert default["tokens_identical_to_default"] is None  # the reference, never compared with itself
    assert default["routing_identical_fraction"] is None
    assert planned["replica_rule_honoured"] == 1.0  # every (token, layer, k) choice is the rule's
    for x in (default, planned):
        assert x["agrees_within_1pct"], x["agreement_rel_err"]
        assert x["ttft_p50_ms"] > 0 and x["throughput_tok_s"] > 0
    assert planned["output_tokens"] == default["output_tokens"] > 0
    # the same (token, expert) pairs, counted where each layout put them
    assert sum(planned["traffic"]["rank_load"]) == sum(default["traffic"]["rank_load"])
    assert default["traffic"]["rank_load"] != planned["traffic"]["rank_load"]
    plan_path = out / "plan.json"
    plan = load_plan(plan_path)
    assert plan.has_redundancy() and plan.slots_per_rank() == 9  # 16 experts / 2 ranks + 1 copy
    assert json.loads(plan_path.read_text())["solver"]["train_fraction"] == 0.5
    assert "origin-node-spread/v1" in (out / "serving" / "serving_report.md").read_text()

    # both runs routed the same logical experts; the default's trace, scored with vLLM's linear
    # layout, gives exactly what the serving path counted
    t_def = load_trace(out / "serving" / "trace-default.npz")
    t_map = load_trace(out / "serving" / "trace-plan0_plan.npz")
    assert np.array_equal(np.sort(t_def.topk_ids, axis=2), np.sort(t_map.topk_ids, axis=2))
    lin = Plan(model_name="m", num_experts=16, moe_layers=plan.moe_layers, ep_size=2,
               topology=Topology.uniform(2, 1), layers={l: linear_layout(16, 2) for l in plan.moe_layers})
    assert evaluate_plan(lin, t_def).imbalance == pytest.approx(default["traffic"]["imbalance"], rel=1e-9)
    assert evaluate_plan(lin, t_def).node_sends == pytest.approx(default["traffic"]["node_sends"], rel=1e-9)

    # `vllm serve` logged one placement line per EP rank with the plan's hash and mechanism
    log = (out / "serving" / "server-plan0:plan.log").read_text()
    placed = [ln for ln in log.splitlines() if "vllm-moeplace: placed experts of 4 layers" in ln]
    assert sorted(re.search(r"ep_rank=(\d+)/2", ln).group(1) for ln in placed) == ["0", "1"]
    sha = hashlib.sha256(plan_path.read_bytes()).hexdigest()[:12]
    assert all(f"sha256={sha}" in ln and "(mechanism map," in ln for ln in placed)

    # the real-trace half runs when the shared data is there, and says how to get it otherwise
    if NEEDED.exists():
        scores = json.loads((out / "real_trace_scores.json").read_text())
        assert "linear" in scores and any(s.get("kind") == "plan" for s in scores.values())
        assert "| moeplace solve |" in report
    else:
        assert "Skipped: the real DeepSeek-V2-Lite trace is neither in the shared data" in report
        assert "Get it with `moeplace datasets fetch dsv2lite-puffin`" in report and "Get it with" in r.stdout
