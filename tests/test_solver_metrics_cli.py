"""`moeplace evaluate`: the JSON contract, agreement with the library scorer on the same split,
the text report, and one-line errors naming the mismatching value."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vllm_moeplace.cli.main import main
from vllm_moeplace.plan import Plan, Topology, load_plan
from vllm_moeplace.metrics import METRIC_NAMES, evaluate_plan
from vllm_moeplace.solver.synth import SynthConfig, synth_trace
from vllm_moeplace.trace import load_trace, save_trace


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ev")
    trace = d / "t.npz"
    save_trace(trace, synth_trace(SynthConfig(num_layers=3, num_experts=16, top_k=3, num_tokens=1500, num_requests=30, seed=5)))
    plan = d / "eplb.json"
    assert main(["baseline", "--trace", str(trace), "--ep-size", "8", "--ranks-per-node", "2", "--method", "eplb",
                 "--out", str(plan)]) == 0
    return {"trace": trace, "plan": plan, "dir": d}


def test_json_shape_and_values(files, capsys):
    capsys.readouterr()
    rc = main(["evaluate", "--plan", str(files["plan"]), "--trace", str(files["trace"]), "--baselines", "linear,round_robin", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == [str(files["plan"]), "linear", "round_robin"]
    for name, row in out.items():
        assert row["kind"] == ("plan" if name.endswith(".json") else "baseline")
        for part in ("held_out", "in_sample"):
            assert set(row[part]) == set(METRIC_NAMES)
    # the same numbers as the library on the same request split
    train, test = load_trace(files["trace"]).split_by_request(0.5)
    plan = load_plan(files["plan"])
    assert out[str(files["plan"])]["held_out"]["node_sends"] == pytest.approx(evaluate_plan(plan, test).node_sends, rel=1e-12)
    assert out[str(files["plan"])]["in_sample"]["imbalance"] == pytest.approx(evaluate_plan(plan, train).imbalance, rel=1e-12)
    # baselines are scored on the plan's topology: linear is vLLM's default layout there
    from vllm_moeplace.metrics import evaluate_layers

    assert out["linear"]["held_out"] == pytest.approx(evaluate_layers({}, plan.topology, test).as_dict(), rel=1e-12)


def test_text_report_and_baselines_only(files, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--trace", str(files["trace"]), "--ep-size", "4", "--ranks-per-node", "2",
                 "--baselines", "linear,eplb_global"]) == 0
    text = capsys.readouterr().out
    assert "held-out requests" in text and "in-sample" in text and "EP4: 2 nodes x 2 ranks" in text
    lines = [l for l in text.splitlines() if l.startswith("linear")]
    assert len(lines) == 2 and lines[0].split()[-1] == "1.000"  # node_sends relative to linear


def test_train_fraction_note(files, tmp_path, capsys):
    plan = tmp_path / "all.json"
    assert main(["baseline", "--trace", str(files["trace"]), "--ep-size", "8", "--ranks-per-node", "2", "--method",
                 "eplb_global", "--train-fraction", "1", "--out", str(plan)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--plan", str(plan), "--trace", str(files["trace"]), "--baselines", "none", "--json"]) == 0
    cap = capsys.readouterr()
    assert list(json.loads(cap.out)) == [str(plan)] and "fitted with train_fraction 1.0" in cap.err


def _plan(path: Path, num_experts: int, moe_layers: list[int], ep_size: int = 8) -> Path:
    topo = Topology.uniform(ep_size, 2)
    layers = {moe_layers[0]: np.arange(num_experts).reshape(ep_size, -1)}
    Plan(model_name="x", num_experts=num_experts, moe_layers=moe_layers, ep_size=ep_size, topology=topo, layers=layers).save(path)
    return path


@pytest.mark.parametrize("experts, layers, message", [
    (32, [1, 2, 3], "model.num_experts is 32 but the trace has num_experts 16"),
    (16, [7, 8], "layers [7] are not MoE layers of the trace"),
])
def test_mismatch_is_one_line_naming_the_value(files, tmp_path, capsys, experts, layers, message):
    p = _plan(tmp_path / "bad.json", experts, layers)
    capsys.readouterr()
    assert main(["evaluate", "--plan", str(p), "--trace", str(files["trace"])]) == 2
    err = capsys.readouterr().err
    assert message in err and str(p) in err and err.count("\n") == 1


def test_needs_plan_or_topology(files, capsys):
    assert main(["evaluate", "--trace", str(files["trace"])]) == 2
    assert "--ep-size" in capsys.readouterr().err


def test_baselines_follow_the_plans_redundancy(files, tmp_path, capsys):
    plan = tmp_path / "red.json"
    assert main(["baseline", "--trace", str(files["trace"]), "--ep-size", "8", "--ranks-per-node", "1", "--method",
                 "eplb_global", "--redundant-per-rank", "1", "--out", str(plan)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--plan", str(plan), "--trace", str(files["trace"]), "--baselines", "linear,eplb,eplb_global",
                 "--json"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    # hierarchical EPLB cannot place copies on one-rank nodes: skipped with a note, not a crash
    assert list(out) == [str(plan), "linear", "eplb_global"] and "baseline eplb skipped" in cap.err
    # the eplb_global baseline at the plan's redundancy is the same layout as the plan itself
    assert out["eplb_global"]["held_out"] == out[str(plan)]["held_out"]
