"""The second placement mechanism: a static logical -> physical table applied right after top-k.

Used whenever the plan is not a pure permutation that vLLM's router can emit by itself: plans
with redundant copies (physical slots R*S > E) and, on grouped top-k models (DeepSeek-V3/R1,
n_group > 1), plans that move experts between groups. The permutation mechanism (remap.py)
stays the zero-cost path for everything else.

How it works inside vLLM 0.32/0.33 (one main-model load, nothing global left behind):

1. While the main model is built, `physical_slots()` makes every MoE layer of the planned size
   have R*S physical experts (vLLM's `determine_expert_counts`, looked up by `FusedMoEFactory` at
   call time); vLLM then builds its own linear layout over R*S physical ids: rank r holds physical
   r*S .. r*S+S-1, and its expert map, kernels and all-reduce work unchanged.
2. Before weights stream in, each planned `RoutedExperts` maps a checkpoint (logical) expert id
   to the local slot that the plan gives it on this rank (or -1), so vLLM's own weight loader puts
   every copy of expert e -- weights and every per-expert quantisation tensor -- where the plan
   says. vLLM's own redundant-expert candidates (physical ids >= E under EPLB's initial map) are
   skipped: the plan, not EPLB's initial map, says where copies live.
3. The router keeps scoring LOGICAL experts in checkpoint order (grouped top-k, score-correction
   bias, softmax/sigmoid and renormalisation exactly upstream's); its `_apply_eplb_mapping` step
   (where vLLM's EPLB maps logical -> physical) maps the chosen ids through a preallocated table
   with the shared replica rule (replica.py). No host sync, no allocation that depends on data
   beyond an arange of the batch: CUDA-graph and torch.compile friendly.

With replicated tokens (TP+EP, every rank routes the same batch) the rule uses a virtual origin
t mod R from the token's batch index, so every rank picks the same copy and the all-reduce adds
each expert exactly once.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from vllm_moeplace.plan import Plan, PlanError
from vllm_moeplace.replica import CandidateTable, candidate_table

if TYPE_CHECKING:
    import torch


def layer_tables(plan: Plan) -> dict[int, CandidateTable]:
    """The replica rule's candidate table of every planned layer."""
    return {l: candidate_table(a, plan.num_experts, plan.topology.node_of_rank) for l, a in sorted(plan.layers.items())}


