"""`moeplace baseline --trace T.npz --ep-size R (--ranks-per-node G | --topology F) --method M --out plan.json`.

Writes a baseline placement in the plan format (see solver/baselines.py for each method). Load-
driven methods are fitted on the first `--train-fraction` of requests (default 0.5, the same
split `moeplace evaluate` scores held-out on; 1 = the whole trace, for a plan to serve).
"""

from __future__ import annotations

import argparse

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.plan import check_redundant_per_rank
from vllm_moeplace.solver.baselines import BASELINES, baseline_plan
from vllm_moeplace.metrics import evaluate_plan
from vllm_moeplace.solver.topology_file import describe, resolve_topology
from vllm_moeplace.trace import load_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="routing trace (.npz)")
    parser.add_argument("--ep-size", type=int, required=True, help="number of EP ranks R")
    topo = parser.add_mutually_exclusive_group(required=True)
    topo.add_argument("--ranks-per-node", type=int, help="consecutive ranks per node G (R / G nodes)")
    topo.add_argument("--topology", help="topology file: {\"nodes\": [[ranks...], ...], \"link_cost\": [[...]]}")
    parser.add_argument("--method", required=True, choices=BASELINES, help="baseline placement method")
    parser.add_argument("--redundant-per-rank", type=int, default=0, help="extra slots per rank for redundant copies (default 0)")
    parser.add_argument("--num-groups", type=int, help="eplb: expert groups (the model's n_group; default one per node)")
    parser.add_argument("--train-fraction", type=float, default=0.5,
                        help="fit on this first fraction of requests (default 0.5; 1 = all)")
    parser.add_argument("--model-name", help="model name for the plan (default: the trace's meta.model)")
    parser.add_argument("--out", required=True, help="plan file to write (atomically)")


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    topology = resolve_topology(args.ep_size, args.ranks_per_node, args.topology)
    check_redundant_per_rank(args.redundant_per_rank, trace.num_experts, topology.ep_size)
    if not 0.0 < args.train_fraction <= 1.0:
        raise MoeplaceError(f"--train-fraction must be in (0, 1], got {args.train_fraction}")
    train = trace if args.train_fraction == 1.0 else trace.split_by_request(args.train_fraction)[0]
    kwargs = {"num_groups": args.num_groups} if args.num_groups is not None else {}
    if args.num_groups is not None and args.method != "eplb":
        raise MoeplaceError(f"--num-groups applies to --method eplb only, not {args.method}")
    plan = baseline_plan(
        args.method, train, topology, args.redundant_per_rank, model_name=args.model_name,
        extra={"train_fraction": args.train_fraction, "trace": str(args.trace)}, **kwargs,
    )
    plan.save(args.out)
    m = evaluate_plan(plan, train)
    print(f"wrote {args.out}: {args.method}, {describe(topology)}, {plan.slots_per_rank()} slots per rank, "
          f"{len(plan.layers)} layers; in-sample node_sends {m.node_sends:.4f}, imbalance {m.imbalance:.4f}")
    return 0
