"""Baseline placements, all in the plan format: per MoE layer an int array [R, S] of logical experts.

- `linear`: vLLM's default; physical slot p = r * S + s holds logical expert p mod E (rank r gets
  the contiguous block; with redundant slots the trailing slots wrap around to experts 0, 1, ...).
- `round_robin`: vLLM's round-robin layout, expert e on rank e mod R, slot e // R (redundant
  slots: see `round_robin`).
- `eplb`: DeepSeek EPLB, hierarchical policy (see `eplb.py`), expert groups = contiguous blocks,
  one group per node unless `num_groups` is given (the model's `n_group`).
- `eplb_global`: DeepSeek EPLB, global policy (replicate and pack over all ranks).
- `greedy`: the co-activation greedy of `greedy.py` (the CP-SAT warm start), when available.

Load-driven methods (eplb, greedy) are fitted on the trace they are given: pass the training
split, score on held-out requests.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.plan import Plan, Topology, validate_plan
from vllm_moeplace.solver import eplb
from vllm_moeplace.trace_stats import expert_load
from vllm_moeplace.trace import Trace

BASELINES = ("linear", "round_robin", "eplb", "eplb_global", "greedy")


class BaselineError(MoeplaceError):
    """A baseline cannot be built for this trace / topology (names the value)."""


def slots_per_rank(num_experts: int, ep_size: int, redundant_per_rank: int = 0) -> int:
    """S = E / R + redundant copies per rank. E must divide evenly over the ranks."""
    if ep_size <= 0 or num_experts % ep_size:
        raise BaselineError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}")
    if redundant_per_rank < 0:
        raise BaselineError(f"redundant_per_rank must be >= 0, got {redundant_per_rank}")
    S = num_experts // ep_size + redundant_per_rank
    if S > num_experts:
        raise BaselineError(f"{S} slots per rank exceed num_experts={num_experts}: a rank would hold an expert twice")
    return S


def linear(E: int, R: int, S: int) -> np.ndarray:
    return (np.arange(R * S, dtype=np.int64) % E).reshape(R, S)


def round_robin(E: int, R: int, S: int) -> np.ndarray:
    # Expert e on rank e % R, slot e // R: the [E/R, R] matrix of ids, transposed.
    B = E // R
    base = np.arange(E, dtype=np.int64).reshape(B, R).T
    # vLLM defines no round-robin layout with redundant slots; ours gives rank r's j-th extra slot
    # an expert of residue class (r + 1 + j // B) mod R, never r's own class, so no rank holds an
    # expert twice (j < E - B because S <= E).
    j = np.arange(S - B)
    r = np.arange(R)[:, None]
    extra = (r + 1 + j[None, :] // B) % R + R * (j[None, :] % B)
    return np.concatenate([base, extra], axis=1)


def available_baselines() -> list[str]:
    return list(BASELINES)


def baseline_layers(
    name: str,
    trace: Trace,
    topology: Topology,
    redundant_per_rank: int = 0,
    *,
    num_groups: int | None = None,
    greedy_time_limit: float = 2.0,
) -> dict[int, np.ndarray]:
    """{decoder_layer: int [R, S]} for baseline `name` fitted on `trace`."""
    E, R = trace.num_experts, topology.ep_size
    S = slots_per_rank(E, R, redundant_per_rank)
    lids = [int(x) for x in trace.layer_ids]
    if name == "linear":
        a = linear(E, R, S)
        return {l: a.copy() for l in lids}
    if name == "round_robin":
        a = round_robin(E, R, S)
        return {l: a.copy() for l in lids}
    if name in ("eplb", "eplb_global"):
        load = expert_load(trace).astype(np.float64)  # [L, E]
        groups = None if name == "eplb_global" else (num_groups or topology.num_nodes)
        return {l: eplb.eplb_layer(load[i], topology.nodes, S, groups) for i, l in enumerate(lids)}
    if name == "greedy":
        try:
            from vllm_moeplace.solver.greedy import coactivation_greedy
        except ImportError:
            raise BaselineError("baseline 'greedy' is not available in this build (solver/greedy.py missing)") from None
        out = {}
        for i, l in enumerate(lids):
            try:
                a = coactivation_greedy(trace, i, topology, slots_per_rank=S, time_limit=greedy_time_limit)
            except ValueError as e:  # greedy.py reports impossible instances as ValueError
                raise BaselineError(f"baseline 'greedy', layer {l}: {e}") from None
            out[l] = np.asarray(a, dtype=np.int64)
        return out
    raise BaselineError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")


def baseline_plan(
    name: str,
    trace: Trace,
    topology: Topology,
    redundant_per_rank: int = 0,
    *,
    model_name: str | None = None,
    extra: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Plan:
    """A validated Plan for baseline `name` (fitted on `trace`)."""
    layers = baseline_layers(name, trace, topology, redundant_per_rank, **kwargs)
    plan = Plan(
        model_name=model_name or str(trace.meta.get("model", "unknown")),
        num_experts=trace.num_experts,
        moe_layers=[int(x) for x in trace.layer_ids],
        ep_size=topology.ep_size,
        topology=topology,
        layers=layers,
        solver={"method": name, "redundant_per_rank": redundant_per_rank, "fitted_tokens": trace.num_tokens, **(extra or {})},
        source=f"<baseline {name}>",
    )
    validate_plan(plan)
    return plan


