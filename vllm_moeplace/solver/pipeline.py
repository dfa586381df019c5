"""`solve(trace, topology, options) -> Plan`: the placement optimiser end to end.

Data in (train split, instance checks, the load-noise scale), then per MoE layer the search of
`layer.solve_layer` with the chosen objective (`objectives`) under the chosen balance strategy
(`balance`), each layer's lower bound alongside, and a validated plan out with its provenance
(`provenance`). The steps of one layer:

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
l+1 seeing layer l fixed. `--time-limit` is shared out by `budget`.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from vllm_moeplace import trace_stats
from vllm_moeplace.plan import Plan, Topology, validate_plan
from vllm_moeplace.solver.balance import BALANCE_STRATEGIES, SolveRun
from vllm_moeplace.solver import guard
from vllm_moeplace.solver.budget import Budget
from vllm_moeplace.solver.layer import LayerResult, SolveError
from vllm_moeplace.solver.objectives import get_objective
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.provenance import OVERFLOW_WARNING, SolveReport
from vllm_moeplace.trace import Trace

__all__ = ["LayerResult", "SolveError", "check_instance", "solve"]


def solve(
    trace: Trace,
    topology: Topology,
    options: SolveOptions,
    *,
    model_name: str = "unknown",
    trace_path: str | None = None,
) -> Plan:
    """A validated plan for every MoE layer of `trace` (trained on options.train_fraction of it)."""
    t0 = time.monotonic()
    # ---- data in ------------------------------------------------------------------------------
    E, R = trace.num_experts, topology.ep_size
    check_instance(E, topology, options)
    train = trace if options.train_fraction >= 1.0 else trace.split_by_request(options.train_fraction)[0]
    if options.risk_scale is None and not options.redundant_per_rank:
        # Resolved once, and recorded in the plan's options so a re-run reproduces it.
        options = options.model_copy(update={"risk_scale": trace_stats.risk_calibration(train, E // R, seed=options.seed)})
    # The step model is resolved before any search, so a bad --hardware / --model-shape fails first.
    step = guard.resolve(train, topology, options, required=options.objective == "step_time")
    objective = get_objective(options.objective, train=train, topology=topology, options=options, step_model=step.model)
    run = SolveRun(train, topology, options, objective, Budget(t0, options.time_limit, options.deterministic),
                   np.random.default_rng(options.seed))

    # ---- per-layer search under the balance strategy (bounds included) -------------------------
    outcome = BALANCE_STRATEGIES[options.balance_target]().run(run)

    # ---- plan out -----------------------------------------------------------------------------
    report = SolveReport(options, objective.metric, outcome, train.num_tokens, train.num_layers, R, trace_path,
                         time.monotonic() - t0)
    if report.overflow:
        warnings.warn(OVERFLOW_WARNING, stacklevel=2)
    layers = {int(train.layer_ids[l]): r.layout for l, r in enumerate(outcome.results)}

    # ---- guard: never slower than the default (predicted) -------------------------------------
    checked = guard.check(layers, trace, train, topology, options, step)
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
    )
    validate_plan(plan)
    return plan


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
