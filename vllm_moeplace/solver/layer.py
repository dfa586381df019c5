"""One MoE layer, end to end: Step 1 (experts to nodes: warm start, repair, descent, iterated
local search), Step 2 (ranks), Step 3 (redundant copies) and the layer's lower bound.

The objective supplies the cost terms and the bound (`objectives`); the balance strategy
supplies the cap (`balance`); the budget arithmetic is `budget`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np

from vllm_moeplace import trace_stats
from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.plan import Topology
from vllm_moeplace.solver import budget as B
from vllm_moeplace.solver.greedy import grow_groups
from vllm_moeplace.solver.instance import LayerInstance
from vllm_moeplace.solver.lns import align_nodes, improve
from vllm_moeplace.solver.noise import risk_matrix
from vllm_moeplace.solver.objectives import BoundInputs, NodeTerms, Objective
from vllm_moeplace.solver.objectives.base import node_sends_weights
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.ranks import place_ranks
from vllm_moeplace.solver.redundancy import add_replicas, copy_counts, rebalance
from vllm_moeplace.solver.replicas import CopyPlacementError, everywhere_set, place_copies, project_out
from vllm_moeplace.solver.request_copies import CopyModel, place_request_copies
from vllm_moeplace.solver.swap_search import SwapSearch
from vllm_moeplace.trace import Trace

# Locality-placed copies: rank-level cap factor for the primaries (x mean, with one std of load
# risk): 1.0 makes the in-node swap repair minimise overflow as far as it goes. Measured on
# DeepSeek-V2-Lite EP16/4, 1 copy per rank, cap 1.05: held-out imbalance 1.137 (no rank-level
# risk) -> 1.128 (cap 1.05 + risk) -> 1.122 (1.0 + risk), node_sends 1.823-1.836 (search noise).
_RANK_CAP_WITH_COPIES = 1.0


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


def solve_layer(
    train: Trace,
    l: int,
    topology: Topology,
    opt: SolveOptions,
    objective: Objective,
    budget: float,
    rng: np.random.Generator,
    prev_nodes: np.ndarray | None = None,
    *,
    with_bound: bool = True,
    warm: np.ndarray | None = None,
    base: LayerInstance | None = None,
    q: np.ndarray | None = None,
    load: np.ndarray | None = None,
) -> LayerResult:
    """Layer index l placed within `budget` seconds at load cap opt.max_imbalance.

    prev_nodes: bool [T, N] nodes each token visited at the previous layer (the inter-layer term),
    warm: a node assignment [E] to continue from, base: the layer's patterns if already built,
    q: its load-risk covariance if already computed, load: the expert loads the caps are about
    when `train` is a sample of the train tokens (the whole train's, so balance is exact).

    `budget` covers the whole layer (setup, search, ranks, copies, bound): the search stops early
    enough for the rest to fit (deterministic mode: fixed work instead)."""
    t_enter = time.monotonic()
    E, R = train.num_experts, topology.ep_size
    s = E // R
    g = topology.ranks_per_node
    sizes = g * s
    base = LayerInstance.from_trace(train, l) if base is None else base
    sampled = load is not None
    load = base.expert_load() if load is None else np.asarray(load, dtype=np.float64)
    origins = objective.origins(topology)  # None: tokens start on a uniform rank
    node_origin = None if origins is None else node_origin_weights(origins, topology)
    # Locality copies price origins per node (uniform inside it): request groups of whole nodes
    # fit; groups inside nodes take the per-rank copy step (`request_copies`).
    locality_copies = bool(opt.redundant_per_rank) and opt.copy_placement == "locality" and (
        origins is None or node_origin is not None)
    copies = None
    if opt.redundant_per_rank and (opt.copy_placement == "balance" or load.max() > opt.max_imbalance * load.sum() / R):
        # Decide the copy counts first and balance the primaries on their per-copy share: the
        # extra copies then fill the lightest ranks (Step 3) instead of fighting a hot primary.
        # Locality mode does this only when one expert alone breaks the cap (Llama-4): otherwise
        # its primaries are balanced on their full load and the copies, chosen for locality,
        # keep the cap by themselves (measured better on DeepSeek-V2-Lite EP16/4).
        copies = copy_counts(load, R * opt.redundant_per_rank, R)
    bal = objective.balance_load(l, load) if copies is None else load / copies
    cap_factor = objective.layer_cap(bal, R, opt.max_imbalance)
    if cap_factor != opt.max_imbalance:
        opt = opt.model_copy(update={"max_imbalance": cap_factor})
    check_balance(load if copies is not None else bal, R, opt.max_imbalance, int(train.layer_ids[l]), opt.redundant_per_rank)

    # ---- Step 1 inputs: the objective's terms, the cap, the start ------------------------------
    # Cost terms on the scale of the patterns searched (the sample's, if one): `load` may be the
    # whole train's.
    terms = objective.node_terms(topology, base.expert_load() if sampled else load)
    inst, pweight = base, None
    own = objective.layer_patterns(train, l, topology)
    if own is not None:  # per-token node weights (request origins); never with the inter-layer term
        inst, pweight = own
    if prev_nodes is not None:
        inst, pweight = inter_layer_instance(train, l, prev_nodes, node_sends_weights(topology), opt.inter_layer_weight, R)
        pweight = pweight * terms.pattern_scale
    w, lin = terms.unit_weight, terms.linear
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
    start = grow_groups(trace_stats.coactivation(train, l), bal, sizes, cap) if warm is None else warm
    risk = risk_matrix(train, l, opt, copies, q)
    everywhere = np.zeros(0, dtype=np.int64)
    if locality_copies and pweight is None:
        # Experts the copies will put on every node cost no sends: solve the partition without them.
        everywhere = everywhere_set(load, topology, opt.redundant_per_rank)
    if everywhere.size:
        inst, start, w, cap, lin, bal_s, risk_s, group = with_phantoms(inst, everywhere, start, w, cap, lin, bal, risk)
    else:
        bal_s, risk_s, group = bal, risk, None
    search = SwapSearch(
        inst, start, w, cap, linear=lin, pattern_weight=pweight, load=bal_s, risk=risk_s, unit_group=group, expert_class=eclass,
    )

    # ---- Step 1 search: the budget minus the bound's and the copies' shares --------------------
    # (no partition bound with locality copies: it would not bound the objective with copies)
    bound_time = B.bound_seconds(budget) if with_bound and not locality_copies else 0.0
    copy_time = B.COPY_SHARE * budget if locality_copies else 0.0
    # The setup above came out of the layer's budget too: the search ends where the budget does,
    # less the bound's, the copies' and the objective's refinement shares.
    refine_time = objective.refine_share * budget
    layer_end = t_enter + budget
    deadline = layer_end - bound_time - copy_time - refine_time
    det = opt.deterministic
    search.repair(np.inf if det else max(deadline, time.monotonic() + B.REPAIR_MIN_S))
    search.descend(np.inf if det else deadline)
    if pweight is not None:
        align_nodes(search, g, cap)
    start_obj = search.cost()
    st = improve(search, topology.num_nodes, opt, budget, deadline, rng)
    if pweight is not None:
        align_nodes(search, g, cap)
    node_assign = search.a[:E]  # without phantoms
    node_cost = search.cost()

    # ---- Step 2: ranks --------------------------------------------------------------------------
    rank_bal = bal
    if everywhere.size:
        inst = base
        rank_bal = bal.copy()
        rank_bal[everywhere] /= topology.num_nodes  # the node's copy serves its own origins only
    rank_risk, rank_cap = risk, opt.max_imbalance
    if locality_copies and q is not None:
        # Which rank of a node holds a primary changes no node send, only balance: spread the
        # node's experts over its ranks against held-out drift as far as swaps can (one standard
        # deviation of the load-risk model under a cap of the mean itself: repair then minimises
        # the overflow). Experts that fire together drift together; this keeps them apart.
        rank_risk = q * max(1.0, opt.balance_risk) ** 2 if risk is None else risk
        rank_cap = _RANK_CAP_WITH_COPIES
    layout, rank_imb = place_ranks(inst, node_assign, topology, s, rank_bal, rank_cap, objective.rank_weight(topology), rank_risk, eclass,
                                   deadline=np.inf if det else max(time.monotonic() + B.REPAIR_MIN_S,
                                                                   layer_end - bound_time - copy_time - refine_time))
    if objective.refine_share > 0:
        layout = objective.refine(l, layout, inst, det, refine_time)
        node_assign = node_assign_of(layout, topology)
        node_cost = inst.cost(node_assign, w) + (0.0 if lin is None else float(lin[np.arange(E), node_assign].sum()))
        rank_load = load[layout].sum(axis=1)  # token pairs, as for every objective
        rank_imb = float(rank_load.max() / rank_load.mean())

    # ---- Step 3: copies -------------------------------------------------------------------------
    if locality_copies:
        copy_s = copy_time if det else max(B.MIN_LAYER_S, layer_end - bound_time - time.monotonic())
        # Request groups may ask for the plain solver's copies of the hottest experts on every node
        # too, seeded before the locality copies (no projection out of the partition: the
        # partition's patterns are keyed by home node; issue 12 attempt, off by default).
        seed = everywhere
        if pweight is not None and objective.everywhere_copies:
            seed = everywhere_set(load, topology, opt.redundant_per_rank)
        layout, rank_imb, node_cost = locality_copies_step(train, l, layout, topology, opt, copy_s, seed, q,
                                                           node_origin)
    elif opt.redundant_per_rank and origins is not None and opt.copy_placement == "locality":
        # request groups inside nodes: copies for the groups' per-rank origins
        model = CopyModel(train, l, origins, topology, opt.max_imbalance)
        layout = place_request_copies(model, layout, opt.redundant_per_rank)
        rank_imb = model.imbalance(layout)
    elif opt.redundant_per_rank:
        layout, rank_imb = balance_copies_step(layout, load, topology, opt.redundant_per_rank, copies, int(train.layer_ids[l]))

    # ---- Bound ----------------------------------------------------------------------------------
    if locality_copies:
        bound = 0.0  # the partition bounds are for primaries only; copies go below them
    elif prev_nodes is None and with_bound:
        bound_s = bound_time if det else min(bound_time, max(0.0, layer_end - time.monotonic()))
        bound = objective.lower_bound(terms, BoundInputs(inst, sizes, node_assign, det, bound_s))
    else:
        bound = objective.trivial_bound(inst, NodeTerms(w, lin))
    return LayerResult(
        layout=layout,
        objective=node_cost,
        bound=min(bound, node_cost),
        start_objective=start_obj,
        cpsat_calls=st.cpsat_calls,
        cpsat_improvements=st.cpsat_improvements,
        cpsat_status=st.cpsat_status,
        node_overflow=search.overflow(),
        rank_imbalance=rank_imb,
    )


def with_phantoms(inst, drop, start, w, cap, lin, bal, risk):
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
    if risk is not None:
        risk = np.pad(risk, ((0, K), (0, K)))
    return (
        project_out(inst, drop),
        np.concatenate([np.asarray(start, dtype=np.int64), np.full(K, N)]),
        np.concatenate([w, [0.0]]),
        np.concatenate([cap, [np.inf]]),
        out_lin,
        pad(bal),
        risk,
        np.concatenate([np.zeros(N, dtype=np.int64), [1]]),
    )


def locality_copies_step(
    train: Trace,
    l: int,
    layout: np.ndarray,
    topology: Topology,
    opt: SolveOptions,
    seconds: float,
    everywhere: np.ndarray,
    q: np.ndarray | None,
    origin: np.ndarray | None = None,
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
            max_passes=B.COPY_PASSES_DET if opt.deterministic else B.COPY_PASSES,
            everywhere=everywhere,
            # --balance-risk k: the copies keep k held-out standard deviations under the cap too
            # (the whole expert's risk: the rule's shares are folded in by place_copies).
            risk=risk_matrix(train, l, opt, None, q),
            origin=origin,
        )
    except CopyPlacementError as e:
        raise SolveError(f"layer {layer}: {e}") from None
    if res.overflow > 0:
        warnings.warn(f"layer {layer}: copies could not bring every rank under --max-imbalance on train", stacklevel=4)
    return res.layout, res.rank_imbalance, res.node_cost


def balance_copies_step(layout, load, topology: Topology, n: int, copies: np.ndarray, layer: int) -> tuple[np.ndarray, float]:
    """Step 3, --copy-placement balance: EPLB-style copies on the lightest ranks, then load-reducing
    swaps; (layout with copies, train rank imbalance with per-copy shares)."""
    R, E = topology.ep_size, len(load)
    layout = with_replicas(layout, load, topology, n, copies, layer)
    layout = rebalance(layout, load, topology)
    holds = np.zeros((R, E))
    holds[np.repeat(np.arange(R), layout.shape[1]), layout.ravel()] = 1
    rl = holds @ (load / holds.sum(axis=0))
    return layout, float(rl.max() / rl.mean())


def with_replicas(layout, load, topology: Topology, n: int, copies: np.ndarray, layer: int) -> np.ndarray:
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


def node_origin_weights(origins: np.ndarray, topology: Topology) -> np.ndarray | None:
    """float [N, T]: R x the probability that each token starts on node n, from per-rank origin
    probabilities [R, T]; None when some token's origin is not uniform over a node's ranks."""
    out = np.zeros((topology.num_nodes, origins.shape[1]))
    for n, ranks in enumerate(topology.nodes):
        block = origins[np.asarray(ranks)]
        if not np.allclose(block, block[0:1]):
            return None
        out[n] = block.sum(axis=0) * topology.ep_size
    return out


def check_balance(load: np.ndarray, R: int, bound: float, layer: int, redundant: int) -> None:
    """A bound below what the hottest expert alone forces is infeasible: say so with the best."""
    mean = load.sum() / R
    if redundant == 0 and mean > 0 and load.max() > bound * mean:
        best = load.max() / mean
        raise SolveError(
            f"--max-imbalance {bound} is infeasible at layer {layer}: expert {int(load.argmax())} alone carries "
            f"{best:.3f} x the mean rank load; best achievable >= {best:.3f} (or add --redundant-per-rank)"
        )


def node_assign_of(layout: np.ndarray, topology: Topology) -> np.ndarray:
    """int64 [E]: node of every expert of a primary-copy layout [R, S]."""
    out = np.empty(layout.size, dtype=np.int64)
    for r, row in enumerate(layout):
        out[row] = topology.node_of_rank[r]
    return out


def token_nodes(trace: Trace, l: int, layout: np.ndarray, topology: Topology) -> np.ndarray:
    """bool [T, N]: nodes each train token visits at layer l (primary copies)."""
    rank_of = np.empty(trace.num_experts, dtype=np.int64)
    for r in range(layout.shape[0]):
        rank_of[layout[r]] = r  # the last copy wins; fine for the inter-layer heuristic
    nodes = topology.node_of_rank[rank_of][trace.topk_ids[:, l, :]]
    out = np.zeros((trace.num_tokens, topology.num_nodes), dtype=bool)
    out[np.arange(trace.num_tokens)[:, None], nodes] = True
    return out


def inter_layer_instance(trace: Trace, l: int, prev: np.ndarray, w: np.ndarray, lam: float, R: int):
    """Patterns keyed by (expert set at l, nodes visited at l-1): touching a node the token did not
    visit at l-1 costs lam extra (inter_layer_node_sends, scaled by R like the node weights)."""
    ids = np.sort(trace.topk_ids[:, l, :].astype(np.int64), axis=1)
    key = np.concatenate([ids, prev.astype(np.int64)], axis=1)
    uniq, counts = np.unique(key, axis=0, return_counts=True)
    K = ids.shape[1]
    inst = LayerInstance(uniq[:, :K], counts.astype(np.float64), trace.num_experts)
    pweight = w[None, :] + lam * R * (1 - uniq[:, K:])
    return inst, pweight
