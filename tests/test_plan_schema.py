"""`moeplace validate --schema`: the plan's JSON Schema accepts the plans our tools write and
refuses structurally bad ones, checked with an independent validator (jsonschema, a vLLM dependency)."""

import json

import numpy as np
import pytest

from vllm_moeplace.cli.main import main
from vllm_moeplace.plan import Plan, Topology, linear_layout
from vllm_moeplace.plan_schema import plan_json_schema
from vllm_moeplace.solver.baselines import baseline_plan
from vllm_moeplace.solver.synth import SynthConfig, synth_trace

jsonschema = pytest.importorskip("jsonschema")


def _validator():
    schema = plan_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _written_plans(tmp_path):
    """Plans as our commands write them: v1 (linear, eplb), v2 with copies, a node-groups topology."""
    trace = synth_trace(SynthConfig(num_experts=16, num_layers=2, top_k=2, num_tokens=400, num_requests=20, seed=1))
    topo = Topology.uniform(4, 2)
    plans = [
        baseline_plan("linear", trace, topo),
        baseline_plan("eplb", trace, topo),
        baseline_plan("eplb", trace, topo, redundant_per_rank=1),
        Plan(model_name="m", num_experts=8, moe_layers=[1, 3], ep_size=4,
             topology=Topology(4, [[0, 2], [1, 3]], np.array([[0, 2.0], [2.0, 0]])),
             layers={3: linear_layout(8, 4)}),
    ]
    out = []
    for i, p in enumerate(plans):
        path = tmp_path / f"p{i}.json"
        p.save(path)
        out.append(json.loads(path.read_text()))
    return out


def test_cli_prints_the_schema(capsys):
    assert main(["validate", "--schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == plan_json_schema()
    assert printed["$schema"].endswith("2020-12/schema")
    assert printed["properties"]["format"]["const"] == "vllm-moeplace/plan"
    assert printed["properties"]["version"]["enum"] == [1, 2]


def test_written_plans_validate(tmp_path):
    v = _validator()
    plans = _written_plans(tmp_path)
    assert {p["version"] for p in plans} == {1, 2}  # both versions are exercised
    for p in plans:
        assert list(v.iter_errors(p)) == []


@pytest.mark.parametrize(
    "mutate, path",
    [
        (lambda d: d.update(format="other/plan"), ["format"]),
        (lambda d: d.update(version=3), ["version"]),
        (lambda d: d.pop("layers"), []),
        (lambda d: d.update(extra=1), []),
        (lambda d: d["model"].update(num_experts=0), ["model", "num_experts"]),
        (lambda d: d.update(ep_size="4"), ["ep_size"]),
        (lambda d: d["layers"].update({"01": d["layers"]["1"]}), ["layers"]),
        (lambda d: d["layers"]["1"][0].__setitem__(0, "x"), ["layers", "1", 0, 0]),
        (lambda d: d.update(topology={"ranks_per_node": 2, "nodes": [[0]]}), ["topology"]),
        (lambda d: d.update(replica_rule="nearest/v9"), ["replica_rule"]),
    ],
)
def test_bad_plans_fail(tmp_path, mutate, path):
    d = _written_plans(tmp_path)[0]
    mutate(d)
    errors = list(_validator().iter_errors(d))
    assert errors, "the schema accepted a bad plan"
    assert any(list(e.absolute_path) == path for e in errors), [(list(e.absolute_path), e.message) for e in errors]


def test_schema_flag_refuses_other_arguments(capsys):
    assert main(["validate", "--schema", "plan.json"]) == 2
    assert "--schema prints the schema only" in capsys.readouterr().err
    assert main(["validate"]) == 2
    assert "no plan file given" in capsys.readouterr().err
