"""The plan file contract: parsing, the validator (the specification), and error messages."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_moeplace.plan import (
    Plan,
    PlanError,
    Topology,
    linear_layout,
    load_plan,
    parse_plan,
    validate_plan,
)


def plan_dict(**over):
    d = {
        "format": "vllm-moeplace/plan",
        "version": 1,
        "model": {"name": "tiny", "num_experts": 8, "moe_layers": [0, 1]},
        "ep_size": 2,
        "topology": {"ranks_per_node": 1},
        "layers": {"0": [[0, 5, 2, 7], [4, 1, 6, 3]], "1": [[0, 1, 2, 3], [4, 5, 6, 7]]},
        "solver": {"method": "test"},
    }
    d.update(over)
    return d


def test_roundtrip(tmp_path):
    p = parse_plan(plan_dict(), "x.json")
    p.save(tmp_path / "p.json")
    q = load_plan(tmp_path / "p.json")
    assert q.to_json() == p.to_json()
    assert q.layers[0].tolist() == [[0, 5, 2, 7], [4, 1, 6, 3]]
    assert q.slots_per_rank() == 4 and not q.has_redundancy()
    # vLLM's per-rank map: global id -> local slot, -1 where not held
    assert q.expert_map(0, 1).tolist() == [-1, 1, -1, 3, 0, -1, 2, -1]


def test_node_groups_topology_roundtrip():
    d = plan_dict(ep_size=4, topology={"nodes": [[0, 2], [1, 3]], "link_cost": [[0, 2], [2, 0]]},
                  layers={"0": [[0, 1], [2, 3], [4, 5], [6, 7]]})
    p = parse_plan(d)
    assert p.topology.node_of_rank.tolist() == [0, 1, 0, 1]
    assert p.to_json()["topology"] == {"nodes": [[0, 2], [1, 3]], "link_cost": [[0.0, 2.0], [2.0, 0.0]]}
    # A uniform contiguous topology is written back in its short form.
    assert Topology.uniform(8, 4).to_json() == {"ranks_per_node": 4}


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"format": "other"}, "field 'format': unknown format 'other'"),
        ({"version": 3}, "field 'version': unsupported version 3"),
        ({"version": True}, "field 'version': unsupported version True"),
        ({"ep_size": 0}, "field 'ep_size'"),
        ({"extra": 1}, "field 'extra'"),
        ({"layers": {"0": [[0, 1, 2, 9], [4, 5, 6, 7]]}}, "field 'layers.0[0]': expert id 9 out of range 0..7"),
        ({"layers": {"0": [[0, 1, 2, 2], [4, 5, 6, 7]]}}, "field 'layers.0[0]': expert 2 appears twice on rank 0"),
        ({"layers": {"0": [[0, 1, 2], [4, 5, 6, 7]]}}, "field 'layers.0': unequal slot counts per rank [3, 4]"),
        ({"layers": {"0": [[0, 1, 2, 3], [0, 1, 2, 3]]}}, "field 'layers.0': experts [4, 5, 6, 7] are on no rank"),
        ({"layers": {"0": [[0, 1, 2, 3]]}}, "1 rank lists, expected ep_size=2"),
        ({"layers": {"5": [[0, 1, 2, 3], [4, 5, 6, 7]]}}, "layer 5 is not a MoE layer of the model"),
        ({"layers": {"x": [[0, 1, 2, 3], [4, 5, 6, 7]]}}, "key 'x' is not a decoder-layer index"),
        ({"topology": {"ranks_per_node": 3}}, "ranks_per_node: 3 does not divide ep_size 2"),
        ({"topology": {"nodes": [[0]]}}, "ranks [1] belong to no node"),
        ({"topology": {"nodes": [[0, 1], [1]]}}, "rank 1 already in node 0"),
        ({"topology": {"nodes": [[0], [1]], "link_cost": [[0, 1]]}}, "link_cost: shape [1, 2], expected [2, 2]"),
        (
            {"layers": {"0": [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]], "1": [[0, 1, 2, 3], [4, 5, 6, 7]]}},
            "layers use different slot counts [4, 5]",
        ),
    ],
)
def test_bad_plans_name_field_and_value(over, needle):
    with pytest.raises(PlanError) as e:
        parse_plan(plan_dict(**over), "plan.json")
    assert needle in str(e.value)
    assert str(e.value).startswith("plan.json")


def test_file_errors(tmp_path):
    with pytest.raises(PlanError, match="missing.json: cannot read plan file"):
        load_plan(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "vllm-moeplace/plan",\n "version": }')
    with pytest.raises(PlanError, match=r"bad.json: malformed JSON at line 2 column"):
        load_plan(bad)


def test_redundant_plan_is_valid_and_flagged():
    d = plan_dict(layers={"0": [[0, 1, 2, 3, 4], [4, 5, 6, 7, 0]], "1": [[0, 1, 2, 3, 5], [4, 5, 6, 7, 1]]})
    assert parse_plan(d).has_redundancy()


def test_save_is_atomic_and_validates(tmp_path):
    p = parse_plan(plan_dict())
    p.layers[0] = np.array([[0, 0, 2, 7], [4, 1, 6, 3]])
    target = tmp_path / "p.json"
    with pytest.raises(PlanError, match="appears twice"):
        p.save(target)
    assert not target.exists() and list(tmp_path.iterdir()) == []


@settings(max_examples=60, deadline=None)
@given(
    e_per_rank=st.integers(1, 6),
    ranks=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_permutation_of_a_linear_layout_is_valid(e_per_rank, ranks, seed):
    rng = np.random.default_rng(seed)
    E = e_per_rank * ranks
    perm = rng.permutation(E).reshape(ranks, e_per_rank)
    p = Plan(model_name="m", num_experts=E, moe_layers=[3], ep_size=ranks,
             topology=Topology.uniform(ranks, 1), layers={3: perm})
    validate_plan(p)
    reparsed = parse_plan(json.loads(json.dumps(p.to_json())))
    assert np.array_equal(reparsed.layers[3], perm)
    # each rank's expert map inverts its slot list
    for r in range(ranks):
        m = p.expert_map(3, r)
        assert np.array_equal(m[perm[r]], np.arange(e_per_rank))
        assert (m >= 0).sum() == e_per_rank


def test_linear_layout_is_vllm_default():
    assert linear_layout(8, 2).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(PlanError, match="not divisible"):
        linear_layout(10, 4)
