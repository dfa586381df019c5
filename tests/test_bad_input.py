"""Bad input never crashes and never lies (issue 15): every command, every file.

A golden list of the known bad-input classes (parametrised), then hypothesis properties over
generated bad files and flags. Every case runs the command in-process through `cli.main.main`
and asserts: non-zero exit, exactly one stderr line naming the file / field / flag, no traceback,
no output file left behind. A few subprocess runs prove no traceback reaches a real stderr.
CP-SAT time limits are tiny so the whole module runs in well under a minute.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_moeplace.cli.main import main
from vllm_moeplace.plan import PlanError, load_plan
from vllm_moeplace.serving.validate import check_plan_fits, read_model_config
from vllm_moeplace.solver.synth import SynthConfig, synth_trace
from vllm_moeplace.trace import save_trace

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


# --------------------------------------------------------------------------- a valid world
class World:
    """Valid inputs every bad case starts from: a trace, a plan, a topology, a model config."""

    def __init__(self, root: Path):
        self.root = root
        self.trace = root / "trace.npz"
        save_trace(self.trace, synth_trace(SynthConfig(num_layers=2, num_experts=8, top_k=2, num_tokens=400,
                                                       num_requests=8, seed=1)))
        self.plan_dict: dict[str, Any] = {
            "format": "vllm-moeplace/plan", "version": 1,
            "model": {"name": "m", "num_experts": 8, "moe_layers": [1, 2]},
            "ep_size": 2, "topology": {"ranks_per_node": 1},
            "layers": {"1": [[0, 1, 2, 3], [4, 5, 6, 7]], "2": [[7, 1, 2, 3], [4, 5, 6, 0]]},
            "solver": {"method": "test"},
        }
        self.plan = self.write("plan.json", self.plan_dict)
        self.topo = self.write("topo.json", {"nodes": [[0], [1]], "link_cost": [[0, 1], [1, 0]]})
        self.config = {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8, "num_hidden_layers": 3,
                       "mlp_only_layers": [0], "num_experts_per_tok": 2}
        self.model = self.model_dir("model", self.config)
        self.prompts = self.write("prompts.jsonl", b'{"prompt": "hello"}\n')

    def write(self, name: str, obj: Any) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(obj if isinstance(obj, bytes) else json.dumps(obj).encode())
        return p

    def model_dir(self, name: str, config: Any) -> Path:
        self.write(f"{name}/config.json", config)
        return self.root / name

    def plan_with(self, name: str, **changes: Any) -> Path:
        d = json.loads(json.dumps(self.plan_dict))
        for dotted, value in changes.items():
            *head, last = dotted.split("__")
            node = d
            for k in head:
                node = node[k]
            node[last] = value
        return self.write(name, d)

    def npz(self, name: str, **arrays: np.ndarray) -> Path:
        base = dict(np.load(self.trace))
        base.update(arrays)
        p = self.root / name
        with p.open("wb") as f:
            np.savez(f, **{k: v for k, v in base.items() if v is not None})
        return p


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("world"))


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse usage errors
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


def assert_refused(argv: list[Any], needles: list[str], outputs: list[Path] = ()) -> str:
    rc, _, err = run(argv)
    lines = err.strip().splitlines()
    assert rc != 0, f"accepted: {argv}\n{err}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not named in: {lines[0]}"
    for p in outputs:
        assert not Path(p).exists(), f"{p} left behind"
    return lines[0]


# --------------------------------------------------------------------------- bad files
def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


def _npy_named_npz(w: World, name: str) -> Path:
    p = w.root / name
    with p.open("wb") as f:
        np.save(f, np.zeros(3))
    return p


def _corrupt_npz(w: World, name: str) -> Path:
    data = bytearray(w.trace.read_bytes())
    with zipfile.ZipFile(w.trace) as z:
        info = z.getinfo("topk_ids.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for i in range(start + 40, start + 60):  # inside the compressed topk_ids stream
        data[i] ^= 0x5A
    return w.write(name, bytes(data))


def _absurd_header_npz(w: World, name: str) -> Path:
    """topk_ids whose header declares ~10^12 ids with 12 bytes stored: must be refused before any
    allocation (np.load would try to allocate terabytes)."""
    p = w.root / name
    header = {"descr": "<i2", "fortran_order": False, "shape": (10**12, 2, 2)}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(p, "w") as z:
        for k, v in np.load(w.trace).items():
            if k != "topk_ids":
                b = io.BytesIO()
                np.save(b, v)
                z.writestr(f"{k}.npy", b.getvalue())
        z.writestr("topk_ids.npy", buf.getvalue() + b"\0" * 12)
    return p


def _pickled_npz(w: World, name: str) -> Path:
    return w.npz(name, topk_ids=np.array([None] * 4, dtype=object))


def _zero_tokens(w: World, name: str) -> Path:
    return w.npz(name, topk_ids=np.zeros((0, 2, 2), np.int16), request_ids=np.zeros(0, np.int32),
                 is_prefill=np.zeros(0, bool))


def _one_request(w: World, name: str) -> Path:
    t = dict(np.load(w.trace))
    return w.npz(name, request_ids=np.zeros_like(t["request_ids"]), labels=None)


BAD_TRACES: dict[str, tuple[Callable[[World, str], Path], list[str]]] = {
    "binary": (lambda w, n: w.write(n, b"\x00\xff\x13garbage"), ["not a readable .npz trace"]),
    "text_named_npz": (lambda w, n: w.write(n, b'{"not": "a trace"}'), ["not a readable .npz trace", "JSON text"]),
    "npy_named_npz": (_npy_named_npz, ["single .npy array"]),
    "corrupt_npz": (_corrupt_npz, ["key 'topk_ids'", "corrupt"]),
    "truncated_npz": (lambda w, n: w.write(n, w.trace.read_bytes()[:300]), ["not a readable .npz trace"]),
    "pickled_array": (_pickled_npz, ["key 'topk_ids'", "pickled", "never unpickled"]),
    "absurd_header": (_absurd_header_npz, ["key 'topk_ids'", "declares", "corrupt or truncated"]),
    "zero_tokens": (_zero_tokens, ["key 'topk_ids'", "zero tokens"]),
    "num_experts_beyond_int16": (lambda w, n: w.npz(n, num_experts=np.array(40000)), ["num_experts", "int16"]),
    "num_experts_float": (lambda w, n: w.npz(n, num_experts=np.array(8.0)), ["num_experts", "integer scalar"]),
    "folder": (lambda w, n: (w.root / n).mkdir(exist_ok=True) or w.root / n, ["folder"]),
    "missing": (lambda w, n: w.root / n, ["no such"]),
}

TRACE_COMMANDS: dict[str, Callable[[World, Path, Path], list[Any]]] = {
    "solve": lambda w, t, o: ["solve", "--trace", t, "--ep-size", 2, "--ranks-per-node", 1, "--time-limit", 0.2, "--out", o],
    "solve_balance": lambda w, t, o: ["solve", "--trace", t, "--ep-size", 2, "--ranks-per-node", 1, "--objective", "balance", "--out", o],
    "baseline": lambda w, t, o: ["baseline", "--trace", t, "--ep-size", 2, "--ranks-per-node", 1, "--method", "linear", "--out", o],
    "evaluate": lambda w, t, o: ["evaluate", "--trace", t, "--plan", w.plan, "--baselines", "none"],
    "analyze": lambda w, t, o: ["analyze", t, "--out", o],
    "validate": lambda w, t, o: ["validate", w.plan, "--trace", t],
}


@pytest.mark.parametrize("command", list(TRACE_COMMANDS))
@pytest.mark.parametrize("case", list(BAD_TRACES))
def test_bad_trace_files(world: World, tmp_path: Path, case: str, command: str) -> None:
    make, needles = BAD_TRACES[case]
    path = make(world, f"bad_{case}.npz")
    out = tmp_path / "out" / "result.json"
    assert_refused(TRACE_COMMANDS[command](world, path, out), [str(path), *needles], [out])


def test_held_out_split_with_no_requests_says_which_and_why(world: World) -> None:
    one = _one_request(world, "one_request.npz")
    line = assert_refused(["evaluate", "--trace", one, "--plan", world.plan, "--baselines", "none"],
                          [str(one), "held-out split empty", "1 request"])
    assert "train fraction 0.5" in line
    assert_refused(["evaluate", "--trace", world.trace, "--plan", world.plan, "--train-fraction", 0.99],
                   ["held-out split empty", "8 request"])


def test_failure_after_plan_computed_leaves_no_file(world: World, tmp_path: Path) -> None:
    """solve fits on the first 0.99 of 8 requests: nothing is held out, refused; no plan file."""
    out = tmp_path / "plan.json"
    assert_refused(["solve", "--trace", world.trace, "--ep-size", 2, "--ranks-per-node", 1, "--time-limit", 0.2,
                    "--train-fraction", 0.99, "--out", out], ["held-out split empty"], [out])
    assert not list(tmp_path.iterdir())


def test_failed_overwrite_restores_the_old_file(world: World, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    out.write_text("old")
    assert_refused(["solve", "--trace", world.trace, "--ep-size", 2, "--ranks-per-node", 1, "--time-limit", 0.2,
                    "--train-fraction", 0.99, "--out", out], ["held-out split empty"])
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


# --------------------------------------------------------------------------- bad JSON files
BAD_PLANS: dict[str, tuple[dict[str, Any] | bytes, list[str]]] = {
    "not_utf8": (b'{"format": "\xff\xfe"}', ["not UTF-8"]),
    "binary": (bytes(range(256)), ["not UTF-8"]),
    "deeply_nested": (_deep(100_000), ["nested too deeply"]),
    "nested_beyond_limit": (b'{"solver": ' + _deep(200) + b"}", ["field 'solver", "nested deeper"]),
    "nan": ({"topology": {"nodes": [[0], [1]], "link_cost": [[0, float("nan")], [1, 0]]}}, ["topology.link_cost[0][1]", "finite"]),
    "infinity": ({"topology": {"nodes": [[0], [1]], "link_cost": [[0, float("inf")], [1, 0]]}}, ["link_cost[0][1]", "finite"]),
    "overflow_literal": (b'{"ep_size": 1e999}', ["field 'ep_size'", "finite"]),
    "int_beyond_64_bits": ({"layers": {"1": [[2**70, 1, 2, 3], [4, 5, 6, 7]]}}, ["layers.1[0][0]", "64 bits"]),
    "int_4301_digits": (b'{"ep_size": ' + b"9" * 4301 + b"}", ["unreadable JSON value"]),
    "absurd_ep_size": ({"ep_size": 10**12}, ["field 'ep_size'", "1000000000000"]),
    "absurd_num_experts": ({"model": {"name": "m", "num_experts": 10**9, "moe_layers": [1, 2]}}, ["model.num_experts", "1000000000"]),
    "id_beyond_int16": ({"layers": {"1": [[40000, 1, 2, 3], [4, 5, 6, 7]]}}, ["layers.1.0.0", "40000"]),
    "absurd_layer_id": ({"model": {"name": "m", "num_experts": 8, "moe_layers": [1, 10**9]}}, ["model.moe_layers.1", "1000000000"]),
    "negative_layer": ({"model": {"name": "m", "num_experts": 8, "moe_layers": [-1, 1, 2]}}, ["model.moe_layers.0", "-1"]),
    "id_as_string": ({"layers": {"1": [["0", 1, 2, 3], [4, 5, 6, 7]]}}, ["layers.1.0.0", '"0"']),
    "id_as_bool": ({"layers": {"1": [[True, 1, 2, 3], [4, 5, 6, 7]]}}, ["layers.1.0.0", "true"]),
    "id_as_float": ({"layers": {"1": [[0.0, 1, 2, 3], [4, 5, 6, 7]]}}, ["layers.1.0.0", "0.0"]),
    "num_experts_string": ({"model": {"name": "m", "num_experts": "8", "moe_layers": [1, 2]}}, ["model.num_experts", '"8"']),
    "ep_size_bool": ({"ep_size": True}, ["field 'ep_size'", "true"]),
    "string_link_cost": ({"topology": {"nodes": [[0], [1]], "link_cost": [[0, "1"], [1, 0]]}}, ["link_cost.0.1", '"1"']),
    "ragged_link_cost": ({"topology": {"nodes": [[0], [1]], "link_cost": [[0, 1], [1]]}}, ["link_cost", "ragged"]),
    "ragged_ranks": ({"layers": {"1": [[0, 1, 2, 3, 4], [5, 6, 7]]}}, ["layers.1", "unequal slot counts"]),
    "not_an_object": (b"[1, 2, 3]", ["plan"]),
}


def _bad_plan(w: World, case: str) -> Path:
    data, _ = BAD_PLANS[case]
    if isinstance(data, bytes):
        return w.write(f"plan_{case}.json", data)
    return w.plan_with(f"plan_{case}.json", **{k: v for k, v in data.items()})


PLAN_COMMANDS: dict[str, Callable[[World, Path, Path], list[Any]]] = {
    "validate": lambda w, p, o: ["validate", p],
    "validate_model": lambda w, p, o: ["validate", p, "--model", w.model, "--ep-size", 2],
    "evaluate": lambda w, p, o: ["evaluate", "--trace", w.trace, "--plan", p, "--baselines", "none"],
    "export": lambda w, p, o: ["export", "--to", "vllm-map", "--plan", p, "--out", o],
}


@pytest.mark.parametrize("command", list(PLAN_COMMANDS))
@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_bad_plan_files(world: World, tmp_path: Path, case: str, command: str) -> None:
    path = _bad_plan(world, case)
    out = tmp_path / "export.json"
    assert_refused(PLAN_COMMANDS[command](world, path, out), [str(path), *BAD_PLANS[case][1]], [out])


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_server_check_refuses_the_same_plan_files(world: World, case: str) -> None:
    """`settings.load_checked` (what every server process reads) gives the same one-line PlanError."""
    from vllm_moeplace.serving.settings import load_checked

    path = _bad_plan(world, case)
    with pytest.raises(PlanError) as e:
        load_checked(str(path), None)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path))


BAD_TOPOLOGIES: dict[str, tuple[Any, list[str]]] = {
    "binary": (b"\x89PNG\r\n\x1a\n\x00", ["not UTF-8"]),
    "nested": (_deep(50_000), ["nested too deeply"]),
    "not_object": ([[0], [1]], ["expected a JSON object"]),
    "ragged_nodes": ({"nodes": [[0], 1]}, ["nodes.1", "1"]),
    "string_costs": ({"nodes": [[0], [1]], "link_cost": [["0", "1"], ["1", "0"]]}, ["link_cost.0.0"]),
    "nan_cost": ({"nodes": [[0], [1]], "link_cost": [[0, float("nan")], [1, 0]]}, ["link_cost[0][1]", "finite"]),
    "inf_cost": ({"nodes": [[0], [1]], "link_cost": [[0, float("inf")], [1, 0]]}, ["link_cost[0][1]", "finite"]),
    "negative_cost": ({"nodes": [[0], [1]], "link_cost": [[0, -1], [1, 0]]}, ["link_cost.0.1"]),
    "ragged_cost": ({"nodes": [[0], [1]], "link_cost": [[0, 1], [1]]}, ["link_cost", "ragged"]),
    "rank_beyond_ep": ({"nodes": [[0], [10**9]]}, ["nodes"]),
}


@pytest.mark.parametrize("command", ["solve", "baseline", "evaluate"])
@pytest.mark.parametrize("case", list(BAD_TOPOLOGIES))
def test_bad_topology_files(world: World, tmp_path: Path, case: str, command: str) -> None:
    data, needles = BAD_TOPOLOGIES[case]
    topo = world.write(f"topo_{case}.json", data if isinstance(data, bytes) else json.dumps(data).encode())
    out = tmp_path / "plan.json"
    common = ["--trace", world.trace, "--ep-size", 2, "--topology", topo]
    argv = {
        "solve": ["solve", *common, "--time-limit", 0.2, "--out", out],
        "baseline": ["baseline", *common, "--method", "linear", "--out", out],
        "evaluate": ["evaluate", *common, "--baselines", "linear"],
    }[command]
    assert_refused(argv, [str(topo), *needles], [out])


BAD_CONFIGS: dict[str, tuple[Any, list[str]]] = {
    "binary": (b"\xff\xd8\xff\xe0", ["not UTF-8"]),
    "nested": (_deep(50_000), ["nested too deeply"]),
    "list": ([1, 2], ["expected a JSON object"]),
    "string": ("Qwen3MoeForCausalLM", ["expected a JSON object"]),
    "experts_string": ({"num_experts": "8"}, ["field 'num_experts'", "'8'"]),
    "experts_float": ({"num_experts": 8.5}, ["field 'num_experts'", "8.5"]),
    "experts_bool": ({"num_experts": True}, ["field 'num_experts'", "True"]),
    "experts_negative": ({"num_experts": -8}, ["field 'num_experts'", "-8"]),
    "experts_absurd": ({"num_experts": 10**9}, ["field 'num_experts'", "1000000000"]),
    "layers_absurd": ({"num_hidden_layers": 10**12}, ["field 'num_hidden_layers'", "1000000000000"]),
    "layers_string": ({"num_hidden_layers": "3"}, ["field 'num_hidden_layers'", "'3'"]),
    "architectures_string": ({"architectures": "Qwen3MoeForCausalLM"}, ["architectures", "Qwen3MoeForCausalLM"]),
    "architectures_not_strings": ({"architectures": [1, {"a": 2}]}, ["1"]),
    "sparse_step_zero": ({"decoder_sparse_step": 0}, ["field 'decoder_sparse_step'", "0"]),
}


def _bad_config(w: World, case: str) -> Path:
    data, _ = BAD_CONFIGS[case]
    if isinstance(data, dict):
        data = {**w.config, **data}
    return w.model_dir(f"model_{case}", data if isinstance(data, bytes) else json.dumps(data).encode())


@pytest.mark.parametrize("command", ["validate", "random-plan"])
@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_model_configs(world: World, tmp_path: Path, case: str, command: str) -> None:
    model = _bad_config(world, case)
    out = tmp_path / "plan.json"
    argv = (["validate", world.plan, "--model", model] if command == "validate"
            else ["random-plan", "--model", model, "--ep-size", 2, "--out", out])
    line = assert_refused(argv, BAD_CONFIGS[case][1], [out])
    assert "config.json" in line or str(world.plan) in line


@pytest.mark.parametrize("case", [c for c in BAD_CONFIGS if isinstance(BAD_CONFIGS[c][0], dict)])
def test_server_check_refuses_bad_model_configs(world: World, case: str) -> None:
    cfg, _ = read_model_config(_bad_config(world, case))
    with pytest.raises(PlanError) as e:
        check_plan_fits(load_plan(world.plan), cfg, True, 2)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- flags
BAD_FLAGS: dict[str, tuple[Callable[[World, Path], list[Any]], list[str]]] = {
    "synth_skew_nan": (lambda w, o: ["synth", "--layers", 2, "--experts", 8, "--top-k", 2, "--tokens", 100, "--skew", "nan", "--out", o], ["--skew", "nan", "finite"]),
    "synth_skew_inf": (lambda w, o: ["synth", "--layers", 2, "--experts", 8, "--top-k", 2, "--tokens", 100, "--skew", "inf", "--out", o], ["--skew", "finite"]),
    "synth_strength_-inf": (lambda w, o: ["synth", "--layers", 2, "--experts", 8, "--top-k", 2, "--tokens", 100, "--cluster-strength", "-inf", "--out", o], ["--cluster-strength"]),
    "synth_seed_negative": (lambda w, o: ["synth", "--layers", 2, "--experts", 8, "--top-k", 2, "--tokens", 100, "--seed", -1, "--out", o], ["--seed", "-1"]),
    "synth_tokens_absurd": (lambda w, o: ["synth", "--layers", 2, "--experts", 8, "--top-k", 2, "--tokens", 10**12, "--out", o], ["--tokens", "1000000000000"]),
    "synth_ids_beyond_int16": (lambda w, o: ["synth", "--layers", 2, "--experts", 40000, "--top-k", 2, "--tokens", 100, "--out", o], ["--experts", "40000"]),
    "synth_too_many_ids": (lambda w, o: ["synth", "--layers", 50000, "--experts", 8, "--top-k", 8, "--tokens", 10**6, "--out", o], ["tokens x layers x top_k"]),
    "synth_int_beyond_64_bits": (lambda w, o: ["synth", "--layers", 2**70, "--experts", 8, "--top-k", 2, "--tokens", 100, "--out", o], ["--layers"]),
    "synth_first_layer_negative": (lambda w, o: ["synth", "--layers", 2, "--experts", 8, "--top-k", 2, "--tokens", 100, "--first-layer", -1, "--out", o], ["--first-layer", "-1"]),
    "solve_balance_risk_nan": (lambda w, o: ["solve", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--balance-risk", "nan", "--out", o], ["--balance-risk", "nan"]),
    "solve_risk_scale_inf": (lambda w, o: ["solve", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--risk-scale", "inf", "--out", o], ["--risk-scale", "inf"]),
    "solve_inter_layer_nan": (lambda w, o: ["solve", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--inter-layer-weight", "NaN", "--out", o], ["--inter-layer-weight"]),
    "solve_time_limit_inf": (lambda w, o: ["solve", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--time-limit", "inf", "--out", o], ["--time-limit"]),
    "solve_max_imbalance_nan": (lambda w, o: ["solve", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--max-imbalance", "nan", "--out", o], ["--max-imbalance"]),
    "solve_seed_negative": (lambda w, o: ["solve", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--seed", -5, "--out", o], ["--seed", "-5"]),
    "solve_ep_absurd": (lambda w, o: ["solve", "--trace", w.trace, "--ep-size", 10**12, "--ranks-per-node", 1, "--out", o], ["--ep-size"]),
    "solve_redundancy_huge": (lambda w, o: ["solve", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--redundant-per-rank", 10000, "--time-limit", 30, "--out", o], ["--redundant-per-rank", "10000"]),
    "solve_redundancy_too_large": (lambda w, o: ["solve", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--redundant-per-rank", 5, "--time-limit", 30, "--out", o], ["--redundant-per-rank", "5", "0..4"]),
    "solve_balance_redundancy_too_large": (lambda w, o: ["solve", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--objective", "balance", "--redundant-per-rank", 5, "--out", o], ["--redundant-per-rank", "5"]),
    "random_plan_ranks_per_node_0": (lambda w, o: ["random-plan", "--model", w.model, "--ep-size", 2, "--ranks-per-node", 0, "--out", o], ["--ranks-per-node", "0"]),
    "random_plan_seed_negative": (lambda w, o: ["random-plan", "--model", w.model, "--ep-size", 2, "--seed", -1, "--out", o], ["--seed", "-1"]),
    "random_plan_ep_absurd": (lambda w, o: ["random-plan", "--model", w.model, "--ep-size", 2**80, "--out", o], ["--ep-size"]),
    "baseline_num_groups_0": (lambda w, o: ["baseline", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--method", "eplb", "--num-groups", 0, "--out", o], ["--num-groups", "0"]),
    "baseline_redundancy_negative": (lambda w, o: ["baseline", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--method", "linear", "--redundant-per-rank", -1, "--out", o], ["--redundant-per-rank", "-1"]),
    "baseline_redundancy_too_large": (lambda w, o: ["baseline", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--method", "linear", "--redundant-per-rank", 9, "--out", o], ["--redundant-per-rank", "9"]),
    "baseline_train_fraction_nan": (lambda w, o: ["baseline", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--method", "linear", "--train-fraction", "nan", "--out", o], ["--train-fraction"]),
    "evaluate_redundancy_negative": (lambda w, o: ["evaluate", "--trace", w.trace, "--plan", w.plan, "--redundant-per-rank", -2], ["--redundant-per-rank", "-2"]),
    "evaluate_redundancy_too_large": (lambda w, o: ["evaluate", "--trace", w.trace, "--plan", w.plan, "--redundant-per-rank", 100], ["--redundant-per-rank", "100"]),
    "evaluate_train_fraction_inf": (lambda w, o: ["evaluate", "--trace", w.trace, "--plan", w.plan, "--train-fraction", "inf"], ["--train-fraction"]),
    "evaluate_train_fraction_out_of_range": (lambda w, o: ["evaluate", "--trace", w.trace, "--plan", w.plan, "--train-fraction", 1.5], ["train_fraction", "1.5"]),
    "import_num_experts_beyond_int16": (lambda w, o: ["import", "--format", "orders-in-chaos", w.root, "--num-experts", 40000, "--out", o], ["--num-experts", "40000"]),
    "import_negative_layer_ids": (lambda w, o: ["import", "--format", "hf-hook-csv", w.root, "--layer-ids", "-3", "--out", o], ["--layer-ids", "-3"]),
    "export_num_layers_absurd": (lambda w, o: ["export", "--to", "sglang", "--plan", w.plan, "--num-layers", 10**12, "--out", o], ["--num-layers"]),
    "validate_ep_size_mismatch": (lambda w, o: ["validate", w.plan, "--model", w.model, "--ep-size", 4], ["field 'ep_size'", "value 2", "4"]),
    "solve_preserve_groups_bad_config": (lambda w, o: ["solve", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--preserve-groups", "--model", w.write("deep/config.json", _deep(100_000)).parent, "--out", o], ["config.json", "nested too deeply"]),
    "solve_preserve_groups_list_config": (lambda w, o: ["solve", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--preserve-groups", "--model", w.write("listcfg/config.json", b"[2]").parent, "--out", o], ["config.json", "n_group"]),
    "validate_ep_size_zero": (lambda w, o: ["validate", w.plan, "--ep-size", 0], ["--ep-size", "0"]),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags(world: World, tmp_path: Path, case: str) -> None:
    make, needles = BAD_FLAGS[case]
    out = tmp_path / "sub" / "out.npz"
    t0 = time.perf_counter()
    assert_refused(make(world, out), needles, [out])
    assert time.perf_counter() - t0 < 10, "refused, but only after the long computation"


# --------------------------------------------------------------------------- output paths
def _writers(w: World, out: Path) -> dict[str, list[Any]]:
    return {
        "solve": ["solve", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--time-limit", 30, "--out", out],
        "baseline": ["baseline", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--method", "greedy", "--out", out],
        "synth": ["synth", "--layers", 2, "--experts", 8, "--top-k", 2, "--tokens", 100, "--out", out],
        "random-plan": ["random-plan", "--model", w.model, "--ep-size", 2, "--out", out],
        "export": ["export", "--to", "sglang", "--plan", w.plan, "--out", out],
        "import": ["import", "--format", "hf-hook-csv", str(ROOT / "tests"), "--out", out],
        # refused before vLLM is imported: an engine start would take far longer than the limit below
        "profile": ["profile", w.model, "--prompts", w.prompts, "--out", out],
    }


OUT_CASES = {
    "is_a_folder": (lambda tmp: tmp, ["is a folder"]),
    "inside_a_file": (lambda tmp: (tmp / "file.txt").write_text("x") and tmp / "file.txt" / "out.json", ["is a file"]),
    "not_creatable": (lambda tmp: Path("/proc/self/no/such/out.json"), ["cannot create files"]),
    "device": (lambda tmp: Path("/dev/null"), ["not a regular file"]),
}


@pytest.mark.parametrize("command", ["solve", "baseline", "synth", "random-plan", "export", "import", "profile"])
@pytest.mark.parametrize("case", list(OUT_CASES))
def test_bad_output_paths_refused_before_computing(world: World, tmp_path: Path, case: str, command: str) -> None:
    make, needles = OUT_CASES[case]
    out = make(tmp_path)
    t0 = time.perf_counter()
    assert_refused(_writers(world, out)[command], ["--out", str(out), *needles])
    assert time.perf_counter() - t0 < 5  # solve would take its 30 s time limit
    assert Path("/dev/null").exists() and not Path("/dev/null").is_file()


@pytest.mark.parametrize("case", ["is_a_file", "inside_a_file", "not_creatable"])
def test_analyze_output_folder(world: World, tmp_path: Path, case: str) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    out = {"is_a_file": f, "inside_a_file": f / "report", "not_creatable": Path("/proc/self/none/report")}[case]
    assert_refused(["analyze", world.trace, "--out", out], ["--out", str(out)])


def _folder_writers(w: World, out: Path) -> dict[str, list[Any]]:
    return {
        "tiny-model": ["tiny-model", "--layers", 1, "--experts", 4, "--top-k", 2, "--out", out],
        "bench": ["bench", w.model, "--plan", w.plan, "--out", out],  # would start two vLLM servers
        "demo": ["demo", "--out", out],  # would run the whole main job
    }


@pytest.mark.parametrize("command", ["tiny-model", "bench", "demo"])
@pytest.mark.parametrize("case", ["is_a_file", "inside_a_file", "not_creatable"])
def test_output_folders_refused_before_starting(world: World, tmp_path: Path, case: str, command: str) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    out = {"is_a_file": f, "inside_a_file": f / "run", "not_creatable": Path("/proc/self/none/run")}[case]
    t0 = time.perf_counter()
    assert_refused(_folder_writers(world, out)[command], ["--out", str(out)])
    assert time.perf_counter() - t0 < 10 and f.read_text() == "x"


# --------------------------------------------------------------------------- empty import sources
@pytest.mark.parametrize("fmt", ["hf-hook-csv", "orders-in-chaos", "vllm-routed-experts",
                                 "sglang-expert-distribution", "trtllm-expert-statistic"])
@pytest.mark.parametrize("content", ["empty", "junk_only"])
def test_import_folder_without_usable_files(tmp_path: Path, fmt: str, content: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    if content == "junk_only":
        (src / "notes.txt").write_text("nothing to import")
        (src / "x.bin").write_bytes(b"\x00\x01")
    out = tmp_path / "t.npz"
    extra = ["--num-experts", 8] if fmt == "vllm-routed-experts" else []  # it needs the count first
    assert_refused(["import", "--format", fmt, src, *extra, "--out", out], [str(src)], [out])


BAD_IMPORT_FILES: dict[str, tuple[str, str, bytes]] = {
    # format, file name, content
    "csv_binary": ("hf-hook-csv", "prompt_1_data.csv", b"\xff\xfe\x00garbage"),
    "csv_header_only": ("hf-hook-csv", "prompt_1_data.csv", b"token_idx,layer,expert_ids\n"),
    "csv_nested_cell": ("hf-hook-csv", "prompt_1_data.csv",
                        b'Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,a,"' + _deep(100_000) + b'"\n'),
    "csv_huge_int_cell": ("hf-hook-csv", "prompt_1_data.csv",
                          b'Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,a,"[' + b"9" * 5000 + b']"\n'),
    "csv_id_beyond_int16": ("hf-hook-csv", "prompt_1_data.csv",
                            b'Layer ID,Batch Number,Token,Activated Expert IDs\n1,0,a,"[1, 70000]"\n'),
    "oic_binary": ("orders-in-chaos", "a.json", b"\xff\xfe\x00"),
    "oic_nested": ("orders-in-chaos", "a.json", _deep(100_000)),
    "oic_not_list": ("orders-in-chaos", "a.json", b'{"a": 1}'),
    "oic_nan": ("orders-in-chaos", "a.json", b"[NaN]"),
    "vre_text_named_npy": ("vllm-routed-experts", "r.npy", b"hello"),
    "vre_pickled_npy": ("vllm-routed-experts", "r.npy", b"PICKLED"),
    "vre_text_named_npz": ("vllm-routed-experts", "r.npz", b"hello"),
    "trtllm_meta_binary": ("trtllm-expert-statistic", "meta_info.json", b"\xff"),
    "trtllm_meta_list": ("trtllm-expert-statistic", "meta_info.json", b"[1]"),
}


@pytest.mark.parametrize("case", list(BAD_IMPORT_FILES))
def test_bad_import_files(tmp_path: Path, case: str) -> None:
    fmt, name, content = BAD_IMPORT_FILES[case]
    src = tmp_path / "src"
    src.mkdir()
    if content == b"PICKLED":
        np.save(src / name, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        (src / name).write_bytes(content)
    out = tmp_path / "t.npz"
    extra = ["--num-experts", 8] if fmt == "vllm-routed-experts" else []
    assert_refused(["import", "--format", fmt, src, *extra, "--out", out], [str(src)], [out])


# --------------------------------------------------------------------------- valid edges still work
def test_small_redundancy_at_ep2_works(world: World, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    rc, stdout, err = run(["solve", "--trace", world.trace, "--ep-size", 2, "--ranks-per-node", 1,
                           "--redundant-per-rank", 1, "--time-limit", 1, "--deterministic", "--max-imbalance", 1.3,
                           "--out", out])
    assert rc == 0, err
    assert load_plan(out).slots_per_rank() == 5
    assert run(["validate", out, "--model", world.model, "--ep-size", 2])[0] == 0


def test_validate_model_and_server_refuse_disagreeing_moe_layers(world: World) -> None:
    """A plan claiming layers 1-3 are MoE is valid alone; the model's MoE layers are 1-2, so both
    `validate --model` and the server's check refuse it, with the same message."""
    path = world.plan_with("plan_moe3.json", model__moe_layers=[1, 2, 3])
    assert run(["validate", path])[0] == 0
    line = assert_refused(["validate", path, "--model", world.model, "--ep-size", 2], [str(path), "model.moe_layers", "[1, 2, 3]"])
    with pytest.raises(PlanError) as e:
        check_plan_fits(load_plan(path), read_model_config(world.model)[0], True, 2,
                        model_src=str(world.model / "config.json"))
    assert str(e.value) in line


