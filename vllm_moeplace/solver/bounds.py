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

from vllm_moeplace.solver.instance import LayerInstance


def star_lower_bound(inst: LayerInstance, slots_per_unit: int, min_unit_weight: float, deadline: float = np.inf) -> float:
    """Lower bound on Σ_p c_p Σ_{u touched} w_u over all partitions into units of <= m slots.

    Anytime: past `deadline` the remaining experts get their weakest term C_e / K (a pattern's
    cost split among at most K members, the most savings can leave), so the sum stays a bound."""
    import time

    k = int(slots_per_unit) - 1
    K = max(1, inst.top_k)
    total = 0.0
    for e in range(inst.num_experts):
        pe = inst.patterns_of(e)
        if not pe.size:
            continue
        c = inst.counts[pe]
        if deadline < np.inf and time.monotonic() > deadline:
            total += c.sum() / K
            continue
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


def pair_relaxation_bound(
    inst: LayerInstance,
    slots_per_unit: int,
    start_assign: np.ndarray,
    min_unit_weight: float,
    time_budget: float,
    max_iters: int = 40,
    exact_lmo_max_experts: int = 64,
) -> float:
    """A stronger bound: the star decomposition with the companions made consistent.

    z[e, f] in [0, 1] stands for "e and f share a node" (symmetric, z[e, e] = 0), and every expert
    has exactly m - 1 companions: Σ_f z[e, f] = m - 1. Every placement is such a z, and there
        cost = F(z) = Σ_p c_p Σ_{e∈p} 1 / (1 + Σ_{f∈p, f≠e} z[e, f])   (x w),
    so min F over the polytope Z is a lower bound. F is convex (1/(1+x) of a linear form), so
    Frank-Wolfe gives a certified lower bound at every iterate:
        min_Z F >= F(z) + min_{s∈Z} ∇F(z)·(s - z),
    the inner minimum being an LP over Z (GLOP). Started at the incumbent placement. Unlike the
    star bound, an expert cannot be everyone's favourite companion: symmetry caps its share.
    Above `exact_lmo_max_experts` the LP is too big for the budget and its minimum is bounded
    from below by its Lagrangian dual instead (`_fw_dual`), which keeps the bound valid.
    """
    import time

    from ortools.linear_solver import pywraplp

    t_end = time.monotonic() + time_budget
    E, m = inst.num_experts, int(slots_per_unit)
    pats, c = inst.patterns, inst.counts
    P, K = pats.shape
    if P == 0 or m < 2 or K < 2:
        return 0.0
    ii, jj = np.nonzero(~np.eye(K, dtype=bool))  # ordered pairs inside a pattern
    pe, pf = pats[:, ii], pats[:, jj]  # [P, K(K-1)]
    pair_code = (pe * E + pf).ravel()
    slot_code = (np.arange(P)[:, None] * K + ii[None, :]).ravel()

    def jmap(z: np.ndarray) -> np.ndarray:
        return np.bincount(slot_code, weights=z.ravel()[pair_code], minlength=P * K).reshape(P, K)

    def value(z: np.ndarray) -> tuple[float, np.ndarray]:
        j = jmap(z)
        return float((c[:, None] / (1.0 + j)).sum()), j

    def ray(j: np.ndarray, d: np.ndarray):
        """t -> F(z + t d) for the z whose jmap is j: jmap is linear, so one gather for d and
        each evaluation is a sum over the patterns (the line search's 16 calls were most of
        the bound's time)."""
        jd = jmap(d)
        cc = c[:, None]
        return lambda t: float((cc / (1.0 + j + t * jd)).sum())

    def grad(j: np.ndarray) -> np.ndarray:
        dj = -c[:, None] / (1.0 + j) ** 2  # dF / d j[p, e]
        g = np.bincount(pair_code, weights=dj[:, ii].ravel(), minlength=E * E).reshape(E, E)
        return g + g.T  # z[e, f] = z[f, e] enters e's and f's terms

    iu, ju = np.triu_indices(E, 1)
    if E > exact_lmo_max_experts:
        return _fw_dual(value, grad, ray, start_assign, m, E, t_end, max_iters, min_unit_weight)
    lp = pywraplp.Solver.CreateSolver("GLOP")
    x = [lp.NumVar(0.0, 1.0, "") for _ in range(len(iu))]
    inc = [[] for _ in range(E)]
    for k in range(len(iu)):
        inc[iu[k]].append(x[k])
        inc[ju[k]].append(x[k])
    for e in range(E):
        lp.Add(lp.Sum(inc[e]) == m - 1)
    z = (start_assign[:, None] == start_assign[None, :]).astype(np.float64)
    np.fill_diagonal(z, 0.0)
    if (z.sum(axis=1) != m - 1).any():
        return 0.0  # unequal node sizes: the polytope above does not hold
    best = 0.0
    f, j = value(z)
    for _ in range(max_iters):
        if time.monotonic() > t_end:
            break
        g = grad(j)
        obj = lp.Objective()
        for k in range(len(iu)):
            obj.SetCoefficient(x[k], float(g[iu[k], ju[k]]))
        obj.SetMinimization()
        left_ms = int(1000 * (t_end - time.monotonic()))
        if left_ms <= 0:
            break
        lp.SetTimeLimit(left_ms)  # only an OPTIMAL LP certifies the bound
        if lp.Solve() != pywraplp.Solver.OPTIMAL:
            break
        # min_s g.s over Z, from the LP's own optimum (upper triangle = each pair once).
        gs = obj.Value()
        gz = float((g[iu, ju] * z[iu, ju]).sum())
        lb = f + gs - gz
        best = max(best, lb - 1e-7 * abs(f))  # floating-point slack on the LP optimum
        s = np.zeros((E, E))
        s[iu, ju] = [v.solution_value() for v in x]
        s = s + s.T
        d = s - z
        z = _line_search(ray(j, d), z, d)
        f, j = value(z)
        if f - best <= 1e-4 * f:
            break
    return float(min_unit_weight * best)


