"""Checks of a (structurally valid) plan against the model and the server configuration.

`load_plan` already enforced the plan specification (plan.py); here we check that the plan fits
THIS model and THIS server, and that the server runs a path the mechanism is correct for.
Runs in the API-server / LLM process at config time, before any worker is spawned, and again in
each worker before weights load (cheap; guards against a file changed in between).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

from vllm_moeplace.limits import MAX_EXPERTS, MAX_LAYERS
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


def _config_int(hf_config: Any, attr: str, lo: int, hi: int, model_src: str) -> int:
    """An integer field of the model config, refused (not coerced) when it is a string, a bool, a
    float or out of lo..hi: int("8"), int(8.5) and int(True) would otherwise pass as 8, 8 and 1."""
    value = getattr(hf_config, attr, None)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise PlanError(f"{model_src}: field '{attr}': value {value!r}: expected an integer in {lo}..{hi}")
    return int(value)


def read_model_config(model_dir: str | os.PathLike) -> tuple[Any, str]:
    """(config.json of a model folder as an attribute namespace, its path): what `moeplace
    validate --model` and `random-plan --model` read, through the one safe JSON reader."""
    from vllm_moeplace.jsonio import read_json

    path = Path(model_dir) / "config.json"
    data = read_json(path, "model config", PlanError)
    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return _namespace(data), str(path)


def _namespace(obj: Any) -> Any:
    if isinstance(obj, dict):
        return SimpleNamespace(**{str(k): _namespace(v) for k, v in obj.items()})
    return obj


def model_moe_facts(arch: MoeArch, hf_config: Any, model_src: str = "model config") -> tuple[int, list[int]]:
    """(routed experts, MoE decoder layers) of a model config, every field the answer depends on
    type- and range-checked first, so a malformed config.json is one error naming the field
    instead of a TypeError, a silent int() coercion or a billion-entry layer list."""
    attr = next((a for a in arch.num_experts_attrs if getattr(hf_config, a, None) is not None), None)
    if attr is None:
        raise PlanError(f"{model_src}: field '{arch.num_experts_attrs[0]}': missing: {arch.name} needs the number "
                        "of routed experts")
    if not isinstance(getattr(hf_config, attr), (list, tuple)):  # ERNIE-VL lists text/vision experts
        _config_int(hf_config, attr, 1, MAX_EXPERTS, model_src)
    _config_int(hf_config, "num_hidden_layers", 1, MAX_LAYERS, model_src)
    for opt in ("first_k_dense_replace", "moe_layer_freq", "decoder_sparse_step", "moe_layer_interval",
                "moe_layer_start_index", "n_group", "num_expert_group", "interleave_moe_layer_step"):
        if getattr(hf_config, opt, None) is not None:
            _config_int(hf_config, opt, 0 if opt in ("first_k_dense_replace", "moe_layer_start_index",
                                                     "interleave_moe_layer_step") else 1,
                        MAX_LAYERS, model_src)
    try:
        experts, layers = arch.num_experts(hf_config), arch.moe_layers(hf_config)
    except (TypeError, ValueError, AttributeError) as e:  # e.g. a list where a number belongs
        raise PlanError(f"{model_src}: not a valid {arch.name} config ({type(e).__name__}: {e})") from None
    if not 0 < experts <= MAX_EXPERTS:
        raise PlanError(f"{model_src}: field '{attr}': value {experts}: expected 1..{MAX_EXPERTS} routed experts")
    return experts, layers


def check_plan_fits(plan: Plan, hf_config: Any, ep_enabled: bool, ep_size: int, model_src: str = "the model") -> MoeArch:
    """The model/server checks that need no vLLM import (unit-testable on an HF config). The
    server runs them at config time; `moeplace validate --model DIR [--ep-size N]` runs exactly
    these, so both accept and refuse the same plans. `model_src` names the config in messages."""
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
    raw = getattr(hf_config, "architectures", None)
    # a string or a list of non-strings is not an architectures list (list("Qwen...") is letters)
    archs = [a for a in raw if isinstance(a, str)] if isinstance(raw, (list, tuple)) else []
    arch = arch_for(archs)
    if arch is None:
        raise PlanError(
            f"{src}: field 'model': value {archs or raw!r}: architecture not supported by the placement plugin "
            f"({model_src} field 'architectures'; supported: {', '.join(ARCHITECTURES)})"
        )
    E, moe_layers = model_moe_facts(arch, hf_config, model_src)
    if plan.num_experts != E:
        raise PlanError(
            f"{src}: field 'model.num_experts': value {plan.num_experts} but {model_src} has {E} routed experts"
        )
    for layer in sorted(plan.layers):
        if layer not in moe_layers:
            raise PlanError(
                f"{src}: field 'layers.{layer}': layer {layer} is not a MoE layer of the model "
                f"(MoE layers: {_ranges(moe_layers)})"
            )
    if sorted(plan.moe_layers) != sorted(moe_layers):
        # The plan's own list decides which layers it calls MoE (and so which it must place when it
        # is served by the mapping mechanism): it must be the model's, not merely contain the placed ones.
        raise PlanError(
            f"{src}: field 'model.moe_layers': value {plan.moe_layers}, but {model_src} makes layers {moe_layers} "
            "MoE layers"
        )
    mech = mechanism(plan, arch, hf_config)
    if mech == MAP and not arch.map_ok:
        raise PlanError(
            f"{src}: field 'layers': the plan {_why_map(plan, arch, hf_config)}, which {arch.name} cannot serve: "
            "vLLM's loader for it takes each rank's experts as a contiguous block of checkpoint rows, so only "
            "plans that are pure permutations (each expert exactly once) are served"
        )
    if mech == MAP:
        missing = sorted(set(moe_layers) - set(plan.layers))
        if missing:
            raise PlanError(
                f"{src}: field 'layers': the plan {_why_map(plan, arch, hf_config)}, so every MoE layer gets "
                f"{plan.ep_size} x {plan.slots_per_rank()} physical slots and must be placed; MoE layers "
                f"{_ranges(missing)} are missing"
            )
    return arch


PERMUTE = "permute"
MAP = "map"


def cross_group_slot(plan: Plan, groups: int) -> tuple[int, int, int] | None:
    """(layer, physical slot, expert) of the first expert outside its group's contiguous id range
    (grouped top-k with `groups` groups), or None when every expert stays in its group."""
    if groups <= 1:
        return None
    size = plan.num_experts // groups
    for layer, a in sorted(plan.layers.items()):
        perm = a.reshape(-1)
        bad = np.nonzero(perm // size != np.arange(perm.size) // size)[0]
        if bad.size:
            return layer, int(bad[0]), int(perm[bad[0]])
    return None


def mechanism(plan: Plan, arch: MoeArch, hf_config: Any) -> str:
    """PERMUTE (zero-cost: permute experts and router rows at load time) for plans that are pure
    permutations vLLM's router can emit by itself; MAP (serving/mapping.py: logical -> physical
    table after top-k) for redundant copies and for cross-group moves under grouped top-k."""
    if not arch.permute or plan.has_redundancy() or cross_group_slot(plan, arch.expert_groups(hf_config)) is not None:
        return MAP
    return PERMUTE


def _why_map(plan: Plan, arch: MoeArch, hf_config: Any) -> str:
    if not arch.permute:
        return f"is for {arch.name}, served by the mapping mechanism"
    if plan.has_redundancy():
        return f"has redundant copies ({plan.slots_per_rank()} slots per rank x {plan.ep_size} ranks > {plan.num_experts} experts)"
    return f"moves experts across the {arch.expert_groups(hf_config)} expert groups of grouped top-k"


# MoE backends / all2all modes that route inside the kernel or place experts themselves: a static
# logical -> physical table cannot be applied there (vLLM's EPLB cannot run on them either).
MAP_REFUSED_MOE_BACKENDS = (
    "flashinfer_trtllm", "flashinfer_moe_ep_cutedsl", "flashinfer_moe_ep_mega_deep_gemm",
    "deep_gemm_mega_moe", "aiter_mega_moe",
)
MAP_REFUSED_ALL2ALL = ("passthrough", "moonep")


def check_map_backend(plan: Plan, vllm_config: Any) -> None:
    """Config-time refusals specific to the mapping mechanism (see docs/serving.md)."""
    moe_backend = str(getattr(getattr(vllm_config, "kernel_config", None), "moe_backend", "auto"))
    a2a = str(getattr(vllm_config.parallel_config, "all2all_backend", ""))
    if moe_backend in MAP_REFUSED_MOE_BACKENDS:
        raise PlanError(
            f"{plan.source}: cannot be served with moe_backend={moe_backend}: the plan needs a logical->physical "
            "expert table after routing (redundant copies or cross-group moves), and this backend routes inside "
            "its kernel"
        )
    if a2a in MAP_REFUSED_ALL2ALL:
        raise PlanError(
            f"{plan.source}: cannot be served with all2all_backend={a2a}: that backend places or dispatches "
            "experts itself, so the plan's physical slots would not be honoured"
        )


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
        # vLLM slices MoE LoRA adapters by the logical block ep_rank*local : +local
        # (lora/model_manager.py), which under a plan lands on other experts' weights.
        (getattr(vllm_config, "lora_config", None) is not None, "LoRA (enable_lora)",
         "MoE LoRA adapters are sliced by vLLM's default expert layout and would land on the wrong experts"),
        # Routed-expert outputs are taken after the router's top-k step: physical slot ids under a
        # plan, which callers would read as checkpoint expert ids.
        (bool(getattr(getattr(vllm_config, "aux_output_config", None), "enable_return_routed_experts", False)),
         "enable_return_routed_experts", "the returned expert ids would be physical slots, not checkpoint experts"),
        # Weight-transfer updates load weights through a fresh loader that bypasses the plan.
        (getattr(vllm_config, "weight_transfer_config", None) is not None, "weight_transfer_config",
         "weight updates would be written by vLLM's default layout, out of step with the plan"),
    ]
    for bad, what, why in refusals:
        if bad:
            raise PlanError(f"{src}: cannot be served with {what}: {why}")
    if _aiter_fused_shared_experts():
        # Fused shared experts occupy extra physical slots after the routed ones on ROCm AITER:
        # refused here, at config time, instead of after the whole checkpoint was read.
        raise PlanError(
            f"{src}: cannot be served with ROCm AITER fused shared experts (VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS): "
            "the shared experts take physical expert slots the plan does not describe"
        )
    if mechanism(plan, arch, vllm_config.model_config.hf_config) == MAP:
        check_map_backend(plan, vllm_config)
    return arch


def _aiter_fused_shared_experts() -> bool:
    try:
        from vllm._aiter_ops import rocm_aiter_ops

        return bool(rocm_aiter_ops.is_fusion_moe_shared_experts_enabled())
    except Exception:  # noqa: BLE001 - no AITER in this build (CPU, CUDA): not enabled
        return False


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
