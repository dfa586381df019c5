"""`solve(trace, topology, options) -> Plan`: the placement optimiser end to end.

Per MoE layer (layers are independent unless the inter-layer term is on; then they are solved
in order, layer l+1 seeing layer l fixed):

Step 1  expert -> node. node_sends depends only on node membership, so this is a weighted set
        partition over the layer's unique routing patterns (`instance`), each node holding
        exactly (ranks on node x slots) experts and at most max_imbalance x its mean train load.
        Warm start: load-capped co-activation greedy, repaired and descended by exact-delta swaps
        (`greedy`, `swap_search`). Then the budget alternates CP-SAT on exact neighbourhoods (a few
        free experts on 2-3 nodes, `neighbourhood`, hinted with the incumbent) and iterated-local-
        search kicks (a few random swaps, repair, descent); only strict improvements are kept.
Step 2  expert -> rank inside each node: longest-processing-time, then swaps inside the node down
        to the rank load cap (and, for --objective rank_sends, fewer distinct ranks per token).
Step 3  redundant copies, if asked: by default for locality under the replica rule
        (`replicas`: the hottest experts replicated on every node and projected out of Step 1,
        then exact-delta greedy and all-slot descent within the rank cap); `--copy-placement
        balance` keeps the earlier balance-only placement (`redundancy`).
Bound   per layer max(one node per pattern, star bound, Frank-Wolfe bound of the consistent-
        companion relaxation; `bounds`) for node_sends; the gap in the plan is
        (objective - bound) / objective over all layers.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.plan import Plan, Topology, validate_plan
from vllm_moeplace import trace_stats as stats
from vllm_moeplace.solver import allocate
from vllm_moeplace.solver.bounds import pair_relaxation_bound, star_lower_bound
from vllm_moeplace.solver.instance import LayerInstance, node_weights
from vllm_moeplace.solver.swap_search import SwapSearch
from vllm_moeplace.solver.neighbourhood import reoptimise_units
from vllm_moeplace.solver.redundancy import add_replicas, copy_counts, rebalance
from vllm_moeplace.solver.greedy import grow_groups, lpt_partition
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.replicas import CopyPlacementError, everywhere_set, place_copies, project_out
from vllm_moeplace.trace import Trace

# --balance-target expected: share of each layer's budget spent on the candidate caps; the rest
# continues the search at the chosen cap.
_FIRST_PASS = 0.5
# Budget below which one more candidate cap is not worth its fixed setup (greedy, repair, descent).
_MIN_CANDIDATE_S = 0.09
# Locality-placed copies: share of a layer's budget for placing them, and the descent passes in
# deterministic mode (measured on DeepSeek-V2-Lite EP16/4: passes after the 6th rarely improve).
_COPY_SHARE = 0.35
_COPY_PASSES_DET = 6
# Locality-placed copies: rank-level cap factor for the primaries (x mean, with one std of load
# risk): 1.0 makes the in-node swap repair minimise overflow as far as it goes. Measured on
# DeepSeek-V2-Lite EP16/4, 1 copy per rank, cap 1.05: held-out imbalance 1.137 (no rank-level
# risk) -> 1.128 (cap 1.05 + risk) -> 1.122 (1.0 + risk), node_sends 1.823-1.836 (search noise).
_RANK_CAP = 1.0


class SolveError(MoeplaceError):
    """The instance or the constraints cannot be solved as asked (names the value)."""


@dataclass(frozen=True)
class LayerResult:
    layout: np.ndarray  # int64 [R, S]
    objective: float  # node-level objective on train (scaled: x R, summed over tokens)
    bound: float  # lower bound on the same quantity
    start_objective: float  # of the warm start
    cpsat_calls: int
    cpsat_improvements: int
    cpsat_status: str
    node_overflow: float
    rank_imbalance: float  # train max/mean rank load


def solve(
    trace: Trace,
    topology: Topology,
    options: SolveOptions,
    *,
    model_name: str = "unknown",
    trace_path: str | None = None,
) -> Plan:
    """A validated plan for every MoE layer of `trace` (trained on options.train_fraction of it)."""
    t0 = time.monotonic()
    E, R = trace.num_experts, topology.ep_size
    check_instance(E, topology, options)
    train = trace if options.train_fraction >= 1.0 else trace.split_by_request(options.train_fraction)[0]
    L = train.num_layers
    if options.risk_scale is None and not options.redundant_per_rank:
        # Resolved once, and recorded in the plan's options so a re-run reproduces it.
        options = options.model_copy(update={"risk_scale": stats.risk_calibration(train, E // R, seed=options.seed)})
    rng = np.random.default_rng(options.seed)
    layers: dict[int, np.ndarray] = {}
    results: list[LayerResult] = []
    prev_nodes: np.ndarray | None = None
    expected: list[float] = []
    spread: list = []  # std of each layer's predicted held-out imbalance
    z = statistics.NormalDist().inv_cdf(options.balance_confidence) if options.balance_confidence > 0.5 else 0.0
    noises: list[allocate.NoiseModel] = []  # per layer, built once (--balance-target expected)
    layer_q: list[np.ndarray | None] = []  # per layer: the scaled load-risk Q, computed once
    layer_caps: dict[int, float] = {}
    for l in range(L):
        # What is left of the budget, shared by the remaining layers; 8% is kept for the fixed
        # per-layer work (patterns, bound, ranks) so the whole solve stays inside --time-limit.
        left = t0 + 0.92 * options.time_limit - time.monotonic()
        per_layer = options.time_limit / L if options.deterministic else max(0.05, left / (L - l))
        need_q = not options.redundant_per_rank or options.balance_risk > 0 or options.copy_placement == "locality"
        q = _layer_q(train, l, options) if need_q else None
        layer_q.append(q)
        if options.balance_target == "expected":
            noises.append(_noise(train, l, options, q))
            cands, imbs, stds = _solve_layer_candidates(
                train, l, topology, options, per_layer * _FIRST_PASS, rng, noises[-1], q=q
            )
            results.append(cands)  # type: ignore[arg-type]  # resolved after all layers below
            expected.append(imbs)  # type: ignore[arg-type]
            spread.append(stds)
            continue
        res = _solve_layer(train, l, topology, options, per_layer, rng, prev_nodes, q=q)
        results.append(res)
        if options.inter_layer_weight > 0:
            prev_nodes = _token_nodes(train, l, res.layout, topology)
        if not options.redundant_per_rank:
            mean, std = _noise(train, l, options, q).imbalance(res.layout)
            expected.append(mean)
            spread.append(std)
    if options.balance_target == "expected":
        cost = np.array([[np.inf if r is None else r.objective for r in cands] for cands in results])
        pick = allocate.choose(cost, np.array(expected), options.max_imbalance, std=np.array(spread), z=z)
        results = [results[l][int(c)] for l, c in enumerate(pick)]  # type: ignore[index]
        expected = [float(expected[l][int(c)]) for l, c in enumerate(pick)]  # type: ignore[index]
        spread = [float(spread[l][int(c)]) for l, c in enumerate(pick)]
        layer_caps = {int(train.layer_ids[l]): allocate.CAP_GRID[int(c)] for l, c in enumerate(pick)}
        # Second pass: the rest of the budget continues each layer's search at its chosen cap. A
        # better layout is taken only if the bound (on the mean, or on the quantile) still holds
        # with it: it may spend what the knapsack left unspent, no more.
        for l in range(L):
            left = t0 + 0.92 * options.time_limit - time.monotonic()
            per_layer = options.time_limit * (1 - _FIRST_PASS) / L if options.deterministic else left / (L - l)
            if per_layer < 0.05:
                break
            cap = layer_caps[int(train.layer_ids[l])]
            res = _solve_layer(
                train, l, topology, options.model_copy(update={"max_imbalance": cap}), per_layer, rng, None,
                with_bound=False, warm=_node_assign(results[l].layout, topology), q=layer_q[l],
            )
            imb, sd = noises[l].imbalance(res.layout)
            trial_m, trial_s = list(expected), list(spread)
            trial_m[l], trial_s[l] = imb, sd
            if res.objective < results[l].objective - 1e-9 and allocate.quantile(trial_m, trial_s, z) <= max(
                options.max_imbalance, allocate.quantile(expected, spread, z)
            ):
                results[l] = replace(res, bound=min(results[l].bound, res.objective), start_objective=results[l].start_objective)
                expected[l], spread[l] = imb, sd
    for l, res in enumerate(results):
        layers[int(train.layer_ids[l])] = res.layout
    obj = sum(r.objective for r in results)
    bound = sum(r.bound for r in results)
    denom = float(train.num_tokens * L * R) or 1.0
    gap = (obj - bound) / obj if obj > 0 else 0.0
    calls = sum(r.cpsat_calls for r in results)
    solver: dict[str, Any] = {
        "method": (
            "expert->node partition over aggregated patterns: load-capped co-activation greedy, exact-delta swaps, "
            "LNS alternating CP-SAT exact neighbourhoods (2 nodes x 5 / 3 nodes x 4 free experts) and kicks; "
            "experts->ranks by LPT + in-node swaps"
        ),
        "objective_name": options.objective,
        "objective": obj / denom,
        "best_bound": bound / denom,
        "gap": gap,
        "bound_method": (
            "max(1 node per pattern, star decomposition, Frank-Wolfe bound of the consistent-companion "
            "relaxation) per layer (bounds); node_sends objective only"
        ),
        # OPTIMAL only when the bound closes the gap of the whole decision; copies are placed
        # heuristically after the bounded node partition.
        "status": "OPTIMAL" if gap <= 1e-9 and not options.redundant_per_rank else "FEASIBLE",
        "bound_scope": (
            "none: locality-placed copies (objective = train node-level cost with copies under the replica rule)"
            if options.redundant_per_rank and options.copy_placement == "locality"
            else "node-level objective of the primary copies (train)"
        ),
        "warm_start_objective": sum(r.start_objective for r in results) / denom,
        "cpsat_calls": calls,
        "cpsat_improvements": sum(r.cpsat_improvements for r in results),
        "cpsat_last_status": next((r.cpsat_status for r in reversed(results) if r.cpsat_calls), "NOT_RUN"),
        "train_rank_imbalance": float(np.mean([r.rank_imbalance for r in results])),
        # Predicted mean held-out rank imbalance under request-sampling noise (allocate.NoiseModel);
        # absent with redundant copies.
        "expected_imbalance": float(np.mean(expected)) if expected else None,
        # The balance_confidence quantile of the same (normal approximation, layers independent).
        "imbalance_quantile": allocate.quantile(expected, spread, z) if expected else None,
        "balance_confidence": options.balance_confidence,
        "balance_target": options.balance_target,
        # Variance factor of the load-risk model (measured on the train requests unless given).
        "risk_scale": options.risk_scale,
        "layer_caps": layer_caps or None,
        "options": options.model_dump(),
        "trace": trace_path,
        "train_fraction": options.train_fraction,
        "train_tokens": train.num_tokens,
        "seed": options.seed,
        "time_s": time.monotonic() - t0,
    }
    if any(r.node_overflow > 0 for r in results):
        msg = "some layers exceed --max-imbalance on train at node level; kept the best found"
        warnings.warn(msg, stacklevel=2)
        solver["warning"] = msg
    plan = Plan(
        model_name=model_name,
        num_experts=E,
        moe_layers=[int(x) for x in trace.layer_ids],
        ep_size=R,
        topology=topology,
        layers=layers,
        solver=solver,
    )
    validate_plan(plan)
    return plan


def check_instance(E: int, topology: Topology, options: SolveOptions) -> None:
    R = topology.ep_size
    if options.balance_target == "expected" and (options.redundant_per_rank or options.inter_layer_weight > 0):
        raise SolveError(
            "--balance-target expected supports neither --redundant-per-rank nor --inter-layer-weight yet "
            f"(got {options.redundant_per_rank} and {options.inter_layer_weight}); use --balance-target train"
        )
    if options.preserve_groups:
        n = options.preserve_groups
        if E % n:
            raise SolveError(f"--preserve-groups {n} does not divide num_experts {E} into equal contiguous groups")
        if options.redundant_per_rank and n > 1:
            raise SolveError(
                f"--preserve-groups {n} with --redundant-per-rank {options.redundant_per_rank}: in group-preserving mode "
                f"physical slot p holds group p // {E // n}, and the extra slots p >= {E} belong to no group; "
                "drop --preserve-groups (the server serves cross-group plans) or the copies"
            )
    if E % R:
        raise SolveError(
            f"ep_size {R} does not divide num_experts {E} + redundant slots {R * options.redundant_per_rank} "
            f"(= {E + R * options.redundant_per_rank} physical experts)"
        )


def _solve_layer(
    train: Trace,
    l: int,
    topology: Topology,
    opt: SolveOptions,
    budget: float,
    rng: np.random.Generator,
    prev_nodes: np.ndarray | None,
    with_bound: bool = True,
    warm: np.ndarray | None = None,
    base: LayerInstance | None = None,
    q: np.ndarray | None = None,
) -> LayerResult:
    E, R = train.num_experts, topology.ep_size
    s = E // R
    g = topology.ranks_per_node
    sizes = g * s
    base = LayerInstance.from_trace(train, l) if base is None else base  # patterns: reusable per layer
    load = base.expert_load()
    copies = None
    if opt.redundant_per_rank and (opt.copy_placement == "balance" or load.max() > opt.max_imbalance * load.sum() / R):
        # Decide the copy counts first and balance the primaries on their per-copy share: the
        # extra copies then fill the lightest ranks (Step 3) instead of fighting a hot primary.
        # Locality mode does this only when one expert alone breaks the cap (Llama-4): otherwise
        # its primaries are balanced on their full load and the copies, chosen for locality,
        # keep the cap by themselves (measured better on DeepSeek-V2-Lite EP16/4).
        copies = copy_counts(load, R * opt.redundant_per_rank, R)
    bal = load if copies is None else load / copies
    _check_balance(load, R, opt.max_imbalance, int(train.layer_ids[l]), opt.redundant_per_rank)
    inst, pweight = base, None
    w = node_weights(g, R)
    if prev_nodes is not None:
        inst, pweight = _inter_layer_instance(train, l, prev_nodes, w, opt.inter_layer_weight, R)
    lin = None
    if opt.objective == "hop_cost":
        # Mean link cost from all origin ranks to node u, per pair; node_sends kept as tie-break.
        h = (g[:, None] * topology.link_cost).sum(axis=0)  # x R already
        lin = load[:, None] * h[None, :]
        w = w * 1e-3
        pweight = None if pweight is None else pweight * 1e-3
    cap = sizes / E * bal.sum() * opt.max_imbalance
    eclass = None
    if opt.preserve_groups > 1:  # n_group 1: one group holding every expert, no restriction
        # Group-preserving mode: start from vLLM's linear layout (every expert in its own group's
        # slots) and only swap experts of the same group (keeps each node's per-group slot count).
        # CP-SAT neighbourhoods do not know the groups: local search and kicks only.
        eclass = np.arange(E) // (E // opt.preserve_groups)
        opt = opt.model_copy(update={"lns_fraction": 0.0})
        if warm is None:
            warm = topology.node_of_rank[np.arange(E) // s]
    # warm: a node assignment [E] to continue from (the second pass of --balance-target expected)
    start = grow_groups(stats.coactivation(train, l), bal, sizes, cap) if warm is None else warm
    fold_loads = fold_caps = None
    if opt.balance_folds > 1:
        fold_loads = _fold_loads(train, l, opt.balance_folds) / (1 if copies is None else copies)
        fold_caps = fold_loads.sum(axis=1, keepdims=True) * (sizes / E)[None, :] * opt.max_imbalance
    risk = _risk(train, l, opt, copies, q)
    everywhere = np.zeros(0, dtype=np.int64)
    if opt.redundant_per_rank and opt.copy_placement == "locality" and pweight is None:
        # Experts the copies will put on every node cost no sends: solve the partition without them.
        everywhere = everywhere_set(load, topology, opt.redundant_per_rank)
    if everywhere.size:
        inst, start, w, cap, lin, bal_s, fold_loads, fold_caps, risk_s, group = _with_phantoms(
            inst, everywhere, start, w, cap, lin, bal, fold_loads, fold_caps, risk
        )
    else:
        bal_s, risk_s, group = bal, risk, None
    search = SwapSearch(
        inst, start, w, cap, linear=lin, pattern_weight=pweight, load=bal_s, fold_loads=fold_loads, fold_caps=fold_caps,
        risk=risk_s, unit_group=group, expert_class=eclass,
    )
    # A quarter of the layer's budget (at most 3 s) is kept for the lower bound, and with
    # locality-placed copies a share for placing them (the node partition is their start).
    locality_copies = bool(opt.redundant_per_rank) and opt.copy_placement == "locality"
    # (no partition bound with locality copies: it would not bound the objective with copies)
    bound_time = min(3.0, 0.25 * budget) if with_bound and not locality_copies else 0.0
    copy_time = _COPY_SHARE * budget if opt.redundant_per_rank and opt.copy_placement == "locality" else 0.0
    deadline = time.monotonic() + budget - bound_time - copy_time
    det = opt.deterministic
    search.repair(np.inf if det else deadline)
    search.descend(np.inf if det else deadline)
    if pweight is not None:
        _align_nodes(search, g, cap)
    start_obj = search.cost()
    calls, improved, status = _improve(search, topology.num_nodes, opt, budget, deadline, rng)
    if pweight is not None:
        _align_nodes(search, g, cap)
    node_assign = search.a[:E]  # without phantoms
    objective = search.cost()
    rank_bal = bal
    if everywhere.size:
        inst = base
        rank_bal = bal.copy()
        rank_bal[everywhere] /= topology.num_nodes  # the node's copy serves its own origins only
    rank_risk, rank_cap = risk, None
    if opt.redundant_per_rank and opt.copy_placement == "locality" and q is not None:
        # Which rank of a node holds a primary changes no node send, only balance: spread the
        # node's experts over its ranks against held-out drift as far as swaps can (one standard
        # deviation of the load-risk model under a cap of the mean itself: repair then minimises
        # the overflow). Experts that fire together drift together; this keeps them apart.
        rank_risk = q * max(1.0, opt.balance_risk) ** 2 if risk is None else risk
        rank_cap = _RANK_CAP
    layout, rank_imb = _place_ranks(inst, node_assign, topology, s, rank_bal, opt, rank_risk, eclass, rank_cap)
    if opt.redundant_per_rank and opt.copy_placement == "locality":
        layout, rank_imb, objective = _locality_copies(train, l, layout, topology, opt, copy_time, everywhere, q)
    elif opt.redundant_per_rank:
        layout = _with_replicas(layout, load, topology, opt.redundant_per_rank, copies, int(train.layer_ids[l]))
        layout = rebalance(layout, load, topology)
        holds = np.zeros((R, E))
        holds[np.repeat(np.arange(R), layout.shape[1]), layout.ravel()] = 1
        rl = holds @ (load / holds.sum(axis=0))
        rank_imb = float(rl.max() / rl.mean())
    if opt.redundant_per_rank and opt.copy_placement == "locality":
        bound = 0.0  # the partition bounds below are for primaries only; copies go below them
    elif opt.objective == "node_sends" and prev_nodes is None and with_bound:
        bound = _node_bound(inst, sizes, node_assign, w, det, bound_time)
    else:
        bound = float(inst.counts.sum() * w.min()) if lin is None else 0.0
    return LayerResult(
        layout=layout,
        objective=objective,
        bound=min(bound, objective),
        start_objective=start_obj,
        cpsat_calls=calls,
        cpsat_improvements=improved,
        cpsat_status=status,
        node_overflow=search.overflow(),
        rank_imbalance=rank_imb,
    )


def _with_phantoms(inst, drop, start, w, cap, lin, bal, fold_loads, fold_caps, risk):
    """The node search's inputs with the experts `drop` projected out of the cost
    (`replicas.project_out`): K phantom experts pinned on an extra unit of weight 0 and no cap,
    in a swap group of its own. The dropped experts keep their slots and load (their copies
    will split it over the nodes: load / N each)."""
    E, K = inst.num_experts, inst.top_k
    N = len(w)
    pad = lambda x, v=0.0: np.concatenate([x, np.full((K,) + x.shape[1:], v)])  # noqa: E731
    # Every node will hold one instance of each dropped expert and serve its own origins' pairs:
    # load_e * g_n / R per node, a constant taken off the node caps; in the partition they are
    # free filler (load 0).
    bal = bal.copy()
    cap = cap - cap / cap.sum() * bal[drop].sum()
    bal[drop] = 0.0
    out_lin = None if lin is None else np.concatenate([pad(lin), np.zeros((E + K, 1))], axis=1)
    if fold_loads is not None:
        fold_loads = np.concatenate([fold_loads, np.zeros((fold_loads.shape[0], K))], axis=1)
        fold_caps = np.concatenate([fold_caps, np.full((fold_caps.shape[0], 1), np.inf)], axis=1)
    if risk is not None:
        risk = np.pad(risk, ((0, K), (0, K)))
    return (
        project_out(inst, drop),
        np.concatenate([np.asarray(start, dtype=np.int64), np.full(K, N)]),
        np.concatenate([w, [0.0]]),
        np.concatenate([cap, [np.inf]]),
        out_lin,
        pad(bal),
        fold_loads,
        fold_caps,
        risk,
        np.concatenate([np.zeros(N, dtype=np.int64), [1]]),
    )


def _locality_copies(
    train: Trace,
    l: int,
    layout: np.ndarray,
    topology: Topology,
    opt: SolveOptions,
    seconds: float,
    everywhere: np.ndarray,
    q: np.ndarray | None,
) -> tuple[np.ndarray, float, float]:
    """Step 3, locality mode (`replicas.place_copies`): (layout with copies, train rank imbalance
    under the replica rule, train node cost with copies). Deterministic mode bounds the search by
    passes, not the clock."""
    layer = int(train.layer_ids[l])
    try:
        res = place_copies(
            layout,
            train.topk_ids[:, l, :],
            topology,
            train.num_experts,
            opt.redundant_per_rank,
            opt.max_imbalance,
            deadline=np.inf if opt.deterministic else time.monotonic() + seconds,
            max_passes=_COPY_PASSES_DET if opt.deterministic else 50,
            everywhere=everywhere,
            # --balance-risk k: the copies keep k held-out standard deviations under the cap too
            # (the whole expert's risk: the rule's shares are folded in by place_copies).
            risk=_risk(train, l, opt, None, q),
        )
    except CopyPlacementError as e:
        raise SolveError(f"layer {layer}: {e}") from None
    if res.overflow > 0:
        warnings.warn(f"layer {layer}: copies could not bring every rank under --max-imbalance on train", stacklevel=3)
    return res.layout, res.rank_imbalance, res.node_cost


def _with_replicas(layout, load, topology: Topology, n: int, copies: np.ndarray, layer: int) -> np.ndarray:
    """add_replicas, and if the copy counts cannot sit on distinct ranks beside these primaries
    (one very hot expert wanting nearly every rank), fewer copies of the hottest: a warning, not a crash."""
    R = topology.ep_size
    try:
        return add_replicas(layout, load, topology, n, copies)
    except ValueError as first:
        for most in range(int(copies.max()) - 1, 0, -1):
            try:
                out = add_replicas(layout, load, topology, n, copy_counts(load, R * n, most))
            except ValueError:
                continue
            warnings.warn(f"layer {layer}: {first}; placed at most {most} copies per expert instead", stacklevel=3)
            return out
        raise SolveError(f"layer {layer}: {first}") from None


def _node_bound(inst: LayerInstance, sizes: np.ndarray, node_assign: np.ndarray, w: np.ndarray, det: bool, seconds: float) -> float:
    """Lower bound on a layer's node-level objective (valid for every load cap: caps only cut)."""
    return max(
        float(inst.counts.sum() * w.min()),
        star_lower_bound(inst, int(sizes.max()), float(w.min())),
        # deterministic mode: a fixed number of Frank-Wolfe steps instead of a time budget
        pair_relaxation_bound(inst, int(sizes.max()), node_assign, float(w.min()), 1e9, max_iters=10)
        if det
        else pair_relaxation_bound(inst, int(sizes.max()), node_assign, float(w.min()), seconds),
    )


