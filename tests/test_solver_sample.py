"""Issue 17 item 6: the budget covers the whole solve. Pattern counting (exact aggregation), the
token sample the budget can use, the anytime star bound, and the solve's clock."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from _builders import trace_from_ids

from vllm_moeplace import trace_stats
from vllm_moeplace.plan import Topology
from vllm_moeplace.solver import sample as S
from vllm_moeplace.solver.bounds import star_lower_bound
from vllm_moeplace.solver.instance import LayerInstance
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.pipeline import solve
from vllm_moeplace.solver.synth import SynthConfig, synth_trace


def _random_ids(T: int, E: int, K: int, seed: int, hot: int = 0) -> np.ndarray:
    """int16 [T, K]: K distinct experts per token; with `hot`, tokens draw from the first `hot`
    experts only, so many tokens share a pattern."""
    rng = np.random.default_rng(seed)
    pool = E if not hot else hot
    return np.argsort(rng.random((T, pool)), axis=1)[:, :K].astype(np.int16)


@pytest.mark.parametrize("E,K,hot", [(64, 6, 9), (256, 8, 0), (256, 8, 11), (1024, 7, 9), (2, 1, 0)])
def test_aggregated_counts_equal_per_token_counts(E, K, hot):
    # Packed keys (E^K fits 63 bits) and the row-sort fallback (1024 x top-7: 70 bits) agree
    # with counting every token's expert set one by one.
    ids = _random_ids(3000, E, K, seed=E + K, hot=hot)
    pats, counts = trace_stats.count_patterns(ids, E)
    per_token = Counter(tuple(sorted(int(x) for x in row)) for row in ids)
    assert {tuple(p): int(c) for p, c in zip(pats.tolist(), counts)} == per_token
    assert int(counts.sum()) == len(ids)
    # Rows sorted inside and in lexicographic order, as np.unique(axis=0) gives them.
    ref_p, ref_c = np.unique(np.sort(ids, axis=1), axis=0, return_counts=True)
    assert np.array_equal(pats, ref_p) and np.array_equal(counts, ref_c)
    assert pats.dtype == np.int64 and counts.dtype == np.int64


def test_unique_patterns_of_a_token_subset_is_the_subset_trace():
    ids = _random_ids(500, 16, 3, seed=1, hot=6)
    tr = trace_from_ids(np.stack([ids, ids[::-1]], axis=1), 16)
    keep = np.array([3, 7, 8, 100, 250, 499])
    a = trace_stats.unique_patterns(tr, 1, tokens=keep)
    b = trace_stats.unique_patterns(tr.select_tokens(np.isin(np.arange(500), keep)), 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_sample_size_fits_the_setup_share_between_floor_and_trace():
    u, K, E = 1e-7, 8, 256
    n = S.sample_size(10**6, K, E, 2.0, u, 20_000)
    setup = lambda n: u * (S.SETUP_PER_PAIR * n * K + S.SETUP_PER_E2 * E**2)  # noqa: E731
    assert setup(n) <= S.SETUP_SHARE * 2.0 < setup(n + 1)
    assert S.sample_size(10**6, K, E, 4.0, u, 20_000) > 2 * n  # the fixed E^2 part is paid once
    assert S.sample_size(10**6, K, E, 1e-3, u, 20_000) == 20_000  # floor
    assert S.sample_size(30_000, K, E, 100.0, u, 20_000) == 30_000  # never more than there is


def test_choose_sample_keeps_small_traces_whole_and_is_reproducible():
    tr = synth_trace(SynthConfig(num_layers=2, num_experts=32, top_k=4, num_tokens=6000, seed=0))
    assert S.choose_sample(tr, 1e-3, 2, deterministic=False, seed=0).tokens is None  # <= MIN_TOKENS
    # Deterministic mode: no clock; a size from the static rate, the same tokens every time.
    old = S.DET_MIN_TOKENS
    try:
        S.DET_MIN_TOKENS = 1000
        a = S.choose_sample(tr, 0.02, 2, deterministic=True, seed=3)
        b = S.choose_sample(tr, 0.02, 2, deterministic=True, seed=3)
    finally:
        S.DET_MIN_TOKENS = old
    assert a.tokens is not None and np.array_equal(a.tokens, b.tokens) and a.size < 6000
    assert a.size == S.sample_size(6000, 4, 32, 0.02, S.STATIC_S_PER_PAIR, 1000) > 1000
    assert np.all(np.diff(a.tokens) > 0) and a.tokens.max() < 6000
    assert a.to_json()["of"] == 6000 and a.to_json()["cost_source"] == "static"


def test_star_bound_is_anytime():
    ids = _random_ids(2000, 16, 4, seed=5, hot=10)
    pats, counts = trace_stats.count_patterns(ids, 16)
    inst = LayerInstance(pats, counts.astype(float), 16)
    full = star_lower_bound(inst, 4, 2.0)
    # Past its deadline every expert gets C_e / K: the sum is the one-node-per-pattern bound.
    assert star_lower_bound(inst, 4, 2.0, deadline=0.0) == pytest.approx(2.0 * inst.total)
    assert 2.0 * inst.total <= full + 1e-9


def _sampled_solve(monkeypatch, time_limit: float, **opts):
    # A slow machine as the probe would see it: the sample drops to its floor whatever the load.
    monkeypatch.setattr(S, "MIN_TOKENS", 3000)
    monkeypatch.setattr(S, "probe_s_per_pair", lambda *a: 1e-4)
    tr = synth_trace(SynthConfig(num_layers=4, num_experts=32, top_k=4, num_tokens=30_000, seed=2))
    topo = Topology.uniform(8, 2)
    t0 = time.monotonic()
    plan = solve(tr, topo, SolveOptions(time_limit=time_limit, seed=0, **opts))
    return tr, topo, plan, time.monotonic() - t0


def test_sampled_solve_records_sample_and_balances_on_all_train_tokens(monkeypatch):
    # A budget far too small for 30k tokens: the search runs on a sample, recorded in the plan;
    # the rank loads it balanced and reports are those of every train token (loads are not
    # sampled): the reported train imbalance is the one recomputed from the whole trace.
    tr, topo, plan, _ = _sampled_solve(monkeypatch, 1.5)
    smp = plan.solver["sample"]
    assert smp["tokens"] == 3000 and smp["of"] == 30_000 and smp["cost_source"] == "probe"
    imb = []
    for li, lid in enumerate(tr.layer_ids.tolist()):
        load = np.bincount(tr.topk_ids[:, li, :].ravel().astype(np.int64), minlength=32).astype(float)
        rank = load[plan.layers[lid]].sum(axis=1)
        imb.append(rank.max() / rank.mean())
    assert plan.solver["train_rank_imbalance"] == pytest.approx(float(np.mean(imb)), rel=1e-12)
    # objective is per searched token: the same scale as without a sample (node_sends per token
    # is between 0 and the number of remote nodes).
    assert 0.0 < plan.solver["objective"] <= 4 * (1 - 2 / 8)


def test_time_limit_bounds_the_whole_solve(monkeypatch):
    # Generous slack (the machine is shared); without the layer deadline covering its setup and
    # the sample, this solve takes several times its limit.
    _, _, plan, wall = _sampled_solve(monkeypatch, 1.5)
    assert wall <= 1.5 + 1.0
    assert plan.solver["time_s"] <= 1.5 + 1.0


def test_started_in_the_past_counts_against_the_limit(monkeypatch):
    # The command line passes its own start: time already spent (loading) is not given again.
    monkeypatch.setattr(S, "MIN_TOKENS", 3000)
    tr = synth_trace(SynthConfig(num_layers=4, num_experts=32, top_k=4, num_tokens=8000, seed=2))
    plan = solve(tr, Topology.uniform(8, 2), SolveOptions(time_limit=2.0, seed=0), started=time.monotonic() - 1.5)
    assert plan.solver["time_s"] >= 1.5
    assert plan.solver["time_s"] <= 2.0 + 1.0
