"""CP-SAT on the aggregated pattern model: exact re-optimisation of a few units at a time (LNS).

Sub-problem: the experts currently on a set of units Q (2-3 nodes) are re-partitioned among Q,
everything else fixed. Only patterns meeting >= 2 of those experts depend on the choice (a pattern
meeting one expert e costs lin[e, u] wherever e goes), and identical projections are merged, so a
2-node sub-problem of DeepSeek-V2-Lite has ~10^3 pattern rows instead of ~5 * 10^4 tokens.

  x[e, u]  expert e on unit u            exactly one u per e; size[u] experts per unit
  y[q, u]  projected pattern q touches u  x[e, u] => y[q, u] for e in q
  Σ_e load_e x[e, u] <= cap[u]            (train load bound)
  minimise Σ cw[q, u] y[q, u] + Σ lin[e, u] x[e, u]

Symmetry: units of Q that are interchangeable (same size, cap, weights) get the hottest free
expert pinned to the lowest of them. The current assignment is the hint, so CP-SAT never returns
worse than what it was given.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from vllm_moeplace.solver.swap_search import SwapSearch


@dataclass(frozen=True)
class SubResult:
    status: str
    improved: bool
    delta: float  # new sub-cost - old sub-cost (<= 0 when improved)


def solver_params(solver: cp_model.CpSolver, time_limit: float, seed: int, deterministic: bool, workers: int) -> None:
    """Time limit on every solve; deterministic mode bounds work by CP-SAT's deterministic time
    with one worker, so the same seed gives the same answer regardless of machine load."""
    solver.parameters.random_seed = int(seed)
    # Probing / clique detection on ~10^4 implications eats a 1 s budget before any search;
    # the model is already tight in the ways presolve would find, so keep presolve light.
    solver.parameters.cp_model_probing_level = 0
    solver.parameters.max_presolve_iterations = 1
    solver.parameters.symmetry_level = 0
    if deterministic:
        solver.parameters.num_workers = 1
        solver.parameters.max_deterministic_time = float(time_limit)
        solver.parameters.max_time_in_seconds = 20.0 * float(time_limit) + 1.0  # safety net only
    else:
        solver.parameters.num_workers = max(1, min(2, int(workers)))
        solver.parameters.max_time_in_seconds = float(time_limit)


def reoptimise_units(
    search: SwapSearch,
    units: list[int],
    time_limit: float,
    seed: int = 0,
    deterministic: bool = False,
    workers: int = 2,
    max_rows: int = 3000,
    free: np.ndarray | None = None,
) -> SubResult:
    """Exactly re-partition the experts of `units` among them; apply to `search` if better.

    `free`: only these experts (all on `units`) move; the other experts of `units` stay put.
    Small free sets (~8 per unit) are solved to optimality in well under a second, a strictly
    larger neighbourhood than the swaps of the local search.
    """
    a = search.a
    units = list(units)
    experts = np.flatnonzero(np.isin(a, units)) if free is None else np.sort(np.asarray(free, dtype=np.int64))
    if len(experts) < 2:
        return SubResult("SKIPPED", False, 0.0)
    inst = search.inst
    loc = {u: i for i, u in enumerate(units)}
    pats = inst.patterns
    member = np.isin(pats, experts)  # [P, K]
    m = member.sum(axis=1)
    # Patterns meeting exactly one sub-expert: a linear cost on that expert.
    U = len(units)
    lin = search.lin[np.ix_(experts, units)].copy()
    e_index = np.full(inst.num_experts, -1, dtype=np.int64)
    e_index[experts] = np.arange(len(experts))
    # A (pattern, unit) already touched by a fixed member costs the same wherever the free
    # experts go: zero its weight. free_on[p, j] = free members of p now on unit j.
    units_arr = np.array(units)
    free_on = ((a[pats][:, :, None] == units_arr[None, None, :]) & member[:, :, None]).sum(axis=1)
    fixed_touch = (search.cnt[:, units_arr] - free_on) > 0  # [P, U]
    CWs = np.where(fixed_touch, 0.0, search.CW[:, units_arr])
    one = np.flatnonzero(m == 1)
    if one.size:
        who = e_index[pats[one][member[one]]]
        # The pattern touches exactly the unit its one free expert goes to.
        cw = CWs[one]
        np.add.at(lin, who, cw)
    multi = np.flatnonzero(m >= 2)
    proj = np.where(member[multi], e_index[pats[multi]], -1)
    proj = -np.sort(-proj, axis=1)  # members first, -1 padding last
    # Members fixed outside the sub-problem never leave their unit, and sub units hold only sub
    # experts, so a multi pattern touches u in Q iff one of its sub-experts is on u.
    cwq = CWs[multi]
    # Merge rows with the same projection and the same per-count weights.
    key = np.concatenate([proj.astype(np.float64), cwq / search.inst.counts[multi][:, None]], axis=1)
    keep_rows = cwq.sum(axis=1) > 0
    key, proj, cwq = key[keep_rows], proj[keep_rows], cwq[keep_rows]
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.ravel()
    qproj = uniq[:, : proj.shape[1]].astype(np.int64)
    qcw = np.zeros((len(uniq), U))
    np.add.at(qcw, inv, cwq)  # merged rows carry the summed weight (cwq already holds counts)
    if max_rows and len(qproj) > max_rows:
        # Keep the heaviest rows: the model stays small enough for CP-SAT to search in a second;
        # the answer is re-scored exactly below and only taken if the true cost drops.
        keep = np.argsort(-qcw.sum(axis=1), kind="stable")[:max_rows]
        qproj, qcw = qproj[keep], qcw[keep]
    # Integer objective: counts * integer weights are exact; otherwise scale by 1000.
    scale = 1.0 if np.allclose(qcw, np.round(qcw)) and np.allclose(lin, np.round(lin)) else 1000.0
    qcw_i = np.round(qcw * scale).astype(np.int64)
    lin_i = np.round(lin * scale).astype(np.int64)

    model = cp_model.CpModel()
    n_e = len(experts)
    x = [[model.new_bool_var(f"x{i}_{j}") for j in range(U)] for i in range(n_e)]
    for i in range(n_e):
        model.add_exactly_one(x[i])  # every expert on exactly one unit
    size = [int((a[experts] == u).sum()) for u in units]
    load_i = np.round(search.load[experts]).astype(np.int64)
    # The risk margin is not linear: the sub-model keeps the incumbent's margin per unit, and the
    # exact check after the solve undoes an answer whose true margin breaks a cap.
    margin = search.margin()
    for j, u in enumerate(units):
        model.add(sum(x[i][j] for i in range(n_e)) == size[j])  # slots are fixed per unit
        if np.isfinite(search.cap[u]):
            fixed = int(np.round(search.unit_load[u] - search.load[experts][a[experts] == u].sum()))
            cur = int(np.round(search.unit_load[u])) - fixed
            capj = max(int(np.floor(search.cap[u] - margin[u] + 1e-6)) - fixed, cur)  # never stricter than the hint
            model.add(sum(int(load_i[i]) * x[i][j] for i in range(n_e)) <= capj)  # load bound
    y = []
    obj = []
    for q in range(len(qproj)):
        mem = qproj[q][qproj[q] >= 0]
        row = []
        for j in range(U):
            v = model.new_bool_var(f"y{q}_{j}")
            for i in mem:
                model.add_implication(x[i][j], v)  # touching unit j if any member is there
            row.append(v)
            if qcw_i[q, j]:
                obj.append(int(qcw_i[q, j]) * v)
        y.append(row)
    for i in range(n_e):
        for j in range(U):
            if lin_i[i, j]:
                obj.append(int(lin_i[i, j]) * x[i][j])
    model.minimize(sum(obj))
    # Hint: the current assignment (CP-SAT then never returns anything worse).
    cur_j = np.array([loc[int(u)] for u in a[experts]])
    _break_symmetry(model, x, units, search, experts, qcw_i, lin_i, cur_j)
    for i in range(n_e):
        for j in range(U):
            model.add_hint(x[i][j], bool(cur_j[i] == j))
    for q in range(len(qproj)):
        mem = qproj[q][qproj[q] >= 0]
        for j in range(U):
            model.add_hint(y[q][j], bool((cur_j[mem] == j).any()))
    solver = cp_model.CpSolver()
    solver_params(solver, time_limit, seed, deterministic, workers)
    st = solver.solve(model)
    name = solver.status_name(st)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return SubResult(name, False, 0.0)
    new_j = np.array([next(j for j in range(U) if solver.value(x[i][j])) for i in range(n_e)])
    if np.array_equal(new_j, cur_j):
        return SubResult(name, False, 0.0)
    before, over_before = search.cost(), search.overflow()
    old_units = a[experts].copy()
    _apply(search, experts, np.array(units)[new_j])
    delta = search.cost() - before
    # pruned rows hid a worse true cost, or the true risk margin breaks a cap: undo
    if delta >= -1e-9 or search.overflow() > over_before + 1e-9:
        _apply(search, experts, old_units)
        return SubResult(name, False, 0.0)
    return SubResult(name, True, delta)


def _sub_cost(j_of: np.ndarray, qproj: np.ndarray, qcw: np.ndarray, lin: np.ndarray) -> int:
    tot = int(lin[np.arange(len(j_of)), j_of].sum())
    valid = qproj >= 0
    units = np.where(valid, j_of[np.where(valid, qproj, 0)], -1)
    for j in range(qcw.shape[1]):
        tot += int(qcw[(units == j).any(axis=1), j].sum())
    return tot


def _break_symmetry(model, x, units, search, experts, qcw_i, lin_i, cur_j) -> None:
    """Pin the hottest expert to its current unit when all units of the sub-problem are alike
    (any one of them is as good; its current one keeps the hint feasible)."""
    caps = {float(search.cap[u]) for u in units}
    sizes = {int((search.a[experts] == u).sum()) for u in units}
    if len(experts) < int(np.isin(search.a, units).sum()):
        return  # fixed experts make the units distinguishable
    alike_w = np.all(qcw_i == qcw_i[:, :1]) if qcw_i.size else True
    alike_l = np.all(lin_i == lin_i[:, :1]) if lin_i.size else True
    if len(caps) == 1 and len(sizes) == 1 and alike_w and alike_l:
        hot = int(np.argmax(search.load[experts]))
        model.add(x[hot][int(cur_j[hot])] == 1)


def _apply(search: SwapSearch, experts: np.ndarray, new_units: np.ndarray) -> None:
    """Realise a re-partition as a sequence of swaps (keeps the incremental counts exact)."""
    target = dict(zip(experts.tolist(), new_units.tolist()))
    for e in experts.tolist():
        want = target[e]
        if search.a[e] == want:
            continue
        # some expert f on `want` that should be elsewhere, ideally on e's current unit
        cands = [f for f in experts.tolist() if search.a[f] == want and target[f] != want]
        f = next((c for c in cands if target[c] == search.a[e]), cands[0])
        search.apply_swap(e, f)
