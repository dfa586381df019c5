"""Redundant copies placed for locality under the replica rule (`--redundant-per-rank N`).

Given a primary layout (every expert once, from Steps 1-2 of the solver), fill the N extra slots
of every rank so that train node_sends under the one replica rule (`vllm_moeplace.replica`,
origin-node-spread/v1) is as low as possible while every rank's expected load under the same
rule stays under `cap` (max_imbalance x the mean rank load).

Why copies save sends: an origin on node u whose token picks expert e needs no message to e's
node when u holds a copy of e; the saving is real only for tokens whose other experts do not need
that node anyway, so it is counted token by token, exactly, not estimated from loads.

State, per origin node m (the rule's host depends on an origin only through its node, except for
its own copies, which are on its node too; see `metrics.rule_hosts`):
  HN[m, p]    node serving pair p (flat index t*K + k of the train tokens) for origins on m;
  C[m, t, v]  how many of token t's experts origins on m fetch from node v.
node_sends x T x R = sum_m g_m sum_t |{v != m : C[m, t, v] > 0}|. Changing the copy set of one
expert e only changes HN on e's pairs, so the exact delta of any change touches those pairs only:
a pair moving from node v to node w costs [w != m and C[m,t,w] == 0] - [v != m and C[m,t,v] == 1].
The spread part of the rule (copy (t*K + k) mod c) is evaluated with the real keys, so the
deltas are those of the metric, not of an approximation of it.

Rank loads follow the rule's load model (`metrics.rule_rank_load`): a pair on e counts 1/R at
every origin holding e, and (g_m - h_m(e)) / R at the copy the rule picks for node m's other
origins. It depends on e's copy set and on its pairs' keys only, so it is recomputed per expert.

Search: greedy (feasibility first: least overflow over the cap; then the largest exact decrease
of node_sends; then the lowest max rank load), one copy at a time on the lightest free rank of the
chosen node; then replacement descent: every extra slot in turn is emptied and refilled with the
best expert for it, kept when strictly better. Deterministic (no randomness, fixed order).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from vllm_moeplace.plan import Topology
from vllm_moeplace.solver.instance import LayerInstance

_EPS = 1e-9


class CopyPlacementError(ValueError):
    """The extra slots cannot be filled (names the shortfall)."""


@dataclass(frozen=True)
class CopyResult:
    layout: np.ndarray  # int64 [R, S + n]: primaries, then the extra copies
    node_cost: float  # train node_sends x T x R under the rule
    start_node_cost: float  # same, primaries only
    rank_imbalance: float  # train max / mean rank load under the rule
    overflow: float  # sum over ranks of load above the cap (0: the cap holds)


class CopyState:
    """Exact node_sends and rank loads of one layer under the replica rule, as copies change."""

    def __init__(
        self, ids: np.ndarray, layout: np.ndarray, topology: Topology, num_experts: int, cap: float, risk: np.ndarray | None = None,
        origin: np.ndarray | None = None,
    ):
        ids = np.asarray(ids, dtype=np.int64)
        # Origin weights float [N, T]: R x the probability that token t starts on node m, uniform
        # over that node's ranks (request groups, `request_routing`); None: uniform over all ranks,
        # i.e. g[m] for every token (the exact integer arithmetic below).
        self.Wn = None if origin is None else np.asarray(origin, dtype=np.float64)
        self.T, self.K = ids.shape
        self.E = num_experts
        self.R = topology.ep_size
        self.S = int(np.asarray(layout).shape[1])  # primary slots per rank
        self.N = topology.num_nodes
        self.node = np.asarray(topology.node_of_rank, dtype=np.int64)
        self.g = np.asarray(topology.ranks_per_node, dtype=np.int64)
        self.cap = float(cap)
        flat = ids.ravel()
        self.flat_ids = flat
        self.flat_tok = np.arange(flat.size, dtype=np.int64) // self.K
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(self.E + 1))
        # Pairs of each expert: their flat index = the rule's spread key t*K + k.
        self.pairs = [order[bounds[e] : bounds[e + 1]] for e in range(self.E)]
        self.ptok = [p // self.K for p in self.pairs]
        self.holders: list[list[int]] = [[] for _ in range(self.E)]
        for r, row in enumerate(np.asarray(layout, dtype=np.int64)):
            for e in row:
                self.holders[int(e)].append(r)
        for h in self.holders:
            h.sort()
        if any(not h for h in self.holders):
            raise CopyPlacementError("the primary layout misses experts " + str([e for e, h in enumerate(self.holders) if not h][:8]))
        self._residues: dict[tuple[int, int], np.ndarray] = {}
        self.HN = np.empty((self.N, flat.size), dtype=np.int64)
        self.C = np.zeros((self.N, self.T, self.N), dtype=np.int32)
        self.LV = np.zeros((self.E, self.R))
        for e in range(self.E):
            for m in range(self.N):
                self.HN[m, self.pairs[e]] = self._host_nodes(e, self.holders[e], m)
            self.LV[e] = self.expert_load(e, self.holders[e])
        tok = np.repeat(np.arange(self.T), self.K)
        for m in range(self.N):
            np.add.at(self.C[m], (tok, self.HN[m]), 1)
        self.RL = self.LV.sum(axis=0)
        # Optional held-out risk (`trace_stats.load_risk`, scaled by balance_risk^2): rank r serves the
        # share F[e, r] = LV[e, r] / load_e of each expert's pairs, so its held-out load drifts with
        # std sqrt(F[:, r]' Q F[:, r]); the cap must hold with that margin.
        self.Q = None if risk is None else np.asarray(risk, dtype=np.float64)
        self.n_pairs = np.array([max(1, p.size) for p in self.pairs], dtype=np.float64)
        self.var = np.zeros(self.R)
        if self.Q is not None:
            self.F = self.LV / self.n_pairs[:, None]
            self.QF = self.Q @ self.F
            self.var = (self.F * self.QF).sum(axis=0)

    def margin(self, var: np.ndarray | None = None) -> np.ndarray:
        v = self.var if var is None else var
        return np.sqrt(np.maximum(v, 0.0))

    def _var_after(self, e: int, lv: np.ndarray) -> np.ndarray:
        if self.Q is None:
            return self.var
        dF = lv / self.n_pairs[e] - self.F[e]
        return self.var + 2 * dF * self.QF[e] + dF * dF * self.Q[e, e]

    def local_gain(self, u: int) -> np.ndarray:
        """float [E]: exact decrease of node_cost from node u's origins alone if u held every
        expert (pairs u fetches from a node no other expert of the token needs). Adding a copy of
        e on u gains exactly this for u's origins; other nodes only see e's spread change, so this
        ranks candidates before their exact delta is computed."""
        old = self.HN[u]
        lost = (old != u) & (self.C[u][self.flat_tok, old] == 1)
        if self.Wn is not None:
            return np.bincount(self.flat_ids[lost], weights=self.Wn[u][self.flat_tok[lost]], minlength=self.E)
        return np.bincount(self.flat_ids[lost], minlength=self.E) * float(self.g[u])

    # ---- the rule, per expert ------------------------------------------------------------------
    def _counts(self, e: int, c: int) -> np.ndarray:
        """int [c]: e's pairs whose key is j mod c (cached: the greedy asks for few c per e)."""
        k = (e, c)
        if k not in self._residues:
            self._residues[k] = np.bincount(self.pairs[e] % c, minlength=c)
        return self._residues[k]

    def _host_nodes(self, e: int, hold: list[int], m: int) -> np.ndarray | int:
        """Node serving each of e's pairs for origins on node m (an int when it is the same for all)."""
        hn = self.node[hold]
        if (hn == m).any():
            return m  # own copy, or a copy on the node: both on m
        if len(hold) == 1:
            return int(hn[0])
        return hn[self.pairs[e] % len(hold)]

    def _wcounts(self, e: int, c: int, m: int) -> np.ndarray:
        """float [c]: e's pairs whose key is j mod c, each weighted by its origin weight on node m
        per origin rank of m (Wn[m, t] / g[m])."""
        k = (e, c, -1 - m)
        if k not in self._residues:
            w = self.Wn[m][self.ptok[e]] / float(self.g[m])
            self._residues[k] = np.bincount(self.pairs[e] % c, weights=w, minlength=c)
        return self._residues[k]

    def expert_load(self, e: int, hold: list[int]) -> np.ndarray:
        """float [R]: expected pairs of e each rank serves, mean over origins, for copy set `hold`."""
        if self.Wn is not None:
            return self._expert_load_weighted(e, hold)
        out = np.zeros(self.R)
        n_pairs = float(self.pairs[e].size)
        hold_a = np.asarray(hold, dtype=np.int64)
        hn = self.node[hold_a]
        spread_all = self._counts(e, len(hold)) if len(hold) > 1 else np.array([n_pairs])
        for m in range(self.N):
            on = hold_a[hn == m]
            if on.size:
                out[on] += n_pairs  # each origin holding e serves its pairs itself
                others = self.g[m] - on.size
                if others:
                    out[on] += others * (self._counts(e, on.size) if on.size > 1 else np.array([n_pairs]))
            else:
                out[hold_a] += self.g[m] * spread_all
        return out / self.R

    def _expert_load_weighted(self, e: int, hold: list[int]) -> np.ndarray:
        """expert_load with origin weights: per origin node m, each of its ranks starts pair p
        with weight Wn[m, t_p] / g[m]; a rank holding e serves its own, the others go by the rule."""
        out = np.zeros(self.R)
        hold_a = np.asarray(hold, dtype=np.int64)
        hn = self.node[hold_a]
        for m in range(self.N):
            if not self.Wn[m][self.ptok[e]].any():
                continue
            on = hold_a[hn == m]
            if on.size:
                out[on] += self._wcounts(e, 1, m)[0]
                others = self.g[m] - on.size
                if others:
                    out[on] += others * self._wcounts(e, on.size, m)
            else:
                out[hold_a] += self.g[m] * self._wcounts(e, len(hold), m)
        return out / self.R

    # ---- cost ----------------------------------------------------------------------------------
    def node_cost(self) -> float:
        tot = 0.0
        for m in range(self.N):
            touched = self.C[m] > 0
            if self.Wn is not None:
                tot += float((touched.sum(axis=1) - touched[:, m]) @ self.Wn[m])
                continue
            tot += self.g[m] * (touched.sum() - touched[:, m].sum())
        return float(tot)

    def overflow(self, rl: np.ndarray | None = None, var: np.ndarray | None = None) -> float:
        rl = self.RL if rl is None else rl
        return float(np.maximum(rl + self.margin(var) - self.cap, 0.0).sum())

    def _changed_hosts(self, e: int, hold: list[int]):
        """Per origin node m whose host nodes for e's pairs change if e's copy set became `hold`:
        (m, new host nodes [P], mask of changed pairs, their tokens, old and new host nodes)."""
        for m in range(self.N):
            new = self._host_nodes(e, hold, m)
            old = self.HN[m, self.pairs[e]]
            ch = old != new
            if ch.any():
                yield m, new, self.ptok[e][ch], old[ch], np.broadcast_to(new, old.shape)[ch]

    def delta(self, e: int, hold: list[int]) -> float:
        """Exact change of node_cost if e's copy set became `hold` (sorted ranks)."""
        tot = 0
        for m, _, t, vo, vn in self._changed_hosts(e, hold):
            Cm = self.C[m]
            lost = (vo != m) & (Cm[t, vo] == 1)
            gained = (vn != m) & (Cm[t, vn] == 0)
            if self.Wn is not None:
                tot += float(self.Wn[m][t] @ (gained.astype(np.float64) - lost))
                continue
            tot += int(self.g[m]) * (int(gained.sum()) - int(lost.sum()))
        return float(tot)

    def apply(self, e: int, hold: list[int]) -> None:
        hold = sorted(hold)
        for m, new, t, vo, vn in list(self._changed_hosts(e, hold)):
            Cm = self.C[m]
            Cm[t, vo] -= 1  # e's pairs are in distinct tokens: no repeated index
            Cm[t, vn] += 1
            self.HN[m, self.pairs[e]] = new
        lv = self.expert_load(e, hold)
        if self.Q is not None:
            dF = lv / self.n_pairs[e] - self.F[e]
            self.var = self._var_after(e, lv)
            self.QF += np.outer(self.Q[:, e], dF)
            self.F[e] += dF
        self.RL += lv - self.LV[e]
        self.LV[e] = lv
        self.holders[e] = hold

    # ---- moves ---------------------------------------------------------------------------------
    def load_after(self, e: int, hold: list[int]) -> tuple[float, float]:
        """(overflow, max rank load) if e's copy set became `hold`."""
        lv = self.expert_load(e, sorted(hold))
        rl = self.RL - self.LV[e] + lv
        over = self.overflow(rl, self._var_after(e, lv))
        return (over if over > _EPS else 0.0), float(rl.max())


