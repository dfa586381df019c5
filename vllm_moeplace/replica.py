"""The one replica-selection rule: which physical copy of a logical expert serves a token.

Used by the serving path (the logical -> physical mapping after top-k), `moeplace evaluate` (the
metrics), the simulator and `moeplace bench` traffic counting. Pure numpy here; the serving path
runs the same tables through torch (`serving/mapping.py`), built from `candidate_table` below.

Physical slots follow vLLM's linear physical layout: with S slots per EP rank, physical id
p = r * S + s is rank r's local slot s, which holds logical expert `layout[r, s]`.

Rule `origin-node-spread/v1`, for a token with origin rank o, spread key t, choosing expert e at
top-k position k:

1. o holds a copy of e            -> that copy (no send at all);
2. else o's node holds copies     -> copy number (t*K + k) mod n among them, in ascending rank
                                     order (an intra-node send; spreads load over the node's copies);
3. else                           -> copy number (t*K + k) mod c among all c copies, in ascending
                                     rank order (spreads remote load evenly over the copies).

Deterministic, and it depends only on (origin, spread key, k, e), never on the executing rank:

- per-DP-rank routing before an all-to-all (GPU DeepEP paths): origin = the DP rank that holds
  the token, spread key = the token's index in that rank's batch;
- replicated tokens (TP+EP, allgather-reducescatter: every rank routes the same batch), where a
  rank-dependent choice would make the all-reduce count an expert twice or not at all: a virtual
  origin o = t mod R and spread key t // R from the token's batch index t, the same on every rank.

`moeplace evaluate` averages over origins (uniform, as every metric here) with spread key = the
token's row in the trace. Cost of the rule: one gather from a [R, E, C] table per (token, k), C =
the largest number of candidates any (origin, expert) has; without copies C = 1 and the rule is
the identity permutation table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REPLICA_RULE = "origin-node-spread/v1"


@dataclass(frozen=True)
class CandidateTable:
    """Per origin rank and logical expert: the physical ids the rule chooses among."""

    cand: np.ndarray  # int64 [R, E, C], padded with the first candidate
    count: np.ndarray  # int64 [R, E], >= 1
    slots_per_rank: int

    @property
    def ep_size(self) -> int:
        return int(self.cand.shape[0])


def physical_copies(layout: np.ndarray, num_experts: int) -> list[np.ndarray]:
    """Per logical expert, int64 physical ids of its copies in ascending order (= ascending rank)."""
    a = np.asarray(layout, dtype=np.int64)
    flat = a.reshape(-1)
    order = np.argsort(flat, kind="stable")  # physical ids grouped by expert, ascending within
    bounds = np.searchsorted(flat[order], np.arange(num_experts + 1))
    return [order[bounds[e] : bounds[e + 1]] for e in range(num_experts)]


def node_candidates(layout: np.ndarray, num_experts: int, node_of_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps 2-3 of the rule, per node: (cand int64 [N, E, C], count int64 [N, E]) = the physical
    ids an origin on node n that holds no copy of e chooses among (the node's copies, else all).

    They do not depend on which rank of the node the origin is, which is what lets the metrics
    and the solver work per node instead of per origin."""
    a = np.asarray(layout, dtype=np.int64)
    R, S = a.shape
    node_of_rank = np.asarray(node_of_rank, dtype=np.int64)
    N = int(node_of_rank.max()) + 1 if node_of_rank.size else 0
    copies = physical_copies(a, num_experts)
    missing = [e for e, c in enumerate(copies) if c.size == 0]
    if missing:
        raise ValueError(f"experts {missing[:8]} are on no rank")
    lists = [[c[node_of_rank[c // S] == n] for c in copies] for n in range(N)]
    lists = [[x if x.size else c for x, c in zip(row, copies)] for row in lists]
    C = max(x.size for row in lists for x in row)
    cand = np.empty((N, num_experts, C), dtype=np.int64)
    count = np.empty((N, num_experts), dtype=np.int64)
    for n, row in enumerate(lists):
        for e, x in enumerate(row):
            count[n, e] = x.size
            cand[n, e, : x.size] = x
            cand[n, e, x.size :] = x[0]
    return cand, count


def candidate_table(layout: np.ndarray, num_experts: int, node_of_rank: np.ndarray) -> CandidateTable:
    """The rule's candidates for a layer placed as `layout` (int [R, S]); see the module docstring."""
    a = np.asarray(layout, dtype=np.int64)
    R, S = a.shape
    node_of_rank = np.asarray(node_of_rank, dtype=np.int64)
    ncand, ncount = node_candidates(a, num_experts, node_of_rank)
    # Step 1: an origin holding a copy uses it (its first slot holding e, if it held two).
    own = np.full((R, num_experts), -1, dtype=np.int64)
    p = np.arange(a.size, dtype=np.int64)[::-1]  # reversed so the lowest slot is written last
    own[p // S, a.reshape(-1)[p]] = p
    cand = ncand[node_of_rank]  # [R, E, C] (a copy: fancy indexing)
    count = ncount[node_of_rank]
    held = own >= 0
    cand[held] = own[held][:, None]
    count[held] = 1
    # A node whose every rank holds e widened the node table; no origin uses that width.
    C = int(count.max())
    return CandidateTable(cand=np.ascontiguousarray(cand[:, :, :C]), count=count, slots_per_rank=S)


def select(table: CandidateTable, ids: np.ndarray, origin: np.ndarray | int, spread: np.ndarray) -> np.ndarray:
    """Physical ids int64 [T, K] for logical `ids` [T, K], per-token origin rank [T] (or one rank
    for all) and spread key [T]."""
    ids = np.asarray(ids, dtype=np.int64)
    T, K = ids.shape
    o = np.broadcast_to(np.asarray(origin, dtype=np.int64), (T,))[:, None]
    key = np.asarray(spread, dtype=np.int64)[:, None] * K + np.arange(K)[None, :]
    j = key % table.count[o, ids]
    return table.cand[o, ids, j]


def replicated_origin(num_tokens: int, ep_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(origin, spread) for replicated-token paths (TP+EP): virtual origin t mod R, key t // R."""
    t = np.arange(num_tokens, dtype=np.int64)
    return t % ep_size, t // ep_size


def is_identity_rule(layout: np.ndarray, num_experts: int) -> bool:
    """True when every expert has exactly one copy: the rule picks that copy whatever the origin."""
    a = np.asarray(layout)
    return a.size == num_experts and np.unique(a).size == num_experts