# --------------------------------------------------------------------------- properties
@FAST
@given(data=st.binary(max_size=300))
def test_any_bytes_as_plan_are_refused_cleanly(world: World, data: bytes) -> None:
    p = world.write("fuzz_plan.json", data)
    assert_refused(["validate", p], [str(p)])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
    max_leaves=12,
)
PLAN_PATHS = [("ep_size",), ("version",), ("model", "num_experts"), ("model", "moe_layers"), ("model", "moe_layers", 0),
              ("model", "name"), ("topology",), ("topology", "ranks_per_node"), ("layers",), ("layers", "1"),
              ("layers", "1", 0), ("layers", "1", 0, 2), ("layers", "2", 1, 3), ("solver",)]


def _mutated_plan(w: World, path: tuple, value: Any) -> dict[str, Any]:
    d = json.loads(json.dumps(w.plan_dict))
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return d


@FAST
@given(path=st.sampled_from(PLAN_PATHS), value=json_values, ep=st.integers(-3, 6))
def test_mutated_plans_validate_iff_the_server_accepts(world: World, path: tuple, value: Any, ep: int) -> None:
    """validate --model --ep-size and the server's load + check answer alike; never a traceback."""
    p = world.write("fuzz_mut.json", json.dumps(_mutated_plan(world, path, value)).encode())
    rc, _, err = run(["validate", p, "--model", world.model, "--ep-size", ep])
    assert "Traceback" not in err and rc in (0, 2)
    server_ok = True
    try:
        from vllm_moeplace.serving.settings import load_checked

        load_checked.__globals__["_cache"].clear()
        check_plan_fits(load_checked(str(p), None), read_model_config(world.model)[0], True, ep)
    except PlanError:
        server_ok = False
    if ep < 1:
        assert rc == 2 and "--ep-size" in err
    else:
        assert (rc == 0) == server_ok, err
        if rc:
            assert len(err.strip().splitlines()) == 1 and str(p) in err


