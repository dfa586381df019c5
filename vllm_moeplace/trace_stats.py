"""Routing statistics of a trace: the one place they are counted, used by the solver, the
synthetic-trace calibration and the analysis report (`profiling/analyze.py`).

All functions are vectorised numpy over the whole trace (the real DeepSeek-V2-Lite trace is
94k tokens x 26 layers x top-6; DeepSeek-R1 shape is 58 layers x 256 experts x top-8) and take a
*layer index* `l` (position 0..L-1 in `trace.layer_ids`), not a decoder-layer id.

Pure numpy: no vLLM or torch.
"""

from __future__ import annotations

import numpy as np

from vllm_moeplace.trace import Trace, TraceError


def _check_layer(trace: Trace, l: int) -> None:
    if not 0 <= l < trace.num_layers:
        raise TraceError(f"layer index {l} out of range 0..{trace.num_layers - 1} (trace has {trace.num_layers} MoE layers)")


def expert_load(trace: Trace, mask: np.ndarray | None = None) -> np.ndarray:
    """Tokens routed to each expert at each MoE layer: int64 [L, E].

    Each row sums to T * K (every token picks K distinct experts). `mask` (bool [T]): count only
    those tokens (per label, prefill / decode) without building a sub-Trace, whose validation
    would re-sort the whole id array.
    """
    ids = trace.topk_ids if mask is None else trace.topk_ids[mask]
    _, L, K = ids.shape
    E = trace.num_experts
    # Offset expert ids by layer so one bincount covers all layers.
    flat = ids.astype(np.int64) + (np.arange(L, dtype=np.int64) * E)[None, :, None]
    return np.bincount(flat.ravel(), minlength=L * E).reshape(L, E)


def pair_counts(a: np.ndarray, b: np.ndarray, num_experts: int) -> np.ndarray:
    """Counts of (a[t, i], b[t, j]) over all t, i, j: int64 [E, E]. a, b: int [T, K]."""
    E = num_experts
    if a.shape[0] == 0:
        return np.zeros((E, E), dtype=np.int64)
    # [T, K, K] pair codes; at R1 shape (50k x 8 x 8) this is 3.2M int64 = 26 MB, acceptable.
    codes = a.astype(np.int64)[:, :, None] * E + b.astype(np.int64)[:, None, :]
    return np.bincount(codes.ravel(), minlength=E * E).reshape(E, E)


def coactivation(trace: Trace, l: int) -> np.ndarray:
    """Co-activation counts at layer index l: int64 [E, E], symmetric.

    C[i, j] (i != j) = tokens that chose both i and j; the diagonal C[e, e] is the load of e
    (tokens that chose e), so `C.diagonal() == expert_load(trace)[l]`.
    """
    _check_layer(trace, l)
    ids = trace.topk_ids[:, l, :]
    return pair_counts(ids, ids, trace.num_experts)


def transitions(trace: Trace, l: int) -> np.ndarray:
    """Inter-layer transition counts between MoE layer indices l and l+1: int64 [E, E].

    M[i, j] = tokens that chose i at layer l and j at layer l+1 (each token contributes K*K pairs),
    the layer-to-layer dependency that ExFlow / MoETuner (arXiv 2502.06643) exploit.
    """
    _check_layer(trace, l)
    if l + 1 >= trace.num_layers:
        raise TraceError(f"no MoE layer after layer index {l} (trace has {trace.num_layers} MoE layers)")
    return pair_counts(trace.topk_ids[:, l, :], trace.topk_ids[:, l + 1, :], trace.num_experts)


