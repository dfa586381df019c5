"""Dispatch traffic counted from the routed ids the serving engine really produced.

Counted directly from PHYSICAL expert ids (what the router emits inside vLLM when a plan is
active; equal to logical ids under the default layout): physical expert p lives on rank p // S
(vLLM's linear physical layout, S slots per rank). This is deliberately a separate, plain
implementation from `vllm_moeplace.metrics` (which works from logical ids and a plan), so that agreement
between the two on the same run is a real check of the plugin, the capture and the evaluator.

Token origin is uniform over ranks (the same assumption as the solver's metrics), under a stated
virtual topology (ranks grouped into nodes); or, for plans with redundant copies, each token's own
origin rank (`origin`), because which copy served a token depended on its origin (replica.py).
Physical slots may outnumber logical experts (copies): physical p lives on rank p // S with
S = num_physical / ep_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Traffic:
    ep_size: int
    nodes: tuple[tuple[int, ...], ...]
    tokens: int
    pairs_remote: float  # (token, expert) pairs sent to another rank, per token and layer
    rank_sends: float  # distinct remote ranks per token and layer
    node_sends: float  # distinct remote nodes per token and layer
    imbalance: float  # mean over layers of max/mean rank load
    rank_load: tuple[int, ...]  # (token, expert) pairs per rank, summed over layers

    def as_dict(self) -> dict:
        return {
            "ep_size": self.ep_size, "nodes": [list(n) for n in self.nodes], "tokens": self.tokens,
            "pairs_remote": self.pairs_remote, "rank_sends": self.rank_sends, "node_sends": self.node_sends,
            "imbalance": self.imbalance, "rank_load": list(self.rank_load),
        }


def count_traffic(
    physical_ids: np.ndarray, num_experts: int, nodes: list[list[int]], origin: np.ndarray | None = None
) -> Traffic:
    """physical_ids: int [T, L, K] routed physical expert ids (num_experts = physical slots in all);
    nodes: rank groups (a partition); origin: int [T] origin rank of each token, or None for
    origins uniform over ranks."""
    ids = np.asarray(physical_ids, dtype=np.int64)
    T, L, K = ids.shape
    R = sum(len(n) for n in nodes)
    if num_experts % R:
        raise ValueError(f"num_experts={num_experts} not divisible by ep_size={R}")
    S = num_experts // R
    node_of = np.empty(R, np.int64)
    for i, ranks in enumerate(nodes):
        node_of[list(ranks)] = i
    g = np.array([len(n) for n in nodes], np.float64)
    ranks = ids // S  # [T, L, K]
    # distinct ranks per (token, layer): one-hot over ranks, then any()
    hit_rank = np.zeros((T, L, R), bool)
    np.put_along_axis(hit_rank, ranks, True, axis=2)
    hit_node = np.zeros((T, L, len(nodes)), bool)
    np.put_along_axis(hit_node, node_of[ranks], True, axis=2)
    if origin is None:
        # origin o uniform: a hit rank is remote unless it is o (prob 1/R); a hit node is remote
        # unless o is on it (prob g_n / R)
        rank_sends = hit_rank.sum(axis=2).mean() * (1 - 1 / R)
        node_sends = (hit_node * (1 - g / R)).sum(axis=2).mean()
        pairs_remote = K * (1 - 1 / R)
    else:
        o = np.asarray(origin, dtype=np.int64)
        tt = np.arange(T)
        rank_sends = (hit_rank.sum(axis=2) - hit_rank[tt, :, o]).mean()
        node_sends = (hit_node.sum(axis=2) - hit_node[tt, :, node_of[o]]).mean()
        pairs_remote = float((ranks != o[:, None, None]).sum(axis=2).mean())
    load = np.zeros((L, R), np.int64)
    for li in range(L):
        load[li] = np.bincount(ranks[:, li].ravel(), minlength=R)
    imb = float(np.mean(load.max(axis=1) / load.mean(axis=1))) if T else 1.0
    return Traffic(R, tuple(tuple(n) for n in nodes), T, float(pairs_remote), float(rank_sends), float(node_sends),
                   imb, tuple(int(x) for x in load.sum(axis=0)))
