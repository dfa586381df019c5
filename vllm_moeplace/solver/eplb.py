"""DeepSeek's Expert Parallelism Load Balancer (EPLB), re-implemented from its published description
(github.com/deepseek-ai/EPLB README; the same policy is vLLM's `distributed/eplb` default).

Vocabulary: a *logical* expert is a routed expert of the checkpoint; a *physical* expert is one
copy of it in a slot; R ranks ("GPUs") each hold S slots, R * S = E + redundant copies.

Hierarchical policy (used when expert groups divide evenly over nodes):
  Step 1. Pack expert groups (contiguous blocks of E / num_groups experts) onto nodes, balancing
          the per-node load.
  Step 2. Inside each node, replicate: repeatedly give one more copy to the expert with the
          highest load per copy, until the node's slots are used.
  Step 3. Pack the node's physical experts onto its ranks, balancing per-rank load.
Global policy: steps 2 and 3 over all ranks as one node (used when groups do not divide nodes).

Balanced packing: items in descending load order, each into the lightest pack that still has room.

Two deliberate differences from the published code, because our plan format forbids an expert
twice on one rank (`validate_plan`): replication stops giving copies to an expert that already
has one per rank of the node, and packing skips packs that already hold a copy of the same
logical expert (with a swap repair in the rare case that no pack with room is eligible).
Without redundancy neither rule ever triggers, so the result is the published algorithm's.

Pure numpy: no vLLM or torch.
"""

from __future__ import annotations

import numpy as np

from vllm_moeplace.errors import MoeplaceError


class EplbError(MoeplaceError):
    """The EPLB preconditions (divisibility, equal node sizes) do not hold."""


