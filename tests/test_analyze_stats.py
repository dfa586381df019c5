"""Routing statistics of `moeplace analyze` on small hand-made traces with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_moeplace.profiling.analyze import (
    analyze,
    hot_set,
    jaccard,
    l1_distance,
    lift_matrix,
    max_over_mean,
    rank_imbalance,
    rankdata,
    spearman,
    top_share,
    transition_concentration,
    weighted_top_share,
)
from vllm_moeplace.trace_stats import coactivation, gini, pair_counts
from vllm_moeplace.trace import Trace
from _builders import trace_from_ids


def _trace(ids, request_ids=None, is_prefill=None, num_experts=4, labels=None, layer_ids=None) -> Trace:
    return trace_from_ids(ids, num_experts, layer_ids=layer_ids, request_ids=request_ids, is_prefill=is_prefill, labels=labels)


def test_gini_and_max_over_mean_golden() -> None:
    assert gini(np.array([5, 5, 5, 5])) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 8])) == pytest.approx(0.75)  # (n-1)/n: one expert takes all
    assert gini(np.array([1, 3])) == pytest.approx(0.25)  # |1-3|*2 / (2 * 4 * 2)
    assert gini(np.array([[0, 0], [1, 3]])).tolist() == pytest.approx([0.0, 0.25])
    assert max_over_mean(np.array([[1, 3], [2, 2], [0, 0]])).tolist() == pytest.approx([1.5, 1.0, 1.0])


@given(st.lists(st.integers(0, 50), min_size=1, max_size=12))
@settings(max_examples=60, deadline=None)
def test_gini_matches_pairwise_definition(x: list[int]) -> None:
    a = np.array(x, dtype=float)
    ref = 0.0 if a.sum() == 0 else np.abs(a[:, None] - a[None, :]).sum() / (2 * len(a) ** 2 * a.mean())
    assert gini(a) == pytest.approx(ref, abs=1e-12)


def test_rank_imbalance_contiguous_layout() -> None:
    load = np.array([[4, 0, 1, 1, 1, 1, 0, 0]])  # EP4 ranks hold (0,1) (2,3) (4,5) (6,7): 4 2 2 0
    assert rank_imbalance(load, 4).tolist() == pytest.approx([2.0])
    assert rank_imbalance(load, 2).tolist() == pytest.approx([6 / 4])


def test_lift_golden() -> None:
    # 4 tokens, top-2 over 4 experts: (0,1) x3, (2,3) x1
    t = _trace([[[0, 1]], [[1, 0]], [[0, 1]], [[2, 3]]])
    c = coactivation(t, 0)
    expected, lift = lift_matrix(c, 4)
    # p0 = p1 = 3/4, p2 = p3 = 1/4: expected(0,1) = 4 * 9/16 = 2.25, observed 3
    assert expected[0, 1] == pytest.approx(2.25) and lift[0, 1] == pytest.approx(3 / 2.25)
    assert expected[2, 3] == pytest.approx(0.25) and lift[2, 3] == pytest.approx(4.0)
    assert lift[0, 2] == pytest.approx(0.0) and np.isnan(lift[0, 0])
    a = analyze(t)
    assert [(p.i, p.j, p.observed) for p in a.top_pairs] == [(0, 1, 3), (2, 3, 1)]
    assert a.top_pair_lift[0] == pytest.approx((3 / 2.25 + 4.0) / 2)


def test_transition_concentration_golden() -> None:
    # deterministic transitions: every expert sends all of its tokens to one next expert
    assert transition_concentration(np.diag([3, 1, 0, 2, 5])) == pytest.approx(1.0)
    # uniform rows over 10 experts: the top 20% (2 experts) hold 0.2
    assert transition_concentration(np.ones((10, 10))) == pytest.approx(0.2)
    rows = np.array([[6, 2, 1, 1, 0], [1, 1, 1, 1, 0]])  # top ceil(0.2*5) = 1 entry
    assert top_share(rows).tolist() == pytest.approx([0.6, 0.25])
    assert transition_concentration(rows) == pytest.approx((0.6 + 0.25) / 2)
    assert weighted_top_share(rows) == pytest.approx((6 + 1) / 14)
    assert np.isnan(transition_concentration(np.zeros((3, 3))))


def test_pair_counts_golden() -> None:
    a = np.array([[0, 1], [2, 3]])
    b = np.array([[1, 2], [3, 0]])
    m = pair_counts(a, b, 4)
    assert m.sum() == 8 and m[0, 1] == m[0, 2] == m[1, 1] == m[1, 2] == 1 and m[2, 3] == m[3, 0] == 1


def test_rankdata_and_spearman_golden() -> None:
    assert rankdata(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 100])) == pytest.approx(1.0)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1.0)
    # no ties: 1 - 6 sum d^2 / (n (n^2 - 1)); ranks b = [2, 1, 4, 3, 5], d^2 = 1+1+1+1+0
    assert spearman(np.arange(5), np.array([2, 1, 4, 3, 5])) == pytest.approx(1 - 6 * 4 / (5 * 24))
    # with ties: Pearson of ranks [1..5] and [1, 2, 3.5, 5, 3.5]
    rb = np.array([1, 2, 3.5, 5, 3.5])
    ra = np.arange(1, 6)
    ref = ((ra - 3) * (rb - 3)).sum() / math.sqrt(((ra - 3) ** 2).sum() * ((rb - 3) ** 2).sum())
    assert spearman(np.arange(5), np.array([5, 6, 7, 8, 7])) == pytest.approx(ref)
    assert math.isnan(spearman(np.array([1, 1, 1]), np.array([1, 2, 3])))


def test_hot_sets_jaccard_l1() -> None:
    assert hot_set(np.array([5, 9, 9, 1, 7]), 2).tolist() == [1, 2]
    assert hot_set(np.array([5, 9, 9, 1, 7]), 3).tolist() == [1, 2, 4]
    assert hot_set(np.array([3, 3, 3]), 2).tolist() == [0, 1]  # ties: lower id first
    assert jaccard(np.array([1, 2, 3]), np.array([2, 3, 4])) == pytest.approx(0.5)
    assert l1_distance(np.array([1, 1, 0]), np.array([0, 0, 5])) == pytest.approx(2.0)
    assert l1_distance(np.array([1, 3]), np.array([2, 6])) == pytest.approx(0.0)


def test_analyze_prefill_decode_labels_stability() -> None:
    # 2 layers, top-1, 4 experts; request 0 = "code", 1 = "math"
    ids = [[[0], [1]], [[0], [1]], [[1], [2]], [[3], [3]], [[2], [0]], [[2], [0]]]
    t = _trace(
        ids,
        request_ids=[0, 0, 0, 1, 1, 1],
        is_prefill=[True, False, False, True, False, False],
        labels=["code", "math"],
        layer_ids=[1, 3],
    )
    a = analyze(t, ranks=(2, 3), hot_k=2)
    assert a.load.tolist() == [[2, 1, 2, 1], [2, 2, 1, 1]]
    assert a.rank_imbalance[2].tolist() == pytest.approx([1.0, 4 / 3])
    assert any("EP3" in n for n in a.notes) and any("top_k = 1" in n for n in a.notes)
    assert a.top_pairs == [] and np.isnan(a.top_pair_lift).all()
    # layer 1: prefill load [1, 0, 0, 1], decode load [1, 1, 2, 0] -> ranks [3.5,1.5,1.5,3.5] vs [2.5,2.5,4,1]
    assert a.prefill_decode_spearman[0] == pytest.approx(spearman(np.array([1, 0, 0, 1]), np.array([1, 1, 2, 0])))
    assert a.labels == ["code", "math"]
    # code: layer 1 loads [2,1,0,0] -> {0,1}; math: [0,0,2,1] -> {2,3}; layer 3 code [0,2,1,0] -> {1,2}, math [2,0,0,1] -> {0,3}
    assert a.label_hot["code"].tolist() == [[0, 1], [1, 2]] and a.label_hot["math"].tolist() == [[2, 3], [0, 3]]
    assert a.label_jaccard.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    # halves = the two requests; layer 1: [2,1,0,0] vs [0,0,2,1] -> L1 of shares = 2
    assert a.stability_l1[0] == pytest.approx(2.0)
    assert a.stability_corr[0] == pytest.approx(np.corrcoef([2, 1, 0, 0], [0, 0, 2, 1])[0, 1])
    # transitions 1->3 (top ceil(0.8)=1 next expert): every source expert is deterministic here -> 1.0
    assert a.transition_share.tolist() == pytest.approx([1.0])


def test_analyze_without_decode_or_labels() -> None:
    t = _trace([[[0, 1]], [[2, 3]]], request_ids=[0, 0])
    a = analyze(t)
    assert a.prefill_decode_spearman is None and a.labels == [] and a.label_jaccard is None
    assert np.isnan(a.stability_corr).all() and any("one request" in n for n in a.notes)
    assert a.transition_share.size == 0
