"""`moeplace random-plan`: a seeded random permutation of experts per MoE layer, as plan.json.

Until a solver plan is at hand this is the non-trivial placement the demo and the end-to-end
tests serve with: outputs must equal the default layout's for ANY permutation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.plan import Plan, Topology


def model_moe_info(model_dir: str | Path) -> tuple[str, int, list[int]]:
    """(architecture, num routed experts, MoE decoder-layer indices) from a model's config.json,
    read and checked as the server checks it (`serving.validate.model_moe_facts`)."""
    from vllm_moeplace.serving.arch import ARCHITECTURES, arch_for
    from vllm_moeplace.serving.validate import model_moe_facts, read_model_config

    cfg, cfg_path = read_model_config(model_dir)
    archs = getattr(cfg, "architectures", None)
    arch = arch_for(archs if isinstance(archs, list) and all(isinstance(a, str) for a in archs) else None)
    if arch is None:
        raise MoeplaceError(
            f"{cfg_path}: field 'architectures': value {archs}: not a supported MoE "
            f"architecture ({', '.join(ARCHITECTURES)})"
        )
    num_experts, moe_layers = model_moe_facts(arch, cfg, cfg_path)
    return arch.name, num_experts, moe_layers


def random_plan(
    model_dir: str | Path,
    ep_size: int,
    seed: int = 0,
    ranks_per_node: int | None = None,
    groups: int = 1,
    redundant_per_rank: int = 0,
) -> Plan:
    """Each MoE layer: a uniformly random permutation of the experts, cut into ep_size ranks.

    `groups` > 1 permutes only within contiguous id groups (grouped top-k models).
    `redundant_per_rank` > 0 appends that many random copies to each rank (experts it does not
    hold yet, in random slots), so the plan exercises the serving path for redundant copies.
    """
    _, num_experts, moe_layers = model_moe_info(model_dir)
    if ep_size <= 0 or num_experts % ep_size:
        raise MoeplaceError(f"--ep-size: value {ep_size} does not divide the model's {num_experts} experts")
    if groups <= 0 or num_experts % groups:
        raise MoeplaceError(f"--groups: value {groups} does not divide the model's {num_experts} experts")
    per_rank = num_experts // ep_size
    if redundant_per_rank < 0 or per_rank + redundant_per_rank > num_experts:
        raise MoeplaceError(
            f"--redundant-per-rank: value {redundant_per_rank} must be in 0..{num_experts - per_rank} "
            f"(a rank holds {per_rank} experts and at most one copy of each of the {num_experts})"
        )
    rng = np.random.default_rng(seed)
    size = num_experts // groups
    layers = {}
    for layer in moe_layers:
        perm = np.concatenate([g * size + rng.permutation(size) for g in range(groups)])
        a = perm.reshape(ep_size, per_rank)
        if redundant_per_rank:
            rows = []
            for r in range(ep_size):
                extra = rng.choice(np.setdiff1d(np.arange(num_experts), a[r]), redundant_per_rank, replace=False)
                rows.append(rng.permutation(np.concatenate([a[r], extra])))
            a = np.stack(rows)
        layers[layer] = a
    return Plan(
        model_name=str(model_dir),
        num_experts=num_experts,
        moe_layers=moe_layers,
        ep_size=ep_size,
        topology=Topology.uniform(ep_size, ranks_per_node or ep_size),
        layers=layers,
        solver={"method": "random_permutation", "seed": seed, "groups": groups, "redundant_per_rank": redundant_per_rank},
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (config.json)")
    parser.add_argument("--ep-size", type=int, required=True, help="expert-parallel size the plan is for")
    parser.add_argument("--out", required=True, help="plan.json to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks-per-node", type=int, default=None, help="default: all ranks on one node")
    parser.add_argument("--groups", type=int, default=1, help="keep experts within this many contiguous id groups")
    parser.add_argument("--redundant-per-rank", type=int, default=0, help="random extra copies per rank (default 0)")


def run(args: argparse.Namespace) -> int:
    plan = random_plan(args.model, args.ep_size, args.seed, args.ranks_per_node, args.groups, args.redundant_per_rank)
    plan.save(args.out)
    print(f"wrote {args.out}: {len(plan.layers)} MoE layers, {plan.num_experts} experts over {plan.ep_size} ranks")
    return 0
