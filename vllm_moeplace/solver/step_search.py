"""The step-time surrogate of one MoE layer and its swap descent (used by the `step_time` objective).

The simulator's time of one layer is, per phase (prefill, decode), the slowest rank's dispatch +
expert compute + combine (`sim.model`). The surrogate prices the same terms in expectation, from
per-expert activation probabilities p_e (the share of the phase's train tokens routed to e):

- expert compute of rank r: a roofline max(FLOP time, weight-read time), with
  FLOP time = B * Σ_{e on r} p_e * flops_per_pair / GPU FLOP/s (B = tokens in one step), and
  weight-read time = A_r * expert bytes / HBM bandwidth, A_r the distinct active experts. In a step
  of B independent tokens expert e is active with probability q_e = 1 - (1 - p_e)^B, so
  E[A_r] = Σ q_e and Var[A_r] = Σ q_e (1 - q_e); the phase's compute is the max over ranks of
  E[A_r] + κ sd[A_r], κ = the expected largest of R standard normals (Blom's approximation), since
  the slowest rank of a real step is the one whose count came out high, not the one with the
  highest mean;
- communication: with per-node aggregation (DeepEP) a token crosses the network once per remote
  node its experts touch, so a rank sends tokens_per_rank * node_sends RDMA messages per
  phase (node_sends per token, origins uniform) in dispatch and again in combine. Priced at that
  mean: balance of the RDMA traffic over ranks and the NVLink leg are not in the surrogate (the
  simulator re-scores them exactly, `objectives.step_time`).

The layer surrogate is Σ_phase share_phase * (max_r compute_r + comm), plus 10^-3 x the
load-weighted mean of every rank's compute, which breaks ties between layouts with the same
slowest rank (so a descent can lower the second-slowest rank first and the slowest next).

`StepDescent` swaps experts between ranks (any two ranks; node_sends priced exactly by a node-level
`SwapSearch`) while the surrogate falls: each round evaluates every swap of an expert on a
slowest rank with every expert elsewhere in one vectorised pass, and confirms the best ones with
the exact node_sends delta. Pure numpy.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np

from vllm_moeplace.solver.swap_search import SwapSearch

_EPS = 1e-12
# Weight of the tie-break (mean compute weighted by compute) relative to the max term.
TIE = 1e-3


def blom_max(n: int) -> float:
    """Expected largest of n standard normals (Blom's approximation); 0 for one rank."""
    if n <= 1:
        return 0.0
    return statistics.NormalDist().inv_cdf((n - 0.375) / (n + 0.25))


@dataclass(frozen=True)
class PhaseCost:
    """Per-expert terms of one phase, in seconds."""

    share: float  # share of steps of this phase (the phase mix)
    flop: np.ndarray  # float [E]: FLOP seconds of e's expected pairs in one step
    q: np.ndarray  # float [E]: probability e is active in one step
    weight_read: float  # seconds to read one expert's weights
    comm_per_node_send: float  # seconds of dispatch + combine per unit of node_sends per token
    kappa: float  # sd factor of the active-expert count

    @property
    def v(self) -> np.ndarray:
        return self.q * (1.0 - self.q)

    def balance_load(self) -> np.ndarray:
        """float [E]: seconds e adds to its rank's expected compute (a per-expert roofline)."""
        return np.maximum(self.flop, self.q * self.weight_read)


def phase_cost(p: np.ndarray, share: float, tokens_in_step: int, flop_per_pair_s: float, weight_read_s: float,
               comm_per_node_send: float, ranks: int) -> PhaseCost:
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    q = -np.expm1(tokens_in_step * np.log1p(-np.minimum(p, 1.0 - 1e-15)))
    return PhaseCost(share, tokens_in_step * p * flop_per_pair_s, q, weight_read_s, comm_per_node_send, blom_max(ranks))


class StepDescent:
    """Rank assignment of one layer under the surrogate. rank_of: int [E]; node_search: a node-level
    SwapSearch with node_sends weights on the same assignment (its cost()/norm = node_sends per token)."""

    def __init__(self, phases: list[PhaseCost], rank_of: np.ndarray, node_of_rank: np.ndarray, node_search: SwapSearch, norm: float):
        self.phases = [ph for ph in phases if ph.share > 0]
        self.rank_of = np.asarray(rank_of, dtype=np.int64).copy()
        self.node_of_rank = np.asarray(node_of_rank, dtype=np.int64)
        self.R = len(self.node_of_rank)
        self.ns = node_search
        self.norm = norm  # node-level cost -> node_sends per token
        self.swaps = 0
        self._sums()

    def _sums(self) -> None:
        R = self.R
        self.F = [np.bincount(self.rank_of, weights=ph.flop, minlength=R) for ph in self.phases]
        self.Q = [np.bincount(self.rank_of, weights=ph.q, minlength=R) for ph in self.phases]
        self.V = [np.bincount(self.rank_of, weights=ph.v, minlength=R) for ph in self.phases]

    @staticmethod
    def _compute(ph: PhaseCost, f, q, v):
        return np.maximum(f, (q + ph.kappa * np.sqrt(np.maximum(v, 0.0))) * ph.weight_read)

    def compute(self) -> list[np.ndarray]:
        """Per phase, float [R]: each rank's expected compute seconds."""
        return [self._compute(ph, f, q, v) for ph, f, q, v in zip(self.phases, self.F, self.Q, self.V)]

    def node_sends(self) -> float:
        return self.ns.cost() / self.norm

    def value(self) -> float:
        ns = self.node_sends()
        out = 0.0
        for ph, c in zip(self.phases, self.compute()):
            out += ph.share * (c.max() + TIE * float((c * c).sum() / max(c.sum(), _EPS)) + ph.comm_per_node_send * ns)
        return float(out)

    def _candidates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(e, f, compute delta) of every swap of an expert on a slowest rank with an expert elsewhere."""
        comp = self.compute()
        E = len(self.rank_of)
        hot = np.unique([int(np.argmax(c)) for c in comp])
        es = np.flatnonzero(np.isin(self.rank_of, hot))
        fs = np.arange(E)
        e, f = np.meshgrid(es, fs, indexing="ij")
        e, f = e.ravel(), f.ravel()
        ra, rb = self.rank_of[e], self.rank_of[f]
        keep = ra != rb
        e, f, ra, rb = e[keep], f[keep], ra[keep], rb[keep]
        delta = np.zeros(len(e))
        for ph, c, F, Q, V in zip(self.phases, comp, self.F, self.Q, self.V):
            dF = ph.flop[f] - ph.flop[e]
            dQ = ph.q[f] - ph.q[e]
            dV = ph.v[f] - ph.v[e]
            na = self._compute(ph, F[ra] + dF, Q[ra] + dQ, V[ra] + dV)
            nb = self._compute(ph, F[rb] - dF, Q[rb] - dQ, V[rb] - dV)
            # max over the ranks other than ra and rb: the first of the top three not among them
            top = np.argsort(-c, kind="stable")[:3]
            other = np.full(len(e), -np.inf)
            for t in top[::-1]:
                other = np.where((t != ra) & (t != rb), c[t], other)
            new_max = np.maximum(other, np.maximum(na, nb))
            s, s2 = c.sum(), (c * c).sum()
            ns_, ns2 = s - c[ra] - c[rb] + na + nb, s2 - c[ra] ** 2 - c[rb] ** 2 + na * na + nb * nb
            tie = ns2 / np.maximum(ns_, _EPS) - s2 / max(s, _EPS)
            delta += ph.share * (new_max - c.max() + TIE * tie)
        return e, f, delta

    def descend(self, max_rounds: int, checks: int = 64, deadline: float = float("inf")) -> float:
        """Swap while the surrogate falls (at most max_rounds accepted swaps, until `deadline` on
        time.monotonic()); returns its value."""
        comm = sum(ph.share * ph.comm_per_node_send for ph in self.phases) / self.norm
        for _ in range(max_rounds):
            if time.monotonic() > deadline:
                break
            e, f, d = self._candidates()
            order = np.argsort(d, kind="stable")[:checks]
            done = False
            for i in order:
                if d[i] >= -_EPS:
                    break
                ei, fi = int(e[i]), int(f[i])
                na, nb = self.node_of_rank[self.rank_of[ei]], self.node_of_rank[self.rank_of[fi]]
                dn = 0.0 if na == nb else self.ns.swap_delta(ei, fi) * comm
                if d[i] + dn < -_EPS:
                    self._apply(ei, fi, na != nb)
                    done = True
                    break
            if not done:
                break
        return self.value()

    def _apply(self, e: int, f: int, cross: bool) -> None:
        ra, rb = self.rank_of[e], self.rank_of[f]
        for ph, F, Q, V in zip(self.phases, self.F, self.Q, self.V):
            for arr, x in ((F, ph.flop), (Q, ph.q), (V, ph.v)):
                d = x[f] - x[e]
                arr[ra] += d
                arr[rb] -= d
        self.rank_of[e], self.rank_of[f] = rb, ra
        if cross:
            self.ns.apply_swap(e, f)
        self.swaps += 1