@FAST
@given(cut=st.integers(0, 4000), flips=st.lists(st.integers(0, 10**6), max_size=3))
def test_damaged_traces_are_refused_or_read(world: World, cut: int, flips: list[int]) -> None:
    data = bytearray(world.trace.read_bytes())
    for i in flips:
        data[i % len(data)] ^= 0xA5
    if cut:
        data = data[: max(1, len(data) - cut)]
    p = world.write("fuzz_trace.npz", bytes(data))
    rc, _, err = run(["evaluate", "--trace", p, "--plan", world.plan, "--baselines", "none", "--json"])
    assert "Traceback" not in err and rc in (0, 2)
    if rc:
        assert len(err.strip().splitlines()) == 1 and str(p) in err


FLOAT_FLAGS = [("synth", "--skew"), ("synth", "--cluster-strength"), ("synth", "--layer-coupling"),
               ("solve", "--balance-risk"), ("solve", "--risk-scale"), ("solve", "--inter-layer-weight"),
               ("solve", "--max-imbalance"), ("solve", "--time-limit"), ("solve", "--balance-confidence"),
               ("baseline", "--train-fraction"), ("evaluate", "--train-fraction"), ("solve", "--phase-mix"),
               ("evaluate", "--phase-mix")]
INT_FLAGS = [("synth", "--seed"), ("synth", "--tokens"), ("synth", "--experts"), ("solve", "--seed"),
             ("solve", "--ep-size"), ("solve", "--redundant-per-rank"), ("random-plan", "--seed"),
             ("random-plan", "--ranks-per-node"), ("baseline", "--num-groups"), ("evaluate", "--redundant-per-rank"),
             ("export", "--num-layers"), ("solve", "--prefill-tokens-per-rank"), ("evaluate", "--decode-tokens-per-rank")]


