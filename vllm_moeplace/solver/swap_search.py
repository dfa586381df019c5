"""Exact-delta local search over expert partitions (pairwise swaps between units).

Units have fixed slot counts, so the neighbourhood is "swap two experts on different units";
it keeps every unit's slot count and is the move set the CP-SAT LNS and the greedy share.

Cost model (see `instance`): cost(a) = Σ_p Σ_u CW[p, u] [p touches u] + Σ_e lin[e, a_e],
CW[p, u] = count_p * w_u (optionally a per-pattern weight, used for the inter-layer term).

Speed trick: with cnt[p, u] = experts of p on u, the cost of moving e alone to u is
  D[e, u] = Σ_{p∋e} CW[p,u][cnt[p,u]==0] - Σ_{p∋e} CW[p,a_e][cnt[p,a_e]==1]  (+ linear terms),
one bincount per unit for all experts at once. D[e, a_f] + D[f, a_e] is a lower bound on the swap
delta (patterns holding both e and f are the only ones counted wrongly, and only optimistically),
so candidates are ranked by it and confirmed with the exact delta, which touches only the patterns
of e and f.
"""

from __future__ import annotations

import time

import numpy as np

from vllm_moeplace.solver.instance import LayerInstance

_EPS = 1e-9


class SwapSearch:
    def __init__(
        self,
        inst: LayerInstance,
        assign: np.ndarray,
        unit_weight: np.ndarray,
        cap: np.ndarray | None = None,
        linear: np.ndarray | None = None,
        pattern_weight: np.ndarray | None = None,
        unit_group: np.ndarray | None = None,
        load: np.ndarray | None = None,
        risk: np.ndarray | None = None,
        expert_class: np.ndarray | None = None,
    ):
        self.inst = inst
        self.U = len(unit_weight)
        self.a = np.asarray(assign, dtype=np.int64).copy()
        w = np.asarray(unit_weight, dtype=np.float64)
        # CW [P, U]: cost of pattern p touching unit u, already multiplied by its count.
        base = w[None, :] if pattern_weight is None else pattern_weight
        self.CW = inst.counts[:, None] * np.broadcast_to(base, (inst.num_patterns, self.U))
        self.lin = np.zeros((inst.num_experts, self.U)) if linear is None else np.asarray(linear, dtype=np.float64)
        # The load the caps are about (per-copy share when experts get redundant copies).
        self.load = inst.expert_load() if load is None else np.asarray(load, dtype=np.float64)
        self.cap = np.full(self.U, np.inf) if cap is None else np.asarray(cap, dtype=np.float64)
        self.cnt = inst.unit_counts(self.a, self.U)
        self.unit_load = np.bincount(self.a, weights=self.load, minlength=self.U)
        # Optional sampling-risk margin: a unit's load must stay under its cap by sqrt(w' Q w),
        # w its expert indicator, Q [E, E] the (scaled) covariance of expert loads between
        # request samples (`trace_stats.load_risk`). Held-out loads of experts that fire for the same
        # requests move together, so the margin steers correlated hot experts apart.
        self.Q = None if risk is None else np.asarray(risk, dtype=np.float64)
        self.refresh_risk()
        self.swaps = 0
        # Swaps only between units of the same group (ranks of one node at the rank level).
        self.group = np.zeros(self.U, dtype=np.int64) if unit_group is None else np.asarray(unit_group)
        # Swaps only between experts of the same class (expert groups in --preserve-groups mode:
        # a same-group swap keeps every unit's per-group slot count).
        self.eclass = np.zeros(len(self.a), dtype=np.int64) if expert_class is None else np.asarray(expert_class, dtype=np.int64)

    # ---- cost ----------------------------------------------------------------------------------
    def cost(self) -> float:
        return float(((self.cnt > 0) * self.CW).sum() + self.lin[np.arange(len(self.a)), self.a].sum())

    def overflow(self) -> float:
        return float(np.maximum(self.unit_load + self.margin() - self.cap, 0).sum())

    def margin(self, qv: np.ndarray | None = None) -> np.ndarray:
        """Per-unit risk margin sqrt(w' Q w) (zeros without a risk matrix)."""
        if self.Q is None:
            return np.zeros(self.U)
        return np.sqrt(np.maximum(self.qv if qv is None else qv, 0.0))

    def refresh_risk(self) -> None:
        if self.Q is None:
            self.MQ = self.qv = None
            return
        ind = np.zeros((self.U, len(self.a)))
        ind[self.a, np.arange(len(self.a))] = 1.0
        self.MQ = ind @ self.Q  # [U, E]: Σ_{e' on u} Q[e', :]
        self.qv = np.einsum("ue,ue->u", self.MQ, ind)

    def _swap_qv(self, e, f, ua=None, ub=None):
        """w'Qw of e's and f's units (ua, ub; default: their current ones) after exchanging e and f.
        Scalars, or index arrays that broadcast (repair evaluates every pair at once)."""
        ua = self.a[e] if ua is None else ua
        ub = self.a[f] if ub is None else ub
        Q, M = self.Q, self.MQ
        common = Q[e, e] + Q[f, f] - 2 * Q[e, f]
        return self.qv[ua] - 2 * M[ua, e] + 2 * M[ua, f] + common, self.qv[ub] - 2 * M[ub, f] + 2 * M[ub, e] + common

    def refresh_loads(self) -> None:
        self.unit_load = np.bincount(self.a, weights=self.load, minlength=self.U)
        self.refresh_risk()

    def move_deltas(self) -> np.ndarray:
        """float [E, U]: cost change of moving expert e alone to unit u (0 on its own unit)."""
        pats, E, K = self.inst.patterns, self.inst.num_experts, self.inst.top_k
        flat = pats.ravel()
        zero = self.CW * (self.cnt == 0)
        gain_in = np.stack([np.bincount(flat, weights=np.repeat(zero[:, u], K), minlength=E) for u in range(self.U)], 1)
        own = self.a[pats]  # [P, K] unit of each member
        rows = np.arange(pats.shape[0])[:, None]
        alone = (self.cnt[rows, own] == 1) * self.CW[rows, own]
        loss_out = np.bincount(flat, weights=alone.ravel(), minlength=E)
        d = gain_in - loss_out[:, None] + self.lin - self.lin[np.arange(E), self.a][:, None]
        d[np.arange(E), self.a] = 0.0
        return d

    def swap_delta(self, e: int, f: int) -> float:
        """Exact cost change of exchanging the units of experts e and f."""
        ua, ub = self.a[e], self.a[f]
        pe, pf = self.inst.patterns_of(e), self.inst.patterns_of(f)
        both = np.intersect1d(pe, pf, assume_unique=True)
        pe = np.setdiff1d(pe, both, assume_unique=True)
        pf = np.setdiff1d(pf, both, assume_unique=True)
        cnt, CW = self.cnt, self.CW
        d = (CW[pe, ub] * (cnt[pe, ub] == 0)).sum() - (CW[pe, ua] * (cnt[pe, ua] == 1)).sum()
        d += (CW[pf, ua] * (cnt[pf, ua] == 0)).sum() - (CW[pf, ub] * (cnt[pf, ub] == 1)).sum()
        d += self.lin[e, ub] - self.lin[e, ua] + self.lin[f, ua] - self.lin[f, ub]
        return float(d)

    def apply_swap(self, e: int, f: int) -> None:
        ua, ub = self.a[e], self.a[f]
        pe, pf = self.inst.patterns_of(e), self.inst.patterns_of(f)
        both = np.intersect1d(pe, pf, assume_unique=True)
        pe = np.setdiff1d(pe, both, assume_unique=True)
        pf = np.setdiff1d(pf, both, assume_unique=True)
        self.cnt[pe, ua] -= 1
        self.cnt[pe, ub] += 1
        self.cnt[pf, ub] -= 1
        self.cnt[pf, ua] += 1
        self.a[e], self.a[f] = ub, ua
        dl = self.load[f] - self.load[e]
        self.unit_load[ua] += dl
        self.unit_load[ub] -= dl
        if self.Q is not None:
            self.qv[ua], self.qv[ub] = self._swap_qv(e, f, ua, ub)  # a[] is already exchanged
            dq = self.Q[f] - self.Q[e]
            self.MQ[ua] += dq
            self.MQ[ub] -= dq
        self.swaps += 1

    def _load_ok(self, e: int, f: int) -> bool:
        ua, ub = self.a[e], self.a[f]
        dl = self.load[f] - self.load[e]
        na, nb = self.unit_load[ua] + dl, self.unit_load[ub] - dl
        oa, ob = self.unit_load[ua], self.unit_load[ub]
        if self.Q is not None:
            qa, qb = self._swap_qv(e, f)
            na, nb = na + np.sqrt(max(qa, 0.0)), nb + np.sqrt(max(qb, 0.0))
            oa, ob = oa + np.sqrt(max(self.qv[ua], 0.0)), ob + np.sqrt(max(self.qv[ub], 0.0))
        # A unit may exceed its cap only if it already did and the swap does not make it worse.
        ok_a = na <= self.cap[ua] + _EPS or na <= oa + _EPS
        ok_b = nb <= self.cap[ub] + _EPS or nb <= ob + _EPS
        return ok_a and ok_b

    # ---- searches ------------------------------------------------------------------------------
    def repair(self, deadline: float) -> None:
        """Swap experts to bring unit loads under their caps, cheapest-in-cost first."""
        E = len(self.a)
        while self.overflow() > _EPS and time.monotonic() < deadline:
            ua = self.a[:, None]
            ub = self.a[None, :]
            dl = self.load[None, :] - self.load[:, None]  # load change of e's unit when e<->f
            na = self.unit_load[ua] + dl
            nb = self.unit_load[ub] - dl
            ma = mb = 0.0
            if self.Q is not None:
                # margins after every swap e<->f at once
                idx = np.arange(E)
                qa, qb = self._swap_qv(idx[:, None], idx[None, :], ua, ub)
                na = na + np.sqrt(np.maximum(qa, 0))
                nb = nb + np.sqrt(np.maximum(qb, 0))
                margin = self.margin()
                ma, mb = margin[ua], margin[ub]
            over_now = np.maximum(self.unit_load[ua] + ma - self.cap[ua], 0) + np.maximum(self.unit_load[ub] + mb - self.cap[ub], 0)
            over_new = np.maximum(na - self.cap[ua], 0) + np.maximum(nb - self.cap[ub], 0)
            gain = over_now - over_new
            gain[(ua == ub) | (self.group[ua] != self.group[ub]) | (self.eclass[:, None] != self.eclass[None, :])] = -np.inf
            best = gain.max()
            if best <= _EPS:
                return
            d = self.move_deltas()
            approx = d[np.arange(E)[:, None], ub] + d[np.arange(E)[None, :], ua]  # [e,f]: d[e,a_f] + d[f,a_e]
            # Among swaps recovering at least half the best reduction, take the cheapest.
            score = np.where(gain >= 0.5 * best, approx, np.inf)
            e, f = np.unravel_index(np.argmin(score), score.shape)
            self.apply_swap(int(e), int(f))

    def descend(self, deadline: float, max_checks: int = 4000) -> float:
        """Best-improvement-ordered swap descent to a swap-local optimum (or the deadline)."""
        E = len(self.a)
        idx = np.arange(E)
        while time.monotonic() < deadline:
            d = self.move_deltas()
            approx = d[idx[:, None], self.a[None, :]] + d[idx[None, :], self.a[:, None]]  # d[e,a_f] + d[f,a_e]
            ga = self.group[self.a]
            approx[(self.a[:, None] == self.a[None, :]) | (ga[:, None] != ga[None, :]) | (self.eclass[:, None] != self.eclass[None, :])] = np.inf
            approx[np.tril_indices(E)] = np.inf
            flat = np.flatnonzero(approx < -_EPS)
            if not flat.size:
                break
            flat = flat[np.argsort(approx.ravel()[flat], kind="stable")][:max_checks]
            accepted = 0
            for k, fl in enumerate(flat):
                e, f = divmod(int(fl), E)
                if self.a[e] == self.a[f] or not self._load_ok(e, f):
                    continue
                if self.swap_delta(e, f) < -_EPS:
                    self.apply_swap(e, f)
                    accepted += 1
                if (k & 63) == 0 and time.monotonic() >= deadline:
                    break
            if not accepted:
                break
        return self.cost()
