"""A lower bound on a layer's node_sends that the reported gap can stand on.

The LP relaxation of "pattern touches node" is useless here (x = 1/N everywhere gives one node
per pattern; the anchors note measured 88-95% CP-SAT gaps). This bound is combinatorial instead.

Star decomposition. Split each pattern's cost among its experts: an expert e on node n pays
w_n / |p ∩ n| of pattern p; the shares of a node sum to w_n, so for any placement
    cost = Σ_e Σ_{p∋e} c_p w_{n(e)} / (1 + |p ∩ G_e|),   G_e = the other experts on e's node.
Every G_e has (slots of e's node) - 1 members, so choosing each G_e on its own, ignoring that
they must agree, can only lower the cost:
    LB = w_min Σ_e [ C_e - max_{|G| = m-1} s_e(G) ],  C_e = Σ_{p∋e} c_p,
    s_e(G) = Σ_{p∋e} c_p (1 - 1/(1 + |p ∩ G|)),
with m the largest node's slot count. s_e is monotone submodular (a concave function of a count,
summed), so for ANY set S, max_{|G|=k} s_e(G) <= s_e(S) + (sum of the k largest marginal gains
Δ(f | S)). We evaluate that upper bound at every set along the greedy path and keep the smallest:
an upper bound on the savings, hence a valid lower bound on the cost. It ignores load caps,
so it also bounds every capped problem.
"""

from __future__ import annotations

import numpy as np

from vllm_moeplace.solver.cpsat_instance import LayerInstance


def star_lower_bound(inst: LayerInstance, slots_per_unit: int, min_unit_weight: float) -> float:
    """Lower bound on Σ_p c_p Σ_{u touched} w_u over all partitions into units of <= m slots."""
    k = int(slots_per_unit) - 1
    total = 0.0
    for e in range(inst.num_experts):
        pe = inst.patterns_of(e)
        if not pe.size:
            continue
        c = inst.counts[pe]
        total += c.sum() - _max_savings_upper(inst.patterns[pe], c, e, k, inst.num_experts)
    return float(min_unit_weight * total)


def _max_savings_upper(pats: np.ndarray, c: np.ndarray, e: int, k: int, E: int) -> float:
    if k <= 0:
        return 0.0
    j = np.zeros(len(pats))  # |p ∩ S| for the current greedy set S
    in_s = np.zeros(E, dtype=bool)
    in_s[e] = True
    flat = pats.ravel()
    K = pats.shape[1]
    s_val = 0.0
    best_upper = np.inf
    for _ in range(k + 1):
        gain_p = c * (1.0 / (1.0 + j) - 1.0 / (2.0 + j))  # marginal of one more member of p
        gains = np.bincount(flat, weights=np.repeat(gain_p, K), minlength=E)
        gains[in_s] = -np.inf
        top = np.sort(gains[np.isfinite(gains)])[::-1][:k]
        best_upper = min(best_upper, s_val + float(np.maximum(top, 0).sum()))
        if in_s.sum() - 1 >= k:
            break
        f = int(np.argmax(gains))
        if not np.isfinite(gains[f]):
            break
        s_val += float(gains[f])
        in_s[f] = True
        j += (pats == f).any(axis=1)
    return best_upper