def map_to_physical(
    topk_ids: "torch.Tensor", cand: "torch.Tensor", count: "torch.Tensor", base: int = 0, span: int | None = None
) -> "torch.Tensor":
    """Logical top-k ids [T, K] -> physical ids under the replica rule. cand: int64 [R, E, C];
    count: int64 [R, E]. Returns the input's dtype.

    The ranks that route the same tokens are `base .. base+span-1` (default: all R, i.e. every
    rank routes the whole batch, as under TP+EP); token t of the batch gets the virtual origin
    base + t mod span and the spread key t // span, the same on every rank that routes it
    (replica.replicated_origin for base 0, span R). With data-parallel attention (each DP rank
    routes only its own tokens, its TP ranks the same ones) base = dp_rank * tp_size, span = tp_size.
    """
    import torch

    T, K = topk_ids.shape
    span = cand.shape[0] if span is None else span
    t = torch.arange(T, device=topk_ids.device, dtype=torch.int64)
    origin = (base + t % span).unsqueeze(1).expand(T, K)
    key = (t // span).unsqueeze(1) * K + torch.arange(K, device=topk_ids.device, dtype=torch.int64).unsqueeze(0)
    ids = topk_ids.long()
    j = torch.remainder(key, count[origin, ids])
    return cand[origin, ids, j].to(topk_ids.dtype)


@contextlib.contextmanager
def physical_slots(plan: Plan) -> Iterator[list[int]]:
    """While the main model is built: MoE layers with the plan's expert count get R*S physical
    experts. Yields the list of (logical) expert counts seen, for the post-build check."""
    from vllm.model_executor.layers.fused_moe import layer as fm_layer

    orig = fm_layer.determine_expert_counts
    physical = plan.ep_size * plan.slots_per_rank()
    seen: list[int] = []

    def determine_expert_counts(num_experts: int, num_redundant_experts: int, *args: Any, **kwargs: Any):
        g, logical, shared = orig(num_experts, num_redundant_experts, *args, **kwargs)
        seen.append(int(num_experts))
        if num_experts == plan.num_experts and num_redundant_experts == 0:
            g = physical
        return g, logical, shared

    fm_layer.determine_expert_counts = determine_expert_counts
    try:
        yield seen
    finally:
        fm_layer.determine_expert_counts = orig


def _layer_of(name: str) -> int | None:
    m = re.search(r"\blayers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def runners_by_layer(model: Any) -> dict[int, Any]:
    """{decoder layer: MoERunner} of a built vLLM model (the runner holds router + experts)."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    out: dict[int, Any] = {}
    for mod in model.modules():
        experts = getattr(mod, "routed_experts", None)
        if isinstance(experts, RoutedExperts) and hasattr(mod, "router"):
            layer = _layer_of(experts.layer_name)
            if layer is not None:
                out[layer] = mod
    return out


def origin_span(moe_parallel_config: Any, ep_size: int) -> tuple[int, int]:
    """(base, span) of map_to_physical for a layer: which EP ranks route the same tokens."""
    dp = int(getattr(moe_parallel_config, "dp_size", 1) or 1)
    if dp <= 1:
        return 0, ep_size
    tp = max(1, ep_size // dp)
    return int(getattr(moe_parallel_config, "dp_rank", 0)) * tp, tp


def install(model: Any, plan: Plan, per_expert_loader: bool = True) -> int:
    """Steps 2 and 3 on a built (not yet loaded) model. Returns the number of layers mapped.

    `per_expert_loader=False` (fused-expert architectures, e.g. Llama-4): vLLM's loader hands
    RoutedExperts blocks of PHYSICAL rows taken by its own linear expert map, which the checkpoint
    stream has already gathered into physical order (remap.FusedGather); the logical -> local slot
    map of step 2 must then stay vLLM's.

    Refuses (PlanError) a layer vLLM did not build with R*S physical / S local experts, a router
    that has no logical->physical step, and monolithic kernels that route inside the kernel.
    """
    import torch
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    S, R, E = plan.slots_per_rank(), plan.ep_size, plan.num_experts
    tables = layer_tables(plan)
    runners = runners_by_layer(model)
    done = 0
    for layer, table in tables.items():
        runner = runners.get(layer)
        if runner is None:
            continue  # another pipeline stage holds it (checked after loading)
        experts, router = runner.routed_experts, runner.router
        where = f"{plan.source}: field 'layers.{layer}'"
        if experts.global_num_experts != R * S or experts.local_num_experts != S:
            raise PlanError(
                f"{where}: vLLM built {experts.layer_name} with {experts.local_num_experts}/"
                f"{experts.global_num_experts} local/physical experts, the plan needs {S}/{R * S}"
            )
        if getattr(experts.quant_method, "is_monolithic", False):
            raise PlanError(
                f"{where}: the MoE kernel of {experts.layer_name} ({type(experts.quant_method).__name__}) routes "
                "inside the kernel, where a logical->physical table cannot be applied; refusing"
            )
        if not isinstance(router, BaseRouter) or router.eplb_state is not None:
            raise PlanError(f"{where}: router {type(router).__name__} has no free logical->physical step; refusing")
        mpc = experts.moe_config.moe_parallel_config
        local = plan.expert_map(layer, int(mpc.ep_rank))  # logical -> local slot on this rank, or -1
        base, span = origin_span(mpc, R)

        def to_local(expert_id: int, _local: np.ndarray = local) -> int:
            # vLLM's redundant candidates (physical >= E under EPLB's initial map) repeat a
            # logical expert already placed through its id < E: skip them.
            return int(_local[expert_id]) if 0 <= expert_id < E else -1

        if per_expert_loader:
            experts._map_global_expert_id_to_local_expert_id = to_local
        device = experts.w13_weight.device if hasattr(experts, "w13_weight") else torch.device("cpu")
        cand = torch.as_tensor(table.cand, dtype=torch.int64, device=device)
        count = torch.as_tensor(table.count, dtype=torch.int64, device=device)

        def apply_mapping(
            topk_ids: "torch.Tensor", _c: "torch.Tensor" = cand, _n: "torch.Tensor" = count, _b: int = base, _s: int = span
        ) -> "torch.Tensor":
            return map_to_physical(topk_ids, _c, _n, _b, _s)

        router._apply_eplb_mapping = apply_mapping
        router._moeplace_table = (cand, count)
        done += 1
    return done


def is_installed(router: Any) -> bool:
    return hasattr(router, "_moeplace_table")
