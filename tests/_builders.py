"""Builders shared by test modules (import as `from _builders import ...`; pytest puts tests/ on
sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vllm_moeplace.plan import Plan, Topology
from vllm_moeplace.trace import Trace
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.pipeline import solve


def trace_from_ids(ids, num_experts: int, *, layer_ids=None, request_ids=None, is_prefill=None, labels=None,
                   one_request: bool = False) -> Trace:
    """A trace from literal expert ids: [T, L, K] (or [T, K] for one MoE layer). Defaults: decoder
    layers 1..L, one request per token (one_request=True: all tokens in request 0), all prefill."""
    ids = np.asarray(ids, dtype=np.int16)
    if ids.ndim == 2:
        ids = ids[:, None, :]
    T, L, _ = ids.shape
    if request_ids is None:
        request_ids = np.zeros(T) if one_request else np.arange(T)
    return Trace(
        topk_ids=ids,
        layer_ids=np.asarray(layer_ids if layer_ids is not None else np.arange(1, L + 1), dtype=np.int32),
        request_ids=np.asarray(request_ids, dtype=np.int32),
        is_prefill=np.asarray(is_prefill if is_prefill is not None else np.ones(T), dtype=bool),
        num_experts=num_experts,
        meta={},
        labels=None if labels is None else np.asarray(labels),
    )


def plan_from_layers(layers: dict[int, list[list[int]]], num_experts: int = 8, moe_layers=None, ep_size: int | None = None) -> Plan:
    """A plan of literal layouts {decoder layer: [R][S] expert ids}, one rank per node."""
    ep = ep_size if ep_size is not None else len(next(iter(layers.values())))
    return Plan(
        model_name="t",
        num_experts=num_experts,
        moe_layers=moe_layers if moe_layers is not None else sorted(layers),
        ep_size=ep,
        topology=Topology.uniform(ep, ep),
        layers={k: np.array(v) for k, v in layers.items()},
        source="plan.json",
    )


def solver_plan(model: Path, redundant: int, seed: int = 0) -> Plan:
    """A plan from `moeplace solve` for EP2 (two single-rank nodes) on a skewed synthetic trace of
    the model's MoE layers: the copies go where the solver puts them, not where a test wants."""
    from vllm_moeplace.tiny_model import skewed_routing_trace

    trace = skewed_routing_trace(model, 800, 2, seed)
    opt = SolveOptions(redundant_per_rank=redundant, deterministic=True, time_limit=2.0, max_imbalance=1.3)
    return solve(trace, Topology.uniform(2, 1), opt, model_name=str(model))




def solve_layer_candidates(trace, l, topology, opt, budget, rng, noise):
    """(candidates, predicted imbalances, their stds) of one layer at every cap of
    allocate.CAP_GRID, as the `expected` balance strategy computes them."""
    import time

    from vllm_moeplace.solver.balance import SolveRun, solve_candidates
    from vllm_moeplace.solver.budget import Budget
    from vllm_moeplace.solver.objectives import get_objective

    run = SolveRun(trace, topology, opt, get_objective(opt.objective), Budget(time.monotonic(), opt.time_limit, opt.deterministic), rng)
    c = solve_candidates(run, l, budget, noise)
    return c.results, c.imbalance, c.spread
