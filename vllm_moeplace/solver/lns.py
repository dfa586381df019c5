"""Step 1's improvement loop: iterated local search over a `SwapSearch`, alternating exact CP-SAT
neighbourhoods (`neighbourhood.reoptimise_units`) and kicks; plus the whole-group relabelling the
inter-layer term needs. The search's cost terms come from the objective (`objectives.NodeTerms`)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np

from vllm_moeplace.solver import budget as B
from vllm_moeplace.solver.neighbourhood import reoptimise_units
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.swap_search import SwapSearch

_EPS = 1e-9
# Kicks exchange this many random expert pairs (inclusive range): enough to leave a swap-local
# optimum, few enough that repair and descent bring the walk back near it.
_KICK_SWAPS = (2, 20)
# Neighbourhood sizes CP-SAT proves optimal in ~0.1 s on DeepSeek-V2-Lite (whole node pairs stay
# unproven after 10 s): free experts per node for 2- and 3-node neighbourhoods.
_FREE_PER_NODE_2 = 5
_FREE_PER_NODE_3 = 4


@dataclass(frozen=True)
class ImproveStats:
    cpsat_calls: int
    cpsat_improvements: int
    cpsat_status: str


def improve(search: SwapSearch, N: int, opt: SolveOptions, budget: float, deadline: float, rng) -> ImproveStats:
    """Iterated local search until the budget is spent: exact CP-SAT neighbourhoods for about
    lns_fraction of the time, otherwise a kick (random swaps, load ignored) followed by repair and
    swap descent. Only feasible strict improvements become the incumbent; a walk that ends worse
    or over a cap is reset to it, an equal one is kept (a step along a plateau)."""
    if N < 2:
        return ImproveStats(0, 0, "NOT_RUN")
    pairs = [(i, j) for i in range(N) for j in range(i + 1, N)]
    order = [pairs[k] for k in rng.permutation(len(pairs))]
    calls = improved = 0
    status = "NOT_RUN"
    sub_time = B.cpsat_call_seconds(budget, opt.lns_fraction, len(pairs))
    # Deterministic mode: fixed work instead of the clock.
    rounds = B.deterministic_rounds(budget) if opt.deterministic else 10**9
    best_a, best_c = search.a.copy(), search.cost()
    stall = 0
    t_start, cpsat_time = time.monotonic(), 0.0
    until = np.inf if opt.deterministic else deadline
    lns_fraction = opt.lns_fraction
    for it in range(rounds):
        if stall >= B.STALL_ROUNDS:
            break
        if not opt.deterministic and time.monotonic() + B.ROUND_SLACK_S > deadline:
            break
        if opt.deterministic:
            use_cpsat = lns_fraction > 0 and it % B.DET_CPSAT_EVERY == 0
        else:
            use_cpsat = lns_fraction > 0 and cpsat_time <= lns_fraction * (time.monotonic() - t_start)
            use_cpsat = use_cpsat and time.monotonic() + sub_time <= deadline
        if use_cpsat:
            units, free = neighbourhood(search, N, order, calls, rng)
            t_call = time.monotonic()
            try:
                r = reoptimise_units(
                    search, units, sub_time, seed=opt.seed + it, deterministic=opt.deterministic, workers=opt.workers, free=free
                )
            except Exception as e:  # never lose the incumbent to a CP-SAT failure: warn, go on without it
                warnings.warn(f"CP-SAT neighbourhood failed ({type(e).__name__}: {e}); continuing with local search", stacklevel=2)
                reset(search, best_a)
                lns_fraction = 0.0
                status = f"ERROR: {type(e).__name__}"
                continue
            finally:
                cpsat_time += time.monotonic() - t_call
            calls += 1
            status = r.status
            if r.improved:
                improved += 1
                search.descend(until)
        else:
            kick(search, rng, int(rng.integers(_KICK_SWAPS[0], _KICK_SWAPS[1] + 1)))
            search.repair(until)
            search.descend(until)
        c = search.cost()
        if c < best_c - _EPS and search.overflow() <= _EPS:
            best_a, best_c = search.a.copy(), c
            stall = 0
            continue
        stall += 1
        if c > best_c + _EPS or search.overflow() > _EPS:
            reset(search, best_a)
    if search.cost() > best_c + _EPS or search.overflow() > _EPS:
        reset(search, best_a)
    return ImproveStats(calls, improved, status)


def neighbourhood(search: SwapSearch, N: int, order: list[tuple[int, int]], k: int, rng: np.random.Generator):
    """Units and free experts of the k-th CP-SAT neighbourhood: alternately a node pair (in the
    shuffled `order`) and three random nodes."""
    if N >= 3 and k % 2:
        units = sorted(int(u) for u in rng.choice(N, 3, replace=False))
        per = _FREE_PER_NODE_3
    else:
        units = list(order[(k // 2) % len(order)])
        per = _FREE_PER_NODE_2
    free = []
    for u in units:
        on = np.flatnonzero(search.a == u)
        free.append(rng.choice(on, min(per, len(on)), replace=False))
    return units, np.concatenate(free)


def kick(search: SwapSearch, rng: np.random.Generator, swaps: int) -> None:
    """`swaps` random exchanges between units of the same group, regardless of cost or load (the
    caller repairs and descends, and keeps the result only if it is feasible and better)."""
    E = len(search.a)
    for _ in range(swaps):
        for _try in range(20):
            e, f = (int(x) for x in rng.integers(0, E, 2))
            if search.a[e] != search.a[f] and search.group[search.a[e]] == search.group[search.a[f]] and search.eclass[e] == search.eclass[f]:
                search.apply_swap(e, f)
                break


def reset(search: SwapSearch, assign: np.ndarray) -> None:
    search.a = assign.copy()
    search.cnt = search.inst.unit_counts(search.a, search.U)
    search.refresh_loads()


def align_nodes(search: SwapSearch, g: np.ndarray, cap: np.ndarray) -> None:
    """Relabel whole expert groups among alike nodes (same size and cap) to minimise the cost.

    Swaps never move a whole group, but with the inter-layer term the node a group sits on
    matters: which nodes the token visited at the previous layer. Group n on node m costs
    A[n, m] = Σ_p [p touches n] CW[p, m] (exact: group membership is unchanged), a linear
    assignment problem."""
    from ortools.graph.python import linear_sum_assignment

    N = search.U
    touch = (search.cnt > 0).astype(np.float64)  # [P, N]
    A = touch.T @ search.CW + np.array([[search.lin[search.a == n, m].sum() for m in range(N)] for n in range(N)])
    scale = 1000.0 / max(1.0, float(np.abs(A).max()) / 1e6)
    lsa = linear_sum_assignment.SimpleLinearSumAssignment()
    for n in range(N):
        for m in range(N):
            if g[n] == g[m] and cap[n] == cap[m]:
                lsa.add_arc_with_cost(n, m, int(round(A[n, m] * scale)))
    if lsa.solve() != lsa.OPTIMAL:
        return
    perm = np.array([lsa.right_mate(n) for n in range(N)])
    if (perm == np.arange(N)).all():
        return
    before = search.cost()
    old = search.a.copy()
    reset(search, perm[search.a])
    if search.cost() > before:  # rounding could in principle mislead: keep the better one
        reset(search, old)