def _fw_dual(value, grad, ray, start_assign, m, E, t_end, max_iters, w) -> float:
    """Frank-Wolfe with the LMO replaced by a lower bound on it: for any u,
        min_{s∈Z} g·s >= (m-1) Σ_e u_e - Σ_{e<f} max(0, u_e + u_f - g_ef)
    (Lagrangian dual of the degree constraints, 0 <= s <= 1 kept). u is improved by a few
    subgradient steps; the step direction is the Lagrangian minimiser. The linearisation bound
    F(z) + ∇F(z)·(s - z) <= F* holds for every z >= 0, so the iterate need not stay in Z."""
    import time

    z = (start_assign[:, None] == start_assign[None, :]).astype(np.float64)
    np.fill_diagonal(z, 0.0)
    iu, ju = np.triu_indices(E, 1)
    best = 0.0
    f, j = value(z)
    for _ in range(max_iters):
        if time.monotonic() > t_end:
            break
        g = grad(j)
        gu = g[iu, ju]
        gz = float((gu * z[iu, ju]).sum())
        u = np.sort(g, axis=1)[:, m - 1] / 2.0  # start: half the (m-1)-th smallest gradient
        scale = float(np.abs(gu).mean()) + 1e-12
        dual_best = -np.inf
        for k in range(60):
            slack = u[iu] + u[ju] - gu
            dual = (m - 1) * u.sum() - np.maximum(slack, 0).sum()
            dual_best = max(dual_best, dual)
            act = slack > 0
            deg = np.bincount(iu[act], minlength=E) + np.bincount(ju[act], minlength=E)
            u = u + (scale / (1 + k)) * ((m - 1) - deg)
        best = max(best, f + dual_best - gz - 1e-7 * abs(f))
        s = np.zeros((E, E))
        s[iu, ju] = (u[iu] + u[ju] - gu > 0).astype(np.float64)
        s = s + s.T
        d = s - z
        z = _line_search(ray(j, d), z, d)
        f, j = value(z)
    return float(w * best)


def _line_search(phi, z, d):
    """z + t*d for the t in [0, 1] minimising phi(t) = F(z + t d) (ternary search, 8 steps: exact
    enough on the convex 1-D restriction; the bound certified afterwards does not depend on t)."""
    lo, hi = 0.0, 1.0
    for _ in range(8):
        a, b = (2 * lo + hi) / 3, (lo + 2 * hi) / 3
        if phi(a) < phi(b):
            hi = b
        else:
            lo = a
    return z + 0.5 * (lo + hi) * d
