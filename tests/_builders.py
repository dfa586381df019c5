"""Builders shared by test modules (import as `from _builders import ...`; pytest puts tests/ on
sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vllm_moeplace.plan import Plan, Topology
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.pipeline import solve
from vllm_moeplace.trace import Trace


def solver_plan(model: Path, redundant: int, seed: int = 0) -> Plan:
    """A plan from `moeplace solve` for EP2 (two single-rank nodes) on a skewed synthetic trace of
    the model's MoE layers: the copies go where the solver puts them, not where a test wants."""
    from vllm_moeplace.cli.random_plan import model_moe_info

    _, E, layers = model_moe_info(model)
    rng = np.random.default_rng(seed)
    T, K = 800, 2
    pop = 1.0 / np.arange(1, E + 1) ** 1.2
    ids = np.stack([[rng.choice(E, K, replace=False, p=rng.permutation(pop) / pop.sum()) for _ in layers] for _ in range(T)])
    trace = Trace(topk_ids=ids.astype(np.int16), layer_ids=np.array(layers, np.int32),
                  request_ids=np.repeat(np.arange(T // 20), 20).astype(np.int32), is_prefill=np.ones(T, bool),
                  num_experts=E, meta={"model": "tiny"})
    opt = SolveOptions(redundant_per_rank=redundant, deterministic=True, time_limit=2.0, max_imbalance=1.3)
    return solve(trace, Topology.uniform(2, 1), opt, model_name=str(model))


