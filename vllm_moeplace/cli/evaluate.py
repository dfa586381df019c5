"""`moeplace evaluate --plan P.json [--plan ...] --trace T.npz [--json]`: score plans and baselines.

The trace is split by request (`Trace.split_by_request(--train-fraction)`): baselines are fitted
on the first part; every layout is scored on that part (in-sample) and on the other requests
(held-out, the default headline). Plans should have been fitted on the same first part (the
`--train-fraction` of `moeplace solve` / `moeplace baseline`); a plan that records another
fraction gets a note.

`--json` prints one JSON object, one key per layout (plan path as given, or baseline method):

    {"plan.json": {"kind": "plan", "source": "plan.json",
                   "held_out":  {"node_sends": .., "rank_sends": .., "hop_cost": .., "imbalance": .., "inter_layer_node_sends": ..},
                   "in_sample": {... same keys ...}},
     "linear":    {"kind": "baseline", "source": "linear", "held_out": {...}, "in_sample": {...}}}
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

from vllm_moeplace.plan import Plan, Topology, check_redundant_per_rank, load_plan
from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.solver.baselines import BASELINES, available_baselines, baseline_layers
from vllm_moeplace.metrics import METRIC_NAMES, Metrics, check_plan_fits_trace, evaluate_layers
from vllm_moeplace.routed_metrics import RoutingScore, score_routing
from vllm_moeplace.solver.topology_file import describe, resolve_topology
from vllm_moeplace.trace import Trace, load_trace

DEFAULT_BASELINES = ("linear", "round_robin", "eplb", "eplb_global", "greedy")
SHORT = {"node_sends": "node_sends", "rank_sends": "rank_sends", "hop_cost": "hop_cost",
         "imbalance": "imbalance", "inter_layer_node_sends": "inter_layer"}


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # "plan" | "baseline"
    source: str
    in_sample: Metrics
    held_out: Metrics
    layers: dict | None = None  # the layout, for the step-time prediction


def _baseline_list(text: str) -> list[str]:
    if text.strip().lower() == "none":
        return []
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in BASELINES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown baseline(s) {bad}; choose from {', '.join(BASELINES)} or 'none'")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", action="append", default=[], metavar="P.json", help="plan file to score (repeatable)")
    parser.add_argument("--trace", required=True, help="routing trace (.npz)")
    parser.add_argument("--train-fraction", type=float, default=0.5,
                        help="first fraction of requests = training part (baselines fitted there); the rest is held out (default 0.5)")
    parser.add_argument("--baselines", type=_baseline_list, default=list(DEFAULT_BASELINES),
                        help=f"comma list of baselines to score beside the plans, or 'none' (default {','.join(DEFAULT_BASELINES)}; "
                             f"greedy only when available)")
    parser.add_argument("--redundant-per-rank", type=int, default=None,
                        help="redundant copies per rank for the baselines (default: the first plan's, else 0)")
    parser.add_argument("--ep-size", type=int, help="EP size for the baselines when no --plan is given")
    topo = parser.add_mutually_exclusive_group()
    topo.add_argument("--ranks-per-node", type=int, help="with --ep-size: consecutive ranks per node")
    topo.add_argument("--topology", help="with --ep-size: topology file (nodes + link_cost JSON)")
    parser.add_argument("--router-window", type=int, default=1, metavar="W",
                        help="plans with request_routing: route W consecutive requests together (balanced by "
                             "regret under the share cap; default 1 = one at a time)")
    st = parser.add_argument_group("predicted MoE step time (simulator time model, held-out requests)")
    st.add_argument("--hardware", default="h800-deepep",
                    help="a profile of benchmarks/sim_params.json or a JSON file (default h800-deepep)")
    st.add_argument("--model-shape", default=None,
                    help="a model of benchmarks/sim_params.json or a JSON file (default: matched from the trace's model name; "
                         "without a match the step time is not printed)")
    st.add_argument("--phase-mix", type=float, default=None,
                    help="share of prefill steps for the 'mix' column (default: measured from the trace)")
    st.add_argument("--prefill-tokens-per-rank", type=int, default=4096, help="tokens per rank in a prefill step (default 4096)")
    st.add_argument("--decode-tokens-per-rank", type=int, default=128, help="tokens per rank in a decode step (default 128)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _plan_name(path: str, taken: set[str]) -> str:
    name = path
    while name in taken:
        name = f"{name}'"
    return name


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    plans: list[tuple[str, Plan]] = []
    for path in args.plan:
        plan = load_plan(path)
        check_plan_fits_trace(plan, trace)
        plans.append((path, plan))
    if plans:
        topology: Topology = plans[0][1].topology
        if args.ep_size is not None or args.ranks_per_node is not None or args.topology is not None:
            raise MoeplaceError("--ep-size/--ranks-per-node/--topology are only for scoring baselines without --plan")
    else:
        if args.ep_size is None:
            raise MoeplaceError("give at least one --plan, or --ep-size with --ranks-per-node/--topology to score the baselines alone")
        topology = resolve_topology(args.ep_size, args.ranks_per_node, args.topology)
    train, test = trace.split_by_request(args.train_fraction)
    notes: list[str] = []
    rows: list[Row] = []
    taken: set[str] = set()
    for path, plan in plans:
        name = _plan_name(path, taken)
        taken.add(name)
        fitted = plan.solver.get("train_fraction")
        if fitted is not None and abs(float(fitted) - args.train_fraction) > 1e-9:
            notes.append(f"{path} was fitted with train_fraction {fitted}, scored with {args.train_fraction}: "
                         f"its held-out part overlaps its training data")
        rows.append(Row(name, "plan", path, evaluate_layers(plan.layers, plan.topology, train),
                        evaluate_layers(plan.layers, plan.topology, test), plan.layers))
    if len({json.dumps(p.topology.to_json(), sort_keys=True) for _, p in plans}) > 1:
        notes.append(f"plans use different topologies; baselines use the first plan's ({describe(topology)})")
    red = args.redundant_per_rank
    if red is not None:
        check_redundant_per_rank(red, trace.num_experts, topology.ep_size)
    if red is None:
        red = 0
        if plans:
            p0 = plans[0][1]
            red = max(0, p0.slots_per_rank() - p0.num_experts // p0.ep_size)
    available = set(available_baselines())
    for method in args.baselines:
        if method not in available:
            notes.append(f"baseline {method} skipped: not available in this build")
            continue
        try:
            layers = baseline_layers(method, train, topology, red)
        except MoeplaceError as e:
            notes.append(f"baseline {method} skipped: {e}")
            continue
        name = _plan_name(method, taken)
        taken.add(name)
        rows.append(Row(name, "baseline", method, evaluate_layers(layers, topology, train), evaluate_layers(layers, topology, test),
                        layers))
    routed = {name: (score_routing(plan, train, args.router_window), score_routing(plan, test, args.router_window))
              for (path, plan), name in zip(plans, [r.name for r in rows if r.kind == "plan"])
              if plan.request_routing is not None}
    step, step_info = _step_times(rows, trace, test, topology, args, notes)
    for n in notes:
        print(f"moeplace evaluate: note: {n}", file=sys.stderr)
    if args.json:
        out = {}
        for r in rows:
            out[r.name] = {"kind": r.kind, "source": r.source, "held_out": r.held_out.as_dict(), "in_sample": r.in_sample.as_dict()}
            if step:
                out[r.name]["step_time_ms"] = step[r.name]
        for name, (ins, held) in routed.items():
            out[name]["request_routing"] = {"held_out": held.as_dict(), "in_sample": ins.as_dict()}
        print(json.dumps(out, indent=1))
        return 0
    _print_report(trace, train, test, topology, red, rows, args)
    _print_step_times(rows, step, step_info)
    for name, (ins, held) in routed.items():
        _print_routing(name, ins, held)
    return 0


def _print_routing(name: str, ins: RoutingScore, held: RoutingScore) -> None:
    """A request-aware plan: each request routed by the plan's router from its own prefill
    signature, against the same placement with requests spread evenly over the ranks."""
    print(f"\nrequest routing of {name} (token origin = a rank of the request's group; spread = the same placement "
          "with requests spread evenly)")
    cols = ("node_sends_prefill", "node_sends_decode", "node_sends", "rank_sends", "imbalance")
    print(f"{'requests':<10} {'origin':<7} " + " ".join(f"{c:>18}" for c in cols) + f" {'group share':>12} {'token share':>12}")
    for part, sc in (("held-out", held), ("in-sample", ins)):
        for kind in ("routed", "spread"):
            m = getattr(sc, kind).as_dict()
            share = f"{sc.share_imbalance:>12.3f} {sc.token_share_imbalance:>12.3f}" if kind == "routed" else ""
            print(f"{part:<10} {kind:<7} " + " ".join(f"{m[c]:>18.4f}" for c in cols) + f" {share}")
        if sc.spread.node_sends_decode > 0:
            print(f"{part:<10} decode node_sends routed / spread: {sc.routed.node_sends_decode / sc.spread.node_sends_decode:.3f}"
                  f"; {sc.fallback_requests} request(s) without a signature (fallback)")


def _step_times(rows: list[Row], trace: Trace, test: Trace, topology: Topology, args: argparse.Namespace,
                notes: list[str]) -> tuple[dict[str, dict[str, float]], dict]:
    """{layout: {prefill, decode, mix} ms} on the held-out requests, or {} with a note when the model
    shape is unknown. A wrong --hardware / --model-shape / batch size is an error, not a note."""
    from vllm_moeplace.sim.network import SimParamsError
    from vllm_moeplace.sim.predict import batch_sources, phase_batches, predict, step_model

    for flag in ("prefill_tokens_per_rank", "decode_tokens_per_rank"):
        if getattr(args, flag) <= 0:
            raise MoeplaceError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")
    if args.phase_mix is not None and not 0.0 <= args.phase_mix <= 1.0:
        raise MoeplaceError(f"--phase-mix {args.phase_mix}: must be in [0, 1] (share of prefill steps)")
    try:
        model = step_model(trace, topology.ep_size, args.hardware, args.model_shape, args.phase_mix,
                           args.prefill_tokens_per_rank, args.decode_tokens_per_rank)
    except SimParamsError as e:
        if args.model_shape is None and "no model shape" in str(e):
            notes.append(f"step time not predicted: {e}")
            return {}, {}
        raise
    batches = phase_batches(test, model, topology.ep_size)
    out = {r.name: predict(r.layers, topology, test, model, batches) for r in rows}
    return out, dict(model.describe(), batches_from=batch_sources(test))


def _print_step_times(rows: list[Row], step: dict[str, dict[str, float]], info: dict) -> None:
    if not step:
        return
    print(f"\npredicted MoE step time, held-out requests (ms per step, all MoE layers; {info['hardware']}, "
          f"{info['model_shape']}, {info['tokens_per_rank']['prefill']} / {info['tokens_per_rank']['decode']} tokens per rank "
          f"in prefill / decode; mix = {info['phase_mix']:.3f} prefill steps, {info['phase_mix_source']})")
    ref = next((step[r.name] for r in rows if r.kind == "baseline" and r.source == "linear"), None)
    width = max([len(r.name) for r in rows] + [6])
    head = f"{'layout':<{width}}  {'prefill':>10}  {'decode':>10}  {'mix':>10}"
    if ref is not None:
        head += f"  {'prefill/lin':>11}  {'decode/lin':>11}  {'mix/lin':>11}"
    print(head)
    for r in rows:
        t = step[r.name]
        line = f"{r.name:<{width}}  {t['prefill']:>10.3f}  {t['decode']:>10.3f}  {t['mix']:>10.3f}"
        if ref is not None:
            line += "".join(f"  {t[k] / ref[k]:>11.3f}" for k in ("prefill", "decode", "mix"))
        print(line)


def _print_report(trace: Trace, train: Trace, test: Trace, topology: Topology, red: int, rows: list[Row],
                  args: argparse.Namespace) -> None:
    model = trace.meta.get("model", "?")
    print(f"trace {args.trace}: {model}, {trace.num_tokens} tokens, {len(set(trace.request_ids.tolist()))} requests, "
          f"{trace.num_layers} MoE layers, {trace.num_experts} experts, top-{trace.top_k}")
    print(f"split by request: train = first {args.train_fraction:g} ({train.num_tokens} tokens, "
          f"{len(set(train.request_ids.tolist()))} requests), held-out = the rest ({test.num_tokens} tokens, "
          f"{len(set(test.request_ids.tolist()))} requests)")
    print(f"baselines: {describe(topology)}, {red} redundant slot(s) per rank, fitted on train")
    ref = next((r for r in rows if r.kind == "baseline" and r.source == "linear"), None)
    width = max([len(r.name) for r in rows] + [6])
    for part, title in (("held_out", "held-out requests"), ("in_sample", "in-sample (training requests)")):
        print(f"\n{title}")
        head = f"{'layout':<{width}}  " + "  ".join(f"{SHORT[m]:>11}" for m in METRIC_NAMES)
        if ref is not None:
            head += f"  {'node/linear':>11}"
        print(head)
        for r in rows:
            m: Metrics = getattr(r, part)
            line = f"{r.name:<{width}}  " + "  ".join(f"{getattr(m, k):>11.4f}" for k in METRIC_NAMES)
            if ref is not None:
                line += f"  {m.node_sends / getattr(ref, part).node_sends:>11.3f}"
            print(line)
