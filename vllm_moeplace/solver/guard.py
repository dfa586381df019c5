"""Never slower than the default: every solve predicts the MoE step time of its plan, of vLLM's
linear layout and of EPLB (fitted on the same train part) with the simulator's time model, on the
held-out requests (`--train-fraction` < 1; else on the train requests, said so), per phase and for
the phase mix. If the plan is predicted slower than linear for the phase mix, the fastest of the
two baselines is written instead, with a loud warning, unless `keep_plan` is set. The record goes
into the plan's `solver.step_time` section.

The step model (hardware, model shape, batch sizes, phase mix) is resolved before the search
(`resolve`), so a bad `--hardware` or `--model-shape` fails before any work. When the model shape
is not given and the trace's model name matches no known shape, the check cannot run: the record
says why (`checked: false`) and `moeplace solve` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vllm_moeplace.plan import Topology
from vllm_moeplace.sim.network import SimParamsError
from vllm_moeplace.sim.predict import StepModel, batch_sources, phase_batches, predict, step_model
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.trace import Trace

# The baselines every plan is compared with (vLLM's default first: the reference).
BASELINES = ("linear", "eplb")
# Relative tolerance of "slower": predictions of one layout on common batches are deterministic,
# so any excess counts; the epsilon only absorbs float summation order.
_REL_EPS = 1e-9


@dataclass(frozen=True)
class Resolved:
    model: StepModel | None
    reason: str | None  # why there is no model (then model is None)


@dataclass(frozen=True)
class GuardOutcome:
    layers: dict[int, np.ndarray]  # the layers to write
    written: str  # "plan" | a baseline name
    record: dict[str, Any]
    warning: str | None  # the loud message when the plan is slower than linear


def resolve(train: Trace, topology: Topology, options: SolveOptions, *, required: bool) -> Resolved:
    """The step model of this solve. Explicit flags that are wrong raise (SimParamsError); a model
    shape that cannot be matched from the trace's name raises only when `required` (the step_time
    objective needs it), else the check is skipped with the reason."""
    try:
        return Resolved(step_model(train, topology.ep_size, options.hardware, options.model_shape, options.phase_mix,
                                   options.prefill_tokens_per_rank, options.decode_tokens_per_rank), None)
    except SimParamsError as e:
        if required or options.model_shape is not None or options.hardware != SolveOptions.model_fields["hardware"].default:
            raise
        return Resolved(None, str(e))


def check(
    layers: dict[int, np.ndarray],
    trace: Trace,
    train: Trace,
    topology: Topology,
    options: SolveOptions,
    resolved: Resolved,
    routing: Any = None,
) -> GuardOutcome:
    """Predict plan vs baselines and decide which layers to write.

    `routing` (a request-aware plan's `RequestRouting`): the plan is timed as it is served, each
    test request routed by the plan's router and its tokens starting on its group's ranks; the
    baselines as vLLM runs them, requests spread evenly. Nothing else would be a fair verdict: with
    uniform origins a placement built for routed requests looks like a plain one."""
    if resolved.model is None:
        rec = {"checked": False, "reason": f"step time not predicted: {resolved.reason}"}
        return GuardOutcome(layers, "plan", rec, None)
    from vllm_moeplace.solver.baselines import BaselineError, baseline_layers

    model = resolved.model
    held_out = options.train_fraction < 1.0
    test = trace.split_by_request(options.train_fraction)[1] if held_out else trace
    batches = phase_batches(test, model, topology.ep_size)
    plan_batches = batches
    if routing is not None:
        from vllm_moeplace.request_routing import route_trace

        try:
            plan_batches = phase_batches(test, model, topology.ep_size,
                                         routed=(route_trace(routing, test)[0], routing.group_ranks))
        except SimParamsError as e:  # a group that got no token of a phase: no routed prediction
            rec = {"checked": False, "reason": f"step time of the routed requests not predicted: {e}"}
            return GuardOutcome(layers, "plan", rec, None)
    red = max(0, next(iter(layers.values())).shape[1] - trace.num_experts // topology.ep_size)
    candidates: dict[str, dict[int, np.ndarray]] = {"plan": layers}
    skipped = {}
    for name in BASELINES:
        if name == "eplb" and options.preserve_groups > 1:
            skipped[name] = "--preserve-groups: EPLB does not keep expert groups in their slots"
            continue
        try:
            candidates[name] = baseline_layers(name, train, topology, red)
        except BaselineError as e:
            skipped[name] = str(e)
    times = {name: predict(lay, topology, test, model, plan_batches if name == "plan" else batches)
             for name, lay in candidates.items()}
    plan_t, lin_t = times["plan"]["mix"], times["linear"]["mix"]
    slower = plan_t > lin_t * (1.0 + _REL_EPS)
    written, warning = "plan", None
    if slower:
        best = min((n for n in candidates if n != "plan"), key=lambda n: times[n]["mix"])
        what = (f"the plan is predicted {100 * (plan_t / lin_t - 1):.1f}% SLOWER than vLLM's linear layout for phase mix "
                f"{model.phase_mix:.3f} (share of prefill steps) on {model.hardware_name}: {plan_t:.3f} ms vs "
                f"{lin_t:.3f} ms per MoE step ({'held-out' if held_out else 'train'} requests)")
        if options.keep_plan:
            warning = what + "; kept anyway (--keep-plan)"
        else:
            written = best
            warning = what + f"; wrote the {best} layout instead ({times[best]['mix']:.3f} ms; --keep-plan keeps the plan)"
            if routing is not None:
                warning += "; the plan's request_routing is dropped with it (it was fitted for the replaced placement)"
    record: dict[str, Any] = {
        "checked": True,
        **model.describe(),
        "evaluated_on": "held-out requests" if held_out else "train requests (train_fraction 1: nothing held out)",
        "batches_from": batch_sources(test),
        "plan_origins": ("requests routed by the plan's request_routing (baselines: spread evenly)"
                         if routing is not None else "spread evenly"),
        "predicted_ms": times,
        "plan_vs_linear": plan_t / lin_t if lin_t > 0 else None,
        "slower_than_linear": bool(slower),
        "written": written,
    }
    if skipped:
        record["baselines_skipped"] = skipped
    if warning:
        record["warning"] = warning
    return GuardOutcome(candidates[written], written, record, warning)
