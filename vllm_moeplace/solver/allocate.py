"""Spend an imbalance budget where it buys the most node_sends (--balance-target expected).

The imbalance metric is a mean over layers, and held-out loads differ from train loads by
request-sampling noise. So a single train cap for every layer is the wrong contract twice: it
ignores that some layers give up much more co-location than others for the same balance, and it
bounds an imbalance nobody will see (the train one). Here each layer is solved at several train
caps; every candidate's *expected held-out* imbalance is predicted from the layer's load
covariance (`trace_stats.load_risk`, Monte-Carlo over Gaussian noise with common random numbers, so
candidates are compared on the same draws); and a multiple-choice knapsack (CP-SAT, exact) picks
one candidate per layer minimising node_sends with the mean predicted imbalance under the bound.
"""

from __future__ import annotations

import numpy as np
from ortools.sat.python import cp_model

from vllm_moeplace.errors import MoeplaceError

# Train caps tried per layer (the predicted held-out imbalance, not these, is what is bounded).
CAP_GRID: tuple[float, ...] = (1.02, 1.05, 1.08, 1.12, 1.16, 1.22, 1.30, 1.45)


class NoiseModel:
    """Gaussian draws of a layer's held-out-minus-train expert loads (covariance Q = load_risk)."""

    def __init__(self, load: np.ndarray, risk: np.ndarray, samples: int = 256, seed: int = 0):
        self.load = np.asarray(load, dtype=np.float64)
        vals, vecs = np.linalg.eigh(np.asarray(risk, dtype=np.float64))
        root = vecs * np.sqrt(np.maximum(vals, 0.0))[None, :]  # Q = root @ root.T (Q is PSD, rank E-1)
        g = np.random.default_rng(seed).standard_normal((samples, len(load)))
        # Loads are shares of a fixed total (rows of Q sum to 0), so the mean rank load is fixed.
        self.draws = self.load[None, :] + g @ root.T  # [S, E]

    def expected_imbalance(self, layout: np.ndarray) -> float:
        """E[max rank load / mean rank load] over the draws, for layout int [R, S] (no copies)."""
        return self.imbalance(layout)[0]

    def imbalance(self, layout: np.ndarray) -> tuple[float, float]:
        """(mean, std) over the draws of max rank load / mean rank load, for layout int [R, S]."""
        rank = self.draws[:, layout].sum(axis=2)  # [S, R]
        imb = rank.max(axis=1) / rank.mean(axis=1)
        return float(imb.mean()), float(imb.std())


def quantile(means, stds, z: float) -> float:
    """Normal approximation of a quantile of the mean over layers of the held-out imbalance:
    mean of the layer means + z x its std, layers taken as independent (each one's noise comes from
    a different expert set)."""
    means, stds = np.asarray(means, dtype=np.float64), np.asarray(stds, dtype=np.float64)
    return float(means.mean() + z * np.sqrt((stds**2).sum()) / len(means))


def choose(
    cost: np.ndarray, imb: np.ndarray, bound: float, std: np.ndarray | None = None, z: float = 0.0, time_limit: float = 10.0
) -> np.ndarray:
    """int [L]: one candidate per layer (row) minimising Σ cost with mean imb <= bound, or, with
    z > 0 and per-candidate std, with `quantile(imb, std, z)` <= bound.

    cost, imb, std: [L, C]; unavailable candidates are +inf in cost. Raises when even the most
    balanced candidate of every layer misses the bound, naming the best achievable mean.
    The quantile is not linear, so the knapsack is re-solved on a tightened mean budget until the
    chosen set's quantile fits (the std of a mean over many layers barely moves between sets)."""
    if z <= 0 or std is None:
        return _knapsack(cost, imb, bound, time_limit)
    L = cost.shape[0]
    budget = bound
    for _ in range(8):
        try:
            pick = _knapsack(cost, imb, budget, time_limit)
        except MoeplaceError as e:
            if budget == bound:
                raise
            raise MoeplaceError(
                f"--max-imbalance {bound} at the asked confidence needs a mean predicted imbalance of at most "
                f"{budget:.4f} ({e}); raise --max-imbalance or lower --balance-confidence"
            ) from None
        rows = np.arange(L)
        q = quantile(imb[rows, pick], std[rows, pick], z)
        if q <= bound + 1e-12:
            return pick
        budget -= q - bound + 1e-6
    raise MoeplaceError(
        f"--max-imbalance {bound} at the asked confidence is not reachable: the last set chosen has a "
        f"quantile of {q:.4f}; raise --max-imbalance or lower --balance-confidence"
    )


def _knapsack(cost: np.ndarray, imb: np.ndarray, bound: float, time_limit: float) -> np.ndarray:
    L, C = cost.shape
    ok = np.isfinite(cost) & np.isfinite(imb)
    best = float(np.where(ok, imb, np.inf).min(axis=1).mean())
    if best > bound + 1e-12:
        raise MoeplaceError(
            f"--max-imbalance {bound} (expected held-out, mean over layers) is not reachable: the most "
            f"balanced candidates give {best:.4f}; raise --max-imbalance or add --redundant-per-rank"
        )
    scale_c = 1e6 / max(1.0, float(np.abs(cost[ok]).max()))
    model = cp_model.CpModel()
    pick = [[model.new_bool_var(f"p{l}_{c}") if ok[l, c] else None for c in range(C)] for l in range(L)]
    for l in range(L):
        model.add_exactly_one(v for v in pick[l] if v is not None)
    # Ceil the imbalance terms and floor the budget: the chosen set never exceeds the bound.
    imb_i = np.ceil(np.where(ok, imb, 0) * 1e5).astype(np.int64)
    model.add(sum(int(imb_i[l, c]) * pick[l][c] for l in range(L) for c in range(C) if ok[l, c]) <= int(np.floor(bound * L * 1e5)))
    model.minimize(sum(int(round(cost[l, c] * scale_c)) * pick[l][c] for l in range(L) for c in range(C) if ok[l, c]))
    # Hint: the most balanced candidate of each layer (feasible by the check above).
    most = np.where(ok, imb, np.inf).argmin(axis=1)
    for l in range(L):
        for c in range(C):
            if ok[l, c]:
                model.add_hint(pick[l][c], bool(c == most[l]))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit)
    solver.parameters.num_workers = 1
    st = solver.solve(model)
    if st not in (cp_model.OPTIMAL, cp_model.FEASIBLE):  # ceil rounding can cut the last feasible set
        return most
    return np.array([next(c for c in range(C) if ok[l, c] and solver.value(pick[l][c])) for l in range(L)])
