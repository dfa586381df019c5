"""The solver's objectives: one module each, registered here under the name `SolveOptions.objective`
accepts (`options.ObjectiveName`). Adding one: a module with an `Objective` subclass, its entry
below and in the Literal, its tests, and its paragraph in docs/solver.md."""

from __future__ import annotations

from typing import Any, get_args

from vllm_moeplace.solver.objectives.base import BoundInputs, NodeTerms, Objective
from vllm_moeplace.solver.objectives.hop_cost import HopCost
from vllm_moeplace.solver.objectives.node_sends import NodeSends
from vllm_moeplace.solver.objectives.rank_sends import RankSends
from vllm_moeplace.solver.objectives.request_sends import RequestNodeSends
from vllm_moeplace.solver.objectives.step_time import StepTime
from vllm_moeplace.solver.options import ObjectiveName

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (NodeSends, RankSends, HopCost, StepTime)}
OBJECTIVES[RequestNodeSends.name] = RequestNodeSends

# The registry and the options' Literal are one list: a name in one and not the other is a bug
# caught at import, not at the first solve that asks for it.
if set(OBJECTIVES) != set(get_args(ObjectiveName)):
    raise ImportError(f"objective registry {sorted(OBJECTIVES)} != SolveOptions.objective {sorted(get_args(ObjectiveName))}")


def get_objective(name: str, **context: Any) -> Objective:
    """The objective `name`, built from the solve's context (`Objective.create`: train trace,
    topology, options, step model); objectives that need none ignore it."""
    return OBJECTIVES[name].create(**context)


__all__ = ["OBJECTIVES", "BoundInputs", "NodeTerms", "Objective", "get_objective"]
