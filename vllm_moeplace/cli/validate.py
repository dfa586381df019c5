"""`moeplace validate plan.json [plan.json ...] [--model DIR] [--trace T.npz]`: check plans.

Always: the plan specification (`plan.validate_plan`, via `load_plan`). With `--model DIR`: the
plan must pass exactly the model checks the server runs at config time (`serving.validate.
check_plan_fits`: the HF `config.json`'s routed experts and MoE layers, facts from the serving
adapter's architecture table, `serving/arch.py`, which needs no vLLM), for a server of EP size
`--ep-size` (default: the plan's); the serving mechanism it will use (permute / map) is printed.
With `--trace`: the plan must fit the trace (experts, layers) so it can be scored.
With `--schema`: print the plan file's JSON Schema (`plan_schema.py`) and check nothing else.
Exit status 0 when every plan passes, 2 at the first failure (one line naming file, field, value).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.plan import Plan, PlanError, load_plan
from vllm_moeplace.metrics import check_plan_fits_trace
from vllm_moeplace.solver.topology_file import describe
from vllm_moeplace.trace import load_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plans", nargs="*", metavar="plan.json", help="plan file(s) to check")
    parser.add_argument("--schema", action="store_true",
                        help="print the plan file's JSON Schema (draft 2020-12) to stdout and exit")
    parser.add_argument("--model", metavar="DIR", help="model directory with a Hugging Face config.json")
    parser.add_argument("--ep-size", type=int, metavar="N",
                        help="the server's EP size (tensor x data x prefill-context parallel); with --model, the "
                             "server's whole config-time check runs for that EP size (default: the plan's ep_size)")
    parser.add_argument("--trace", help="also check the plan fits this trace (.npz)")


def load_hf_config(model_dir: str) -> Any:
    """config.json of a model directory as an attribute namespace (what the arch table reads)."""
    from vllm_moeplace.serving.validate import read_model_config

    return read_model_config(model_dir)[0]


def check_against_model(plan: Plan, model_dir: str, ep_size: int | None = None) -> list[str]:
    """Raise PlanError if the plan does not fit the model; return notes on servability.

    Exactly the server's config-time check (`serving.validate.check_plan_fits`, no vLLM import),
    for a server whose EP size is `ep_size` (default: the plan's own), so `validate --model DIR
    --ep-size N` accepts and refuses the same plans as `vllm serve DIR` at EP size N."""
    from vllm_moeplace.serving.validate import MAP, check_plan_fits, mechanism

    cfg = load_hf_config(model_dir)
    cfg_src = str(Path(model_dir) / "config.json")
    arch = check_plan_fits(plan, cfg, True, plan.ep_size if ep_size is None else ep_size, model_src=cfg_src)
    if mechanism(plan, arch, cfg) == MAP:
        return ["served by the mapping mechanism (logical -> physical table after top-k: redundant copies "
                "or cross-group moves), replica rule origin-node-spread/v1"]
    return ["served by the permutation mechanism (zero runtime cost)"]


def run(args: argparse.Namespace) -> int:
    if args.schema:
        if args.plans or args.model or args.trace or args.ep_size is not None:
            raise MoeplaceError("--schema prints the schema only; give no plan, --model, --ep-size or --trace with it")
        import json

        from vllm_moeplace.plan_schema import plan_json_schema

        print(json.dumps(plan_json_schema(), indent=1))
        return 0
    if not args.plans:
        raise MoeplaceError("no plan file given (or pass --schema to print the plan's JSON Schema)")
    trace = load_trace(args.trace) if args.trace else None
    for path in args.plans:
        plan = load_plan(path)
        notes = check_against_model(plan, args.model, args.ep_size) if args.model else []
        if args.ep_size is not None and not args.model and plan.ep_size != args.ep_size:
            raise PlanError(f"{path}: field 'ep_size': value {plan.ep_size} but --ep-size is {args.ep_size}")
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