def _argv(w: World, command: str, flag: str, value: str, out: Path) -> list[Any]:
    base = {
        "synth": ["synth", "--layers", 2, "--experts", 8, "--top-k", 2, "--tokens", 100, "--out", out],
        "solve": ["solve", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--time-limit", 0.2, "--out", out],
        "random-plan": ["random-plan", "--model", w.model, "--ep-size", 2, "--out", out],
        "baseline": ["baseline", "--trace", w.trace, "--ep-size", 2, "--ranks-per-node", 1, "--method", "eplb", "--out", out],
        "evaluate": ["evaluate", "--trace", w.trace, "--plan", w.plan, "--baselines", "none"],
        "export": ["export", "--to", "sglang", "--plan", w.plan, "--out", out],
    }[command]
    return [*base, flag, value]


@FAST
@given(flag=st.sampled_from(FLOAT_FLAGS), value=st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e400"]))
def test_non_finite_float_flags_refused(world: World, tmp_path_factory, flag: tuple[str, str], value: str) -> None:
    out = tmp_path_factory.mktemp("f") / "out.json"
    assert_refused(_argv(world, *flag, value, out), [flag[1]], [out])


@FAST
@given(flag=st.sampled_from(INT_FLAGS),
       value=st.one_of(st.integers(-(2**70), -1), st.integers(2**63, 2**90), st.sampled_from(["1.5", "0x10", "", "1e3"])))
def test_out_of_range_int_flags_refused(world: World, tmp_path_factory, flag: tuple[str, str], value: Any) -> None:
    out = tmp_path_factory.mktemp("i") / "out.json"
    assert_refused(_argv(world, *flag, str(value), out), [flag[1]], [out])


# --------------------------------------------------------------------------- real processes
@pytest.mark.parametrize("argv_of", [
    lambda w, bad: ["validate", w.write("sub_plan.json", b"\xff" + _deep(5000))],
    lambda w, bad: ["solve", "--trace", _corrupt_npz(w, "sub_corrupt.npz"), "--ep-size", 2, "--ranks-per-node", 1, "--out", bad],
    lambda w, bad: ["synth", "--layers", 2, "--experts", 8, "--top-k", 2, "--tokens", 100, "--skew", "nan", "--out", bad],
])
def test_no_traceback_reaches_a_real_stderr(world: World, tmp_path: Path, argv_of) -> None:
    out = tmp_path / "out.json"
    argv = [str(a) for a in argv_of(world, out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "vllm_moeplace", *argv], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"moeplace {argv[0]}: error:") and not out.exists()
