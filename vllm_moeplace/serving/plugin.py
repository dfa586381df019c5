"""vLLM general plugin (`vllm.general_plugins` entry point): `register()` runs in every vLLM
process (API server / LLM process, engine core, each worker).

Two layers of hooks, so that without a plan nothing in vLLM's runtime changes:

- config hooks, installed in every process (inert unless asked): `--moe-placement-plan` and
  `--moe-cpu-ep-fix` on `EngineArgs.add_cli_args` (so they show in `vllm serve --help`), and a
  wrapper of `EngineArgs.create_engine_config` that, when a plan or the fix is requested,
  validates the plan against the model and server BEFORE any worker is spawned, writes the
  absolute path + SHA-256 into `additional_config`, and marks child processes active through
  the environment (`MOEPLACE_RUNTIME_HOOKS=1`).
- runtime hooks, installed in every process (inert unless the vLLM config asks): a wrapper of
  `BaseModelLoader.load_model` that remaps expert weights for the plan (remap.py / mapping.py),
  installs the CPU EP kernel fix (cpu_ep_fix.py) where needed, and checks that every EP rank
  serves the same plan. The request is read from `additional_config`, which vLLM ships to every
  worker (Ray workers included), never only from the environment.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
from typing import Any

# Under "vllm." so vLLM's own log handler and level apply.
logger = logging.getLogger("vllm.moeplace")

_registered = False
_runtime_installed = False
_flags_from_cli = False  # the plan came from our CLI flag: report errors as one line + exit


def register() -> None:
    """Entry point. Re-entrant and idempotent; imports vLLM lazily; no I/O."""
    global _registered
    if _registered:
        return
    _registered = True
    _install_config_hooks()
    # The load hook is installed in every process and reads the request from the vLLM config
    # (additional_config, shipped to every worker, Ray ones included), not from the environment,
    # which launchers such as Ray do not forward: a worker on another node still sees the plan.
    # Without a request in its config it only calls vLLM's own load_model.
    install_runtime_hooks()


# ---------------------------------------------------------------------------------------------
# config hooks (every process)
# ---------------------------------------------------------------------------------------------


class _EnvAction(argparse.Action):
    """Store the value AND export it, so the engine core and workers inherit it."""

    def __init__(self, *args: Any, env: str, **kwargs: Any):
        self.env = env
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        global _flags_from_cli
        _flags_from_cli = True
        if self.nargs == 0:
            values = True
            os.environ[self.env] = "1"
        else:
            values = os.path.abspath(values)
            os.environ[self.env] = values
        setattr(namespace, self.dest, values)


def add_cli_flags(parser: Any) -> Any:
    from vllm_moeplace.serving.settings import ENV_FIX, ENV_PLAN

    if "--moe-placement-plan" in getattr(parser, "_option_string_actions", {}):
        return parser
    group = parser.add_argument_group("vllm-moeplace", "Expert placement (vllm-moeplace plugin).")
    group.add_argument(
        "--moe-placement-plan",
        metavar="PATH",
        default=None,
        action=_EnvAction,
        env=ENV_PLAN,
        help="Placement plan (plan.json from `moeplace solve`): load on every expert-parallel rank "
        "exactly the experts the plan assigns. Needs --enable-expert-parallel. "
        'Offline API: additional_config={"moe_placement_plan": PATH}.',
    )
    group.add_argument(
        "--moe-cpu-ep-fix",
        default=False,
        nargs=0,
        action=_EnvAction,
        env=ENV_FIX,
        help="Apply only vllm-moeplace's fix of the CPU expert-parallel kernel (implied by "
        "--moe-placement-plan on CPU); lets vLLM's default layout run TP+EP on CPU.",
    )
    return parser


def _install_config_hooks() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.add_cli_args, "_moeplace", False):
        return
    orig_add = EngineArgs.add_cli_args

    @functools.wraps(orig_add)
    def add_cli_args(parser: Any, *args: Any, **kwargs: Any) -> Any:
        return add_cli_flags(orig_add(parser, *args, **kwargs))

    add_cli_args._moeplace = True  # type: ignore[attr-defined]
    EngineArgs.add_cli_args = staticmethod(add_cli_args)

    orig_create = EngineArgs.create_engine_config

    @functools.wraps(orig_create)
    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _create_engine_config(orig_create, self, *args, **kwargs)

    create_engine_config._moeplace = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config


def _create_engine_config(orig: Any, engine_args: Any, *args: Any, **kwargs: Any) -> Any:
    from vllm_moeplace.errors import MoeplaceError
    from vllm_moeplace.serving import settings as st

    req = st.requested(engine_args.additional_config)
    if not req.active:
        # Nothing asked: vLLM exactly as without the plugin (and no stale flag for children).
        os.environ.pop(st.ENV_ACTIVE, None)
        vllm_config = orig(engine_args, *args, **kwargs)
        _warn_if_cpu_ep_unfixed(vllm_config)
        return vllm_config
    try:
        return _create_active_config(orig, engine_args, req, *args, **kwargs)
    except MoeplaceError as e:
        if _flags_from_cli:
            # `vllm serve`: one line naming file, field and value; no traceback.
            raise SystemExit(f"vllm-moeplace: error: {e}") from None
        raise


def _warn_if_cpu_ep_unfixed(vllm_config: Any) -> None:
    """Upstream's CPU MoE kernel under EP reads experts this rank does not hold: say so loudly
    (and how to fix it) instead of letting a user trust its outputs."""
    try:
        from vllm_moeplace.serving import cpu_ep_fix

        unfixed = cpu_ep_fix.needs_fix(vllm_config)
    except Exception:  # noqa: BLE001 - a warning must never stop vLLM from starting
        return
    if unfixed:
        logger.warning(
            "vllm-moeplace: expert parallelism on CPU without the kernel fix: vLLM's CPU MoE kernel ignores "
            "expert_map under EP (crashes or wrong outputs; docs/cpu-ep-kernel-bug.md). Add --moe-cpu-ep-fix "
            "(or additional_config={\"moe_cpu_ep_fix\": true})."
        )


def _create_active_config(orig: Any, engine_args: Any, req: Any, *args: Any, **kwargs: Any) -> Any:
    from vllm_moeplace.plan import load_plan_hashed
    from vllm_moeplace.serving import settings as st
    from vllm_moeplace.serving.compat import check_supported
    from vllm_moeplace.serving.validate import check_server

    extra = dict(engine_args.additional_config or {})
    plan = None
    if req.plan_path is not None:
        check_supported("--moe-placement-plan")
        path = os.path.abspath(req.plan_path)
        # structural checks (PlanError naming file/field/value) and the hash of the same bytes
        plan, sha = load_plan_hashed(path)
        extra[st.PLAN_KEY] = path
        extra[st.SHA_KEY] = sha
    if req.cpu_ep_fix:
        extra[st.FIX_KEY] = True
    engine_args.additional_config = extra
    vllm_config = orig(engine_args, *args, **kwargs)
    if plan is not None:
        check_server(plan, vllm_config)
        logger.info("vllm-moeplace: serving with placement plan %s (%d layers)", plan.source, len(plan.layers))
    os.environ[st.ENV_ACTIVE] = "1"
    # Workers may run in this very process (uniproc executor): their hooks must exist here too.
    install_runtime_hooks()
    return vllm_config


# ---------------------------------------------------------------------------------------------
# runtime hooks (active processes only)
# ---------------------------------------------------------------------------------------------


def runtime_hooks_installed() -> bool:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    return getattr(BaseModelLoader.load_model, "_moeplace", False)


def install_runtime_hooks() -> None:
    global _runtime_installed
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    if _runtime_installed or runtime_hooks_installed():
        return
    _runtime_installed = True
    orig = BaseModelLoader.load_model
    sig = inspect.signature(orig)

    @functools.wraps(orig)
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(self, *args, **kwargs)
        return _load_model(orig, bound, self, bound.arguments["vllm_config"], bound.arguments["model_config"])

    load_model._moeplace = True  # type: ignore[attr-defined]
    BaseModelLoader.load_model = load_model


def _load_model(orig: Any, bound: inspect.BoundArguments, loader: Any, vllm_config: Any, model_config: Any) -> Any:
    from vllm_moeplace.plan import PlanError
    from vllm_moeplace.serving import cpu_ep_fix
    from vllm_moeplace.serving import settings as st

    req = st.requested(vllm_config.additional_config, environ={})
    if (req.active) and cpu_ep_fix.needs_fix(vllm_config):
        if cpu_ep_fix.install():
            logger.info("vllm-moeplace: CPU expert-parallel kernel fix installed")
    # Only the main model: a draft model of speculative decoding keeps its own layout.
    if req.plan_path is None or model_config is not vllm_config.model_config:
        return orig(*bound.args, **bound.kwargs)

    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from vllm_moeplace.serving import mapping
    from vllm_moeplace.serving.remap import WeightRemapper
    from vllm_moeplace.serving.validate import MAP, check_server, mechanism

    plan = st.load_checked(req.plan_path, req.plan_sha256)
    arch = check_server(plan, vllm_config)
    if not isinstance(loader, DefaultModelLoader):
        raise PlanError(f"{plan.source}: model loader {type(loader).__name__} is not supported with a plan")
    mech = mechanism(plan, arch, vllm_config.model_config.hf_config)
    if mech == MAP:
        model, moved = _load_mapped(orig, bound, loader, plan, arch, mapping)
    else:
        remapper = WeightRemapper(plan, arch)
        inner = loader.get_all_weights
        # Instance attribute, only for this one load: the class stays untouched.
        loader.get_all_weights = lambda mc, model: remapper(inner(mc, model))
        try:
            model = orig(*bound.args, **bound.kwargs)
        finally:
            del loader.get_all_weights
        remapper.check_complete()
        verify_physical_layout(model, plan)
        moved = remapper.renamed
    _refuse_weight_reload(plan.source)
    check_ep_agreement(plan.source, _fault_sha(req.plan_sha256 or ""), mech)
    # One line per rank, with the rank and the plan's hash: deploy/check_applied.sh reads these
    # from every node's log to prove the whole EP group serves the same plan.
    logger.info(
        "vllm-moeplace: placed experts of %d layers per %s (mechanism %s, %d %s) ep_rank=%d/%d sha256=%s",
        len(plan.layers), plan.source, mech, moved, "layers mapped" if mech == MAP else "expert tensors renamed",
        _ep_rank(), plan.ep_size, (req.plan_sha256 or "")[:12],
    )
    return model


ENV_FAULT_RANK = "VLLM_MOEPLACE_TEST_FAULT_RANK"
"""Tests only: this EP rank reports a different plan hash to the agreement check, as a node with
another plan file (or no plugin activation) would. Named so nobody sets it by accident."""


def _fault_sha(sha: str) -> str:
    rank = os.environ.get(ENV_FAULT_RANK)
    return "0" * 64 if rank is not None and rank == str(_ep_rank()) else sha


def check_ep_agreement(source: str, sha: str, mechanism: str) -> None:
    """All EP ranks must serve the same plan (SHA-256) with the same mechanism: one all-gather over
    the EP group's CPU group after loading; a start where ranks differ fails, naming them.
    (A rank whose node has no vllm-moeplace installed cannot join this call; the others then wait
    until the group's timeout instead of serving a mixed layout.)"""
    try:
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_ep_group

        group = get_ep_group()
    except Exception:  # noqa: BLE001 - no EP group (single process): nothing to agree on
        return
    if group.world_size <= 1:
        return
    mine = {"rank": int(group.rank_in_group), "sha256": sha, "mechanism": mechanism}
    everyone: list[Any] = [None] * group.world_size
    dist.all_gather_object(everyone, mine, group=group.cpu_group)
    kinds = {(e["sha256"], e["mechanism"]) for e in everyone}
    if len(kinds) > 1:
        from vllm_moeplace.plan import PlanError

        per_rank = ", ".join(f"ep_rank {e['rank']}: sha256 {e['sha256'][:12] or 'none'} ({e['mechanism']})"
                             for e in sorted(everyone, key=lambda e: e["rank"]))
        raise PlanError(f"{source}: expert-parallel ranks do not serve the same plan ({per_rank}); refusing to start")


def _refuse_weight_reload(source: str) -> None:
    """vLLM's in-place `reload_weights` builds a fresh loader that bypasses the plan: experts and
    router would fall out of step. In a worker serving a plan, refuse it with a clear error."""
    try:
        from vllm.v1.worker import gpu_model_runner as gmr  # the CPU runner inherits its method
    except ImportError:  # noqa: BLE001 - no such runner in this build: nothing to guard
        return
    if getattr(gmr.reload_weights, "_moeplace", False):
        return
    from vllm_moeplace.plan import PlanError

    def reload_weights(*args: Any, **kwargs: Any) -> None:
        raise PlanError(
            f"{source}: reload_weights is not supported while serving a placement plan (the reload would load "
            "experts by vLLM's default layout, out of step with the plan's router); restart the server instead"
        )

    reload_weights._moeplace = True  # type: ignore[attr-defined]
    gmr.reload_weights = reload_weights


def _load_mapped(
    orig: Any, bound: inspect.BoundArguments, loader: Any, plan: Any, arch: Any, mapping: Any
) -> tuple[Any, int]:
    """The mapping mechanism (serving/mapping.py): build the main model with R*S physical slots
    per MoE layer, install the per-layer loading map and logical->physical table between
    construction and weight loading, then verify the built layout. Fused-expert architectures
    get their expert tensors gathered into physical order in the stream instead of the per-expert
    loading map (remap.FusedGather)."""
    from vllm_moeplace.serving.remap import FusedGather

    inner = loader.load_weights
    installed: list[int] = []
    fused = FusedGather(plan, arch) if arch.fused_experts else None

    def load_weights(model: Any, model_config: Any) -> Any:
        installed.append(mapping.install(model, plan, per_expert_loader=fused is None))
        return inner(model, model_config)

    loader.load_weights = load_weights  # instance attributes, for this one load only
    if fused is not None:
        stream = loader.get_all_weights
        loader.get_all_weights = lambda mc, model: fused(stream(mc, model))
    try:
        with mapping.physical_slots(plan):
            model = orig(*bound.args, **bound.kwargs)
    finally:
        del loader.load_weights
        if fused is not None:
            del loader.get_all_weights
    if fused is not None:
        fused.check_complete()
    verify_physical_layout(model, plan, physical=plan.ep_size * plan.slots_per_rank())
    for layer, runner in mapping.runners_by_layer(model).items():
        if layer in plan.layers and not mapping.is_installed(runner.router):
            raise PlanError(f"{plan.source}: field 'layers.{layer}': the logical->physical table was not installed")
    return model, installed[0] if installed else 0


def _ep_rank() -> int:
    """This worker's rank in the expert-parallel group (-1 if vLLM cannot tell)."""
    try:
        from vllm.distributed.parallel_state import get_ep_group

        return int(get_ep_group().rank_in_group)
    except Exception:  # noqa: BLE001 - a log field must never fail a load
        return -1


def verify_physical_layout(model: Any, plan: Any, physical: int | None = None) -> None:
    """Every planned layer's RoutedExperts must use vLLM's linear layout with S slots per rank over
    `physical` = R*S physical experts (default: num_experts, the permutation mechanism): the plan's
    slot s of rank r is physical expert r*S+s only under that layout."""
    import re

    import torch
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    from vllm_moeplace.plan import PlanError

    S = plan.slots_per_rank()
    P = plan.num_experts if physical is None else physical
    seen = set()
    for mod in model.modules():
        if not isinstance(mod, RoutedExperts):
            continue
        m = re.search(r"\blayers\.(\d+)\.", mod.layer_name)
        if m is None or int(m.group(1)) not in plan.layers:
            continue
        layer = int(m.group(1))
        seen.add(layer)
        ep_rank = mod.moe_config.moe_parallel_config.ep_rank
        expected = torch.full((P,), -1, dtype=torch.int32)
        expected[ep_rank * S : (ep_rank + 1) * S] = torch.arange(S, dtype=torch.int32)
        emap = mod.expert_map_manager.expert_map
        if (
            mod.global_num_experts != P
            or mod.local_num_experts != S
            or emap is None
            or not torch.equal(emap.cpu().to(torch.int32), expected)
        ):
            raise PlanError(
                f"{plan.source}: field 'layers.{layer}': vLLM built {mod.layer_name} with "
                f"{mod.local_num_experts}/{mod.global_num_experts} local experts and a non-linear expert map; "
                "the plan assumes the linear layout"
            )
    # Under pipeline parallelism a rank holds only some layers; missing ones are fine there.
    if not seen and plan.layers and _pp_size() == 1:
        raise PlanError(f"{plan.source}: no MoE layer of the model matched the plan's layers {sorted(plan.layers)}")


def _pp_size() -> int:
    try:
        from vllm.distributed import get_pp_group

        return get_pp_group().world_size
    except Exception:  # noqa: BLE001 - no PP group means no PP
        return 1

