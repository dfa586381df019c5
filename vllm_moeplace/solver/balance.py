"""Balance strategies: how the load caps of the layers are chosen, one class per
`SolveOptions.balance_target`, registered in `BALANCE_STRATEGIES`.

- `TrainCap` ("train"): every layer is solved once at cap max_imbalance on its train load.
- `ExpectedTarget` ("expected"): every layer is solved at the caps of `allocate.CAP_GRID`; a
  knapsack (`allocate.choose`) picks one cap per layer so that the predicted held-out imbalance,
  averaged over layers (or its balance_confidence quantile), stays under max_imbalance at the
  least train cost; the rest of the budget continues each layer at its chosen cap.

Both return a `BalanceOutcome`: one `LayerResult` per layer and the predicted held-out imbalance
(mean and std) of each.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from typing import ClassVar, get_args

import numpy as np

from vllm_moeplace import trace_stats
from vllm_moeplace.plan import Topology
from vllm_moeplace.solver import allocate
from vllm_moeplace.solver import budget as B
from vllm_moeplace.solver.instance import LayerInstance
from vllm_moeplace.solver.layer import LayerResult, SolveError, check_balance, node_assign_of, solve_layer, token_nodes
from vllm_moeplace.solver.noise import layer_q, noise_model
from vllm_moeplace.solver.objectives import BoundInputs, Objective
from vllm_moeplace.solver.options import BalanceTarget, SolveOptions
from vllm_moeplace.trace import Trace


@dataclass(frozen=True)
class BalanceOutcome:
    results: list[LayerResult]  # one per layer, in trace order
    expected: list[float]  # predicted mean held-out rank imbalance per layer (empty with copies)
    spread: list[float]  # its standard deviation per layer
    z: float  # normal quantile of balance_confidence (0: the mean)
    layer_caps: dict[int, float] = field(default_factory=dict)  # decoder layer -> chosen train cap

    @property
    def imbalance_quantile(self) -> float | None:
        return allocate.quantile(self.expected, self.spread, self.z) if self.expected else None


@dataclass
class SolveRun:
    """What every strategy works from: the train trace, the topology, the options, the objective,
    the clock and the seeded generator (used in layer order, so runs are reproducible); `search`
    is the train trace or the token sample the budget can use (`sample`), whose patterns the
    layers are searched on, while loads and the noise model come from the whole train trace."""

    train: Trace
    topology: Topology
    options: SolveOptions
    objective: Objective
    budget: B.Budget
    rng: np.random.Generator
    search: Trace | None = None
    sampled: bool = False
    _req: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.search is None:
            self.search = self.train

    def load(self, l: int) -> np.ndarray | None:
        """Layer l's expert loads on the whole train trace when the search works on a sample
        (None: the search's own patterns carry them)."""
        if not self.sampled:
            return None
        return np.bincount(self.train.topk_ids[:, l, :].ravel().astype(np.int64), minlength=self.train.num_experts).astype(np.float64)

    def q(self, l: int) -> np.ndarray | None:
        """Layer l's load-risk covariance, when anything will use it."""
        o = self.options
        need = not o.redundant_per_rank or o.balance_risk > 0 or o.copy_placement == "locality"
        if not need:
            return None
        if self._req is None:  # one sort of the request ids per solve, not one per layer
            self._req = trace_stats.request_index(self.train)
        return layer_q(self.train, l, o, self._req)


class BalanceStrategy:
    name: ClassVar[str]

    def run(self, run: SolveRun) -> BalanceOutcome:
        raise NotImplementedError


def _z(options: SolveOptions) -> float:
    c = options.balance_confidence
    return statistics.NormalDist().inv_cdf(c) if c > 0.5 else 0.0


class TrainCap(BalanceStrategy):
    name: ClassVar[str] = "train"

    def run(self, run: SolveRun) -> BalanceOutcome:
        train, opt = run.train, run.options
        L = train.num_layers
        results: list[LayerResult] = []
        expected: list[float] = []
        spread: list[float] = []
        prev_nodes = None
        for l in range(L):
            per_layer = run.budget.layer(l, L)
            q = run.q(l)
            res = solve_layer(run.search, l, run.topology, opt, run.objective, per_layer, run.rng, prev_nodes, q=q, load=run.load(l))
            results.append(res)
            if opt.inter_layer_weight > 0:
                prev_nodes = token_nodes(run.search, l, res.layout, run.topology)
            if not opt.redundant_per_rank:
                mean, std = noise_model(train, l, opt, q).imbalance(res.layout)
                expected.append(mean)
                spread.append(std)
        return BalanceOutcome(results, expected, spread, _z(opt))


class ExpectedTarget(BalanceStrategy):
    name: ClassVar[str] = "expected"

    def run(self, run: SolveRun) -> BalanceOutcome:
        train, opt, topology = run.train, run.options, run.topology
        L = train.num_layers
        z = _z(opt)
        grid: list[Candidates] = []
        qs = []
        for l in range(L):
            per_layer = run.budget.layer(l, L)
            q = run.q(l)
            qs.append(q)
            grid.append(solve_candidates(run, l, per_layer * B.FIRST_PASS, noise_model(train, l, opt, q), q=q))
        cost = np.array([[np.inf if r is None else r.objective for r in c.results] for c in grid])
        imbs = np.array([c.imbalance for c in grid])
        pick = allocate.choose(cost, imbs, opt.max_imbalance, std=np.array([c.spread for c in grid]), z=z)
        results = [grid[l].results[int(c)] for l, c in enumerate(pick)]
        expected = [float(grid[l].imbalance[int(c)]) for l, c in enumerate(pick)]
        spread = [float(grid[l].spread[int(c)]) for l, c in enumerate(pick)]
        caps = {int(train.layer_ids[l]): allocate.CAP_GRID[int(c)] for l, c in enumerate(pick)}
        # Second pass: the rest of the budget continues each layer's search at its chosen cap. A
        # better layout is taken only if the bound (on the mean, or on the quantile) still holds
        # with it: it may spend what the knapsack left unspent, no more.
        for l in range(L):
            per_layer = run.budget.second_pass(l, L)
            if per_layer < B.MIN_LAYER_S:
                break
            cap = caps[int(train.layer_ids[l])]
            res = solve_layer(
                run.search, l, topology, opt.model_copy(update={"max_imbalance": cap}), run.objective, per_layer, run.rng, None,
                with_bound=False, warm=node_assign_of(results[l].layout, topology), q=qs[l], load=run.load(l),
            )
            imb, sd = grid[l].noise.imbalance(res.layout)
            trial_m, trial_s = list(expected), list(spread)
            trial_m[l], trial_s[l] = imb, sd
            if res.objective < results[l].objective - 1e-9 and allocate.quantile(trial_m, trial_s, z) <= max(
                opt.max_imbalance, allocate.quantile(expected, spread, z)
            ):
                results[l] = replace(res, bound=min(results[l].bound, res.objective), start_objective=results[l].start_objective)
                expected[l], spread[l] = imb, sd
        return BalanceOutcome(results, expected, spread, z, caps)


@dataclass(frozen=True)
class Candidates:
    """One layer solved at every cap of allocate.CAP_GRID (None where not tried or infeasible)."""

    results: list[LayerResult | None]
    imbalance: list[float]  # predicted mean held-out imbalance per cap (inf where None)
    spread: list[float]
    noise: allocate.NoiseModel


def solve_candidates(run: SolveRun, l: int, budget: float, noise: allocate.NoiseModel, q: np.ndarray | None = None) -> Candidates:
    """The layer solved at the caps of allocate.CAP_GRID, each with the mean and std of its
    predicted held-out imbalance; the layer's one lower bound is attached to every candidate (it
    holds for all caps)."""
    train, topology, opt = run.search, run.topology, run.options
    load = run.load(l)
    bound_time = B.bound_seconds(budget)
    grid = allocate.CAP_GRID
    # Each cap costs a fixed setup (greedy start, repair, one descent) before any search: with a
    # short budget, try fewer caps spread over the grid (always its two ends) so --time-limit holds.
    n_try = int(np.clip((budget - bound_time) / B.MIN_CANDIDATE_S, 2, len(grid)))
    tried = set(np.linspace(0, len(grid) - 1, n_try).round().astype(int).tolist())
    each = max(B.MIN_LAYER_S, (budget - bound_time) / len(tried))
    cands: list[LayerResult | None] = []
    imbs: list[float] = []
    stds: list[float] = []
    warm = None
    inst = LayerInstance.from_trace(train, l)
    for i, cap in enumerate(grid):
        # Tightest cap first; each looser cap continues from the previous candidate (feasible for
        # it too), so a looser candidate is never worse on train than a tighter one.
        res = None
        if i in tried:
            try:
                res = solve_layer(
                    train, l, topology, opt.model_copy(update={"max_imbalance": cap}), run.objective, each, run.rng, None,
                    with_bound=False, warm=warm, base=inst, q=q, load=load,
                )
            except SolveError:
                res = None
        cands.append(res)
        if res is None:
            imbs.append(np.inf)
            stds.append(np.inf)
            continue
        m, sd = noise.imbalance(res.layout)
        imbs.append(m)
        stds.append(sd)
        warm = node_assign_of(res.layout, topology)
    done = [c for c in cands if c is not None]
    if not done:  # every cap is below what the hottest expert forces: say so with its numbers
        check_balance(inst.expert_load() if load is None else load, topology.ep_size, max(allocate.CAP_GRID), int(train.layer_ids[l]), 0)
    best = min(done, key=lambda r: r.objective)
    terms = run.objective.node_terms(topology, inst.expert_load())  # the search's (sample's) scale
    sizes = topology.ranks_per_node * (train.num_experts // topology.ep_size)
    bound = run.objective.lower_bound(terms, BoundInputs(inst, sizes, node_assign_of(best.layout, topology), opt.deterministic, bound_time))
    cands = [None if c is None else replace(c, bound=min(bound, c.objective)) for c in cands]
    return Candidates(cands, imbs, stds, noise)


BALANCE_STRATEGIES: dict[str, type[BalanceStrategy]] = {cls.name: cls for cls in (TrainCap, ExpectedTarget)}

if set(BALANCE_STRATEGIES) != set(get_args(BalanceTarget)):
    raise ImportError(f"balance registry {sorted(BALANCE_STRATEGIES)} != SolveOptions.balance_target {sorted(get_args(BalanceTarget))}")
