"""How the user's request reaches every vLLM process, and the public helper for the active plan.

Three ways to ask, all ending in `VllmConfig.additional_config` (which vLLM ships to every
worker and folds into its config hash, so a different plan never reuses a stale compile cache):

- `vllm serve ... --moe-placement-plan plan.json [--moe-cpu-ep-fix]` (the flags set the
  environment variables below while the command line is parsed);
- `LLM(..., additional_config={"moe_placement_plan": "plan.json", "moe_cpu_ep_fix": True})`;
- environment `VLLM_MOEPLACE_PLAN=plan.json` / `VLLM_MOEPLACE_CPU_EP_FIX=1`.

At config time the plugin rewrites the path to an absolute one and adds the file's SHA-256
(`moe_placement_plan_sha256`); workers refuse a file whose content changed since.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from vllm_moeplace.plan import Plan, PlanError, load_plan

if TYPE_CHECKING:
    from vllm.config import VllmConfig

PLAN_KEY = "moe_placement_plan"
SHA_KEY = "moe_placement_plan_sha256"
FIX_KEY = "moe_cpu_ep_fix"
ENV_PLAN = "VLLM_MOEPLACE_PLAN"
ENV_FIX = "VLLM_MOEPLACE_CPU_EP_FIX"
# Internal, kept for child processes of older versions: the config hook still sets it, but the load
# hook is installed in every process and reads the request from the vLLM config.
ENV_ACTIVE = "MOEPLACE_RUNTIME_HOOKS"

_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    plan_path: str | None
    plan_sha256: str | None
    cpu_ep_fix: bool  # asked for explicitly; a plan implies it where needed

    @property
    def active(self) -> bool:
        return self.plan_path is not None or self.cpu_ep_fix


def requested(additional_config: Mapping[str, Any] | None, environ: Mapping[str, str] = os.environ) -> Settings:
    """What the user asked for: additional_config first, the environment as fallback."""
    ac = dict(additional_config or {})
    path = ac.get(PLAN_KEY) or environ.get(ENV_PLAN) or None
    fix = ac.get(FIX_KEY)
    if fix is None:
        fix = environ.get(ENV_FIX, "").strip().lower() in _TRUE
    return Settings(plan_path=str(path) if path else None, plan_sha256=ac.get(SHA_KEY), cpu_ep_fix=bool(fix))


_cache: dict[tuple[str, str | None], Plan] = {}


def load_checked(path: str, sha256: str | None) -> Plan:
    """Load a plan, refusing one whose bytes differ from what was validated at config time (the
    bytes hashed are the bytes parsed: one read)."""
    from vllm_moeplace.plan import load_plan_hashed

    key = (path, sha256)
    if key not in _cache:
        plan, now = load_plan_hashed(path)
        if sha256 is not None and now != sha256:
            raise PlanError(
                f"{path}: plan file changed after the server validated it (sha256 {now[:12]} != {sha256[:12]})"
            )
        _cache[key] = plan
    return _cache[key]


def active_plan(vllm_config: "VllmConfig | None" = None) -> Plan | None:
    """The plan the given (default: current) vLLM config serves with, or None."""
    if vllm_config is None:
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
    s = requested(vllm_config.additional_config, environ={})
    return load_checked(s.plan_path, s.plan_sha256) if s.plan_path else None


def physical_to_logical_map(vllm_config: "VllmConfig | None" = None) -> dict[int, np.ndarray] | None:
    """For the active plan: {decoder layer: int64 [num_experts]} mapping the id the router's
    top-k step emits (what `BaseRouter.set_capture_fn` sees) to the LOGICAL checkpoint expert id.
    Layers absent from the dict are identity. None when those ids are logical already: no plan
    active, or a plan served by the mapping mechanism (serving/mapping.py), whose router scores
    logical experts and maps to physical slots only after the capture point.
    """
    from vllm_moeplace.serving.remap import physical_to_logical
    from vllm_moeplace.serving.validate import MAP, mechanism
    from vllm_moeplace.serving.arch import arch_for

    if vllm_config is None:
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
    plan = active_plan(vllm_config)
    if plan is None:
        return None
    hf = vllm_config.model_config.hf_config
    arch = arch_for(list(getattr(hf, "architectures", None) or []))
    if arch is not None and mechanism(plan, arch, hf) == MAP:
        return None
    return physical_to_logical(plan)
