"""`moeplace solve`: compute a topology-aware placement plan from a routing trace."""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.plan import Topology, linear_layout
from vllm_moeplace.trace import load_trace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="routing trace (.npz)")
    p.add_argument("--ep-size", type=int, required=True, help="number of EP ranks R")
    topo = p.add_mutually_exclusive_group(required=True)
    topo.add_argument("--ranks-per-node", type=int, help="G consecutive ranks per node")
    topo.add_argument("--topology", help="JSON file {nodes: [[ranks]], link_cost: [[...]]}")
    p.add_argument("--objective", default="node_sends", choices=["node_sends", "rank_sends", "hop_cost"])
    p.add_argument("--inter-layer-weight", type=float, default=0.0)
    p.add_argument("--max-imbalance", type=float, default=1.05, help="train max/mean load bound (default 1.05)")
    p.add_argument("--redundant-per-rank", type=int, default=0, help="extra slots per rank for expert copies")
    p.add_argument(
        "--copy-placement", default="locality", choices=["locality", "balance"],
        help="locality (default): copies by exact train node_sends savings under the replica rule, within the load cap; "
        "balance: the earlier EPLB-style placement",
    )
    p.add_argument("--time-limit", type=float, default=60.0, help="total seconds (default 60)")
    p.add_argument("--train-fraction", type=float, default=1.0, help="plan from this share of requests; rest held out")
    p.add_argument("--balance-folds", type=int, default=1, help="also bound the load of each of this many request folds")
    p.add_argument(
        "--balance-target", default="train", choices=["train", "expected"],
        help="train: every layer's train load <= --max-imbalance; expected: mean predicted held-out imbalance <= it",
    )
    p.add_argument("--balance-risk", type=float, default=0.0, help="keep this many std of request-sampling noise under the cap")
    p.add_argument(
        "--balance-confidence", type=float, default=0.5,
        help="with --balance-target expected: bound this quantile of the held-out imbalance (default 0.5: its mean)",
    )
    p.add_argument(
        "--risk-scale", type=float, default=None,
        help="variance factor on the load-noise model (default: measured on the train requests; 1 = raw model)",
    )
    p.add_argument(
        "--preserve-groups", type=int, nargs="?", const=-1, default=0, metavar="N",
        help="group-preserving mode for grouped top-k models: every expert stays in the physical slots of its own "
        "id group (N groups of E/N); without N, read n_group from --model DIR/config.json",
    )
    p.add_argument("--model", default=None, help="model folder (or its config.json); read for n_group by --preserve-groups")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="same output for the same seed, regardless of load")
    p.add_argument("--model-name", default=None)
    p.add_argument("--out", required=True, help="plan.json to write")


def _topology(args: argparse.Namespace) -> Topology:
    from vllm_moeplace.solver.topology_file import resolve_topology

    if args.ep_size <= 0:
        raise MoeplaceError(f"--ep-size {args.ep_size}: must be positive")
    return resolve_topology(args.ep_size, ranks_per_node=args.ranks_per_node, path=args.topology)


def model_n_group(path: str) -> int:
    """n_group from a Hugging Face model folder's config.json (or the file itself)."""
    import json
    from pathlib import Path

    f = Path(path)
    if f.is_dir():
        f = f / "config.json"
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise MoeplaceError(f"--model {path}: cannot read {f}: {e}") from None
    n = cfg.get("n_group", (cfg.get("text_config") or {}).get("n_group"))
    if not isinstance(n, int) or n < 1:
        raise MoeplaceError(f"--model {path}: {f} has no positive integer n_group (got {n!r}); pass --preserve-groups N")
    return n


def _preserve_groups(args: argparse.Namespace) -> int:
    if args.preserve_groups == -1:
        if not args.model:
            raise MoeplaceError("--preserve-groups without N needs --model DIR to read n_group from its config.json")
        return model_n_group(args.model)
    return args.preserve_groups


def run(args: argparse.Namespace) -> int:
    from vllm_moeplace.solver.options import SolveOptions
    from vllm_moeplace.solver.pipeline import solve

    try:
        opts = SolveOptions(
            objective=args.objective,
            inter_layer_weight=args.inter_layer_weight,
            max_imbalance=args.max_imbalance,
            redundant_per_rank=args.redundant_per_rank,
            copy_placement=args.copy_placement,
            time_limit=args.time_limit,
            train_fraction=args.train_fraction,
            seed=args.seed,
            balance_folds=args.balance_folds,
            balance_target=args.balance_target,
            balance_risk=args.balance_risk,
            risk_scale=args.risk_scale,
            balance_confidence=args.balance_confidence,
            deterministic=args.deterministic,
            preserve_groups=_preserve_groups(args),
        )
    except ValidationError as e:
        err = e.errors()[0]
        raise MoeplaceError(f"--{str(err['loc'][0]).replace('_', '-')} {err.get('input')!r}: {err['msg']}") from None
    topology = _topology(args)
    trace = load_trace(args.trace)
    meta_name = trace.meta.get("model") if isinstance(trace.meta, dict) else None
    plan = solve(trace, topology, opts, model_name=args.model_name or meta_name or "unknown", trace_path=args.trace)
    plan.save(args.out)
    s = plan.solver
    print(
        f"{s['status']}  objective {s['objective_name']} {s['objective']:.4f} (train)  bound {s['best_bound']:.4f}  "
        f"gap {100 * s['gap']:.1f}%  time {s['time_s']:.1f}s  cp-sat {s['cpsat_improvements']}/{s['cpsat_calls']} improving"
    )
    if "warning" in s:
        print(f"warning: {s['warning']}")
    if opts.train_fraction < 1.0:
        from vllm_moeplace.metrics import evaluate_layers

        held = trace.split_by_request(opts.train_fraction)[1]
        lin = {l: linear_layout(trace.num_experts, args.ep_size) for l in plan.layers}
        m = evaluate_layers(plan.layers, topology, held)
        b = evaluate_layers(lin, topology, held)
        print("held-out      node_sends  rank_sends  hop_cost  imbalance")
        for name, x in (("plan", m), ("linear", b)):
            print(f"{name:12s} {x.node_sends:10.3f} {x.rank_sends:11.3f} {x.hop_cost:9.3f} {x.imbalance:10.3f}")
        print(f"node_sends vs linear: {m.node_sends / b.node_sends:.3f}x")
    print(f"wrote {args.out}")
    return 0
