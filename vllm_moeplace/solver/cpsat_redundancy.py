"""Redundant copies (`--redundant-per-rank N`): which experts get extra copies, and where.

Evaluation rules (from the issue): a replicated expert's pairs split evenly among its copies for
load; for dispatch an origin rank uses a copy on itself, else on its node, else the lowest-numbered
rank holding it.

Step 1: copy counts: repeatedly give one more copy to the expert with the largest load per copy
        (as EPLB does: this minimises the largest single item to pack).
Step 2: each extra copy, heaviest per-copy load first, goes to the least-loaded rank (per-copy
        loads) that has a free extra slot and does not hold the expert yet; ties prefer a node
        without a copy (a copy on a new node also saves that node's origins a remote send) and a
        rank numbered after the primary copy (so remote origins keep using the co-located one).
Step 3: swap extra copies between ranks while the largest rank load drops.
"""

from __future__ import annotations

import numpy as np

from vllm_moeplace.plan import Topology


def copy_counts(load: np.ndarray, extra: int, max_copies: int) -> np.ndarray:
    """int64 [E]: copies per expert (>= 1) after handing out `extra` additional copies."""
    copies = np.ones(len(load), dtype=np.int64)
    for _ in range(extra):
        per = np.where(copies < max_copies, load / copies, -np.inf)
        copies[int(np.argmax(per))] += 1
    return copies


def add_replicas(layout: np.ndarray, load: np.ndarray, topology: Topology, extra_per_rank: int) -> np.ndarray:
    """int64 [R, S + extra_per_rank]: `layout` (each expert once) plus redundant copies."""
    R, S = layout.shape
    E = len(load)
    copies = copy_counts(load, R * extra_per_rank, R)
    per = load / copies
    hosts = [set() for _ in range(E)]
    primary_rank = np.zeros(E, dtype=np.int64)
    for r in range(R):
        for e in layout[r]:
            hosts[int(e)].add(r)
            primary_rank[e] = r
    rank_load = per[layout].sum(axis=1)
    extra = [[] for _ in range(R)]
    node_of = topology.node_of_rank
    todo = [e for e in np.argsort(-per, kind="stable") for _ in range(int(copies[e]) - 1)]
    for e in todo:
        host_nodes = {int(node_of[r]) for r in hosts[e]}
        best, key = -1, None
        for r in range(R):
            if len(extra[r]) >= extra_per_rank or r in hosts[e]:
                continue
            k = (rank_load[r], int(node_of[r]) in host_nodes, r < primary_rank[e], r)
            if key is None or k < key:
                best, key = r, k
        if best < 0:  # every free slot is on a rank that holds e: move a lighter copy away
            raise ValueError(f"add_replicas: no rank can take another copy of expert {e}")
        extra[best].append(int(e))
        hosts[e].add(best)
        rank_load[best] += per[e]
    _improve_extra(extra, layout, per, rank_load)
    return np.concatenate([layout, np.array(extra, dtype=np.int64).reshape(R, extra_per_rank)], axis=1)


def _improve_extra(extra: list[list[int]], layout: np.ndarray, per: np.ndarray, rank_load: np.ndarray) -> None:
    """Step 3: swap extra copies between the most-loaded rank and others while its load drops."""
    R = len(extra)
    held = [set(map(int, layout[r])) | set(extra[r]) for r in range(R)]
    for _ in range(4 * R * max(1, len(extra[0]))):
        hi = int(np.argmax(rank_load))
        best = None
        for i, e in enumerate(extra[hi]):
            for r in range(R):
                if r == hi:
                    continue
                for j, f in enumerate(extra[r]):
                    if e == f or e in held[r] or f in held[hi]:
                        continue
                    d = per[e] - per[f]
                    new_max = max(rank_load[hi] - d, rank_load[r] + d)
                    if d > 0 and new_max < rank_load[hi] - 1e-9 and (best is None or new_max < best[0]):
                        best = (new_max, i, r, j, e, f, d)
        if best is None:
            return
        _, i, r, j, e, f, d = best
        extra[hi][i], extra[r][j] = f, e
        held[hi].discard(e)
        held[hi].add(f)
        held[r].discard(f)
        held[r].add(e)
        rank_load[hi] -= d
        rank_load[r] += d
