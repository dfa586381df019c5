"""Fix for vLLM's CPU expert-parallel kernel bug (docs/cpu-ep-kernel-bug.md).

`CPUUnquantizedExperts.apply` (vllm/model_executor/layers/fused_moe/experts/cpu_moe.py) hands the
router's GLOBAL `topk_ids` to `cpu_fused_moe` and ignores `expert_map`; under EP each rank holds
only its local experts, so the kernel indexes past its weight tensor and segfaults on the first
request. The fix maps ids through `expert_map` first: local experts get their local slot,
non-local ones slot 0 with weight 0 (their partial sum is added by the other rank's all-reduce).

The same bug is in every modular CPU experts class of `cpu_moe.py` (unquantized, fp8, mxfp4,
int8 on x86/Arm/Power/Zen, fp8 w8a8): `supports_expert_map()` exists but nothing calls it, and
each `apply` hands global ids to its kernel. `install()` wraps the `apply` of every such class
whose source never reads `expert_map` past its signature (a future vLLM that maps ids itself is
left alone: mapping twice would be wrong). Only the unquantized path is run here (no quantized
tiny model); the quantized ones take the same ids/weights contract.

Installed only in worker processes, only on the CPU platform with EP on, on the vLLM builds known
to have the bug (internals 0.32-0.33), and only when the plugin is active (a plan, or the fix
asked for alone). `map_topk_to_local` is the whole fix as a pure tensor function.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig

_ORIGINAL_ATTR = "_moeplace_original_apply"


def map_topk_to_local(
    topk_ids: "torch.Tensor",
    topk_weights: "torch.Tensor",
    expert_map: "torch.Tensor",
    apply_router_weight_on_input: bool,
) -> tuple["torch.Tensor", "torch.Tensor", bool]:
    """Global top-k ids [M, K] -> local slot ids the kernel may index, and weights that zero
    non-local experts. Returns (ids, weights, apply_router_weight_on_input for the kernel).

    With `apply_router_weight_on_input` (Llama-4, top-1) the router weight was already applied to
    the hidden states and the kernel ignores `topk_weights`, so zeroing them would not mask
    anything: instead pass the 0/1 locality mask as the weights and turn the flag off, so the
    kernel multiplies each expert output by 1 (local) or 0 (remote) and the input keeps its scaling.
    """
    import torch

    local = expert_map.index_select(0, topk_ids.reshape(-1).long()).view(topk_ids.shape)
    is_local = local >= 0
    ids = torch.where(is_local, local, torch.zeros_like(local)).to(topk_ids.dtype)
    if apply_router_weight_on_input:
        return ids, is_local.to(topk_weights.dtype), False
    weights = torch.where(is_local, topk_weights, torch.zeros_like(topk_weights))
    return ids, weights, apply_router_weight_on_input


def _experts_class() -> type:
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    return CPUUnquantizedExperts


def _ignores_expert_map(fn: Any) -> bool:
    """`apply` takes expert_map but its body never uses it (the bug), judged from its source."""
    import re

    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    if "expert_map" not in inspect.signature(fn).parameters:
        return False
    # the body starts after the signature's closing "):" / ") -> T:" line
    head_end = re.search(r"\)\s*(->[^:]*)?:\s*\n", src)
    if head_end is None:
        return False
    return re.search(r"\bexpert_map\b", src[head_end.end():]) is None


def experts_classes() -> list[type]:
    """Every modular CPU experts class (defining its own `apply`) whose kernel ignores expert_map."""
    from vllm.model_executor.layers.fused_moe import modular_kernel as mk
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    out = []
    for obj in vars(cpu_moe).values():
        if (
            isinstance(obj, type)
            and obj.__module__ == cpu_moe.__name__
            and issubclass(obj, mk.FusedMoEExpertsModular)
            and "apply" in vars(obj)
            and (hasattr(vars(obj)["apply"], _ORIGINAL_ATTR) or _ignores_expert_map(vars(obj)["apply"]))
        ):
            out.append(obj)
    return out


def is_installed() -> bool:
    return hasattr(_experts_class().apply, _ORIGINAL_ATTR)


def needs_fix(vllm_config: "VllmConfig") -> bool:
    """CPU platform + EP on + a vLLM build with the bug."""
    from vllm.platforms import current_platform

    from vllm_moeplace.serving.compat import detect_build, SUPPORTED_INTERNALS

    build = detect_build()
    return (
        current_platform.is_cpu()
        and bool(vllm_config.parallel_config.enable_expert_parallel)
        and build is not None
        and build.internals in SUPPORTED_INTERNALS
    )


def install() -> bool:
    """Wrap the `apply` of every CPU experts class that ignores expert_map (the unquantized one's
    x86/Arm/Power subclasses inherit it). Idempotent; True if anything was wrapped now."""
    done = False
    for cls in experts_classes():
        done |= _wrap(cls)
    return done


def _wrap(cls: type) -> bool:
    original = vars(cls)["apply"]
    if hasattr(original, _ORIGINAL_ATTR):
        return False
    sig = inspect.signature(original)

    @functools.wraps(original)
    def apply(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(self, *args, **kwargs)
        a = bound.arguments
        if a.get("expert_map") is not None:
            a["topk_ids"], a["topk_weights"], a["apply_router_weight_on_input"] = map_topk_to_local(
                a["topk_ids"], a["topk_weights"], a["expert_map"], bool(a["apply_router_weight_on_input"])
            )
        return original(*bound.args, **bound.kwargs)

    setattr(apply, _ORIGINAL_ATTR, original)
    cls.apply = apply
    return True


def uninstall() -> None:
    for cls in experts_classes():
        original = getattr(vars(cls)["apply"], _ORIGINAL_ATTR, None)
        if original is not None:
            cls.apply = original
