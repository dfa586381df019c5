"""Placement metrics, exactly as defined in issue 4 and docs/metrics.md.

For a token t at MoE layer l with chosen experts X, ranks 0..R-1 grouped into nodes, the token's
origin rank o uniform over all ranks and independent of its routing:

- host(o, t, k): the rank serving the k-th expert e of token t for origin o, by the one replica
  rule of `vllm_moeplace.replica` (origin-node-spread/v1): o itself if it holds a copy, else copy
  (t*K + k) mod n among the n copies on o's node, else copy (t*K + k) mod c among all c copies
  (ascending rank order), with spread key t = the token's row in the trace.
- rank_sends = mean_o |{host(o, e) : e in X} \\ {o}|          (distinct remote ranks)
- node_sends = mean_o |{node(host(o, e)) : e in X} \\ {node(o)}|  (distinct remote nodes)
- hop_cost   = mean_o sum_{e in X} link_cost[node(o)][node(host(o, e))]   (pairs, not deduplicated)
- inter_layer_node_sends = mean_o |N_{l+1}(o) \\ N_l(o)| over consecutive MoE layers (l, l+1),
  N_l(o) = {node(host(o, e)) : e in X_l}: the nodes a token must newly reach at the next layer if
  its state stayed where its previous experts ran (ExFlow / MoETuner, arXiv 2502.06643).
- imbalance  = max_r load_r / mean_r load_r, load_r = mean_o of the (token, expert) pairs the rule
  sends to r from origin o (the expected pairs r serves).

Each metric is averaged over (token, layer) (imbalance: over layers; inter-layer: over tokens and
layer pairs). Without redundant copies host(o, e) does not depend on o, and the averages over o
have closed forms: rank_sends = |ranks(X)| (1 - 1/R), node_sends = sum_{n in nodes(X)} (1 - g_n/R).

Two implementations: `evaluate_layers_reference` loops per token and per origin in plain Python
calling `replica.select` (the test oracle, obviously correct, slow); `evaluate_layers` is
vectorised (used everywhere).
Pure numpy: no vLLM or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.plan import Plan, PlanError, Topology, linear_layout
from vllm_moeplace.replica import candidate_table, is_identity_rule, node_candidates, select
from vllm_moeplace.trace import Trace

METRIC_NAMES = ("node_sends", "rank_sends", "hop_cost", "imbalance", "inter_layer_node_sends")


class MetricsError(MoeplaceError):
    """A plan / placement does not fit the trace or topology it is scored on."""


@dataclass(frozen=True)
class Metrics:
    """Scores of one placement on one trace. Scalars are the averages defined above."""

    node_sends: float
    rank_sends: float
    hop_cost: float
    imbalance: float
    inter_layer_node_sends: float
    layer_ids: np.ndarray  # int [L], decoder-layer ids, trace order
    node_sends_per_layer: np.ndarray  # float [L]
    rank_sends_per_layer: np.ndarray  # float [L]
    hop_cost_per_layer: np.ndarray  # float [L]
    imbalance_per_layer: np.ndarray  # float [L]
    inter_layer_per_pair: np.ndarray  # float [L-1], pair (layer_ids[i], layer_ids[i+1])
    num_tokens: int

    def as_dict(self) -> dict[str, float]:
        """The scalar metrics, as plain floats (the shape `moeplace evaluate --json` prints)."""
        return {name: float(getattr(self, name)) for name in METRIC_NAMES}


# ---- inputs --------------------------------------------------------------------------------------


def _check_inputs(layers: dict[int, np.ndarray], topology: Topology, trace: Trace) -> dict[int, np.ndarray]:
    """Placements for every trace layer (missing ones = vLLM's linear layout), checked against trace."""
    E, R = trace.num_experts, topology.ep_size
    if trace.num_tokens == 0:
        raise MetricsError("cannot score a placement on a trace with no tokens")
    trace_layers = [int(x) for x in trace.layer_ids]
    extra = sorted(set(int(k) for k in layers) - set(trace_layers))
    if extra:
        raise MetricsError(f"placement has layer(s) {extra} that are not MoE layers of the trace (layer_ids {trace_layers})")
    out: dict[int, np.ndarray] = {}
    for lid in trace_layers:
        if lid in layers:
            a = np.asarray(layers[lid], dtype=np.int64)
        else:
            try:
                a = linear_layout(E, R)
            except PlanError as e:
                raise MetricsError(f"layer {lid} is not in the placement and the linear default cannot fill it: {e}") from None
        if a.ndim != 2 or a.shape[0] != R:
            raise MetricsError(f"layer {lid}: placement shape {list(a.shape)}, expected [ep_size={R}, slots]")
        if a.size and (a.min() < 0 or a.max() >= E):
            raise MetricsError(f"layer {lid}: expert id {int(a.max() if a.max() >= E else a.min())} out of range 0..{E - 1} (trace num_experts {E})")
        missing = np.setdiff1d(np.arange(E), a.ravel())
        if missing.size:
            raise MetricsError(f"layer {lid}: experts {missing.tolist()[:8]} are on no rank")
        out[lid] = a
    return out


def _holds(a: np.ndarray, E: int) -> np.ndarray:
    """bool [R, E]: rank r holds a copy of expert e."""
    R = a.shape[0]
    h = np.zeros((R, E), dtype=bool)
    h[np.repeat(np.arange(R), a.shape[1]), a.ravel()] = True
    return h


def rule_hosts(a: np.ndarray, topology: Topology, E: int, ids: np.ndarray) -> np.ndarray:
    """int64 [N, T, K]: per origin node n, the rank serving each (token, position) for an origin on
    n that holds no copy of the expert (steps 2-3 of the replica rule; spread key = row0 + row).

    An origin holding the expert serves it itself; every other origin on n gets this host, which
    depends on n but not on the origin's rank: the reason the metrics can work per node.
    Spread key of a token = its row in `ids`."""
    ids = np.asarray(ids, dtype=np.int64)
    T, K = ids.shape
    S = a.shape[1]
    ncand, ncount = node_candidates(a, E, topology.node_of_rank)
    key = np.arange(T, dtype=np.int64)[:, None] * K + np.arange(K)[None, :]  # [T, K]
    out = np.empty((ncand.shape[0], T, K), dtype=np.int64)
    for n in range(ncand.shape[0]):
        out[n] = ncand[n][ids, key % ncount[n][ids]] // S
    return out


# ---- fast implementation -----------------------------------------------------------------------


def _distinct_mask(sorted_vals: np.ndarray) -> np.ndarray:
    """bool [T, K]: True at the first occurrence of each value in each (sorted) row."""
    first = np.ones_like(sorted_vals, dtype=bool)
    first[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    return first


def _node_membership(node_ids: np.ndarray, num_nodes: int) -> np.ndarray:
    """bool [T, N]: node n hosts one of the token's experts."""
    T = node_ids.shape[0]
    m = np.zeros((T, num_nodes), dtype=bool)
    m[np.arange(T)[:, None], node_ids] = True
    return m


def _imbalance_single(a: np.ndarray, load: np.ndarray) -> float:
    """max/mean rank load when every expert has one copy (the rule is the identity)."""
    rank_load = load[a].sum(axis=1)
    mean = rank_load.mean()
    return float(rank_load.max() / mean) if mean > 0 else 1.0


def rule_rank_load(holds: np.ndarray, load: np.ndarray, D: np.ndarray, ids: np.ndarray, topology: Topology) -> np.ndarray:
    """float [R]: expected (token, expert) pairs each rank serves under the rule, mean over origins.

    holds bool [R, E]; load [E] pairs per expert; D = `rule_hosts` [N, T, K] for tokens `ids` [T, K].
    A pair on e is served by each origin holding e itself (1/R each), and by D[n] for the
    g_n - h_n(e) origins of node n that hold no copy (h_n(e): ranks of n holding e)."""
    R = topology.ep_size
    out = holds.astype(np.float64) @ load
    for n, ranks in enumerate(topology.nodes):
        w = len(ranks) - holds[np.asarray(ranks)].sum(axis=0)  # [E] origins of n without a copy
        out += np.bincount(D[n].ravel(), weights=w[ids].ravel().astype(np.float64), minlength=R)
    return out / R


def evaluate_layers(layers: dict[int, np.ndarray], topology: Topology, trace: Trace) -> Metrics:
    """Score per-layer placements {decoder_layer: int [R, S]} on `trace` (vectorised).

    A trace layer missing from `layers` scores as vLLM's linear layout.
    """
    placed = _check_inputs(layers, topology, trace)
    E, R, N = trace.num_experts, topology.ep_size, topology.num_nodes
    T, L, K = trace.topk_ids.shape
    node_of_rank = topology.node_of_rank
    cost = topology.link_cost
    node_w = 1.0 - topology.ranks_per_node / R  # [N]: expected remote-node message per hosted node
    ns, rs, hc, im = (np.zeros(L) for _ in range(4))
    inter = np.zeros(max(L - 1, 0))
    prev_members: np.ndarray | None = None  # [O, T, N] per origin group, from the previous layer
    for li, lid in enumerate(trace.layer_ids.tolist()):
        a = placed[lid]
        ids = trace.topk_ids[:, li, :].astype(np.int64)  # [T, K]
        load = np.bincount(ids.ravel(), minlength=E).astype(np.float64)
        if is_identity_rule(a, E):
            # No origin-dependence (every expert has one copy): closed forms over uniform origins.
            im[li] = _imbalance_single(a, load)
            H = np.empty(E, dtype=np.int64)
            H[a.ravel()] = np.repeat(np.arange(R), a.shape[1])
            hosts = np.sort(H[ids], axis=1)  # [T, K]
            rs[li] = _distinct_mask(hosts).sum(axis=1).mean() * (1.0 - 1.0 / R)
            members = _node_membership(node_of_rank[hosts], N)  # [T, N]
            ns[li] = (members @ node_w).mean()
            mean_cost_to = cost[node_of_rank].mean(axis=0)  # [N]: mean over origins of cost to n
            hc[li] = mean_cost_to[node_of_rank[hosts]].sum(axis=1).mean()
            members = members[None]  # one origin group
        else:
            # With copies the rule's host depends on the origin o only through o's node n, except
            # that o serves its own copies itself (and then the host is on n anyway): node-level
            # metrics are computed once per node (weight g_n / R); rank_sends per origin from the
            # node's hosts D[n] with o's own experts removed.
            holds = _holds(a, E)
            D = rule_hosts(a, topology, E, ids)  # [N, T, K]
            rl = rule_rank_load(holds, load, D, ids, topology)
            im[li] = float(rl.max() / rl.mean()) if rl.mean() > 0 else 1.0
            members = np.zeros((N, T, N), dtype=bool)
            r_acc = n_acc = h_acc = 0.0
            for n, ranks in enumerate(topology.nodes):
                w = len(ranks) / R
                key = np.sort(D[n] * E + ids, axis=1)  # token's experts grouped by their host
                hosts, es = key // E, key % E  # [T, K], hosts sorted per row
                nodes = node_of_rank[hosts]
                members[n] = _node_membership(nodes, N)
                n_acc += w * (members[n].sum(axis=1).mean() - members[n][:, n].mean())
                h_acc += w * cost[n][nodes].sum(axis=1).mean()
                # Groups = (token, distinct host). Origin o messages a group's host unless o holds
                # every expert of the group itself (then the group's host is o or o serves them
                # all locally); count those fully-held groups sparsely.
                gid = np.cumsum(_distinct_mask(hosts).ravel()) - 1  # [T*K] group of each slot
                num_groups = int(gid[-1]) + 1
                size = np.bincount(gid, minlength=num_groups)
                g = len(ranks)
                oi, pos = np.nonzero(holds[np.asarray(ranks)][:, es.ravel()])  # slots local to origin oi
                held = np.bincount(oi * num_groups + gid[pos], minlength=g * num_groups).reshape(g, num_groups)
                r_acc += (g * num_groups - int((held == size[None, :]).sum())) / T / R
            rs[li], ns[li], hc[li] = r_acc, n_acc, h_acc
        if li > 0:
            assert prev_members is not None
            # Origin groups: one (no copies) or one per node (weight g_n / R); broadcasting pairs them.
            newly = (members & ~prev_members).sum(axis=2).mean(axis=1)  # [1 or N]
            inter[li - 1] = newly[0] if newly.size == 1 else newly @ (topology.ranks_per_node / R)
        prev_members = members
    return Metrics(
        node_sends=float(ns.mean()),
        rank_sends=float(rs.mean()),
        hop_cost=float(hc.mean()),
        imbalance=float(im.mean()),
        inter_layer_node_sends=float(inter.mean()) if inter.size else 0.0,
        layer_ids=trace.layer_ids.astype(np.int64),
        node_sends_per_layer=ns,
        rank_sends_per_layer=rs,
        hop_cost_per_layer=hc,
        imbalance_per_layer=im,
        inter_layer_per_pair=inter,
        num_tokens=T,
    )


def check_plan_fits_trace(plan: Plan, trace: Trace, where: str | None = None) -> None:
    """Raise MetricsError naming the mismatching value when `plan` cannot be scored on `trace`."""
    src = where or plan.source
    if plan.num_experts != trace.num_experts:
        raise MetricsError(f"{src}: model.num_experts is {plan.num_experts} but the trace has num_experts {trace.num_experts}")
    if plan.topology.ep_size != plan.ep_size:
        raise MetricsError(f"{src}: topology describes {plan.topology.ep_size} ranks but ep_size is {plan.ep_size}")
    trace_layers = set(int(x) for x in trace.layer_ids)
    extra = sorted(set(plan.layers) - trace_layers)
    if extra:
        raise MetricsError(f"{src}: layers {extra} are not MoE layers of the trace (trace layer_ids {sorted(trace_layers)})")


def evaluate_plan(plan: Plan, trace: Trace) -> Metrics:
    """Score a plan on a trace; trace layers the plan does not list score as the linear layout."""
    check_plan_fits_trace(plan, trace)
    return evaluate_layers(plan.layers, plan.topology, trace)


# ---- reference implementation (test oracle) ------------------------------------------------------


def evaluate_layers_reference(layers: dict[int, np.ndarray], topology: Topology, trace: Trace) -> dict[str, Any]:
    """The definitions, written as literally as possible: loops over layers, tokens and origins.

    Slow (pure Python); only for small instances in tests. Returns the scalar metrics dict.
    """
    placed = _check_inputs(layers, topology, trace)
    E, R = trace.num_experts, topology.ep_size
    node = [int(topology.node_of_rank[r]) for r in range(R)]
    cost = topology.link_cost
    T, L, K = trace.topk_ids.shape
    lids = trace.layer_ids.tolist()
    tables = {lid: candidate_table(placed[lid], E, topology.node_of_rank) for lid in lids}

    def hosts_of(li: int, t: int, o: int) -> list[int]:
        """Ranks serving token t's experts at layer li for origin o: the replica rule, as served."""
        lid = lids[li]
        phys = select(tables[lid], trace.topk_ids[t : t + 1, li], o, np.array([t]))[0]
        return [int(p) // placed[lid].shape[1] for p in phys]

    ns_sum = rs_sum = hc_sum = inter_sum = 0.0
    imb_sum = 0.0
    for li in range(L):
        load = [0.0] * R
        for t in range(T):
            for o in range(R):
                hosts = hosts_of(li, t, o)
                for h in hosts:
                    load[h] += 1.0 / R  # origins are uniform: each carries 1/R of the token
                rs_sum += len({h for h in hosts if h != o}) / R
                ns_sum += len({node[h] for h in hosts if node[h] != node[o]}) / R
                hc_sum += sum(cost[node[o]][node[h]] for h in hosts) / R
                if li > 0:
                    prev_nodes = {node[h] for h in hosts_of(li - 1, t, o)}
                    now_nodes = {node[h] for h in hosts}
                    inter_sum += len(now_nodes - prev_nodes) / R
        imb_sum += max(load) / (sum(load) / R)
    return {
        "node_sends": ns_sum / (T * L),
        "rank_sends": rs_sum / (T * L),
        "hop_cost": hc_sum / (T * L),
        "imbalance": imb_sum / L,
        "inter_layer_node_sends": inter_sum / (T * (L - 1)) if L > 1 else 0.0,
    }


# ---- one origin per token (the serving path's view) ----------------------------------------------


def evaluate_layers_at_origins(
    layers: dict[int, np.ndarray], topology: Topology, trace: Trace, origin: np.ndarray, spread: np.ndarray
) -> dict[str, float]:
    """node_sends, rank_sends and imbalance when token t starts on rank origin[t] with spread key
    spread[t] (instead of the average over all origins): what a serving run with the replica
    rule's virtual origins dispatched (replica.replicated_origin). Imbalance counts the pairs each
    rank really served. `moeplace bench` compares this with the traffic it counted in the engine."""
    from vllm_moeplace.replica import candidate_table, select

    placed = _check_inputs(layers, topology, trace)
    R = topology.ep_size
    o = np.asarray(origin, dtype=np.int64)
    node_of = topology.node_of_rank
    T, L, K = trace.topk_ids.shape
    ns, rs, im = (np.zeros(L) for _ in range(3))
    for li, lid in enumerate(trace.layer_ids.tolist()):
        a = placed[lid]
        table = candidate_table(a, trace.num_experts, node_of)
        hosts = select(table, trace.topk_ids[:, li, :], o, spread) // a.shape[1]  # [T, K] ranks
        hit_rank = np.zeros((T, R), dtype=bool)
        hit_rank[np.arange(T)[:, None], hosts] = True
        hit_node = _node_membership(node_of[hosts], topology.num_nodes)
        rs[li] = (hit_rank.sum(axis=1) - hit_rank[np.arange(T), o]).mean()
        ns[li] = (hit_node.sum(axis=1) - hit_node[np.arange(T), node_of[o]]).mean()
        load = np.bincount(hosts.ravel(), minlength=R).astype(np.float64)
        im[li] = float(load.max() / load.mean()) if load.mean() > 0 else 1.0
    return {"node_sends": float(ns.mean()), "rank_sends": float(rs.mean()), "imbalance": float(im.mean())}
