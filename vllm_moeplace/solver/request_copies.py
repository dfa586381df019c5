"""Step 3 with request groups inside nodes: redundant copies when tokens start on their group's
ranks and those are not all of a node's ranks (groups of whole nodes use the exact locality copies
of `replicas` with per-token origin weights instead; `layer.solve_layer` chooses).

With origins concentrated on a group's node, a copy of expert e on node n is worth the pairs of
n's tokens that choose e (they stop crossing nodes), and copies spread a hot expert's load over
ranks. Both are priced with the replica rule's expected pair loads (`replica`), given the origin
probabilities W [R, T] (`routed_metrics.origin_weights`):

- an origin o holding e serves its own pairs on e;
- other origins of node n reach n's c_n(e) copies evenly (the rule's spread key);
- a node with no copy sends its pairs to all c(e) copies evenly.

    cost = remote pairs + MU * Σ_r max(0, load_r - cap),   cap = max_imbalance x mean rank load

MU makes the load cap come first (a hard bound where copies can meet it, the least overflow where
they cannot). Greedy: each free slot (R x redundant_per_rank of them) gets the (expert, rank)
copy of lowest cost, then single-copy moves (drop a copy of an expert that has another, add the
best one on that rank) while they lower the cost. Pair counts ignore that two experts of one
token on one remote node are one send; the routed evaluator (`routed_metrics`) scores exactly.
"""

from __future__ import annotations

import numpy as np

from vllm_moeplace.plan import Topology
from vllm_moeplace.trace import Trace

MU = 1e3  # weight of load overflow against remote pairs
_MOVE_PASSES = 3


class CopyModel:
    """Expected pair loads and remote pairs of a layout with copies, for fixed origins."""

    def __init__(self, trace: Trace, l: int, W: np.ndarray, topology: Topology, max_imbalance: float):
        E, R = trace.num_experts, topology.ep_size
        ids = trace.topk_ids[:, l, :].astype(np.int64)  # [T, K]
        K = ids.shape[1]
        # dr[o, e]: expected pairs on e from origin o; dn[n, e]: from origins on node n.
        self.dr = np.stack([np.bincount(ids.ravel(), weights=np.repeat(W[o], K), minlength=E) for o in range(R)])
        self.node = topology.node_of_rank
        N = topology.num_nodes
        self.dn = np.zeros((N, E))
        np.add.at(self.dn, self.node, self.dr)
        self.R, self.N, self.E = R, N, E
        self.cap = max_imbalance * self.dr.sum() / R

    def columns(self, holds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float [R, E] load each rank serves for each expert, float [E] remote pairs per expert).

        Column e depends on column e of holds only, which is what lets the greedy price adding a
        copy of every expert to one rank with one call (set the whole row, read each column)."""
        hn = np.zeros((self.N, self.E))
        np.add.at(hn, self.node, holds.astype(np.float64))  # c_n(e)
        total = hn.sum(axis=0)  # c(e)
        remote = (self.dn * (hn == 0)).sum(axis=0)  # [E] pairs from nodes without a copy
        # Origins on node n without a copy of e reach n's c_n(e) copies evenly.
        node_rest = np.zeros((self.N, self.E))
        np.add.at(node_rest, self.node, self.dr * ~holds)
        per_copy_local = np.where(hn > 0, node_rest / np.maximum(hn, 1), 0.0)  # [N, E]
        per_copy_remote = remote / np.maximum(total, 1)  # [E]: spread over all copies
        C = self.dr * holds + holds * (per_copy_local[self.node] + per_copy_remote[None, :])
        return C, remote

    def loads_and_remote(self, holds: np.ndarray) -> tuple[np.ndarray, float]:
        """(float [R] rank loads, remote pairs) of holds bool [R, E]."""
        C, remote = self.columns(holds)
        return C.sum(axis=1), float(remote.sum())

    def overflow(self, load: np.ndarray) -> np.ndarray:
        """Σ_r max(0, load_r - cap) along axis 0 (load [R] or [R, candidates])."""
        return np.maximum(load - self.cap, 0).sum(axis=0)

    def add_costs(self, holds: np.ndarray, r: int) -> np.ndarray:
        """float [E]: cost after adding a copy of e on rank r, for every e (inf where r holds e)."""
        C, rem = self.columns(holds)
        H = holds.copy()
        H[r] = True
        Cn, remn = self.columns(H)
        load = C.sum(axis=1)[:, None] - C + Cn  # [R, E]: rank loads with the one new copy
        out = rem.sum() - rem + remn + MU * self.overflow(load)
        out[holds[r]] = np.inf
        return out

    def imbalance(self, layout: np.ndarray) -> float:
        """max / mean expected rank load of a layout [R, S]."""
        holds = np.zeros((self.R, self.E), dtype=bool)
        holds[np.repeat(np.arange(self.R), layout.shape[1]), layout.ravel()] = True
        load = self.loads_and_remote(holds)[0]
        return float(load.max() / load.mean()) if load.mean() > 0 else 1.0

    def cost(self, holds: np.ndarray) -> float:
        load, remote = self.loads_and_remote(holds)
        return remote + MU * float(np.maximum(load - self.cap, 0).sum())


def place_request_copies(model: CopyModel, layout: np.ndarray, per_rank: int) -> np.ndarray:
    """Layout [R, S + per_rank]: the primaries of `layout` [R, S] plus greedy copies."""
    R, E = model.R, model.E
    holds = np.zeros((R, E), dtype=bool)
    holds[np.repeat(np.arange(R), layout.shape[1]), layout.ravel()] = True
    primary = holds.copy()
    free = np.full(R, per_rank)
    for _ in range(R * per_rank):
        costs = np.full((R, E), np.inf)
        for r in np.flatnonzero(free):
            costs[r] = model.add_costs(holds, r)
        r, e = np.unravel_index(int(np.argmin(costs)), costs.shape)  # first minimum, rank-major
        holds[r, e] = True
        free[r] -= 1
    cur = model.cost(holds)
    # Moves: a copy (not a primary) to another expert on the same rank, while the cost drops.
    for _ in range(_MOVE_PASSES):
        improved = False
        for r in range(R):
            for e in np.flatnonzero(holds[r] & ~primary[r]):
                holds[r, e] = False
                costs = model.add_costs(holds, r)
                costs[e] = np.inf
                f = int(np.argmin(costs))
                if costs[f] < cur - 1e-9:
                    holds[r, f] = True
                    cur = float(costs[f])
                    improved = True
                else:
                    holds[r, e] = True
        if not improved:
            break
    extra = [np.flatnonzero(holds[r] & ~primary[r]) for r in range(R)]
    return np.concatenate([layout, np.array(extra, dtype=np.int64).reshape(R, per_rank)], axis=1)
