"""Placement metrics when requests are routed to groups of DP ranks (issue 12).

`metrics.py` scores a placement with every token starting on a uniformly random rank. Here a
token starts on a rank of its request's group, uniform over that group's ranks (a request the
router spreads evenly: uniform over all ranks), so

- node_sends(t) = Σ_o w_o(t) |{node(host(o, t, k))}_k \\ {node(o)}|,  w_o(t) = [o in group(t)] / |group(t)|,
- rank_sends(t) = Σ_o w_o(t) |{host(o, t, k)}_k \\ {o}|,
- rank load_r   = Σ_t Σ_o w_o(t) |{k : host(o, t, k) = r}|, imbalance = max_r / mean_r (mean over layers),

host(o, t, k) by the same replica rule as everywhere (`replica`: o itself if it holds a copy,
else a copy on o's node, else any copy), spread key = the token's row in the trace. With every
token spread evenly these are exactly `metrics.evaluate_layers`' node_sends, rank_sends and
imbalance (tested). node_sends is reported for prefill and decode tokens separately.

Pure numpy: no vLLM or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_moeplace.metrics import _check_inputs, _holds, rule_hosts
from vllm_moeplace.plan import Plan, Topology
from vllm_moeplace.trace import Trace


@dataclass(frozen=True)
class RoutedMetrics:
    node_sends: float  # all tokens
    node_sends_prefill: float  # nan without prefill tokens
    node_sends_decode: float  # nan without decode tokens
    rank_sends: float
    imbalance: float  # mean over layers of max / mean rank load
    imbalance_per_layer: np.ndarray  # float [L]
    num_prefill: int
    num_decode: int

    def as_dict(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in ("node_sends", "node_sends_prefill", "node_sends_decode",
                                                     "rank_sends", "imbalance")}


def origin_weights(token_group: np.ndarray, group_ranks: tuple[tuple[int, ...], ...], R: int) -> np.ndarray:
    """float [R, T]: probability that token t starts on rank o (group -1: uniform over all)."""
    T = len(token_group)
    W = np.zeros((R, T))
    spread = token_group < 0
    W[:, spread] = 1.0 / R
    for g, ranks in enumerate(group_ranks):
        sel = token_group == g
        W[np.ix_(np.asarray(ranks), np.flatnonzero(sel))] = 1.0 / len(ranks)
    return W


def evaluate_routed(layers: dict[int, np.ndarray], topology: Topology, trace: Trace, token_group: np.ndarray,
                    group_ranks: tuple[tuple[int, ...], ...]) -> RoutedMetrics:
    """Score per-layer placements {decoder layer: int [R, S]} with each token starting on its
    group's ranks (token_group int [T], -1 = spread evenly over all ranks)."""
    placed = _check_inputs(layers, topology, trace)
    E, R, N = trace.num_experts, topology.ep_size, topology.num_nodes
    T, L, K = trace.topk_ids.shape
    W = origin_weights(np.asarray(token_group), group_ranks, R)
    nor = topology.node_of_rank
    ns_tok = np.zeros(T)  # summed over layers
    rs_tok = np.zeros(T)
    imb = np.zeros(L)
    for li, lid in enumerate(trace.layer_ids.tolist()):
        a = placed[lid]
        ids = trace.topk_ids[:, li, :].astype(np.int64)  # [T, K]
        holds = _holds(a, E)
        D = rule_hosts(a, topology, E, ids)  # [N, T, K]: host for an origin on node n without a copy
        load = np.zeros(R)
        for o in range(R):
            w = W[o]
            sel = np.flatnonzero(w > 0)
            if not sel.size:
                continue
            n = int(nor[o])
            hosts = np.where(holds[o][ids[sel]], o, D[n][sel])  # [t, K]
            member = np.zeros((sel.size, N), dtype=bool)
            member[np.arange(sel.size)[:, None], nor[hosts]] = True
            ns_tok[sel] += w[sel] * (member.sum(axis=1) - member[:, n])
            hs = np.sort(hosts, axis=1)
            distinct = np.ones_like(hs, dtype=bool)
            distinct[:, 1:] = hs[:, 1:] != hs[:, :-1]
            rs_tok[sel] += w[sel] * (distinct.sum(axis=1) - (hs == o).any(axis=1))
            load += np.bincount(hosts.ravel(), weights=np.repeat(w[sel], K), minlength=R)
        imb[li] = float(load.max() / load.mean()) if load.mean() > 0 else 1.0
    pre = trace.is_prefill

    def mean(mask: np.ndarray) -> float:
        return float(ns_tok[mask].mean() / L) if mask.any() else float("nan")

    return RoutedMetrics(
        node_sends=float(ns_tok.mean() / L),
        node_sends_prefill=mean(pre),
        node_sends_decode=mean(~pre),
        rank_sends=float(rs_tok.mean() / L),
        imbalance=float(imb.mean()),
        imbalance_per_layer=imb,
        num_prefill=int(pre.sum()),
        num_decode=int((~pre).sum()),
    )


@dataclass(frozen=True)
class RoutingScore:
    """A request-aware plan on one set of requests: routed by the plan's router vs spread evenly."""

    routed: RoutedMetrics
    spread: RoutedMetrics  # the same placement, every request spread evenly over the ranks
    share_imbalance: float  # max group requests / fair share
    token_share_imbalance: float  # max group tokens / fair share
    fallback_requests: int  # requests without a signature (sent by the fallback)

    def as_dict(self) -> dict:
        return {"routed": self.routed.as_dict(), "spread": self.spread.as_dict(),
                "share_imbalance": self.share_imbalance, "token_share_imbalance": self.token_share_imbalance,
                "fallback_requests": self.fallback_requests}


def score_routing(plan: Plan, trace: Trace, window: int = 1, prefix_tokens: int = 0) -> RoutingScore:
    """Route each request of `trace` by the plan's router from its own prefill signature (never
    its decode routing; `window` consecutive arrivals at a time), score the placement with those
    origins, and with requests spread evenly."""
    from vllm_moeplace.request_routing import route_trace, share_imbalance, signatures

    routing = plan.request_routing
    if routing is None:
        raise ValueError(f"{plan.source}: the plan has no request_routing section")
    tok_group, req_group = route_trace(routing, trace, window, prefix_tokens)
    G = routing.num_groups
    routed = evaluate_routed(plan.layers, plan.topology, trace, tok_group, routing.group_ranks)
    spread = evaluate_routed(plan.layers, plan.topology, trace, np.full(trace.num_tokens, -1), routing.group_ranks)
    tok_share = float(np.bincount(tok_group, minlength=G).max() * G / max(trace.num_tokens, 1))
    ok = signatures(trace, routing.layers, prefix_tokens)[2]
    return RoutingScore(routed, spread, share_imbalance(req_group, G), tok_share, int((~ok).sum()))
