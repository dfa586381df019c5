"""CP-SAT sub-problem, exact-delta local search and the lower bound on small instances."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_moeplace.solver.bounds import pair_relaxation_bound, star_lower_bound
from vllm_moeplace.solver.instance import LayerInstance
from vllm_moeplace.solver.swap_search import SwapSearch
from vllm_moeplace.solver.neighbourhood import reoptimise_units


def random_instance(seed: int, E: int, K: int, T: int) -> LayerInstance:
    rng = np.random.default_rng(seed)
    # Skewed popularity so that balance caps and co-activation both matter.
    p = rng.dirichlet(np.full(E, 0.7))
    ids = np.stack([rng.choice(E, K, replace=False, p=p) for _ in range(T)])
    pats, counts = np.unique(np.sort(ids, axis=1), axis=0, return_counts=True)
    return LayerInstance(pats.astype(np.int64), counts.astype(np.float64), E)


def brute_force(inst: LayerInstance, U: int, w: np.ndarray, cap: float) -> float:
    """Minimum cost over every assignment of E experts to U units of E/U experts within cap."""
    E = inst.num_experts
    m = E // U
    load = inst.expert_load()
    best = np.inf
    for labels in itertools.product(range(U), repeat=E):
        a = np.array(labels)
        if (np.bincount(a, minlength=U) != m).any():
            continue
        if np.bincount(a, weights=load, minlength=U).max() > cap + 1e-9:
            continue
        best = min(best, inst.cost(a, w))
    return best


def test_cpsat_is_exact_on_a_tiny_instance():
    inst = random_instance(3, E=8, K=3, T=60)
    w = np.ones(2)
    load = inst.expert_load()
    cap = load.sum() / 2 * 1.2
    opt = brute_force(inst, 2, w, cap)
    start = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    search = SwapSearch(inst, start, w, np.full(2, cap))
    search.repair(np.inf)
    assert search.overflow() == 0
    reoptimise_units(search, [0, 1], time_limit=5.0, seed=0, deterministic=True)
    assert search.cost() == opt
    assert search.cost() == inst.cost(search.a, w)  # incremental counts stayed exact


def test_cpsat_three_units_match_enumeration():
    inst = random_instance(7, E=6, K=2, T=40)
    w = np.array([3.0, 3.0, 2.0])  # a bigger node is cheaper to touch (w = R - g)
    opt = brute_force(inst, 3, w, np.inf)
    search = SwapSearch(inst, np.array([0, 1, 2, 0, 1, 2]), w)
    reoptimise_units(search, [0, 1, 2], time_limit=5.0, deterministic=True)
    assert search.cost() == opt


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_swap_delta_is_exact(seed):
    inst = random_instance(seed, E=8, K=3, T=50)
    rng = np.random.default_rng(seed)
    a = rng.permutation(np.repeat(np.arange(4), 2))
    w = np.array([1.0, 2.0, 1.0, 3.0])
    search = SwapSearch(inst, a, w)
    for _ in range(10):
        e, f = rng.choice(8, 2, replace=False)
        if search.a[e] == search.a[f]:
            continue
        before = search.cost()
        d = search.swap_delta(int(e), int(f))
        search.apply_swap(int(e), int(f))
        assert np.isclose(search.cost() - before, d)
        assert np.isclose(search.cost(), inst.cost(search.a, w))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_cpsat_never_worse_than_its_warm_start(seed):
    inst = random_instance(seed, E=12, K=3, T=80)
    rng = np.random.default_rng(seed)
    a = rng.permutation(np.repeat(np.arange(3), 4))
    cap = np.full(3, inst.expert_load().sum() / 3 * 1.3)
    search = SwapSearch(inst, a, np.ones(3), cap)
    search.repair(np.inf)
    before, over = search.cost(), search.overflow()
    reoptimise_units(search, [0, 2], time_limit=0.5, seed=seed, deterministic=True)
    assert search.cost() <= before + 1e-9
    assert search.overflow() <= over + 1e-9
    assert (np.bincount(search.a, minlength=3) == 4).all()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_bounds_are_below_the_optimum(seed):
    inst = random_instance(seed, E=8, K=3, T=40)
    opt = brute_force(inst, 2, np.ones(2), np.inf)
    lb = star_lower_bound(inst, 4, 1.0)
    # Every bound the pipeline takes the max of must hold.
    assert lb <= opt + 1e-9
    assert inst.total <= opt + 1e-9
    start = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    fw = pair_relaxation_bound(inst, 4, start, 1.0, time_budget=5.0)
    assert 0 < fw <= opt + 1e-6
    dual = pair_relaxation_bound(inst, 4, start, 1.0, time_budget=5.0, max_iters=10, exact_lmo_max_experts=0)
    assert dual <= opt + 1e-6  # the Lagrangian-dual LMO keeps the bound valid


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_cpsat_with_fixed_experts_matches_enumeration(seed):
    """Free-subset neighbourhood: only `free` move; the result is the best over those moves."""
    inst = random_instance(seed, E=9, K=3, T=60)
    w = np.array([2.0, 1.0, 3.0])
    a = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    free = np.array([1, 2, 4, 5, 7])
    best = np.inf
    for labels in itertools.product([0, 1, 2], repeat=len(free)):
        b = a.copy()
        b[free] = labels
        if (np.bincount(b, minlength=3) == 3).all():
            best = min(best, inst.cost(b, w))
    search = SwapSearch(inst, a, w)
    reoptimise_units(search, [0, 1, 2], time_limit=5.0, deterministic=True, free=free)
    assert np.isclose(search.cost(), best)
    fixed = np.setdiff1d(np.arange(9), free)
    assert np.array_equal(search.a[fixed], a[fixed])
