"""`moeplace validate plan.json [plan.json ...] [--model DIR] [--trace T.npz]`: check plans.

Always: the plan specification (`plan.validate_plan`, via `load_plan`). With `--model DIR`: the
model's HF `config.json` must agree on the number of routed experts and the MoE layers (facts from
the serving adapter's architecture table, `serving/arch.py`, which needs no vLLM) and the plan
must pass exactly the model checks the server runs at config time (`serving.validate.
check_plan_fits`); the serving mechanism it will use (permute / map) is printed.
With `--trace`: the plan must fit the trace (experts, layers) so it can be scored.
Exit status 0 when every plan passes, 2 at the first failure (one line naming file, field, value).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.jsonio import read_json
from vllm_moeplace.plan import Plan, PlanError, load_plan
from vllm_moeplace.metrics import check_plan_fits_trace
from vllm_moeplace.solver.topology_file import describe
from vllm_moeplace.trace import load_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plans", nargs="+", metavar="plan.json", help="plan file(s) to check")
    parser.add_argument("--model", metavar="DIR", help="model directory with a Hugging Face config.json")
    parser.add_argument("--trace", help="also check the plan fits this trace (.npz)")


def _namespace(obj: Any) -> Any:
    if isinstance(obj, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in obj.items()})
    return obj


def load_hf_config(model_dir: str) -> Any:
    """config.json of a model directory as an attribute namespace (what the arch table reads)."""
    path = Path(model_dir) / "config.json"
    data = read_json(path, "model config", MoeplaceError)
    if not isinstance(data, dict):
        raise MoeplaceError(f"{path}: expected a JSON object")
    return _namespace(data)


def check_against_model(plan: Plan, model_dir: str) -> list[str]:
    """Raise PlanError if the plan does not fit the model; return notes on servability."""
    from vllm_moeplace.serving.arch import ARCHITECTURES, arch_for  # pure Python, no vLLM

    cfg = load_hf_config(model_dir)
    cfg_src = str(Path(model_dir) / "config.json")
    archs = list(getattr(cfg, "architectures", None) or [])
    arch = arch_for(archs)
    if arch is None:
        raise PlanError(f"{cfg_src}: field 'architectures': value {archs}: no known MoE layout "
                        f"(known: {', '.join(ARCHITECTURES)})")
    E = arch.num_experts(cfg)
    if plan.num_experts != E:
        raise PlanError(f"{plan.source}: field 'model.num_experts': value {plan.num_experts}, but {cfg_src} has {E} routed experts")
    moe = arch.moe_layers(cfg)
    if sorted(plan.moe_layers) != sorted(moe):
        raise PlanError(f"{plan.source}: field 'model.moe_layers': value {plan.moe_layers}, but {cfg_src} "
                        f"makes layers {moe} MoE layers")
    # The server's own model checks (no vLLM import): a plan validate accepts, the server accepts
    # for this model, given a server with EP size = the plan's ep_size.
    from vllm_moeplace.serving.validate import MAP, check_plan_fits, mechanism

    check_plan_fits(plan, cfg, True, plan.ep_size)
    if mechanism(plan, arch, cfg) == MAP:
        return ["served by the mapping mechanism (logical -> physical table after top-k: redundant copies "
                "or cross-group moves), replica rule origin-node-spread/v1"]
    return ["served by the permutation mechanism (zero runtime cost)"]


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace) if args.trace else None
    for path in args.plans:
        plan = load_plan(path)
        notes = check_against_model(plan, args.model) if args.model else []
        if trace is not None:
            check_plan_fits_trace(plan, trace)
        red = plan.slots_per_rank() * plan.ep_size - plan.num_experts
        print(f"{path}: valid: {plan.num_experts} experts, {len(plan.layers)} of {len(plan.moe_layers)} MoE layers placed, "
              f"{describe(plan.topology)}, {plan.slots_per_rank()} slots per rank ({red} redundant), "
              f"method {plan.solver.get('method', '?')}"
              + (f"; fits {args.model}" if args.model else "") + (f"; fits {args.trace}" if trace is not None else ""))
        for n in notes:
            print(f"{path}: note: {n}")
    return 0
