"""Co-activation greedy: grow node groups around hot experts, swap, then pack ranks by LPT.

This is both a baseline (the "greedy" row of the anchors table: node_sends-driven, blind to load)
and, with a load cap, the warm start of the CP-SAT pipeline.

Step 1: for each node in turn, seed it with the hottest unplaced expert, then keep adding the
        unplaced expert with the largest co-activation (tokens choosing both) with the group.
Step 2: pairwise swaps between nodes while node_sends drops (`swap_search.SwapSearch`).
Step 3: inside each node, experts onto ranks by longest-processing-time (heaviest expert to the
        least-loaded rank that still has a free slot).
"""

from __future__ import annotations

import time

import numpy as np

from vllm_moeplace.plan import Topology
from vllm_moeplace import trace_stats as stats
from vllm_moeplace.solver.instance import LayerInstance, node_weights
from vllm_moeplace.solver.swap_search import SwapSearch
from vllm_moeplace.trace import Trace


def coactivation_greedy(
    trace: Trace,
    layer_idx: int,
    topology: Topology,
    slots_per_rank: int | None = None,
    time_limit: float = 5.0,
) -> np.ndarray:
    """Baseline placement of MoE layer `layer_idx` (0-based index into trace.layer_ids).

    Returns int64 [R, S]: expert in slot s of rank r. S defaults to E / R; S > E / R adds
    redundant copies of the hottest experts (see `redundancy.add_replicas`).
    """
    from vllm_moeplace.solver.redundancy import add_replicas

    E, R = trace.num_experts, topology.ep_size
    if E % R:
        raise ValueError(f"coactivation_greedy: num_experts {E} not divisible by ep_size {R}")
    inst = LayerInstance.from_trace(trace, layer_idx)
    s = E // R
    sizes = topology.ranks_per_node * s
    assign = grow_groups(stats.coactivation(trace, layer_idx), inst.expert_load(), sizes)
    search = SwapSearch(inst, assign, node_weights(topology.ranks_per_node, R))
    search.descend(time.monotonic() + time_limit)
    layout = ranks_by_lpt(search.a, inst.expert_load(), topology, s)
    if slots_per_rank is not None and slots_per_rank > s:
        layout = add_replicas(layout, inst.expert_load(), topology, slots_per_rank - s)
    return layout


def grow_groups(coact: np.ndarray, load: np.ndarray, sizes: np.ndarray, cap: np.ndarray | None = None) -> np.ndarray:
    """Assignment [E] of experts to units of `sizes` slots, grown by co-activation (Step 1).

    coact: [E, E] tokens choosing both experts (`stats.coactivation`; the diagonal is ignored).

    With `cap` (max load per unit) an expert is only added where it fits; when nothing fits, the
    lightest unplaced expert is taken (the local search repairs what is left over).
    """
    E = len(load)
    W = np.asarray(coact, dtype=np.float64).copy()
    np.fill_diagonal(W, 0.0)
    assign = np.full(E, -1, dtype=np.int64)
    # Fill the units in order of size, largest first, so a big node gets the hottest cluster.
    for u in np.argsort(-np.asarray(sizes), kind="stable"):
        free = assign < 0
        room = np.inf if cap is None else cap[u]
        group_load = 0.0
        affinity = np.zeros(E)
        for k in range(int(sizes[u])):
            free = assign < 0
            fits = free & (group_load + load <= room)
            pool = fits if fits.any() else free
            if k == 0:
                score = np.where(pool, load, -np.inf)
            else:  # co-activation with the group, ties to the hotter expert
                score = np.where(pool, affinity + 1e-9 * load, -np.inf)
            if not fits.any():
                score = np.where(pool, -load, -np.inf)
            e = int(np.argmax(score))
            assign[e] = u
            group_load += load[e]
            affinity += W[e]
    return assign


def ranks_by_lpt(node_assign: np.ndarray, load: np.ndarray, topology: Topology, slots: int) -> np.ndarray:
    """int64 [R, slots]: each node's experts spread over its ranks, heaviest first (Step 3)."""
    layout = np.zeros((topology.ep_size, slots), dtype=np.int64)
    for n, ranks in enumerate(topology.nodes):
        experts = np.flatnonzero(node_assign == n)
        layout[ranks] = lpt_partition(experts, load, len(ranks), slots)
    return layout


def lpt_partition(experts: np.ndarray, load: np.ndarray, parts: int, slots: int) -> np.ndarray:
    """int64 [parts, slots]: `experts` split into equal-size parts with a small max load."""
    if len(experts) != parts * slots:
        raise ValueError(f"lpt_partition: {len(experts)} experts do not fill {parts} x {slots} slots")
    out = [[] for _ in range(parts)]
    tot = np.zeros(parts)
    for e in experts[np.argsort(-load[experts], kind="stable")]:
        open_ = [p for p in range(parts) if len(out[p]) < slots]
        p = min(open_, key=lambda q: (tot[q], q))
        out[p].append(int(e))
        tot[p] += load[e]
    return np.array(out, dtype=np.int64).reshape(parts, slots)