def _best_exact(st: CopyState, cands: list[tuple], shortlist: int, base: float = 0.0):
    """cands: (overflow, -local gain, max load, expert, rank). The `shortlist` best by (overflow,
    local gain) get their exact delta; returns ((overflow, base + delta, max load), (expert, rank)) of
    the best by (overflow, exact delta, max load), or None."""
    if not cands:
        return None
    cands.sort(key=lambda c: (c[0], c[1], c[2], c[3], c[4]))
    best = None
    for over, _, mx, e, r in cands[:shortlist]:
        if over > cands[0][0] + _EPS:
            break  # feasibility first: a candidate with more overflow never wins
        key = (over, base + st.delta(e, sorted(st.holders[e] + [r])), mx)
        if best is None or key < best[0]:
            best = (key, (e, r))
    return best


def everywhere_set(load: np.ndarray, topology: Topology, extra_per_rank: int) -> np.ndarray:
    """int64 [H]: the hottest experts that the extra slots can replicate on every node.

    An expert with a copy on every node is local to every origin: it never causes a node send,
    and the rule splits its load by origin node, which also keeps it from drifting onto one rank.
    So the primary partition is solved without them (`project_out`) and `place_copies` seeds
    their copies first. R*n extra slots hold (R*n) // (N-1) such experts."""
    N = topology.num_nodes
    if N < 2 or extra_per_rank <= 0:
        return np.zeros(0, dtype=np.int64)
    h = min(topology.ep_size * extra_per_rank // (N - 1), len(load))
    return np.sort(np.argsort(-np.asarray(load), kind="stable")[:h]).astype(np.int64)


def project_out(inst: LayerInstance, drop: np.ndarray) -> LayerInstance:
    """The layer's patterns with the experts `drop` removed from the cost: each dropped expert of a
    pattern becomes a phantom id E + j (j its position), which the caller pins on a unit of weight
    0 that never swaps. Keeps the fixed pattern width the search needs; merges equal patterns."""
    E = inst.num_experts
    K = inst.top_k
    pats = inst.patterns.copy()
    is_drop = np.isin(pats, drop)
    pats[is_drop] = (E + np.broadcast_to(np.arange(K), pats.shape))[is_drop]
    pats.sort(axis=1)
    uniq, inv = np.unique(pats, axis=0, return_inverse=True)
    counts = np.bincount(inv.ravel(), weights=inst.counts, minlength=len(uniq))
    return LayerInstance(uniq.astype(np.int64), counts, E + K)


def place_copies(
    layout: np.ndarray,
    ids: np.ndarray,
    topology: Topology,
    num_experts: int,
    extra_per_rank: int,
    max_imbalance: float,
    deadline: float = np.inf,
    max_passes: int = 20,
    shortlist: int = 16,
    all_slots: bool = True,
    allowed: np.ndarray | None = None,
    everywhere: np.ndarray | None = None,
    risk: np.ndarray | None = None,
    origin: np.ndarray | None = None,
) -> CopyResult:
    """Fill `extra_per_rank` extra slots on every rank of `layout` (int [R, S], each expert once).

    ids: the layer's train routing int [T, K] (row = spread key). risk: optional [E, E] load-risk
    matrix (already scaled): every rank keeps sqrt(F' Q F) under the cap too. allowed: optional bool [E, R],
    which ranks may hold a copy of e (e.g. group-preserving mode); every rank must be able to
    fill its slots. origin: optional float [N, T] origin weights (`CopyState`; request groups).
    Raises CopyPlacementError naming the shortfall when they cannot be filled.
    """
    layout = np.asarray(layout, dtype=np.int64)
    R, S = layout.shape
    E = num_experts
    ids = np.asarray(ids, dtype=np.int64)
    mean = ids.size / R
    st = CopyState(ids, layout, topology, E, max_imbalance * mean, risk, origin)
    start = st.node_cost()
    free = np.full(R, extra_per_rank, dtype=np.int64)
    extras: list[list[int]] = [[] for _ in range(R)]
    ok = np.ones((E, R), dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool).copy()
    nodes = [np.asarray(rs, dtype=np.int64) for rs in topology.nodes]
    placed = 0
    # Seed: the `everywhere` experts get a copy on every node that lacks one (lightest free rank).
    for e in [] if everywhere is None else [int(x) for x in everywhere]:
        for rs in nodes:
            if (st.node[st.holders[e]] == st.node[rs[0]]).any():
                continue
            free_r = [int(r) for r in rs if free[r] > 0 and ok[e, r]]
            if not free_r:
                continue
            r = min(free_r, key=lambda q: (st.RL[q], q))
            st.apply(e, st.holders[e] + [r])
            extras[r].append(e)
            free[r] -= 1
            placed += 1
    for _ in range(R * extra_per_rank - placed):
        gain = np.stack([st.local_gain(u) for u in range(st.N)])  # [N, E]
        cands = []
        for e in range(E):
            held = set(st.holders[e])
            for u, rs in enumerate(nodes):
                free_r = [int(r) for r in rs if free[r] > 0 and r not in held and ok[e, r]]
                if not free_r:
                    continue
                # The lightest free rank of the node: node-level effects are the same for all of
                # them except through the copies' rank order, and the light one keeps the cap.
                r = min(free_r, key=lambda q: (st.RL[q], q))
                over, mx = st.load_after(e, st.holders[e] + [r])
                cands.append((over, -gain[u, e], mx, e, r))
        best = _best_exact(st, cands, shortlist)
        if best is None:
            short = [r for r in range(R) if free[r] > 0]
            raise CopyPlacementError(
                f"ranks {short[:8]} have free copy slots but every expert is already on them "
                f"(or not allowed there): {E} experts, {S} + {extra_per_rank} slots per rank"
            )
        e, r = best[1]
        st.apply(e, st.holders[e] + [r])
        extras[r].append(e)
        free[r] -= 1
    slots = [layout[r].tolist() + extras[r] for r in range(R)]
    _descend(st, slots, ok, deadline, max_passes, shortlist, all_slots)
    out = np.array(slots, dtype=np.int64)
    return CopyResult(
        layout=out,
        node_cost=st.node_cost(),
        start_node_cost=start,
        rank_imbalance=float(st.RL.max() / st.RL.mean()),
        overflow=st.overflow(),
    )


def _descend(
    st: CopyState, slots: list[list[int]], ok: np.ndarray, deadline: float, max_passes: int, shortlist: int, all_slots: bool
) -> None:
    """Replacement descent: empty one slot, refill it with the best expert for that rank (possibly
    the same one); keep only strict improvements of (overflow, node cost). all_slots: primary
    slots too, for experts that keep another copy (so the primary layout is re-solved knowing the
    copies: copy counts and even which copy is the 'primary' become free); else extra slots only."""
    R = len(slots)
    first = 0 if all_slots else st.S
    for _ in range(max_passes):
        improved = False
        for r in range(R):
            u = int(st.node[r])
            for i in range(first, len(slots[r])):
                if time.monotonic() > deadline:
                    return
                e = slots[r][i]
                if len(st.holders[e]) < 2:
                    continue  # its only copy: moving it needs a swap, not a replacement
                before = st.overflow()
                rest = [q for q in st.holders[e] if q != r]
                d_remove = st.delta(e, rest)
                st.apply(e, rest)
                gain = st.local_gain(u)
                cands = []
                for f in range(st.E):
                    if r in st.holders[f] or not ok[f, r]:
                        continue
                    over, mx = st.load_after(f, st.holders[f] + [r])
                    cands.append((over, -gain[f] if f != e else -np.inf, mx, f, r))  # e first: the no-op
                best = _best_exact(st, cands, shortlist, d_remove)
                assert best is not None  # e itself is always a candidate
                (over, d, _), (f, _) = best
                if f != e and (over < before - _EPS or (over <= before + _EPS and d < -_EPS)):
                    st.apply(f, st.holders[f] + [r])
                    slots[r][i] = f
                    improved = True
                else:
                    st.apply(e, st.holders[e] + [r])
        if not improved:
            return
