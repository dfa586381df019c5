"""Step 2: the experts of each node onto its ranks (longest-processing-time, then in-node swaps
down to the rank cap, and for objectives that price ranks, fewer distinct ranks per token)."""

from __future__ import annotations

import time

import numpy as np

from vllm_moeplace.plan import Topology
from vllm_moeplace.solver.budget import RANK_SEARCH_S
from vllm_moeplace.solver.greedy import lpt_partition
from vllm_moeplace.solver.instance import LayerInstance
from vllm_moeplace.solver.swap_search import SwapSearch


def place_ranks(
    inst: LayerInstance,
    node_assign: np.ndarray,
    topology: Topology,
    s: int,
    load: np.ndarray,
    cap_factor: float,
    rank_weight: np.ndarray | None,
    risk: np.ndarray | None = None,
    eclass: np.ndarray | None = None,
    deadline: float = np.inf,
) -> tuple[np.ndarray, float]:
    """(layout int64 [R, s], train rank imbalance). cap_factor: rank cap as a multiple of the mean
    rank load. rank_weight: the objective's per-rank token cost (None: balance only). eclass
    (group-preserving mode): expert groups; every rank then gets exactly as many experts of each
    group as its slots p = r * s + j belong to, in slot order. deadline: when the in-node search
    stops at the latest (a time.monotonic() value)."""
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
        cap = np.full(R, load.sum() / R * cap_factor)
        rw = np.zeros(R) if rank_weight is None else rank_weight
        # Balance only (no rank weight): every swap costs 0, so the patterns change no decision;
        # an instance without them makes the same swaps without P x R counts per repair step.
        pats = inst if rank_weight is not None else LayerInstance(inst.patterns[:0], inst.counts[:0], inst.num_experts)
        search = SwapSearch(pats, rank_of, rw, cap, unit_group=topology.node_of_rank, load=load, risk=risk, expert_class=eclass)
        search.repair(min(deadline, time.monotonic() + RANK_SEARCH_S))
        if rank_weight is not None:
            search.descend(min(deadline, time.monotonic() + RANK_SEARCH_S))
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
