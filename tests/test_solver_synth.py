"""Synthetic traces: valid, reproducible, and carrying the structure they claim (against a control
generated without it)."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_moeplace.cli.main import main
from vllm_moeplace.plan import Topology
from vllm_moeplace.solver.baselines import baseline_layers
from vllm_moeplace.metrics import evaluate_layers
from vllm_moeplace.trace_stats import gini, routing_summary
from vllm_moeplace.solver.synth import SynthConfig, SynthError, synth_trace
from vllm_moeplace.trace import load_trace

SMALL = dict(num_layers=4, num_experts=32, top_k=4, num_tokens=6000, num_requests=60)


@pytest.fixture(scope="module")
def structured():
    return synth_trace(SynthConfig(**SMALL, seed=1))


@pytest.fixture(scope="module")
def control():
    return synth_trace(SynthConfig(**SMALL, seed=1, cluster_strength=0.0, layer_coupling=0.0, domain_bias=0.0, phase_bias=0.0))


def test_valid_and_reproducible(structured):
    t = structured
    assert t.topk_ids.shape == (6000, 4, 4) and t.topk_ids.dtype == np.int16
    assert t.layer_ids.tolist() == [1, 2, 3, 4] and t.num_experts == 32
    again = synth_trace(SynthConfig(**SMALL, seed=1))
    assert np.array_equal(again.topk_ids, t.topk_ids) and np.array_equal(again.is_prefill, t.is_prefill)
    other = synth_trace(SynthConfig(**SMALL, seed=2))
    assert not np.array_equal(other.topk_ids, t.topk_ids)


def test_requests_domains_and_phases(structured):
    t = structured
    req = t.request_ids
    assert np.all(np.diff(req) >= 0) and np.unique(req).tolist() == list(range(60))
    assert t.labels is not None and len(t.labels) == 60 and set(t.labels) <= {f"domain{d}" for d in range(4)}
    # within a request, prefill tokens come first, then decode
    for r in range(60):
        p = t.is_prefill[req == r]
        assert not np.any(p[1:] & ~p[:-1])
    assert 0.6 < t.is_prefill.mean() < 0.95


def test_structure_beats_control(structured, control):
    s, c = routing_summary(structured), routing_summary(control)
    assert s["coact_top_lift"] > 2.0 > 1.3 > c["coact_top_lift"]
    assert s["transition_topk_share"] > 1.5 * c["transition_topk_share"]
    # and placement can exploit it: the co-activation-aware greedy gains much more than on the control
    topo = Topology.uniform(8, 2)

    def gain(t):
        train, test = t.split_by_request(0.5)
        g = evaluate_layers(baseline_layers("greedy", train, topo), topo, test).node_sends
        return g / evaluate_layers({}, topo, test).node_sends

    assert gain(structured) < gain(control) - 0.1


def test_skew_knob_controls_load_gini():
    flat = synth_trace(SynthConfig(**SMALL, skew=0.0, cluster_strength=0.0, domain_bias=0.0, phase_bias=0.0))
    skewed = synth_trace(SynthConfig(**SMALL, skew=1.0, cluster_strength=0.0, domain_bias=0.0, phase_bias=0.0))
    assert routing_summary(skewed)["load_gini"] > routing_summary(flat)["load_gini"] + 0.2


def test_gini_golden():
    assert gini(np.array([1, 1, 1, 1])) == 0.0
    assert gini(np.array([0, 0, 0, 4])) == pytest.approx(0.75)


@pytest.mark.parametrize("bad, match", [
    (dict(top_k=40), "top_k 40 exceeds num_experts 32"),
    (dict(num_requests=0), "num_requests"),
    (dict(layer_coupling=1.5), "layer_coupling"),
    (dict(num_clusters=33), "num_clusters"),
])
def test_bad_parameters(bad, match):
    with pytest.raises(SynthError, match=match):
        synth_trace(SynthConfig(**{**SMALL, **bad}))


def test_cli_writes_loadable_trace(tmp_path, capsys):
    out = tmp_path / "s.npz"
    rc = main(["synth", "--layers", "3", "--experts", "16", "--top-k", "2", "--tokens", "500", "--seed", "7",
               "--requests", "5", "--first-layer", "3", "--out", str(out)])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    t = load_trace(out)
    assert t.layer_ids.tolist() == [3, 4, 5] and t.num_requests == 5 and t.meta["synth"]["seed"] == 7
    assert main(["synth", "--layers", "3", "--experts", "4", "--top-k", "5", "--tokens", "5", "--out", str(out)]) == 2
    assert "top_k 5 exceeds num_experts 4" in capsys.readouterr().err
