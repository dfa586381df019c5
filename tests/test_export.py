"""`moeplace export`: each engine's file read back the way the engine's loader reads it (the
engines are not installed here: their loader steps are re-stated from their source, cited in
vllm_moeplace/export/*.py) and turned back into our plan's layers (round trip)."""

import json

import numpy as np
import pytest

from vllm_moeplace.cli.main import main
from vllm_moeplace.plan import Plan, Topology, load_plan

yaml = pytest.importorskip("yaml")  # PyYAML: a vLLM dependency, and what TensorRT-LLM reads the file with

E, R = 8, 4


def _plan(tmp_path, copies: bool, placed=(1, 3)) -> tuple[Plan, str]:
    rng = np.random.default_rng(7)
    layers = {}
    for l in placed:
        a = rng.permutation(E).reshape(R, E // R)
        if copies:  # one extra slot per rank: a copy of an expert the rank does not hold
            extra = [[int(next(e for e in rng.permutation(E) if e not in row))] for row in a]
            a = np.concatenate([a, np.array(extra)], axis=1)
        layers[l] = a
    plan = Plan(model_name="m", num_experts=E, moe_layers=[1, 2, 3], ep_size=R, topology=Topology.uniform(R, 2),
                layers=layers)
    path = tmp_path / "plan.json"
    plan.save(path)
    return load_plan(path), str(path)


def _export(tmp_path, target, plan_path, *extra):
    out = tmp_path / f"out.{target}"
    assert main(["export", "--to", target, "--plan", plan_path, "--out", str(out), *extra]) == 0
    return out


def _default(S):
    return [p % E for p in range(R * S)]


@pytest.mark.parametrize("copies", [False, True])
def test_sglang_roundtrip(tmp_path, capsys, copies):
    plan, path = _plan(tmp_path, copies)
    out = _export(tmp_path, "sglang", path, "--num-layers", "5")
    printed = capsys.readouterr().out
    # SGLang's loader: a .json path is json.loads'ed, the key used as is, shape [decoder layers, physical]
    data = json.loads(out.read_text())
    assert list(data) == ["physical_to_logical_map"]
    table = np.array(data["physical_to_logical_map"])
    S = plan.slots_per_rank()
    redundant = R * S - E
    assert table.shape == (5, E + redundant) and (E + redundant) % R == 0
    # every logical expert has a physical copy in every row (SGLang builds logical_to_all_physical from it)
    assert all(set(row) == set(range(E)) for row in table.tolist())
    for l in (1, 3):
        assert np.array_equal(table[l].reshape(R, S), plan.layers[l])
    for l in (0, 2, 4):  # dense 0 and 4, unplaced MoE 2: SGLang's trivial layout
        assert table[l].tolist() == _default(S)
    assert f"--ep-num-redundant-experts {redundant}" in printed and f"--init-expert-location {out}" in printed
    assert ("differ from `moeplace evaluate`" in printed) == copies


@pytest.mark.parametrize("copies", [False, True])
def test_trtllm_roundtrip(tmp_path, capsys, copies):
    plan, path = _plan(tmp_path, copies)
    out = _export(tmp_path, "trtllm", path)
    printed = capsys.readouterr().out
    cfg = yaml.safe_load(out.read_text())
    assert set(cfg) == {"num_slots", "initial_global_assignments", "layer_updates_per_iter"}
    S = plan.slots_per_rank()
    assert cfg["num_slots"] == R * S and cfg["layer_updates_per_iter"] == 0
    assign = cfg["initial_global_assignments"]
    assert sorted(assign) == [1, 2, 3]  # decoder-layer ids of the MoE layers, as ints
    for l in (1, 3):  # consecutive num_slots / ep_size slots per rank
        assert np.array_equal(np.array(assign[l]).reshape(R, S), plan.layers[l])
    assert assign[2] == _default(S)
    # the same structure as TensorRT-LLM's own generator writes (yaml.dump, flow-style lists)
    yaml.add_representer(list, lambda d, x: d.represent_sequence("tag:yaml.org,2002:seq", x, flow_style=True))
    theirs = yaml.dump(cfg, width=float("inf"))
    assert yaml.safe_load(theirs) == cfg
    assert "load_balancer: " + str(out) in printed


def test_vllm_map_roundtrip(tmp_path, capsys):
    plan, path = _plan(tmp_path, True)
    out = _export(tmp_path, "vllm-map", path)
    printed = capsys.readouterr().out
    maps = json.loads(out.read_text())
    S = plan.slots_per_rank()
    assert len(maps) == 3 and all(len(m) == R * S for m in maps)  # one list per MoE layer, in order
    assert np.array_equal(np.array(maps[0]).reshape(R, S), plan.layers[1])
    assert maps[1] == _default(S)
    assert np.array_equal(np.array(maps[2]).reshape(R, S), plan.layers[3])
    assert '"num_redundant_experts": 4' in printed and "hash(token index)" in printed


def test_bad_input_one_error_no_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "vllm-moeplace/plan", "version": 1}))
    out = tmp_path / "o.json"
    assert main(["export", "--to", "sglang", "--plan", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeplace export: error: ") and str(bad) in err and "Traceback" not in err
    _, path = _plan(tmp_path, False)
    assert main(["export", "--to", "sglang", "--plan", path, "--out", str(out), "--num-layers", "3"]) == 2
    assert "--num-layers 3" in capsys.readouterr().err
    assert main(["export", "--to", "trtllm", "--plan", path, "--out", str(out), "--num-layers", "5"]) == 2
    assert "--num-layers applies to --to sglang only" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".o.json.*"))
