"""Builders shared by test modules (import as `from _builders import ...`; pytest puts tests/ on
sys.path)."""

from __future__ import annotations

from pathlib import Path

from vllm_moeplace.plan import Plan, Topology
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.pipeline import solve


def solver_plan(model: Path, redundant: int, seed: int = 0) -> Plan:
    """A plan from `moeplace solve` for EP2 (two single-rank nodes) on a skewed synthetic trace of
    the model's MoE layers: the copies go where the solver puts them, not where a test wants."""
    from vllm_moeplace.tiny_model import skewed_routing_trace

    trace = skewed_routing_trace(model, 800, 2, seed)
    opt = SolveOptions(redundant_per_rank=redundant, deterministic=True, time_limit=2.0, max_imbalance=1.3)
    return solve(trace, Topology.uniform(2, 1), opt, model_name=str(model))