def unique_patterns(trace: Trace, l: int, tokens: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Aggregated routing patterns at layer index l.

    Tokens that chose the same expert *set* collapse into one pattern with a count, which is
    what makes exact (per-pattern) models tractable. `tokens` (int indices): count only those
    tokens (a sample), without building a sub-Trace.

    Returns (patterns int64 [P, K], each row sorted ascending, rows in lexicographic order;
    counts int64 [P], summing to the tokens counted).
    """
    _check_layer(trace, l)
    ids = trace.topk_ids[:, l, :] if tokens is None else trace.topk_ids[tokens, l, :]
    return count_patterns(ids, trace.num_experts)


def count_patterns(ids: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(distinct sorted rows of int [T, K] in lexicographic order, int64 count of each).

    One token's signature is its sorted expert set packed into one integer (K fields of
    ceil(log2 E) bits, first expert most significant, so integer order is lexicographic row
    order): one 1-D sort instead of np.unique(axis=0)'s row sort (about 10x faster at R1 shape,
    where nearly every token is its own pattern). Falls back to the row sort when K fields do not
    fit in 63 bits (top-8 of 256 experts fits; top-16 of 1024 does not)."""
    K = ids.shape[1]
    ids = np.sort(ids, axis=1)
    if ids.shape[0] == 0:
        return np.zeros((0, K), dtype=np.int64), np.zeros(0, dtype=np.int64)
    bits = max(1, int(num_experts - 1).bit_length())
    if bits * K > 63:
        pats, counts = np.unique(ids, axis=0, return_counts=True)
        return pats.astype(np.int64), counts.astype(np.int64)
    key = np.zeros(ids.shape[0], dtype=np.int64)
    for k in range(K):
        key <<= bits
        key |= ids[:, k].astype(np.int64)
    uniq, first, counts = np.unique(key, return_index=True, return_counts=True)
    return ids[first].astype(np.int64), counts.astype(np.int64)


def gini(x: np.ndarray) -> np.ndarray:
    """Gini coefficient along the last axis of non-negative x: 0 = all equal, (n-1)/n = one holds all.

    Sorted form of sum_ij |x_i - x_j| / (2 n^2 mean). An all-zero (or empty) row gives 0; a 1-D
    input gives a 0-d array (use float()).
    """
    x = np.sort(np.asarray(x, dtype=np.float64), axis=-1)
    n = x.shape[-1]
    total = x.sum(axis=-1)
    i = np.arange(1, n + 1, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = (2.0 * (x * i).sum(axis=-1)) / (n * total) - (n + 1.0) / n
    return np.where(total > 0, g, 0.0)


def routing_summary(trace: Trace, min_expected: float = 20.0) -> dict[str, float]:
    """Scalar routing statistics (means over layers), the quantities synthetic traces are
    calibrated on:

    - load_max_over_mean: hottest expert's load / mean expert load.
    - load_gini: Gini coefficient of expert load.
    - coact_top_lift: mean lift P(i,j) / (P(i) P(j)) of the E pairs with the highest lift among
      pairs whose expected count under independence is >= `min_expected` (so lifts are not noise).
    - coact_lift_gt2_share: share of co-activations (pairs of a token's experts) falling on pairs
      with lift > 2, i.e. how much co-activation structure a placement can exploit.
    - transition_topk_share: share of layer l -> l+1 transitions from an expert that go to its K
      most frequent successors (uniform, independent routing gives about K / E).
    """
    T, L, K = trace.topk_ids.shape
    E = trace.num_experts
    load = expert_load(trace).astype(np.float64)  # [L, E]
    mom = load.max(axis=1) / load.mean(axis=1)
    ginis = gini(load)  # [L]
    iu = np.triu_indices(E, 1)
    lifts, shares = [], []
    for l in range(L):
        c = coactivation(trace, l).astype(np.float64)[iu]
        p = load[l] / T
        expected = (p[:, None] * p[None, :])[iu] * T
        ok = expected >= min_expected
        lift = np.where(ok, c / np.maximum(expected, 1e-12), 0.0)
        top = np.sort(lift[ok])[-E:] if ok.any() else np.zeros(1)
        lifts.append(top.mean())
        shares.append(c[(lift > 2) & ok].sum() / max(c.sum(), 1.0))
    trans = []
    for l in range(L - 1):
        m = transitions(trace, l).astype(np.float64)
        topk = np.sort(m, axis=1)[:, -K:].sum()
        trans.append(topk / max(m.sum(), 1.0))
    return {
        "load_max_over_mean": float(np.mean(mom)),
        "load_gini": float(np.mean(ginis)),
        "coact_top_lift": float(np.mean(lifts)),
        "coact_lift_gt2_share": float(np.mean(shares)),
        "transition_topk_share": float(np.mean(trans)) if trans else 0.0,
    }


def request_index(trace: Trace) -> np.ndarray:
    """int [T]: each token's request as 0..m-1 (request ids in ascending order), for `load_risk`."""
    return np.unique(trace.request_ids, return_inverse=True)[1]


def load_risk(trace: Trace, l: int, req: np.ndarray | None = None) -> np.ndarray:
    """float [E, E]: covariance of held-out minus train expert loads, in train (token, expert) pairs.

    A unit holding experts S has train load T_S = sum_r c_r[S] over requests r. A held-out sample
    of requests like the train one sees the share T_S / T instead perturbed by request-sampling
    noise; by the delta method for a ratio, Var(share_S) * T^2 = sum_r z_r[S]^2 with residuals
    z_r[e] = c_r[e] - (T_e / T) * K n_r (n_r tokens of request r), and the difference of two such
    samples has twice that variance. Returns 2 Z'Z, so that sqrt(w' Q w) is one standard
    deviation of a unit's held-out load for an indicator w. Long requests dominate it, which is
    the point: they are what makes one half of a trace hot where the other is not.
    """
    _check_layer(trace, l)
    E = trace.num_experts
    req = request_index(trace) if req is None else req  # (callers looping over layers pass it once)
    m = int(req.max()) + 1 if req.size else 0
    ids = trace.topk_ids[:, l, :].astype(np.int64)
    c = np.bincount((req[:, None] * E + ids).ravel(), minlength=m * E).reshape(m, E).astype(np.float64)
    n_pairs = c.sum(axis=1)  # K n_r
    share = c.sum(axis=0) / max(1.0, n_pairs.sum())
    z = c - n_pairs[:, None] * share[None, :]
    return 2.0 * (z.T @ z)


def risk_calibration(trace: Trace, unit_size: int, units: int = 200, seed: int = 0) -> float:
    """Variance factor by which `load_risk` understates real drift, measured on `trace` alone.

    The trace is cut by request into halves A and B (the same cut as the train/held-out split);
    for random units of `unit_size` experts at every layer, the standardised error
    z = w'(share_B T_A - load_A) / sqrt(w' Q_A w) should have mean square 1 if the model were
    exact. Requests are not exchangeable in order (topics drift along a trace), so it is larger;
    the returned mean square, clipped to [1, 4] (never trust one split to say there is *less*
    noise than sampling alone gives), scales Q. 1.0 when there are too few requests to split.
    """
    if len(np.unique(trace.request_ids)) < 4 or unit_size < 1:
        return 1.0
    a, b = trace.split_by_request(0.5)
    E = trace.num_experts
    unit_size = min(unit_size, E - 1)
    rng = np.random.default_rng(seed)
    la, lb = expert_load(a).astype(np.float64), expert_load(b).astype(np.float64)
    zs = []
    req_a = request_index(a)
    for l in range(trace.num_layers):
        q = load_risk(a, l, req_a)
        d = lb[l] / max(1.0, lb[l].sum()) * la[l].sum() - la[l]
        w = np.zeros((units, E))
        w[np.arange(units)[:, None], np.argsort(rng.random((units, E)), axis=1)[:, :unit_size]] = 1.0
        var = np.einsum("ue,ef,uf->u", w, q, w)
        ok = var > 1e-12
        zs.append((w[ok] @ d) ** 2 / var[ok])
    z2 = np.concatenate(zs) if zs else np.zeros(0)
    return float(np.clip(z2.mean(), 1.0, 4.0)) if z2.size else 1.0
