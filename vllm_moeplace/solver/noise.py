"""Request-sampling noise of one layer's loads: the load-risk covariance (`trace_stats.load_risk`,
scaled by risk_scale) as the balance constraints and the held-out imbalance prediction use it."""

from __future__ import annotations

import numpy as np

from vllm_moeplace import trace_stats
from vllm_moeplace.solver import allocate
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.trace import Trace


def layer_q(train: Trace, l: int, opt: SolveOptions, req: np.ndarray | None = None) -> np.ndarray:
    """float [E, E]: one standard deviation of held-out drift, as a covariance (x risk_scale).
    req: `trace_stats.request_index(train)`, if already known."""
    return trace_stats.load_risk(train, l, req) * (opt.risk_scale or 1.0)


def noise_model(train: Trace, l: int, opt: SolveOptions, q: np.ndarray | None = None) -> allocate.NoiseModel:
    """The predicted held-out rank imbalance of layer l's layouts (q: its `layer_q`, if known)."""
    load = np.bincount(train.topk_ids[:, l, :].ravel().astype(np.int64), minlength=train.num_experts).astype(np.float64)
    return allocate.NoiseModel(load, layer_q(train, l, opt) if q is None else q, seed=opt.seed)


def risk_matrix(
    train: Trace, l: int, opt: SolveOptions, copies: np.ndarray | None, q: np.ndarray | None = None
) -> np.ndarray | None:
    """Q with sqrt(w'Qw) = balance_risk standard deviations of a unit's held-out load (None: off).
    With copies, each copy carries 1/copies of its expert's pairs, so Q scales by both shares."""
    if opt.balance_risk <= 0:
        return None
    q = (layer_q(train, l, opt) if q is None else q) * opt.balance_risk**2
    if copies is not None:
        q = q / np.outer(copies, copies)
    return q
