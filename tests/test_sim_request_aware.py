"""The simulator suite's request-aware rows (`sim/request_aware.py`, `simulate.py --only request-aware`):
the routed rows take their origins from the plan's router, the uniform rows are the suite's batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from _builders import trace_from_ids
from vllm_moeplace.plan import Topology
from vllm_moeplace.sim import request_aware as ra
from vllm_moeplace.sim.network import BatchSpec, load_params
from vllm_moeplace.sim.run import sample_batches, simulate
from vllm_moeplace.solver.baselines import baseline_layers

ROOT = Path(__file__).resolve().parents[1]


def two_populations(n_req: int = 48, prefill: int = 4, decode: int = 8, E: int = 16, K: int = 2, L: int = 2, seed: int = 0):
    """Even requests route (prefill and decode) to experts 0..7, odd ones to 8..15, 5% noise: a router
    reading the prefill finds each request's population, so its decode tokens can start next to their experts."""
    rng = np.random.default_rng(seed)
    ids, req, pre = [], [], []
    for r in range(n_req):
        for t in range(prefill + decode):
            base = 8 * (r % 2) if rng.random() >= 0.05 else 8 * (1 - r % 2)
            ids.append([rng.choice(8, K, replace=False) + base for _ in range(L)])
            req.append(r)
            pre.append(t < prefill)
    return trace_from_ids(np.array(ids), E, request_ids=req, is_prefill=pre)


def test_routed_rows_take_origins_from_the_router():
    trace = two_populations()
    train, test = trace.split_by_request(0.5)
    params = load_params(ROOT / "benchmarks" / "sim_params.json")
    hw_name = params.default_hardware
    shape = params.models["deepseek-v2-lite"].model_copy(update={"num_experts": 16, "top_k": 2})
    specs = {"decode-phase": BatchSpec(tokens_per_rank=16, phase="decode", steps=2, seed=0)}
    case = ra.Case("syn", "syn", ((4, 2),), ("decode-phase",), 0, 1.3, 0)
    topo = Topology.uniform(4, 2)
    rows = ra.topology_rows(case, train, test, topo, shape, params.hardware[hw_name], hw_name, specs, seconds=1.0)
    by = {(r.plan, r.origins): r for r in rows}
    assert list(by) == list(ra.ROWS)
    aware, aware_uniform = by[("aware", "routed")], by[("aware", "uniform")]
    # Same layout, same held-out tokens: with origins on the group's node nearly every decode token
    # finds its experts locally; dealt to any rank, about half cross nodes. Uniform origins in the
    # routed rows would make the two equal.
    assert aware.rdma_gb < 0.3 * aware_uniform.rdma_gb
    assert aware.node_sends_decode < 0.3 * aware_uniform.node_sends_decode
    assert aware.share_imbalance <= 1.10 and aware_uniform.share_imbalance == 1.0
    # The uniform rows are the suite's batches: linear equals the suite's `linear` for the same spec.
    lin = simulate(baseline_layers("linear", train, topo), topo, test, params.hardware[hw_name], shape,
                   sample_batches(test, specs["decode-phase"], 4))
    assert by[("linear", "uniform")].total_ms == lin.total * 1e3
    assert by[("linear", "uniform")].rdma_gb == lin.rdma_bytes / 1e9


def test_section_renders_rows_and_reading():
    row = dict(trace="t", model="m", ep_size=8, num_nodes=2, setting="s", batch="prefill", tokens_per_rank=4,
               total_ms=10.0, dispatch_ms=1.0, compute_ms=8.0, combine_ms=1.0, rdma_gb=2.0, nvlink_gb=1.0,
               pair_imbalance=1.1, node_sends_prefill=0.5, node_sends_decode=None, imbalance=1.1, share_imbalance=1.0,
               fit_seconds=0.0, hardware="h")
    rows = [dict(row, plan=p, origins=o) for p, o in ra.ROWS]
    rows[-1].update(total_ms=12.0, rdma_gb=1.0, share_imbalance=1.04)
    block = {"command": "python benchmarks/simulate.py --only request-aware", "machine": {"commit": "abc", "nproc": "2", "cpu": "x"},
             "date": "d", "load_before": "1", "load_after": "2", "wall_seconds": 3.0, "cpsat_seconds": 13.0,
             "hardware": "h", "rows": json.loads(json.dumps(rows)), "reading": "hand-written words"}
    md = ra.section(block)
    assert "| aware | routed | 12.00 | +20.0% |" in md and "| 1.000 | -50.0% |" in md
    assert "held-out share 1.040" in md and "hand-written words" in md and "commit abc" in md
    assert "| 0.500 | – |" in md  # no decode tokens: null, shown as a dash


def test_only_request_aware_merges_a_section_and_keeps_the_other_rows(tmp_path, monkeypatch):
    from vllm_moeplace.sim import suite as sim
    from vllm_moeplace.trace import load_trace, save_trace

    trace = tmp_path / "syn.npz"
    save_trace(trace, two_populations(n_req=24))
    params = json.loads((ROOT / "benchmarks" / "sim_params.json").read_text())
    params["models"]["syn"] = dict(params["models"]["deepseek-v2-lite"], num_experts=16, top_k=2)
    params["batches"] = {"small": {"tokens_per_rank": 8, "phase": "decode", "steps": 1}}
    pfile = tmp_path / "params.json"
    pfile.write_text(json.dumps(params))
    out = tmp_path / "results"
    common = ["--params", str(pfile), "--out", str(out), "--cpsat-seconds", "0.5"]
    assert sim.main(["--trace", str(trace), "--model", "syn", "--topologies", "4x2", "--batches", "small"] + common) == 0
    (out / "simulation_syn.json").rename(out / "simulation.json")
    before = json.loads((out / "simulation.json").read_text())
    monkeypatch.setattr(sim, "load_named_trace", lambda key: load_trace(trace))
    monkeypatch.setattr(ra, "cases", lambda quick: [ra.Case("syn", "syn", ((4, 2),), ("small",), 0, 1.3, 0)])
    assert sim.main(["--only", "request-aware"] + common) == 0
    after = json.loads((out / "simulation.json").read_text())
    assert after["rows"] == before["rows"]  # the suite's rows are left as they were
    block = after["request_aware"]
    assert "--only request-aware" in block["command"] and len(block["rows"]) == len(ra.ROWS)
    md = (out / "simulation.md").read_text()
    assert "## Request-aware placement: origins from the router" in md and "| aware | routed |" in md
