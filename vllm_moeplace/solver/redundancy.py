"""Redundant copies placed for balance only (`--copy-placement balance`, the earlier default).

The default placement is `solver/replicas.py` (locality under the replica rule). This one is kept
for comparison; its internal model splits a replicated expert's pairs evenly among its copies,
while plans are scored (and served) with the replica rule of `vllm_moeplace/replica.py`.

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


def add_replicas(
    layout: np.ndarray, load: np.ndarray, topology: Topology, extra_per_rank: int, copies: np.ndarray | None = None
) -> np.ndarray:
    """int64 [R, S + extra_per_rank]: `layout` (each expert once) plus redundant copies.

    `copies` (Step 1's counts) may be given when the primaries were already balanced for them.
    """
    R, S = layout.shape
    E = len(load)
    if copies is None:
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
    try:
        for e in todo:
            host_nodes = {int(node_of[r]) for r in hosts[e]}
            best, key = -1, None
            for r in range(R):
                if len(extra[r]) >= extra_per_rank or r in hosts[e]:
                    continue
                k = (rank_load[r], int(node_of[r]) in host_nodes, r < primary_rank[e], r)
                if key is None or k < key:
                    best, key = r, k
            if best < 0:  # every free slot is on a rank that holds e: make room by relocating a copy
                best = _make_room(int(e), extra, hosts, extra_per_rank, rank_load, per)
            extra[best].append(int(e))
            hosts[e].add(best)
            rank_load[best] += per[e]
    except _NoRoom:
        # The greedy painted itself into a corner (the last free slots all sit on ranks that hold
        # the expert, and no single move frees one). A max-flow finds copies on distinct ranks
        # whenever any exist; balance is then restored by the swaps of Step 3.
        extra = _flow_assign(layout, copies, extra_per_rank)
        rank_load = per[layout].sum(axis=1) + np.array([per[x].sum() for x in extra])
    _improve_extra(extra, layout, per, rank_load)
    return np.concatenate([layout, np.array(extra, dtype=np.int64).reshape(R, extra_per_rank)], axis=1)


def _make_room(e: int, extra: list[list[int]], hosts: list[set], cap: int, rank_load: np.ndarray, per: np.ndarray) -> int:
    """A rank r without e whose extra copy f can move to a rank r2 that has a free slot and no f;
    moves f and returns r (now with a free slot for e)."""
    R = len(extra)
    free = [r2 for r2 in range(R) if len(extra[r2]) < cap]
    for r in np.argsort(rank_load, kind="stable").tolist():
        if r in hosts[e]:
            continue
        for i, f in enumerate(extra[r]):
            r2 = next((q for q in free if q not in hosts[f]), None)
            if r2 is not None:
                extra[r].pop(i)
                hosts[f].discard(r)
                extra[r2].append(f)
                hosts[f].add(r2)
                rank_load[r] -= per[f]
                rank_load[r2] += per[f]
                return int(r)
    raise _NoRoom(e)


class _NoRoom(Exception):
    pass


def _flow_assign(layout: np.ndarray, copies: np.ndarray, extra_per_rank: int) -> list[list[int]]:
    """Extra copies on distinct ranks, none beside its expert's primary, `extra_per_rank` per rank:
    source -> expert (copies - 1) -> rank without it (1) -> sink (extra_per_rank), integral max
    flow. Raises ValueError naming the shortfall when no such assignment exists."""
    from ortools.graph.python import max_flow

    R, _ = layout.shape
    E = len(copies)
    primary = np.empty(E, dtype=np.int64)
    for r in range(R):
        primary[layout[r]] = r
    flow = max_flow.SimpleMaxFlow()
    src, sink = E + R, E + R + 1
    arcs = []
    for e in np.flatnonzero(copies > 1):
        flow.add_arc_with_capacity(src, int(e), int(copies[e]) - 1)
        for r in range(R):
            if r != primary[e]:
                arcs.append((flow.add_arc_with_capacity(int(e), E + r, 1), int(e), r))
    for r in range(R):
        flow.add_arc_with_capacity(E + r, sink, extra_per_rank)
    need = int((copies - 1).sum())
    if flow.solve(src, sink) != flow.OPTIMAL or flow.optimal_flow() < need:
        raise ValueError(
            f"add_replicas: {need} extra copies cannot sit on distinct ranks apart from their primaries "
            f"({R} ranks x {extra_per_rank} slots; most copies of one expert: {int(copies.max())})"
        )
    extra: list[list[int]] = [[] for _ in range(R)]
    for a, e, r in arcs:
        if flow.flow(a):
            extra[r].append(e)
    return extra


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


def rebalance(layout: np.ndarray, load: np.ndarray, topology: Topology, max_iters: int = 2000) -> np.ndarray:
    """Swap copies between ranks while the most-loaded rank gets lighter (copies split loads
    evenly, so any copy may move). Swaps inside a node are preferred: across nodes they can
    change which node a token's expert is fetched from."""
    a = layout.copy()
    R, S = a.shape
    holds = [set(map(int, a[r])) for r in range(R)]
    copies = np.bincount(a.ravel(), minlength=len(load))
    per = load / np.maximum(copies, 1)
    rl = per[a].sum(axis=1)
    node = topology.node_of_rank
    for _ in range(max_iters):
        hi = int(np.argmax(rl))
        best = None
        for i in range(S):
            e = int(a[hi, i])
            d = per[e] - per[a]  # [R, S]: load hi loses if e <-> a[r, j]
            new_max = np.maximum(rl[hi] - d, rl[:, None] + d)
            ok = (d > 1e-12) & (new_max < rl[hi] - 1e-9)
            ok[hi] = False
            for r, j in zip(*np.nonzero(ok)):
                f = int(a[r, j])
                if e in holds[r] or f in holds[hi]:
                    continue
                key = (node[r] != node[hi], float(new_max[r, j]))
                if best is None or key < best[0]:
                    best = (key, i, int(r), int(j), e, f)
        if best is None:
            break
        _, i, r, j, e, f = best
        a[hi, i], a[r, j] = f, e
        holds[hi].discard(e)
        holds[hi].add(f)
        holds[r].discard(f)
        holds[r].add(e)
        dd = per[e] - per[f]
        rl[hi] -= dd
        rl[r] += dd
    return a