def balanced_packing(weight: np.ndarray, num_packs: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Assign n items to num_packs packs of n / num_packs items each, balancing pack weight.

    weight: float [n]; labels: optional int [n], items with equal label never share a pack.
    Returns pack index int [n]. Precondition: n % num_packs == 0.
    """
    n = weight.shape[0]
    if n % num_packs:
        raise EplbError(f"balanced_packing: {n} items do not split into {num_packs} equal packs")
    cap = n // num_packs
    pack = np.full(n, -1, dtype=np.int64)
    if cap == 1:  # one item per pack: nothing to balance, and no pack can hold a label twice
        return np.arange(n, dtype=np.int64)
    pack_w = np.zeros(num_packs)
    pack_n = np.zeros(num_packs, dtype=np.int64)
    members: list[set[int]] = [set() for _ in range(num_packs)]
    # Stable descending order: equal loads keep index order, so results are reproducible.
    for i in np.argsort(-weight, kind="stable"):
        lab = int(labels[i]) if labels is not None else -1
        open_ = pack_n < cap
        if labels is not None:
            open_ &= np.array([lab not in m for m in members])
        if not open_.any():
            p = _repair(i, lab, pack, pack_n, cap, labels, members)
        else:
            p = int(np.flatnonzero(open_)[np.argmin(pack_w[open_])])
        pack[i] = p
        pack_w[p] += weight[i]
        pack_n[p] += 1
        members[p].add(lab)
    return pack


def _repair(i: int, lab: int, pack: np.ndarray, pack_n: np.ndarray, cap: int, labels: np.ndarray | None,
            members: list[set[int]]) -> int:
    """Every pack with room already holds label `lab`: move an item x from a full pack q without
    `lab` into a pack p with room that lacks x's label, and give q's freed place to item i."""
    assert labels is not None
    for p in np.flatnonzero(pack_n < cap):
        for q in range(len(members)):
            if lab in members[q]:
                continue
            for x in np.flatnonzero(pack == q):
                xl = int(labels[x])
                if xl not in members[p]:
                    pack[x] = p
                    members[q].discard(xl)
                    members[p].add(xl)
                    pack_n[q] -= 1
                    pack_n[p] += 1
                    return q
    raise EplbError(f"cannot place a copy of expert {lab} without putting it twice on one rank")


def replicate(weight: np.ndarray, num_physical: int, max_copies: int) -> np.ndarray:
    """Copies per logical expert: start at one each, then give each extra copy to the expert with
    the largest load per copy (ties: lowest id), never more than `max_copies`. int [n]."""
    n = weight.shape[0]
    if num_physical < n or num_physical > n * max_copies:
        raise EplbError(f"cannot spread {n} experts over {num_physical} slots of {max_copies} rank(s) "
                        f"without putting an expert twice on one rank")
    cnt = np.ones(n, dtype=np.int64)
    for _ in range(num_physical - n):
        per_copy = np.where(cnt < max_copies, weight / cnt, -np.inf)
        cnt[int(np.argmax(per_copy))] += 1
    return cnt


def _place_in_node(weight: np.ndarray, experts: np.ndarray, ranks: list[int], slots: int) -> np.ndarray:
    """Steps 2-3 for one node: replicate `experts` into len(ranks)*slots copies and pack them.
    Returns int [len(ranks), slots] of logical expert ids (rows follow `ranks`)."""
    g = len(ranks)
    w = weight[experts].astype(np.float64)
    cnt = replicate(w, g * slots, max_copies=g)
    phys = np.repeat(np.arange(experts.size), cnt)  # physical copy -> local index
    pack = balanced_packing(w[phys] / cnt[phys], g, labels=phys)
    out = np.empty((g, slots), dtype=np.int64)
    for p in range(g):
        # Order a rank's slots by expert id: slot order carries no meaning for the metrics.
        out[p] = np.sort(experts[phys[pack == p]])
    return out


def eplb_layer(weight: np.ndarray, nodes: list[list[int]], slots_per_rank: int, num_groups: int | None) -> np.ndarray:
    """EPLB placement of one layer.

    weight: float [E] expert load; nodes: rank ids per node (equal sizes for the hierarchical
    policy); num_groups: expert groups (contiguous id blocks), None = global policy.
    Returns int [R, slots_per_rank] of logical expert ids, row r = rank r.
    """
    E = weight.shape[0]
    R = sum(len(n) for n in nodes)
    N = len(nodes)
    out = np.empty((R, slots_per_rank), dtype=np.int64)
    if num_groups is None:
        # Global: all ranks one node, rank order as numbered.
        ranks = sorted(r for n in nodes for r in n)
        out[ranks] = _place_in_node(weight, np.arange(E), ranks, slots_per_rank)
        return out
    if len({len(n) for n in nodes}) != 1:
        raise EplbError(f"hierarchical EPLB needs equal ranks per node, got node sizes {[len(n) for n in nodes]}")
    if E % num_groups or num_groups % N:
        raise EplbError(f"hierarchical EPLB needs num_groups | num_experts and num_nodes | num_groups; got "
                        f"num_experts={E}, num_groups={num_groups}, num_nodes={N}")
    # Step 1: groups onto nodes.
    group_size = E // num_groups
    group_w = weight.reshape(num_groups, group_size).sum(axis=1)
    node_of_group = balanced_packing(group_w.astype(np.float64), N)
    for n, ranks in enumerate(nodes):
        # A node's experts in the order their groups were packed (heaviest group first), as the
        # published algorithm numbers them; this order only matters for tie-breaking.
        mine = np.flatnonzero(node_of_group == n)
        mine = mine[np.argsort(-group_w[mine], kind="stable")]
        experts = np.concatenate([np.arange(g * group_size, (g + 1) * group_size) for g in mine])
        # Steps 2-3 within the node.
        try:
            out[sorted(ranks)] = _place_in_node(weight, experts, sorted(ranks), slots_per_rank)
        except EplbError as e:
            raise EplbError(f"hierarchical EPLB, node {n} ({len(ranks)} ranks): {e}; "
                            f"redundant copies need several ranks per node (or use eplb_global)") from None
    return out
