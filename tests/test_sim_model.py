"""The simulator's time model: golden cases on hand-sized inputs, invariants, and agreement of its
message counts with the placement metrics (node_sends / rank_sends) under uniform origins."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_moeplace.plan import Topology, linear_layout
from vllm_moeplace.sim.model import compute_seconds, layer_time, layer_traffic, peer_table
from vllm_moeplace.sim.network import BatchSpec, Hardware, ModelShape, SimParamsError, load_params, parse_params
from vllm_moeplace.sim.run import Batch, sample_batches, simulate
from vllm_moeplace.metrics import evaluate_layers
from vllm_moeplace.trace import Trace
from _builders import trace_from_ids

# Round numbers so expected seconds can be worked out by hand:
# NVLink 10 GB/s + 1 us, RDMA 1 GB/s + 2 us, 1 TFLOP/s, no weight-read term.
HW = Hardware(nvlink_bandwidth_gbs=10, nvlink_latency_us=1, rdma_bandwidth_gbs=1, rdma_latency_us=2, gpu_tflops=1, hbm_bandwidth_tbs=0)
# hidden 1000: a dispatch message is 1000 bytes, a combine message 2000; a pair is 2*3*1000*500 = 3e6 FLOPs.
SHAPE = ModelShape(hidden_size=1000, moe_intermediate_size=500, num_experts=4, top_k=3,
                   dispatch_bytes_per_element=1, combine_bytes_per_element=2, weight_bytes_per_element=2)


def _trace(ids: list[list[list[int]]], num_experts: int, layer_ids: list[int] | None = None) -> Trace:
    return trace_from_ids(ids, num_experts, layer_ids=layer_ids, one_request=True)


def test_golden_one_token_two_nodes_node_aggregation():
    # 4 ranks, 2 per node, expert e on rank e. The token starts on rank 0 and picks experts 1, 2, 3:
    # NVLink 0->1; one RDMA message 0->2 (rank 2 = rank 0's peer on node 1), which forwards 2->3.
    topo = Topology.uniform(4, 2)
    t = layer_traffic(linear_layout(4, 4), topo, 4, np.array([[1, 2, 3]]), np.array([0]))
    assert t.rdma_out.tolist() == [1, 0, 0, 0] and t.rdma_in.tolist() == [0, 0, 1, 0]
    assert t.nvl_out.tolist() == [1, 0, 1, 0] and t.nvl_in.tolist() == [0, 1, 0, 1]
    assert t.pairs.tolist() == [0, 1, 1, 1]
    lt = layer_time(t, HW, SHAPE)
    # dispatch: rank 0 and rank 2 both RDMA-bound: 2 us + 1000 B / 1 GB/s = 3 us (> NVLink 1.1 us)
    assert lt.dispatch == pytest.approx(3e-6, rel=1e-12)
    assert lt.combine == pytest.approx(2e-6 + 2e-6, rel=1e-12)
    assert lt.compute == pytest.approx(3e6 / 1e12, rel=1e-12)
    res = simulate({1: linear_layout(4, 4)}, topo, _trace([[[1, 2, 3]]], 4), HW, SHAPE,
                   [Batch(tokens=np.array([0]), origins=np.array([0]))])
    assert res.total == pytest.approx(10e-6, rel=1e-12)
    assert res.rdma_bytes == pytest.approx(3000) and res.nvlink_bytes == pytest.approx(6000)


def test_golden_without_aggregation_and_without_overlap():
    topo = Topology.uniform(4, 2)
    ids, org = np.array([[1, 2, 3]]), np.array([0])
    direct = HW.model_copy(update={"node_aggregation": False})
    t = layer_traffic(linear_layout(4, 4), topo, 4, ids, org, node_aggregation=False)
    assert t.rdma_out.tolist() == [2, 0, 0, 0] and t.rdma_in.tolist() == [0, 0, 1, 1]
    lt = layer_time(t, direct, SHAPE)
    assert lt.dispatch == pytest.approx(2e-6 + 2000 / 1e9, rel=1e-12)  # 2 RDMA messages out of rank 0
    assert lt.combine == pytest.approx(2e-6 + 4000 / 1e9, rel=1e-12)
    serial = HW.model_copy(update={"overlap_rdma_nvlink": False})
    t = layer_traffic(linear_layout(4, 4), topo, 4, ids, org)
    # rank 0 (and rank 2): RDMA 3 us then NVLink 1 us + 1000 B / 10 GB/s = 1.1 us
    assert layer_time(t, serial, SHAPE).dispatch == pytest.approx(4.1e-6, rel=1e-12)


def test_golden_weight_read_roofline():
    # 128 tokens on expert 0 of one rank: FLOP time 128 * 3e6 / 1e12 = 384 us; weights 3*1000*500*2 = 3 MB
    # at 0.001 TB/s = 3 ms: the memory term bounds.
    hw = HW.model_copy(update={"hbm_bandwidth_tbs": 0.001})
    s = compute_seconds(np.array([128, 0]), np.array([1, 0]), hw, SHAPE)
    assert s.tolist() == pytest.approx([3e-3, 0.0])
    s = compute_seconds(np.array([128, 0]), np.array([1, 0]), HW, SHAPE)
    assert s.tolist() == pytest.approx([384e-6, 0.0])


def test_peer_table_pairs_equal_local_indices():
    p = peer_table(Topology.uniform(8, 4))
    assert p.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]] * 2


def _random_case(seed: int, R: int = 8, g: int = 4, E: int = 16, K: int = 3, T: int = 40):
    rng = np.random.default_rng(seed)
    ids = np.array([rng.choice(E, size=K, replace=False) for _ in range(T)])
    placement = rng.permutation(E).reshape(R, E // R)
    return Topology.uniform(R, g), placement, ids, rng.integers(0, R, size=T)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), factor=st.floats(1.0, 100.0), which=st.sampled_from(["nvlink", "rdma"]))
def test_more_bandwidth_is_never_slower(seed, factor, which):
    topo, a, ids, org = _random_case(seed)
    key = f"{which}_bandwidth_gbs"
    for agg in (True, False):
        slow = HW.model_copy(update={"node_aggregation": agg})
        fast = slow.model_copy(update={key: getattr(HW, key) * factor})
        t = layer_traffic(a, topo, 16, ids, org, agg)
        assert layer_time(t, fast, SHAPE).total <= layer_time(t, slow, SHAPE).total


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_full_copy_per_node_has_zero_inter_node_time(seed):
    # Every node holds all 16 experts (8 ranks x 4 slots, 2 nodes): no token ever leaves its node.
    topo, _, ids, org = _random_case(seed)
    rng = np.random.default_rng(seed)
    a = np.concatenate([rng.permutation(16).reshape(4, 4), rng.permutation(16).reshape(4, 4)])
    t = layer_traffic(a, topo, 16, ids, org)
    assert t.rdma_out.sum() == 0 and t.rdma_in.sum() == 0
    lt = layer_time(t, HW.model_copy(update={"overlap_rdma_nvlink": False}), SHAPE)
    nvl_only = layer_time(t, HW.model_copy(update={"overlap_rdma_nvlink": False, "rdma_bandwidth_gbs": 1e-6, "rdma_latency_us": 1e6}), SHAPE)
    assert nvl_only.total == lt.total  # a crippled network changes nothing


def test_tokens_routed_inside_their_node_have_zero_inter_node_time():
    topo = Topology.uniform(8, 4)
    a = linear_layout(16, 8)  # node 0 holds experts 0..7, node 1 holds 8..15
    ids = np.array([[0, 3, 7], [8, 9, 15], [1, 2, 4]])
    org = np.array([1, 6, 3])
    t = layer_traffic(a, topo, 16, ids, org)
    assert t.rdma_out.sum() == 0 and t.nvl_out.sum() > 0


@settings(max_examples=50, deadline=None)
@given(p=st.lists(st.integers(0, 10_000), min_size=1, max_size=16), extra=st.lists(st.integers(0, 500), min_size=16, max_size=16),
       mem=st.booleans())
def test_compute_is_monotone_in_rank_load(p, extra, mem):
    p = np.array(p)
    q = p + np.array(extra[: p.size])
    hw = HW.model_copy(update={"hbm_bandwidth_tbs": 0.5 if mem else 0.0})
    act_p, act_q = np.minimum(p, 4), np.minimum(q, 4)  # active experts grow with load too
    cp, cq = compute_seconds(p, act_p, hw, SHAPE), compute_seconds(q, act_q, hw, SHAPE)
    assert (cq >= cp).all() and cq.max() >= cp.max()
    if not mem:  # pure FLOP bound: the busiest rank alone sets the layer's compute time
        assert cp.max() == pytest.approx(p.max() * SHAPE.flops_per_pair / 1e12)


@pytest.mark.parametrize("R,g,redundant", [(8, 4, False), (8, 2, False), (8, 4, True)])
def test_message_counts_match_placement_metrics(R, g, redundant):
    # Over every origin rank, RDMA messages per (token, origin) = node_sends (node aggregation) and
    # all remote messages per (token, origin) without aggregation = rank_sends.
    rng = np.random.default_rng(R * 10 + g)
    E, K, T = 16, 4, 60
    ids = np.array([rng.choice(E, size=K, replace=False) for _ in range(T)])
    a = rng.permutation(E).reshape(R, E // R)
    if redundant:
        # one extra copy per rank: the first expert (from 5 on, cyclically) the rank does not hold yet
        extra = [next(e % E for e in range(5 + r, 5 + r + E) if e % E not in row) for r, row in enumerate(a.tolist())]
        a = np.concatenate([a, np.array(extra)[:, None]], axis=1)
    topo = Topology.uniform(R, g)
    trace = _trace(ids[:, None, :].tolist(), E)
    m = evaluate_layers({1: a}, topo, trace)
    all_ids = np.tile(ids, (R, 1))
    all_org = np.repeat(np.arange(R), T)
    key = np.tile(np.arange(T), R)  # the replica rule's spread key: the token's trace row
    agg = layer_traffic(a, topo, E, all_ids, all_org, True, spread=key)
    direct = layer_traffic(a, topo, E, all_ids, all_org, False, spread=key)
    assert agg.rdma_messages / (T * R) == pytest.approx(m.node_sends)
    assert (direct.rdma_messages + direct.nvl_messages) / (T * R) == pytest.approx(m.rank_sends)
    assert agg.pairs.sum() == T * R * K
    # rank loads over all origins = the metrics' expected pairs per rank (x R)
    from vllm_moeplace.metrics import _holds, rule_hosts, rule_rank_load

    D = rule_hosts(a, topo, E, ids)
    load = np.bincount(ids.ravel(), minlength=E).astype(float)
    assert agg.pairs / R == pytest.approx(rule_rank_load(_holds(a, E), load, D, ids, topo))


def test_sample_batches_deal_exactly_n_tokens_per_rank():
    trace = _trace([[[0, 1, 2]], [[1, 2, 3]], [[0, 2, 3]]], 4)
    bs = sample_batches(trace, BatchSpec(tokens_per_rank=5, steps=3, seed=7), 4)
    assert len(bs) == 3
    for b in bs:
        assert np.bincount(b.origins, minlength=4).tolist() == [5] * 4
        assert b.tokens.max() < 3
    again = sample_batches(trace, BatchSpec(tokens_per_rank=5, steps=3, seed=7), 4)
    assert all((x.tokens == y.tokens).all() and (x.origins == y.origins).all() for x, y in zip(bs, again))
    with pytest.raises(SimParamsError, match="no decode tokens"):
        sample_batches(trace, BatchSpec(tokens_per_rank=5, phase="decode"), 4)


def test_simulate_refuses_a_shape_that_does_not_match_the_trace():
    trace = _trace([[[0, 1, 2]]], 4)
    with pytest.raises(SimParamsError, match="num_experts=64.*num_experts=4"):
        simulate({}, Topology.uniform(4, 2), trace, HW, SHAPE.model_copy(update={"num_experts": 64}),
                 [Batch(tokens=np.array([0]), origins=np.array([0]))])


# ---- parameter file -----------------------------------------------------------------------------

def _params() -> dict:
    return {
        "default_hardware": "hw",
        "hardware": {"hw": HW.model_dump()},
        "models": {"m": SHAPE.model_dump()},
        "batches": {"b": {"tokens_per_rank": 8}},
    }


def test_shipped_parameter_file_is_valid_and_cites_sources():
    from pathlib import Path

    p = load_params(Path(__file__).resolve().parents[1] / "benchmarks" / "sim_params.json")
    assert p.default_hardware in p.hardware
    assert all(h.source for h in p.hardware.values()) and all(m.source for m in p.models.values())
    assert p.models["deepseek-v2-lite"].hidden_size == 2048 and p.models["llama-4-maverick"].hidden_size == 5120


@pytest.mark.parametrize(
    "path,value,expected",
    [
        (("hardware", "hw", "nvlink_bandwidth_gbs"), -5, r"field 'hardware\.hw\.nvlink_bandwidth_gbs'.*greater than 0.*value -5"),
        (("models", "m", "top_k"), 0, r"field 'models\.m\.top_k'.*value 0"),
        (("batches", "b", "phase"), "warmup", r"field 'batches\.b\.phase'.*value \"warmup\""),
        (("hardware", "hw", "nvlink_gbs"), 1, r"field 'hardware\.hw\.nvlink_gbs'.*[Ee]xtra"),
        (("default_hardware",), "gb200", r"default_hardware 'gb200' is not one of.*\['hw'\]"),
    ],
)
def test_parameter_errors_name_field_and_value(tmp_path, path, value, expected):
    data = _params()
    node = data
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    f = tmp_path / "p.json"
    f.write_text(json.dumps(data))
    with pytest.raises(SimParamsError, match=expected) as e:
        load_params(f)
    assert str(f) in str(e.value)


def test_parameter_file_unreadable_or_malformed(tmp_path):
    with pytest.raises(SimParamsError, match="cannot read"):
        load_params(tmp_path / "missing.json")
    f = tmp_path / "bad.json"
    f.write_text("{\"hardware\": ")
    with pytest.raises(SimParamsError, match=r"bad\.json: malformed JSON at line 1"):
        load_params(f)
    assert parse_params(_params()).hardware["hw"] == HW


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), g=st.sampled_from([1, 2, 4, 8]))
def test_node_aggregation_never_adds_network_messages(seed, g):
    # One message per (token, remote node) instead of per (token, remote rank); NVLink forwarding
    # takes over the rest, and every remote host rank still receives the token exactly once.
    topo, a, ids, org = _random_case(seed, g=g)
    agg = layer_traffic(a, topo, 16, ids, org, True)
    direct = layer_traffic(a, topo, 16, ids, org, False)
    assert agg.rdma_messages <= direct.rdma_messages
    if g == 8:  # a single node: no network at all
        assert agg.rdma_messages == direct.rdma_messages == 0
    # Each distinct remote host gets the token once: over NVLink, or as the RDMA peer itself.
    hosts_reached = direct.rdma_messages + direct.nvl_messages
    assert agg.nvl_messages <= hosts_reached <= agg.nvl_messages + agg.rdma_messages
    assert (agg.pairs == direct.pairs).all()
