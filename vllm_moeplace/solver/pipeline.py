"""`solve(trace, topology, options) -> Plan`: the placement optimiser end to end.

Data in (train split, instance checks, the load-noise scale), then per MoE layer the search of
`layer.solve_layer` with the chosen objective (`objectives`) under the chosen balance strategy
(`balance`), each layer's lower bound alongside, and a validated plan out with its provenance
(`provenance`). When the trace has more tokens than the budget can search, the layers are searched
on a token sample (`sample`), balanced on the whole train trace. The steps of one layer:

Step 1  expert -> node: a weighted set partition over the layer's unique routing patterns
        (`instance`), each node holding exactly (ranks on node x slots) experts under its load
        cap. Warm start: load-capped co-activation greedy (`greedy`), repaired and descended by
        exact-delta swaps (`swap_search`); then the budget alternates CP-SAT on exact
        neighbourhoods (`neighbourhood`) and iterated-local-search kicks (`lns`).
Step 2  expert -> rank inside each node (`ranks`).
Step 3  redundant copies, if asked: for locality under the replica rule (`replicas`), or the
        earlier balance-only placement (`redundancy`).
Bound   the objective's lower bound per layer (`bounds` for node_sends); the gap in the plan is
        (objective - bound) / objective over all layers.
Guard   the plan's predicted MoE step time against vLLM's linear layout and EPLB (`guard`): a
        plan predicted slower than linear for the phase mix is replaced by the faster baseline
        unless `keep_plan`; the predictions go into the plan's `solver.step_time`.

Layers are independent unless the inter-layer term is on; then they are solved in order, layer
l+1 seeing layer l fixed. `--time-limit` bounds the whole solve (setup included) and is shared out
by `budget`.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from vllm_moeplace import trace_stats
from vllm_moeplace.plan import Plan, Topology, validate_plan
from vllm_moeplace.solver.balance import BALANCE_STRATEGIES, SolveRun
from vllm_moeplace.solver import guard
from vllm_moeplace.solver.budget import Budget
from vllm_moeplace.solver.layer import LayerResult, SolveError
from vllm_moeplace.solver.objectives import Objective, get_objective
from vllm_moeplace.solver.objectives.request_sends import RequestNodeSends
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.provenance import OVERFLOW_WARNING, SolveReport
from vllm_moeplace.solver.request_groups import RequestGroupOptions, fit_request_routing
from vllm_moeplace.solver.sample import STATIC_S_PER_PAIR, TokenSample, choose_sample
from vllm_moeplace.trace import Trace

__all__ = ["LayerResult", "SolveError", "check_instance", "solve"]


def solve(
    trace: Trace,
    topology: Topology,
    options: SolveOptions,
    *,
    model_name: str = "unknown",
    trace_path: str | None = None,
    request_groups: RequestGroupOptions | None = None,
    started: float | None = None,
) -> Plan:
    """A validated plan for every MoE layer of `trace` (trained on options.train_fraction of it).

    request_groups: also group the requests and route them (`request_groups`); the objective is
    then request_node_sends and the plan carries a request_routing section.
    started: the time.monotonic() at which options.time_limit began (the command line passes
    its own start, so loading the trace counts too); default now."""
    t0 = time.monotonic() if started is None else started
    # ---- data in ------------------------------------------------------------------------------
    E, R = trace.num_experts, topology.ep_size
    check_instance(E, topology, options)
    train = trace if options.train_fraction >= 1.0 else trace.split_by_request(options.train_fraction)[0]
    budget = Budget(t0, options.time_limit, options.deterministic)
    sample = _token_sample(train, budget, topology, options, request_groups is not None)
    search = sample.trace(train)
    if options.risk_scale is None and not options.redundant_per_rank:
        # Resolved once, and recorded in the plan's options so a re-run reproduces it (measured
        # on the sample when there is one: it is a ratio, and it reads every layer of its trace).
        options = options.model_copy(update={"risk_scale": trace_stats.risk_calibration(search, E // R, seed=options.seed)})
    # The step model is resolved before any search, so a bad --hardware / --model-shape fails first.
    step = guard.resolve(train, topology, options, required=options.objective == "step_time")
    options, objective, grouping = _objective(options, train, search, topology, step, request_groups)
    run = SolveRun(train, topology, options, objective, budget, np.random.default_rng(options.seed),
                   search=search, sampled=sample.tokens is not None)

    # ---- per-layer search under the balance strategy (bounds included) -------------------------
    outcome = BALANCE_STRATEGIES[options.balance_target]().run(run)

    # ---- plan out -----------------------------------------------------------------------------
    report = SolveReport(options, objective.metric, outcome, train.num_tokens, train.num_layers, R, trace_path,
                         time.monotonic() - t0, sample if sample.tokens is not None else None)
    if report.overflow:
        warnings.warn(OVERFLOW_WARNING, stacklevel=2)
    layers = {int(train.layer_ids[l]): r.layout for l, r in enumerate(outcome.results)}

    # ---- guard: never slower than the default (predicted) -------------------------------------
    checked = guard.check(layers, trace, train, topology, options, step,
                          routing=None if grouping is None else grouping.routing)
    if checked.warning:
        warnings.warn(checked.warning, stacklevel=2)
    solver = report.to_json()
    solver["step_time"] = checked.record
    extra = objective.report()
    if extra is not None:
        solver["objective_report"] = extra
    plan = Plan(
        model_name=model_name,
        num_experts=E,
        moe_layers=[int(x) for x in trace.layer_ids],
        ep_size=R,
        topology=topology,
        layers=checked.layers,
        solver=solver,
        # A baseline written by the guard keeps no request routing: it was fitted for the plan.
        request_routing=None if grouping is None or checked.written != "plan" else grouping.routing,
    )
    if grouping is not None and checked.written == "plan":
        plan.solver["request_groups"] = {
            "num_groups": request_groups.num_groups, "signature_layers": list(grouping.routing.layers),
            "max_share": request_groups.max_share, "train_share_imbalance": grouping.train_share_imbalance,
        }
        if request_groups.everywhere_copies:
            plan.solver["request_groups"]["everywhere_copies"] = True
    validate_plan(plan)
    return plan


def _token_sample(train: Trace, budget: Budget, topology: Topology, options: SolveOptions, per_token_objective: bool) -> TokenSample:
    """The train tokens the search works on: a sample when the trace is larger than the budget can
    use (`sample`); all of them for an objective that indexes every train token (request groups)."""
    if per_token_objective:
        return TokenSample(None, train.num_tokens, STATIC_S_PER_PAIR, False)
    return choose_sample(train, budget.layer(0, train.num_layers), topology.num_nodes, options.deterministic, options.seed)


def _objective(options: SolveOptions, train: Trace, search: Trace, topology: Topology, step: guard.Resolved,
               request_groups: RequestGroupOptions | None) -> tuple[SolveOptions, Objective, Any]:
    """The objective part the search is given (and, with request groups, the fitted grouping whose
    origins it prices; the options then name request_node_sends)."""
    if request_groups is not None:
        check_request_groups(options)
        grouping = fit_request_routing(train, topology, request_groups, seed=options.seed)
        objective = RequestNodeSends(grouping.token_group, grouping.routing.group_ranks, topology.node_of_rank,
                                     request_groups.everywhere_copies)
        return options.model_copy(update={"objective": "request_node_sends"}), objective, grouping
    if options.objective == "request_node_sends":
        raise SolveError("--objective request_node_sends needs request groups (--request-groups G)")
    objective = get_objective(options.objective, train=search, topology=topology, options=options, step_model=step.model)
    return options, objective, None


def check_request_groups(options: SolveOptions) -> None:
    """What request groups do not combine with yet, refused by name."""
    if options.objective not in ("node_sends", "request_node_sends"):
        raise SolveError(f"--request-groups replaces the objective by request_node_sends; --objective {options.objective} "
                         "cannot be combined with it")
    for flag, value, default in (("--inter-layer-weight", options.inter_layer_weight, 0.0),
                                 ("--preserve-groups", options.preserve_groups, 0)):
        if value != default:
            raise SolveError(f"--request-groups with {flag} {value}: not supported yet (it assumes tokens start on "
                             "a uniform rank)")


def check_instance(E: int, topology: Topology, options: SolveOptions) -> None:
    """Refuse, naming the values, what the solver cannot do (before any work)."""
    R = topology.ep_size
    if options.balance_target == "expected" and (options.redundant_per_rank or options.inter_layer_weight > 0):
        raise SolveError(
            "--balance-target expected supports neither --redundant-per-rank nor --inter-layer-weight yet "
            f"(got {options.redundant_per_rank} and {options.inter_layer_weight}); use --balance-target train"
        )
    if options.preserve_groups:
        n = options.preserve_groups
        if E % n:
            raise SolveError(f"--preserve-groups {n} does not divide num_experts {E} into equal contiguous groups")
        if options.redundant_per_rank and n > 1:
            raise SolveError(
                f"--preserve-groups {n} with --redundant-per-rank {options.redundant_per_rank}: in group-preserving mode "
                f"physical slot p holds group p // {E // n}, and the extra slots p >= {E} belong to no group; "
                "drop --preserve-groups (the server serves cross-group plans) or the copies"
            )
    if E % R:
        raise SolveError(
            f"ep_size {R} does not divide num_experts {E} + redundant slots {R * options.redundant_per_rank} "
            f"(= {E + R * options.redundant_per_rank} physical experts)"
        )