def _node_assign(layout: np.ndarray, topology: Topology) -> np.ndarray:
    """int64 [E]: node of every expert of a primary-copy layout [R, S]."""
    out = np.empty(layout.size, dtype=np.int64)
    for r, row in enumerate(layout):
        out[row] = topology.node_of_rank[r]
    return out


def _layer_q(train: Trace, l: int, opt: SolveOptions) -> np.ndarray:
    """The layer's load-risk covariance scaled by risk_scale: one standard deviation of held-out drift."""
    return stats.load_risk(train, l) * (opt.risk_scale or 1.0)


def _noise(train: Trace, l: int, opt: SolveOptions, q: np.ndarray | None = None) -> allocate.NoiseModel:
    load = np.bincount(train.topk_ids[:, l, :].ravel().astype(np.int64), minlength=train.num_experts).astype(np.float64)
    return allocate.NoiseModel(load, _layer_q(train, l, opt) if q is None else q, seed=opt.seed)


def _solve_layer_candidates(
    train: Trace,
    l: int,
    topology: Topology,
    opt: SolveOptions,
    budget: float,
    rng: np.random.Generator,
    noise: allocate.NoiseModel,
    q: np.ndarray | None = None,
) -> tuple[list[LayerResult | None], list[float], list[float]]:
    """--balance-target expected: the layer solved at the caps of allocate.CAP_GRID (None where
    the hottest expert alone breaks the cap, or where the budget is too short to try every cap),
    each with the mean and std of its predicted held-out imbalance; the layer's one lower bound is
    attached to every candidate (it holds for all caps)."""
    bound_time = min(3.0, 0.25 * budget)
    grid = allocate.CAP_GRID
    # Each cap costs a fixed setup (greedy start, repair, one descent) before any search: with a
    # short budget, try fewer caps spread over the grid (always its two ends) so --time-limit holds.
    n_try = int(np.clip((budget - bound_time) / _MIN_CANDIDATE_S, 2, len(grid)))
    tried = set(np.linspace(0, len(grid) - 1, n_try).round().astype(int).tolist())
    each = max(0.05, (budget - bound_time) / len(tried))
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
                res = _solve_layer(
                    train, l, topology, opt.model_copy(update={"max_imbalance": cap}), each, rng, None, with_bound=False, warm=warm, base=inst, q=q
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
        warm = _node_assign(res.layout, topology)
    done = [c for c in cands if c is not None]
    if not done:  # every cap is below what the hottest expert forces: say so with its numbers
        _check_balance(inst.expert_load(), topology.ep_size, max(allocate.CAP_GRID), int(train.layer_ids[l]), 0)
    if opt.objective == "node_sends":
        sizes = topology.ranks_per_node * (train.num_experts // topology.ep_size)
        w = node_weights(topology.ranks_per_node, topology.ep_size)
        best = min(done, key=lambda r: r.objective)
        bound = _node_bound(inst, sizes, _node_assign(best.layout, topology), w, opt.deterministic, bound_time)
        cands = [None if c is None else replace(c, bound=min(bound, c.objective)) for c in cands]
    return cands, imbs, stds


def _improve(search: SwapSearch, N: int, opt: SolveOptions, budget: float, deadline: float, rng) -> tuple[int, int, str]:
    """Iterated local search until the budget is spent: exact CP-SAT neighbourhoods for about
    lns_fraction of the time, otherwise a kick (2-20 random swaps, load ignored) followed by
    repair and swap descent. Only feasible strict improvements become the incumbent; a walk that
    ends worse or over a cap is reset to it, an equal one is kept (a step along a plateau)."""
    if N < 2:
        return 0, 0, "NOT_RUN"
    pairs = [(i, j) for i in range(N) for j in range(i + 1, N)]
    order = [pairs[k] for k in rng.permutation(len(pairs))]
    calls = improved = 0
    status = "NOT_RUN"
    sub_time = max(0.2, min(1.0, budget * opt.lns_fraction / max(1, len(pairs))))
    # Deterministic mode: fixed work instead of the clock, and CP-SAT on every 4th round.
    rounds = max(1, int(budget * 16)) if opt.deterministic else 10**9
    best_a, best_c = search.a.copy(), search.cost()
    # Measured on DeepSeek-V2-Lite (benchmarks/results/solver_optimality.md): kicks keep finding
    # better partitions for tens of rounds; 60 failures in a row means the budget is better spent
    # on the next layer.
    stall_limit = 60
    stall = 0
    t_start, cpsat_time = time.monotonic(), 0.0
    until = np.inf if opt.deterministic else deadline
    for it in range(rounds):
        if stall >= stall_limit:
            break
        if not opt.deterministic and time.monotonic() + 0.02 > deadline:
            break
        if opt.deterministic:
            use_cpsat = opt.lns_fraction > 0 and it % 4 == 0
        else:
            use_cpsat = opt.lns_fraction > 0 and cpsat_time <= opt.lns_fraction * (time.monotonic() - t_start)
            use_cpsat = use_cpsat and time.monotonic() + sub_time <= deadline
        if use_cpsat:
            units, free = _neighbourhood(search, N, pairs, order, calls, rng)
            t_call = time.monotonic()
            try:
                r = reoptimise_units(
                    search, units, sub_time, seed=opt.seed + it, deterministic=opt.deterministic, workers=opt.workers, free=free
                )
            except Exception as e:  # never lose the incumbent to a CP-SAT failure: warn, go on without it
                warnings.warn(f"CP-SAT neighbourhood failed ({type(e).__name__}: {e}); continuing with local search", stacklevel=2)
                _reset(search, best_a)
                opt = opt.model_copy(update={"lns_fraction": 0.0})
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
            _kick(search, rng, int(rng.integers(2, 21)))
            search.repair(until)
            search.descend(until)
        c = search.cost()
        if c < best_c - 1e-9 and search.overflow() <= 1e-9:
            best_a, best_c = search.a.copy(), c
            stall = 0
            continue
        stall += 1
        if c > best_c + 1e-9 or search.overflow() > 1e-9:
            _reset(search, best_a)
    if search.cost() > best_c + 1e-9 or search.overflow() > 1e-9:
        _reset(search, best_a)
    return calls, improved, status


def _neighbourhood(search: SwapSearch, N: int, pairs, order, k: int, rng: np.random.Generator):
    """Units and free experts of the k-th CP-SAT neighbourhood: alternately a node pair with 5
    free experts each, and three nodes with 4 each (sizes CP-SAT proves optimal in ~0.1 s on
    DeepSeek-V2-Lite, where whole node pairs stay unproven after 10 s)."""
    if N >= 3 and k % 2:
        units = sorted(int(u) for u in rng.choice(N, 3, replace=False))
        per = 4
    else:
        units = list(order[(k // 2) % len(order)])
        per = 5
    free = []
    for u in units:
        on = np.flatnonzero(search.a == u)
        free.append(rng.choice(on, min(per, len(on)), replace=False))
    return units, np.concatenate(free)


def _risk(
    train: Trace, l: int, opt: SolveOptions, copies: np.ndarray | None, q: np.ndarray | None = None
) -> np.ndarray | None:
    """Q with sqrt(w'Qw) = balance_risk standard deviations of a unit's held-out load (None: off).
    With copies, each copy carries 1/copies of its expert's pairs, so Q scales by both shares.
    q: the layer's `_layer_q`, when the caller already has it."""
    if opt.balance_risk <= 0:
        return None
    q = (_layer_q(train, l, opt) if q is None else q) * opt.balance_risk**2
    if copies is not None:
        q = q / np.outer(copies, copies)
    return q


def _fold_loads(trace: Trace, l: int, folds: int) -> np.ndarray:
    """float [folds, E]: expert loads of `folds` contiguous groups of requests."""
    reqs = np.unique(trace.request_ids)
    fold_of_req = np.zeros(int(reqs.max()) + 1, dtype=np.int64)
    fold_of_req[reqs] = np.arange(len(reqs)) * folds // len(reqs)
    f = fold_of_req[trace.request_ids]
    E = trace.num_experts
    ids = trace.topk_ids[:, l, :].astype(np.int64) + (f * E)[:, None]
    return np.bincount(ids.ravel(), minlength=folds * E).reshape(folds, E).astype(np.float64)


def _align_nodes(search: SwapSearch, g: np.ndarray, cap: np.ndarray) -> None:
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
    _reset(search, perm[search.a])
    if search.cost() > before:  # rounding could in principle mislead: keep the better one
        _reset(search, old)


def _kick(search: SwapSearch, rng: np.random.Generator, swaps: int) -> None:
    """Iterated-local-search kick: `swaps` random exchanges between units of the same group,
    regardless of cost or load (the caller repairs and descends, and keeps the result only if
    it is feasible and better)."""
    E = len(search.a)
    for _ in range(swaps):
        for _try in range(20):
            e, f = (int(x) for x in rng.integers(0, E, 2))
            if search.a[e] != search.a[f] and search.group[search.a[e]] == search.group[search.a[f]] and search.eclass[e] == search.eclass[f]:
                search.apply_swap(e, f)
                break


def _reset(search: SwapSearch, assign: np.ndarray) -> None:
    search.a = assign.copy()
    search.cnt = search.inst.unit_counts(search.a, search.U)
    search.refresh_loads()


def _place_ranks(
    inst: LayerInstance,
    node_assign: np.ndarray,
    topology: Topology,
    s: int,
    load: np.ndarray,
    opt: SolveOptions,
    risk: np.ndarray | None = None,
    eclass: np.ndarray | None = None,
    cap_factor: float | None = None,
) -> tuple[np.ndarray, float]:
    """Step 2: experts of each node onto its ranks; returns (layout [R, s], train rank imbalance).
    eclass (group-preserving mode): expert groups; every rank then gets exactly as many experts of
    each group as its slots p = r * s + j belong to, in slot order."""
    R = topology.ep_size
    layout = np.zeros((R, s), dtype=np.int64)
    for n, ranks in enumerate(topology.nodes):
        if eclass is None:
            layout[ranks] = lpt_partition(np.flatnonzero(node_assign == n), load, len(ranks), s)
        else:
            layout[ranks] = _grouped_lpt(np.flatnonzero(node_assign == n), np.asarray(ranks), load, s, eclass)
    if max(len(r) for r in topology.nodes) > 1:
        rank_of = np.empty(len(load), dtype=np.int64)
        for r in range(R):
            rank_of[layout[r]] = r
        cap = np.full(R, load.sum() / R * (opt.max_imbalance if cap_factor is None else cap_factor))
        rw = np.full(R, float(R - 1)) if opt.objective == "rank_sends" else np.zeros(R)
        search = SwapSearch(inst, rank_of, rw, cap, unit_group=topology.node_of_rank, load=load, risk=risk, expert_class=eclass)
        search.repair(time.monotonic() + 5.0)
        if opt.objective == "rank_sends":
            search.descend(time.monotonic() + 5.0)
        for r in range(R):
            on = np.flatnonzero(search.a == r)
            # slot order = group order: slot j of rank r belongs to group (r*s + j) // group size
            layout[r] = on if eclass is None else on[np.argsort(eclass[on], kind="stable")]
    rank_load = load[layout].sum(axis=1)
    return layout, float(rank_load.max() / rank_load.mean())


def _grouped_lpt(experts: np.ndarray, ranks: np.ndarray, load: np.ndarray, s: int, eclass: np.ndarray) -> np.ndarray:
    """int [len(ranks), s]: a node's experts on its ranks, each rank taking exactly its slots' share
    of every group (quota), heaviest expert first onto the lightest rank with quota left; rows in
    slot order (groups ascending, as the slots' groups are)."""
    size = len(eclass) // (int(eclass.max()) + 1)
    quota = {}
    for i, r in enumerate(ranks.tolist()):
        for j in range(s):
            q = (r * s + j) // size
            quota[(i, q)] = quota.get((i, q), 0) + 1
    rows: list[list[int]] = [[] for _ in ranks]
    rl = np.zeros(len(ranks))
    for e in experts[np.argsort(-load[experts], kind="stable")].tolist():
        q = int(eclass[e])
        i = min((i for i in range(len(ranks)) if quota.get((i, q), 0) > 0), key=lambda i: (rl[i], i))
        quota[(i, q)] -= 1
        rows[i].append(e)
        rl[i] += load[e]
    return np.array([sorted(r, key=lambda e: (eclass[e], e)) for r in rows], dtype=np.int64)


def _check_balance(load: np.ndarray, R: int, bound: float, layer: int, redundant: int) -> None:
    """A bound below what the hottest expert alone forces is infeasible: say so with the best."""
    mean = load.sum() / R
    if redundant == 0 and mean > 0 and load.max() > bound * mean:
        best = load.max() / mean
        raise SolveError(
            f"--max-imbalance {bound} is infeasible at layer {layer}: expert {int(load.argmax())} alone carries "
            f"{best:.3f} x the mean rank load; best achievable >= {best:.3f} (or add --redundant-per-rank)"
        )


def _token_nodes(trace: Trace, l: int, layout: np.ndarray, topology: Topology) -> np.ndarray:
    """bool [T, N]: nodes each train token visits at layer l (primary copies)."""
    rank_of = np.empty(trace.num_experts, dtype=np.int64)
    for r in range(layout.shape[0]):
        rank_of[layout[r]] = r  # the last copy wins; fine for the inter-layer heuristic
    nodes = topology.node_of_rank[rank_of][trace.topk_ids[:, l, :]]
    out = np.zeros((trace.num_tokens, topology.num_nodes), dtype=bool)
    out[np.arange(trace.num_tokens)[:, None], nodes] = True
    return out


def _inter_layer_instance(trace: Trace, l: int, prev: np.ndarray, w: np.ndarray, lam: float, R: int):
    """Patterns keyed by (expert set at l, nodes visited at l-1): touching a node the token did not
    visit at l-1 costs lam extra (inter_layer_node_sends, scaled by R like the node weights)."""
    ids = np.sort(trace.topk_ids[:, l, :].astype(np.int64), axis=1)
    key = np.concatenate([ids, prev.astype(np.int64)], axis=1)
    uniq, counts = np.unique(key, axis=0, return_counts=True)
    K = ids.shape[1]
    inst = LayerInstance(uniq[:, :K], counts.astype(np.float64), trace.num_experts)
    pweight = w[None, :] + lam * R * (1 - uniq[:, K:])
    return inst, pweight
