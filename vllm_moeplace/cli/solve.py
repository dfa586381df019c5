"""`moeplace solve`: compute a topology-aware placement plan from a routing trace.

A load-only trace (expert counts, `load_trace.py`: SGLang stat / TensorRT-LLM statistics imports)
is solved with `--objective balance` (the default for such a file; `load_balance.py`); every option
that needs per-token routing is refused for it with one message naming the option."""

from __future__ import annotations

import argparse
import sys
import time
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.plan import Topology, check_redundant_per_rank, linear_layout
from vllm_moeplace.solver.options import CLI_GROUPS, SolveOptions
from vllm_moeplace.trace import load_trace


# Flags whose command-line form differs from the plain field (type, default, docstring).
_FLAG_EXTRAS: dict[str, dict[str, Any]] = {
    # `balance` is served by load_balance.py (load-only traces), not by the per-token search.
    "objective": {"choices": ["node_sends", "rank_sends", "hop_cost", "step_time", "balance"],
                  "type": lambda v: v.replace("-", "_"),
                  "help_suffix": " balance: place by expert load only (the default, and the only choice, for a "
                                 "load-only trace). step-time is accepted for step_time."},
    # Without N: read n_group from --model DIR/config.json.
    "preserve_groups": {"nargs": "?", "const": -1, "metavar": "N",
                        "help_suffix": " Without N, n_group is read from --model DIR/config.json."},
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(field: FieldInfo, extra: str = "") -> str:
    text = " ".join((field.description or "").split()) + extra
    default = field.get_default()
    return f"{text} (default: {default})" if not isinstance(default, bool) else text


def add_option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per public SolveOptions field, in the groups of CLI_GROUPS: type, default and
    choices from the field's annotation, help from its docstring. Defaults stay None here so that
    SolveOptions itself applies (and validates) them."""
    fields = SolveOptions.model_fields
    for group, names in CLI_GROUPS.items():
        g = p.add_argument_group(f"{group} options")
        for name in names:
            f = fields[name]
            extras = dict(_FLAG_EXTRAS.get(name, {}))
            suffix = extras.pop("help_suffix", "")
            kind, choices = _kind(f.annotation)
            if kind is bool:
                g.add_argument(_flag(name), action="store_true", default=None, help=_help(f, suffix))
                continue
            kw: dict[str, Any] = {"type": kind, "choices": choices, "default": None, "help": _help(f, suffix)}
            kw.update(extras)
            g.add_argument(_flag(name), **kw)


def _kind(annotation: Any) -> tuple[type, list | None]:
    """(argparse type, choices) of a field annotation: Literal -> its values, X | None -> X."""
    if get_origin(annotation) is Literal:
        values = list(get_args(annotation))
        return type(values[0]), values
    if get_origin(annotation) in (Union, types.UnionType):
        (inner,) = [a for a in get_args(annotation) if a is not type(None)]
        return _kind(inner)
    return annotation, None


def add_arguments(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("input and output")
    io.add_argument("--trace", required=True, help="routing trace (.npz; `moeplace import` converts other formats), "
                    "or a load-only trace (then --objective balance)")
    io.add_argument("--ep-size", type=int, required=True, help="number of EP ranks R")
    topo = io.add_mutually_exclusive_group(required=True)
    topo.add_argument("--ranks-per-node", type=int, help="G consecutive ranks per node")
    topo.add_argument("--topology", help="JSON file {nodes: [[ranks]], link_cost: [[...]]}")
    io.add_argument("--out", required=True, help="plan.json to write")
    io.add_argument("--model", default=None, help="model folder (or its config.json); read for n_group by --preserve-groups")
    io.add_argument("--model-name", default=None, help="model name recorded in the plan (default: the trace's meta)")
    add_option_flags(p)
    rq = p.add_argument_group("request routing options (request-aware placement, issue 12)")
    rq.add_argument("--request-groups", type=int, nargs="?", const=0, default=None, metavar="G",
                    help="group the requests by their prefill routing into G groups of DP ranks (a multiple of the "
                         "node count; without G: one group per node), place experts so each group's tokens find "
                         "them on its node, and write the router into the plan's request_routing section")
    rq.add_argument("--signature-layers", type=int, default=0, metavar="N",
                    help="the request signature reads the prefill routing of the first N MoE layers (default 0: all)")
    rq.add_argument("--max-group-share", type=float, default=None, metavar="X",
                    help="the router keeps every group at <= X times its fair share of requests (default 1.10)")


def _request_groups(args: argparse.Namespace, topology: Topology):
    """RequestGroupOptions from the flags, or None; the flags that need --request-groups say so."""
    from vllm_moeplace.request_routing import DEFAULT_MAX_SHARE
    from vllm_moeplace.solver.request_groups import RequestGroupOptions

    if args.request_groups is None:
        for flag, given in (("--signature-layers", args.signature_layers), ("--max-group-share", args.max_group_share)):
            if given:
                raise MoeplaceError(f"{flag} {given}: only with --request-groups")
        return None
    g = args.request_groups or topology.num_nodes
    share = DEFAULT_MAX_SHARE if args.max_group_share is None else args.max_group_share
    return RequestGroupOptions(g, args.signature_layers, share)


def _topology(args: argparse.Namespace) -> Topology:
    from vllm_moeplace.solver.topology_file import resolve_topology

    if args.ep_size <= 0:
        raise MoeplaceError(f"--ep-size {args.ep_size}: must be positive")
    return resolve_topology(args.ep_size, ranks_per_node=args.ranks_per_node, path=args.topology)


def model_n_group(path: str) -> int:
    """n_group from a Hugging Face model folder's config.json (or the file itself)."""
    from pathlib import Path

    from vllm_moeplace.jsonio import read_json

    f = Path(path)
    if f.is_dir():
        f = f / "config.json"
    cfg = read_json(f, "model config", MoeplaceError)  # the shared safe reader (UTF-8, depth, NaN)
    text = cfg.get("text_config") if isinstance(cfg, dict) else None
    n = cfg.get("n_group", text.get("n_group") if isinstance(text, dict) else None) if isinstance(cfg, dict) else None
    if type(n) is not int or n < 1:
        raise MoeplaceError(f"--model {path}: {f} has no positive integer n_group (got {n!r}); pass --preserve-groups N")
    return n


def _preserve_groups(args: argparse.Namespace) -> int | None:
    if args.preserve_groups == -1:
        if not args.model:
            raise MoeplaceError("--preserve-groups without N needs --model DIR to read n_group from its config.json")
        return model_n_group(args.model)
    return args.preserve_groups


def _per_token_options(args: argparse.Namespace) -> list[str]:
    """The options given that only the per-token solver understands."""
    given = []
    if (args.inter_layer_weight or 0) > 0:
        given.append("--inter-layer-weight")
    if args.balance_target == "expected":
        given.append("--balance-target expected")
    if (args.balance_risk or 0) > 0:
        given.append("--balance-risk")
    if args.train_fraction is not None and args.train_fraction < 1.0:
        given.append("--train-fraction")
    if args.preserve_groups:
        given.append("--preserve-groups")
    if args.copy_placement == "locality":
        given.append("--copy-placement locality")
    return given


def _run_balance(args: argparse.Namespace, load_only: bool) -> int:
    from vllm_moeplace.load_balance import PER_TOKEN_OPTIONS, balance_plan, refusal
    from vllm_moeplace.load_trace import LoadTrace, load_load_trace

    given = _per_token_options(args)
    if load_only and args.objective not in (None, "balance"):
        raise refusal(args.trace, f"--objective {args.objective}")
    if given:
        if load_only:
            raise refusal(args.trace, f"{given[0]} ({PER_TOKEN_OPTIONS[given[0]]})")
        raise MoeplaceError(f"--objective balance places by expert load only; {given[0]} does not apply to it")
    redundant = args.redundant_per_rank or 0
    if redundant < 0:
        raise MoeplaceError(f"--redundant-per-rank {redundant}: must be >= 0")
    topology = _topology(args)
    if load_only:
        load = load_load_trace(args.trace)
    else:
        import numpy as np

        from vllm_moeplace.trace_stats import expert_load

        trace = load_trace(args.trace)
        load = LoadTrace(expert_load=expert_load(trace)[None].astype(np.int64), layer_ids=trace.layer_ids,
                         num_experts=trace.num_experts, meta=dict(trace.meta, format="native trace counts"))
    check_redundant_per_rank(redundant, load.num_experts, topology.ep_size)
    plan = balance_plan(load, topology, redundant, model_name=args.model_name,
                        extra={"trace": str(args.trace)})
    plan.save(args.out)
    s = plan.solver
    print(f"balance (load only): {len(plan.layers)} layers, {plan.slots_per_rank()} slots per rank, train rank "
          f"imbalance {s['rank_imbalance_even_split']:.4f} mean / {s['rank_imbalance_even_split_max']:.4f} max "
          "(copies splitting their expert's load evenly)")
    print(f"wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from vllm_moeplace.load_trace import is_load_trace
    from vllm_moeplace.solver.pipeline import solve

    started = time.monotonic()  # --time-limit counts from here: loading the trace is part of the solve
    load_only = is_load_trace(args.trace)
    if load_only or args.objective == "balance":
        if args.request_groups is not None:
            raise MoeplaceError("--request-groups needs per-token routing (a native trace), not --objective balance "
                                "or a load-only trace")
        return _run_balance(args, load_only)

    try:
        given = {name: getattr(args, name) for names in CLI_GROUPS.values() for name in names}
        given["preserve_groups"] = _preserve_groups(args)
        opts = SolveOptions(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        raise MoeplaceError(f"--{str(err['loc'][0]).replace('_', '-')} {err.get('input')!r}: {err['msg']}") from None
    topology = _topology(args)
    trace = load_trace(args.trace)
    check_redundant_per_rank(opts.redundant_per_rank, trace.num_experts, topology.ep_size)  # else a long futile search
    meta_name = trace.meta.get("model") if isinstance(trace.meta, dict) else None
    groups = _request_groups(args, topology)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = solve(trace, topology, opts, model_name=args.model_name or meta_name or "unknown", trace_path=args.trace,
                     request_groups=groups, started=started)
    st = plan.solver.get("step_time", {})
    for w in caught:  # the guard's message is printed once, below, in capitals; the others as they are
        if str(w.message) != st.get("warning"):
            print(f"warning: {w.message}", file=sys.stderr)
    plan.save(args.out)
    s = plan.solver
    print(
        f"{s['status']}  objective {s['objective_name']} {s['objective']:.4f} (train)  bound {s['best_bound']:.4f}  "
        f"gap {100 * s['gap']:.1f}%  time {s['time_s']:.1f}s  cp-sat {s['cpsat_improvements']}/{s['cpsat_calls']} improving"
    )
    if "sample" in s:
        x = s["sample"]
        print(f"searched a sample of {x['tokens']} of {x['of']} train tokens (the budget's share; balance on all of them)")
    if "warning" in s:
        print(f"warning: {s['warning']}")
    _print_step_time(st)
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
        if plan.request_routing is not None:
            from vllm_moeplace.routed_metrics import score_routing

            sc = score_routing(plan, held)
            print(f"held-out, routed by the plan's router: decode node_sends {sc.routed.node_sends_decode:.3f} "
                  f"(spread evenly {sc.spread.node_sends_decode:.3f}), prefill {sc.routed.node_sends_prefill:.3f} "
                  f"(spread {sc.spread.node_sends_prefill:.3f}), imbalance {sc.routed.imbalance:.3f}, "
                  f"group share {sc.share_imbalance:.3f} x fair")
    print(f"wrote {args.out}")
    return 0


def _print_step_time(st: dict) -> None:
    """The guard's record: predicted MoE step time of the plan and the baselines, and what was written."""
    if not st.get("checked"):
        print(f"note: {st.get('reason', 'step time not predicted')}", file=sys.stderr)
        return
    print(f"predicted MoE step time (ms, {st['evaluated_on']}; {st['hardware']}, {st['model_shape']}, "
          f"{st['tokens_per_rank']['prefill']}/{st['tokens_per_rank']['decode']} tokens per rank, phase mix "
          f"{st['phase_mix']:.3f} {st['phase_mix_source']}):")
    print(f"{'layout':10s} {'prefill':>10s} {'decode':>10s} {'mix':>10s}")
    for name, t in st["predicted_ms"].items():
        print(f"{name:10s} {t['prefill']:10.3f} {t['decode']:10.3f} {t['mix']:10.3f}")
    if st.get("warning"):
        bar = "!" * 78
        print(f"{bar}\nWARNING: {st['warning']}\n{bar}", file=sys.stderr)
