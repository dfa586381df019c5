"""The simulator suite (`benchmarks/simulate.py` = `vllm_moeplace.sim.suite`) end to end on a small synthetic trace, and the report's tables."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from vllm_moeplace.sim import suite as sim
from vllm_moeplace.sim.report import Row, ratio, scenario_table, summary_table
from vllm_moeplace.trace import Trace, save_trace

ROOT = Path(__file__).resolve().parents[1]


def _row(layout: str, total: float, rdma: float) -> Row:
    return Row(trace="t", model="m", ep_size=8, num_nodes=2, batch="prefill", tokens_per_rank=4, layout=layout,
               total_ms=total, dispatch_ms=total / 4, compute_ms=total / 2, combine_ms=total / 4, rdma_gb=rdma,
               nvlink_gb=1.0, pair_imbalance=1.1, node_sends=0.9, imbalance=1.1, fit_seconds=0.0)


def test_table_ratios_are_against_linear():
    rows = [_row("linear", 10.0, 2.0), _row("greedy", 8.0, 1.5)]
    assert ratio(rows, "greedy", "total_ms") == pytest.approx(0.8)
    assert ratio(rows, "greedy", "rdma_gb") == pytest.approx(0.75)
    assert ratio([_row("greedy", 8.0, 1.5)], "greedy", "total_ms") is None  # no baseline, no ratio
    table = scenario_table(rows)
    assert "| greedy | 8.00 | -20.0% |" in table and "| linear | 10.00 | ±0.0% |" in table
    summary = summary_table(rows + [dataclasses.replace(_row("linear", 5.0, 1.0), batch="decode")])
    assert "| m | EP8 / 2 | prefill (4) |  | 10.00 | ±0.0% | -20.0% |" in summary
    assert "| m | EP8 / 2 | decode (4) |  | 5.00 | ±0.0% | – |" in summary


def _synthetic_trace(path: Path) -> None:
    # 16 experts, top-2, 2 MoE layers; each request uses only even or only odd experts (strong
    # co-activation that vLLM's contiguous layout splits across both nodes).
    rng = np.random.default_rng(0)
    reqs, ids = [], []
    for r in range(40):
        half = r % 2
        for _ in range(12):
            ids.append([rng.choice(8, size=2, replace=False) * 2 + half for _ in range(2)])
            reqs.append(r)
    t = Trace(topk_ids=np.array(ids, dtype=np.int16), layer_ids=np.array([1, 3], dtype=np.int32),
              request_ids=np.array(reqs, dtype=np.int32), is_prefill=np.ones(len(reqs), dtype=bool), num_experts=16,
              meta={"model": "synthetic"})
    save_trace(path, t)


def test_simulate_script_end_to_end(tmp_path):
    trace = tmp_path / "syn.npz"
    _synthetic_trace(trace)
    params = json.loads((ROOT / "benchmarks" / "sim_params.json").read_text())
    params["models"]["syn"] = dict(params["models"]["deepseek-v2-lite"], num_experts=16, top_k=2)
    params["batches"] = {"small": {"tokens_per_rank": 16, "steps": 1}}
    pfile = tmp_path / "params.json"
    pfile.write_text(json.dumps(params))
    out = tmp_path / "results"
    rc = sim.main(["--trace", str(trace), "--model", "syn", "--topologies", "8x2", "--batches", "small",
                   "--params", str(pfile), "--out", str(out), "--cpsat-seconds", "0.5"])
    assert rc == 0
    data = json.loads((out / "simulation_syn.json").read_text())
    layouts = [r["layout"] for r in data["rows"]]
    assert layouts[0] == "linear" and {"round_robin", "eplb", "greedy", "step_time"} <= set(layouts)
    assert all(r["total_ms"] > 0 and r["rdma_gb"] >= 0 for r in data["rows"])
    by = {r["layout"]: r for r in data["rows"]}
    # Grouping the co-activated experts per node must cut inter-node bytes (linear splits them).
    assert by["greedy"]["node_sends"] < by["linear"]["node_sends"]
    assert by["greedy"]["rdma_gb"] < by["linear"]["rdma_gb"]
    md = (out / "simulation_syn.md").read_text()
    assert "--trace" in md and "Machine:" in md and "| linear |" in md
    png = out / "sim_breakdown_simulation_syn.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The page is a pure function of the saved rows: redrawing it gives the same markdown.
    (out / "simulation_syn.md").unlink()
    assert sim.main(["--render-only", str(out / "simulation_syn.json")]) == 0
    assert (out / "simulation_syn.md").read_text() == md
