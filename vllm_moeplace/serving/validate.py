"""Checks of a (structurally valid) plan against the model and the server configuration.

`load_plan` already enforced the plan specification (plan.py); here we check that the plan fits
THIS model and THIS server, and that the server runs a path the mechanism is correct for.
Runs in the API-server / LLM process at config time, before any worker is spawned, and again in
each worker before weights load (cheap; guards against a file changed in between).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from vllm_moeplace.plan import Plan, PlanError
from vllm_moeplace.serving.arch import ARCHITECTURES, MoeArch, arch_for

if TYPE_CHECKING:
    from vllm.config import VllmConfig

# Loaders that stream checkpoint tensors through DefaultModelLoader.get_all_weights.
SUPPORTED_LOAD_FORMATS = ("auto", "safetensors", "pt")


def server_ep_size(parallel_config: Any) -> int:
    """EP group size as vLLM builds it (FusedMoEParallelConfig.make): dp * pcp * tp, or 1 if off."""
    if not parallel_config.enable_expert_parallel:
        return 1
    return (
        parallel_config.data_parallel_size
        * getattr(parallel_config, "prefill_context_parallel_size", 1)
        * parallel_config.tensor_parallel_size
    )


def check_plan_fits(plan: Plan, hf_config: Any, ep_enabled: bool, ep_size: int) -> MoeArch:
    """The model/server checks that need no vLLM import (unit-testable on an HF config)."""
    src = plan.source
    if not ep_enabled:
        raise PlanError(
            f"{src}: field 'ep_size': value {plan.ep_size}: expert parallelism is off on this server; "
            "a placement plan needs --enable-expert-parallel (enable_expert_parallel=True)"
        )
    if plan.ep_size != ep_size:
        raise PlanError(
            f"{src}: field 'ep_size': value {plan.ep_size} but the server's EP size is {ep_size} "
            "(tensor_parallel_size x data_parallel_size x prefill_context_parallel_size)"
        )
    archs = list(getattr(hf_config, "architectures", None) or [])
    arch = arch_for(archs)
    if arch is None:
        raise PlanError(
            f"{src}: field 'model': value {archs}: architecture not supported by the placement plugin "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    E = arch.num_experts(hf_config)
    if plan.num_experts != E:
        raise PlanError(
            f"{src}: field 'model.num_experts': value {plan.num_experts} but the model has {E} routed experts"
        )
    moe_layers = arch.moe_layers(hf_config)
    for layer in sorted(plan.layers):
        if layer not in moe_layers:
            raise PlanError(
                f"{src}: field 'layers.{layer}': layer {layer} is not a MoE layer of the model "
                f"(MoE layers: {_ranges(moe_layers)})"
            )
    if plan.has_redundancy():
        raise PlanError(
            f"{src}: field 'layers': value {plan.slots_per_rank()} slots per rank x {plan.ep_size} ranks > "
            f"{E} experts: redundant expert copies are not supported yet"
        )
    groups = arch.expert_groups(hf_config)
    if groups > 1:
        size = E // groups
        for layer, a in sorted(plan.layers.items()):
            perm = a.reshape(-1)
            bad = np.nonzero(perm // size != np.arange(perm.size) // size)[0]
            if bad.size:
                p = int(bad[0])
                raise PlanError(
                    f"{src}: field 'layers.{layer}': rank {p // a.shape[1]} slot {p % a.shape[1]} holds expert "
                    f"{int(perm[p])} of group {int(perm[p]) // size}, but that slot belongs to group {p // size}; "
                    f"grouped top-k routing (n_group={groups}) needs each expert to stay in its group's "
                    "contiguous id range"
                )
    return arch


def check_server(plan: Plan, vllm_config: "VllmConfig") -> MoeArch:
    """All checks of `plan` against a VllmConfig. Raises PlanError naming file, field, value."""
    src = plan.source
    pc = vllm_config.parallel_config
    arch = check_plan_fits(plan, vllm_config.model_config.hf_config, pc.enable_expert_parallel, server_ep_size(pc))
    refusals = [
        (pc.enable_eplb, "enable_eplb", "EPLB rewrites the expert layout at runtime"),
        (getattr(pc, "enable_ep_weight_filter", False), "enable_ep_weight_filter",
         "the EP weight filter skips checkpoint experts by vLLM's default layout"),
        (pc.expert_placement_strategy != "linear", f"expert_placement_strategy={pc.expert_placement_strategy}",
         "the plan is expressed over vLLM's linear physical layout"),
        (vllm_config.load_config.load_format not in SUPPORTED_LOAD_FORMATS,
         f"load_format={vllm_config.load_config.load_format}",
         f"only {', '.join(SUPPORTED_LOAD_FORMATS)} stream weights through the remapper"),
    ]
    for bad, what, why in refusals:
        if bad:
            raise PlanError(f"{src}: cannot be served with {what}: {why}")
    return arch


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:  # type: ignore[list-item]
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)
