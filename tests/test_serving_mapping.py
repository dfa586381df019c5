"""The mapping mechanism without an engine: the torch table lookup equals the one replica rule
(replica.py), every choice lands on a slot that holds the chosen expert, the choice never depends
on the executing rank, the mechanism is chosen exactly for copies / cross-group moves, and the
plan file carries copies as version 2."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_moeplace.plan import Plan, PlanError, Topology, load_plan, parse_plan
from vllm_moeplace.replica import REPLICA_RULE, candidate_table, replicated_origin, select
from vllm_moeplace.serving.mapping import map_to_physical, origin_span
from vllm_moeplace.serving.validate import MAP, PERMUTE, check_map_backend, check_plan_fits, mechanism
from vllm_moeplace.serving.arch import ARCHITECTURES
from _builders import plan_from_layers


@st.composite
def layouts(draw):
    """A valid layout with copies: R ranks x S slots, every expert somewhere, none twice on a rank."""
    R = draw(st.integers(2, 6))
    per = draw(st.integers(1, 4))
    extra = draw(st.integers(0, 3))
    E = R * per
    extra = min(extra, E - per)
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    a = rng.permutation(E).reshape(R, per)
    rows = [np.concatenate([a[r], rng.choice(np.setdiff1d(np.arange(E), a[r]), extra, replace=False)]) for r in range(R)]
    g = draw(st.sampled_from([g for g in range(1, R + 1) if R % g == 0]))
    return np.stack([rng.permutation(r) for r in rows]), E, g, seed


@settings(max_examples=60, deadline=None)
@given(layouts(), st.integers(1, 40), st.integers(1, 4))
def test_torch_mapping_is_the_replica_rule(case, T, K):
    a, E, g, seed = case
    R, S = a.shape
    K = min(K, E)
    topo = Topology.uniform(R, g)
    table = candidate_table(a, E, topo.node_of_rank)
    rng = np.random.default_rng(seed + 1)
    ids = np.stack([rng.choice(E, K, replace=False) for _ in range(T)])
    origin, spread = replicated_origin(T, R)
    want = select(table, ids, origin, spread)
    got = map_to_physical(torch.as_tensor(ids, dtype=torch.int32), torch.as_tensor(table.cand), torch.as_tensor(table.count))
    assert got.dtype == torch.int32
    assert got.numpy().tolist() == want.tolist()
    # every physical slot chosen holds the logical expert the router chose
    assert (a.reshape(-1)[want] == ids).all()
    # a token whose virtual origin holds the expert is served there (no send)
    holds = np.zeros((R, E), bool)
    holds[np.repeat(np.arange(R), S), a.reshape(-1)] = True
    own = holds[origin[:, None], ids]
    assert ((want // S == origin[:, None]) | ~own).all()


def test_data_parallel_form_uses_the_group_of_ranks_that_route_the_tokens():
    a = np.array([[0, 1, 2], [3, 4, 0], [5, 6, 7], [1, 7, 3]])  # E = 8, copies of 0, 1, 3, 7
    table = candidate_table(a, 8, np.array([0, 0, 1, 1]))
    ids = np.array([[0, 5], [1, 3], [7, 2]])
    # DP rank 1 of 2 with TP 2: its tokens' virtual origins are ranks 2, 3
    base, span = origin_span(SimpleNamespace(dp_size=2, dp_rank=1), 4)
    assert (base, span) == (2, 2)
    got = map_to_physical(torch.as_tensor(ids), torch.as_tensor(table.cand), torch.as_tensor(table.count), base, span)
    t = np.arange(3)
    assert got.numpy().tolist() == select(table, ids, base + t % span, t // span).tolist()
    assert origin_span(SimpleNamespace(dp_size=1, dp_rank=0), 4) == (0, 4)


def test_golden_choices():
    # 4 experts over 2 ranks on 2 nodes, expert 0 on both ranks
    a = np.array([[0, 1, 2], [3, 0, 1]])
    table = candidate_table(a, 4, np.array([0, 1]))
    ids = np.array([[0, 2], [0, 3], [2, 1], [3, 0]])
    phys = map_to_physical(torch.as_tensor(ids), torch.as_tensor(table.cand), torch.as_tensor(table.count))
    # token t: origin t % 2. t0 (rank 0): 0 -> own slot 0, 2 -> slot 2. t1 (rank 1): 0 -> own slot 4,
    # 3 -> slot 3. t2 (rank 0): 2 -> 2, 1 -> own slot 1. t3 (rank 1): 3 -> 3, 0 -> own 4.
    assert phys.tolist() == [[0, 2], [4, 3], [2, 1], [3, 4]]


def make_plan(layers, E=8, moe_layers=None, ep=2):
    return plan_from_layers(layers, E, moe_layers or None, ep)


def dsv3(**kw):
    base = dict(architectures=["DeepseekV3ForCausalLM"], num_hidden_layers=2, n_routed_experts=8,
                first_k_dense_replace=0, moe_layer_freq=1, n_group=2, topk_group=1)
    return SimpleNamespace(**{**base, **kw})


def test_mechanism_choice():
    arch = ARCHITECTURES["DeepseekV3ForCausalLM"]
    keep = make_plan({0: [[3, 1, 0, 2], [5, 7, 4, 6]], 1: [[0, 1, 2, 3], [4, 5, 6, 7]]})
    cross = make_plan({0: [[4, 1, 0, 2], [3, 7, 5, 6]], 1: [[0, 1, 2, 3], [4, 5, 6, 7]]})
    copies = make_plan({0: [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]], 1: [[0, 1, 2, 3, 5], [4, 5, 6, 7, 1]]})
    assert mechanism(keep, arch, dsv3()) == PERMUTE
    assert mechanism(cross, arch, dsv3()) == MAP
    assert mechanism(cross, arch, dsv3(n_group=1)) == PERMUTE  # not grouped: a plain permutation
    assert mechanism(copies, arch, dsv3(n_group=1)) == MAP
    # any architecture's group count counts, not only DeepSeek's name
    qwen = ARCHITECTURES["Qwen3MoeForCausalLM"]
    assert mechanism(cross, qwen, SimpleNamespace(num_expert_group=2)) == MAP
    for plan in (keep, cross, copies):
        assert check_plan_fits(plan, dsv3(), True, 2).name == "DeepseekV3ForCausalLM"


def test_mapped_plan_must_place_every_moe_layer():
    only0 = make_plan({0: [[4, 1, 0, 2], [3, 7, 5, 6]]}, moe_layers=[0, 1])
    with pytest.raises(PlanError, match=r"plan\.json: field 'layers': the plan moves experts across the 2 expert groups.*MoE layers 1 are missing"):
        check_plan_fits(only0, dsv3(), True, 2)
    copies = make_plan({1: [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]]}, moe_layers=[0, 1])
    with pytest.raises(PlanError, match=r"has redundant copies \(5 slots per rank x 2 ranks > 8 experts\).*MoE layers 0 are missing"):
        check_plan_fits(copies, dsv3(n_group=1), True, 2)


@pytest.mark.parametrize("kernel,a2a,pattern", [
    ("flashinfer_trtllm", "allgather_reducescatter", r"moe_backend=flashinfer_trtllm: .*routes inside its kernel"),
    ("auto", "passthrough", r"all2all_backend=passthrough"),
    ("auto", "moonep", r"all2all_backend=moonep"),
])
def test_backends_that_cannot_honour_a_table_are_refused(kernel, a2a, pattern):
    plan = make_plan({0: [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]]})
    cfg = SimpleNamespace(kernel_config=SimpleNamespace(moe_backend=kernel), parallel_config=SimpleNamespace(all2all_backend=a2a))
    with pytest.raises(PlanError, match=pattern):
        check_map_backend(plan, cfg)
    ok = SimpleNamespace(kernel_config=SimpleNamespace(moe_backend="auto"),
                         parallel_config=SimpleNamespace(all2all_backend="deepep_low_latency"))
    check_map_backend(plan, ok)  # DeepEP dispatches by physical id over vLLM's linear layout: fine


def test_plan_with_copies_is_version_2_and_names_the_rule(tmp_path):
    copies = make_plan({0: [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]]})
    copies.save(tmp_path / "c.json")
    d = json.loads((tmp_path / "c.json").read_text())
    assert d["version"] == 2 and d["replica_rule"] == REPLICA_RULE
    assert load_plan(tmp_path / "c.json").has_redundancy()
    perm = make_plan({0: [[3, 1, 0, 2], [5, 7, 4, 6]]})
    perm.save(tmp_path / "p.json")
    d1 = json.loads((tmp_path / "p.json").read_text())
    assert d1["version"] == 1 and "replica_rule" not in d1  # older readers keep reading these
    # an old version-1 file with copies (written before version 2) still reads
    d["version"] = 1
    del d["replica_rule"]
    assert parse_plan(d, "old.json").has_redundancy()
    with pytest.raises(PlanError, match=r"old\.json: field 'replica_rule': value 'x': version 1 plans have no replica rule"):
        parse_plan({**d, "replica_rule": "x"}, "old.json")
    with pytest.raises(PlanError, match=r"new\.json: field 'replica_rule': unknown rule 'nearest/v9'"):
        parse_plan({**d, "version": 2, "replica_rule": "nearest/v9"}, "new.json")
    with pytest.raises(PlanError, match=r"field 'version': unsupported version 3"):
        parse_plan({**d, "version": 3}, "new.json")


def test_validate_accepts_exactly_what_the_server_check_accepts(tmp_path, capsys):
    from vllm_moeplace.cli.main import main

    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 2, "n_routed_experts": 8,
           "first_k_dense_replace": 0, "moe_layer_freq": 1, "n_group": 2, "topk_group": 1}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    plans = {
        "copies_every_layer": make_plan({0: [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]], 1: [[0, 1, 2, 3, 5], [4, 5, 6, 7, 1]]}),
        "copies_one_layer": make_plan({0: [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]]}, moe_layers=[0, 1]),
        "cross_group": make_plan({0: [[4, 1, 0, 2], [3, 7, 5, 6]], 1: [[0, 1, 2, 3], [4, 5, 6, 7]]}),
        "in_group": make_plan({0: [[3, 1, 0, 2], [5, 7, 4, 6]]}, moe_layers=[0, 1]),
    }
    outcome = {}
    for name, plan in plans.items():
        path = tmp_path / f"{name}.json"
        plan.save(path)
        try:
            check_plan_fits(load_plan(path), SimpleNamespace(**cfg), True, 2)
            server_ok = True
        except PlanError:
            server_ok = False
        try:
            code = main(["validate", str(path), "--model", str(tmp_path)])
        except SystemExit as e:  # the CLI's one-line error exit
            code = e.code
        outcome[name] = (server_ok, code == 0)
    assert outcome == {"copies_every_layer": (True, True), "copies_one_layer": (False, False),
                       "cross_group": (True, True), "in_group": (True, True)}
    out = capsys.readouterr().out
    assert "served by the mapping mechanism" in out and "served by the permutation mechanism" in out


def test_gpt_oss_serves_permutations_and_refuses_copies():
    """vLLM's GPT-OSS loader cuts each rank's logical block of checkpoint rows (E/R from
    ep_rank on): permutations are served (rows gathered in the stream), copies refused."""
    cfg = SimpleNamespace(architectures=["GptOssForCausalLM"], num_local_experts=8, num_hidden_layers=2)
    perm = make_plan({0: [[3, 1, 0, 2], [5, 7, 4, 6]], 1: [[0, 1, 2, 3], [4, 5, 6, 7]]})
    assert check_plan_fits(perm, cfg, True, 2).name == "GptOssForCausalLM"
    copies = make_plan({0: [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]], 1: [[0, 1, 2, 3, 5], [4, 5, 6, 7, 1]]})
    with pytest.raises(PlanError, match=r"has redundant copies .* which GptOssForCausalLM cannot serve"):
        check_plan_fits(copies, cfg, True, 2)
