"""`moeplace validate` and `moeplace baseline` on every producer's output; bad plans give one
line naming file, field and value; --model checks against an HF config.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vllm_moeplace.cli.main import main
from vllm_moeplace.plan import load_plan
from vllm_moeplace.solver.synth import SynthConfig, synth_trace
from vllm_moeplace.trace import save_trace


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("v") / "t.npz"
    save_trace(p, synth_trace(SynthConfig(num_layers=3, num_experts=16, top_k=2, num_tokens=800, num_requests=20, seed=3)))
    return p


def _baseline(trace_path: Path, out: Path, method: str, *extra: str) -> int:
    return main(["baseline", "--trace", str(trace_path), "--ep-size", "8", *extra, "--method", method, "--out", str(out)])


@pytest.mark.parametrize("method", ["linear", "round_robin", "eplb", "eplb_global", "greedy"])
def test_every_baseline_output_validates(trace_path, tmp_path, capsys, method):
    out = tmp_path / f"{method}.json"
    assert _baseline(trace_path, out, method, "--ranks-per-node", "2", "--redundant-per-rank", "1") == 0
    assert main(["validate", str(out), "--trace", str(trace_path)]) == 0
    text = capsys.readouterr().out
    assert f"{out}: valid" in text and "(8 redundant)" in text
    plan = load_plan(out)
    assert plan.solver["method"] == method and plan.solver["train_fraction"] == 0.5


def test_baseline_with_topology_file(trace_path, tmp_path, capsys):
    topo = tmp_path / "topo.json"
    topo.write_text(json.dumps({"nodes": [[0, 2, 4, 6], [1, 3, 5, 7]], "link_cost": [[0, 3], [3, 0]]}))
    out = tmp_path / "p.json"
    assert _baseline(trace_path, out, "eplb", "--topology", str(topo)) == 0
    plan = load_plan(out)
    assert plan.topology.nodes == [[0, 2, 4, 6], [1, 3, 5, 7]] and plan.topology.link_cost[0, 1] == 3
    assert main(["validate", str(out)]) == 0
    # a topology for another EP size is refused naming both values
    assert _baseline(trace_path, out, "eplb", "--topology", str(topo), "--ep-size", "4") == 2
    assert "lists 8 ranks, but ep_size is 4" in capsys.readouterr().err
    topo.write_text(json.dumps({"nodes": [[0, 1, 2, 3]]}))
    assert _baseline(trace_path, out, "linear", "--topology", str(topo)) == 2
    assert "lists 4 ranks, but ep_size is 8" in capsys.readouterr().err


def test_baseline_bad_input(trace_path, tmp_path, capsys):
    assert main(["baseline", "--trace", str(trace_path), "--ep-size", "6", "--ranks-per-node", "2",
                 "--method", "linear", "--out", str(tmp_path / "x.json")]) == 2
    assert "num_experts=16 is not divisible by ep_size=6" in capsys.readouterr().err
    assert main(["baseline", "--trace", str(trace_path), "--ep-size", "8", "--ranks-per-node", "3",
                 "--method", "linear", "--out", str(tmp_path / "x.json")]) == 2
    assert "--ranks-per-node 3 does not divide --ep-size 8" in capsys.readouterr().err


def _write_plan(tmp_path: Path, **changes) -> Path:
    data = {"format": "vllm-moeplace/plan", "version": 1,
            "model": {"name": "m", "num_experts": 4, "moe_layers": [1, 2]}, "ep_size": 2,
            "topology": {"ranks_per_node": 1}, "layers": {"1": [[0, 1], [2, 3]]}, "solver": {}}
    data.update(changes)
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(data))
    return p


@pytest.mark.parametrize("changes, message", [
    (dict(layers={"1": [[0, 0], [2, 3]]}), "field 'layers.1[0]': expert 0 appears twice on rank 0"),
    (dict(layers={"1": [[0, 1], [2, 2]]}), "appears twice"),
    (dict(layers={"1": [[0, 1], [2, 7]]}), "expert id 7 out of range 0..3"),
    (dict(layers={"3": [[0, 1], [2, 3]]}), "layer 3 is not a MoE layer"),
    (dict(ep_size=3), "field 'layers.1': 2 rank lists, expected ep_size=3"),
    (dict(format="other"), "field 'format'"),
])
def test_validate_names_field_and_value(tmp_path, capsys, changes, message):
    p = _write_plan(tmp_path, **changes)
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert str(p) in err and message in err and err.count("\n") == 1


def _deepseek_config(tmp_path: Path, experts: int = 4, layers: int = 3) -> Path:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "num_hidden_layers": layers,
        "n_routed_experts": experts, "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1}))
    return d


def test_validate_against_model_config(tmp_path, capsys):
    p = _write_plan(tmp_path)
    assert main(["validate", str(p), "--model", str(_deepseek_config(tmp_path))]) == 0
    assert "fits" in capsys.readouterr().out
    assert main(["validate", str(p), "--model", str(_deepseek_config(tmp_path, experts=8))]) == 2
    assert "'model.num_experts': value 4" in capsys.readouterr().err
    assert main(["validate", str(p), "--model", str(_deepseek_config(tmp_path, layers=4))]) == 2
    assert "makes layers [1, 2, 3] MoE layers" in capsys.readouterr().err
    assert main(["validate", str(p), "--model", str(tmp_path / "nowhere")]) == 2
    assert "config.json: cannot read model config" in capsys.readouterr().err


def test_validate_against_trace(trace_path, tmp_path, capsys):
    p = _write_plan(tmp_path)
    assert main(["validate", str(p), "--trace", str(trace_path)]) == 2
    assert "model.num_experts is 4 but the trace has num_experts 16" in capsys.readouterr().err
    assert np.load(trace_path)["num_experts"] == 16
