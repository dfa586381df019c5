"""Redundant copies: the max-flow fallback and what the solver does when copies cannot fit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_moeplace.plan import Topology
from vllm_moeplace.solver.redundancy import _flow_assign, add_replicas, copy_counts
from vllm_moeplace.solver.layer import with_replicas as _with_replicas

# e0 is so hot that it gets a copy on every rank; e4 (primary beside e0's on rank 0) gets one more:
# e0's extras must take ranks 1-3, leaving rank 0's slot, which cannot take e4. No assignment exists.
LAYOUT = np.array([[0, 4], [1, 5], [2, 6], [3, 7]])
LOAD = np.array([100.0, 1, 1, 1, 30, 1, 1, 1])


def test_copy_counts_that_cannot_sit_on_distinct_ranks_are_named_then_reduced():
    copies = copy_counts(LOAD, 4, 4)
    assert copies.tolist() == [4, 1, 1, 1, 2, 1, 1, 1]
    with pytest.raises(ValueError, match="4 extra copies cannot sit on distinct ranks"):
        _flow_assign(LAYOUT, copies, 1)
    with pytest.raises(ValueError):
        add_replicas(LAYOUT, LOAD, Topology.uniform(4, 2), 1, copies)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = _with_replicas(LAYOUT, LOAD, Topology.uniform(4, 2), 1, copies, layer=3)
    assert any("layer 3" in str(x.message) and "placed at most 2 copies" in str(x.message) for x in w)
    assert out.shape == (4, 3)
    for r in range(4):
        assert len(set(out[r].tolist())) == 3  # no rank holds two copies of one expert
    assert sorted(out[:, :2].ravel().tolist()) == list(range(8))  # primaries untouched


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 3), st.integers(1, 2), st.integers(0, 10_000))
def test_flow_assign_places_every_copy_on_distinct_ranks_apart_from_its_primary(R, S, n, seed):
    rng = np.random.default_rng(seed)
    E = R * S
    layout = rng.permutation(E).reshape(R, S)
    n = min(n, E - S)  # a rank can take at most the E - S experts it does not hold
    # Copy counts generated from a placement known to exist (each rank takes n experts it does
    # not hold), so every example is feasible and checked; infeasible counts have their own test.
    witness = [rng.choice(np.setdiff1d(np.arange(E), layout[r]), n, replace=False) for r in range(R)]
    copies = 1 + np.bincount(np.concatenate(witness), minlength=E)
    extra = _flow_assign(layout, copies, n)
    assert all(len(x) == n for x in extra)
    for r, xs in enumerate(extra):
        assert len(set(xs)) == len(xs) and not set(xs) & set(layout[r].tolist())
    got = np.bincount(np.concatenate([np.asarray(x, dtype=np.int64) for x in extra]), minlength=E)
    assert (got == copies - 1).all()
