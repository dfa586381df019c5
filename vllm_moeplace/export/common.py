"""What every export target shares: the physical -> logical table of a plan layer, the default
layout engines assume for layers a plan leaves out, and the notes on replica choice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.plan import Plan


class ExportError(MoeplaceError):
    """A plan cannot be written for the target engine (names the field and value)."""


@dataclass(frozen=True)
class ExportResult:
    text: str
    """The file content, exactly as written."""
    flag_lines: Callable[[str], list[str]]
    """Given the written path: the lines telling the user how to pass the file to the engine."""
    notes: list[str] = field(default_factory=list)
    """Conventions and differences the user must know (layer indexing, replica choice)."""

    def flags(self, path: str) -> list[str]:
        return self.flag_lines(path)


def physical_to_logical(plan: Plan, layer: int) -> list[int]:
    """Logical expert of each physical slot p = r * S + s (rank-major, the order SGLang, TensorRT-LLM
    and vLLM EPLB all use: slots of rank 0 first). Layers the plan does not place get the layout
    these engines start from: slot p holds expert p mod E (identity, redundant slots wrapping round)."""
    if layer in plan.layers:
        return [int(x) for x in plan.layers[layer].reshape(-1)]
    num_physical = plan.slots_per_rank() * plan.ep_size
    return [p % plan.num_experts for p in range(num_physical)]


def num_redundant(plan: Plan) -> int:
    return plan.slots_per_rank() * plan.ep_size - plan.num_experts


def default_filled(plan: Plan) -> list[int]:
    """MoE layers the plan does not place (exported with the engine's default layout)."""
    return [l for l in sorted(plan.moe_layers) if l not in plan.layers]


def replica_note(plan: Plan, engine_rule: str) -> list[str]:
    """The difference between the engine's choice among copies and ours, only when there are copies."""
    if not plan.has_redundancy():
        return []
    return [
        f"the plan has {num_redundant(plan)} redundant slots; it was scored under our replica rule "
        f"{plan.to_json().get('replica_rule')} (own copy, else a copy on the token's node, else spread over all copies). "
        f"{engine_rule} Load and traffic in the engine can therefore differ from `moeplace evaluate`."
    ]


def ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5': layer lists short enough to read in a note."""
    out: list[list[int]] = []  # [first, last] runs
    for x in sorted(xs):
        if out and out[-1][1] == x - 1:
            out[-1][1] = x
        else:
            out.append([x, x])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def check_uniform_ranks(plan: Plan) -> None:
    """Engines place S consecutive physical slots per rank; every plan satisfies this (validate_plan
    demands equal slot counts), checked here so an export never writes a table of another shape."""
    S = plan.slots_per_rank()
    for l, a in plan.layers.items():
        if a.shape != (plan.ep_size, S):
            raise ExportError(f"{plan.source}: field 'layers.{l}': shape {list(a.shape)}, expected [{plan.ep_size}, {S}]")
    if not plan.layers and plan.num_experts % plan.ep_size:
        raise ExportError(f"{plan.source}: no layer placed and num_experts {plan.num_experts} does not divide over "
                          f"ep_size {plan.ep_size}")
