"""Predicted MoE step time per phase for the solver and `moeplace evaluate`: the simulator's time
model (`sim.model`, stated in docs/simulator.md) on batches drawn from a trace, one prefill-sized
and one decode-sized batch kind, and their mix.

- Hardware: a profile name of the checkout's `benchmarks/sim_params.json`, or a JSON file (a whole
  parameter file, whose `default_hardware` is used, or one bare `Hardware` record).
- Model shape: a key of the same file's `models`, or a JSON file with one `ModelShape` record;
  None = matched from the trace's `meta.model` (the longest key whose letters and digits occur in
  the model name, e.g. `deepseek-v2-lite` in `deepseek-ai/DeepSeek-V2-Lite-Chat`).
- Phase mix: the share of *steps* that are prefill steps, s; the mixed step time is
  s * prefill + (1 - s) * decode. Measured from a trace: its prefill tokens fill
  n_p = tokens / (prefill tokens per rank x R) steps and its decode tokens n_d likewise, s = n_p /
  (n_p + n_d).
- Batches: a phase's batches draw from the trace's tokens of that phase, or from all tokens when the
  trace has none of it (DeepSeek-V2-Lite is prefill only: its decode batches reuse prefill routing
  at decode batch size, as the simulator page does). Common random numbers: the same batches for
  every layout compared.

Pure numpy + pydantic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vllm_moeplace.jsonio import read_json
from vllm_moeplace.plan import Topology
from vllm_moeplace.sim.network import BatchSpec, Hardware, ModelShape, SimParams, SimParamsError, _pydantic_message, load_params
from vllm_moeplace.sim.model import layer_time, layer_traffic
from vllm_moeplace.sim.run import Batch, sample_batches, simulate
from vllm_moeplace.trace import Trace

# The checkout's parameter file (the simulator page's); profile names resolve against it.
PARAMS_FILE = Path(__file__).resolve().parents[2] / "benchmarks" / "sim_params.json"
PHASES = ("prefill", "decode")
# Batches per phase (the simulator page's prefill / decode batch specs).
STEPS = {"prefill": 2, "decode": 4}
BIG_BATCH = 1 << 20


@dataclass(frozen=True)
class StepModel:
    """Everything a step-time prediction needs besides the layout, the topology and the trace."""

    hardware_name: str
    hardware: Hardware
    shape_name: str
    shape: ModelShape
    tokens_per_rank: dict[str, int]  # phase -> tokens per EP rank in one step
    phase_mix: float  # share of prefill steps
    phase_mix_source: str  # "given" | "measured from the trace"

    def describe(self) -> dict:
        return {
            "hardware": self.hardware_name,
            "model_shape": self.shape_name,
            "tokens_per_rank": dict(self.tokens_per_rank),
            "phase_mix": self.phase_mix,
            "phase_mix_source": self.phase_mix_source,
        }


def _default_params() -> SimParams:
    if not PARAMS_FILE.is_file():
        raise SimParamsError(f"hardware profiles file {PARAMS_FILE} is missing (it ships with the source checkout); "
                             "pass a hardware / model-shape JSON file instead of a profile name")
    return load_params(PARAMS_FILE)


def resolve_hardware(spec: str) -> tuple[str, Hardware]:
    """(name, Hardware) of a profile name of benchmarks/sim_params.json or of a JSON file."""
    p = Path(spec)
    if p.suffix == ".json" or p.is_file():
        data = read_json(p, "hardware file", SimParamsError)
        if isinstance(data, dict) and "hardware" in data:
            params = load_params(p)
            return f"{p}:{params.default_hardware}", params.hardware[params.default_hardware]
        try:
            return str(p), Hardware.model_validate(data)
        except Exception as e:  # pydantic ValidationError, named by field
            from pydantic import ValidationError

            if isinstance(e, ValidationError):
                raise SimParamsError(_pydantic_message(str(p), e)) from None
            raise
    params = _default_params()
    if spec not in params.hardware:
        raise SimParamsError(f"--hardware {spec!r}: not a profile of {PARAMS_FILE} ({', '.join(sorted(params.hardware))}) "
                             "nor an existing JSON file")
    return spec, params.hardware[spec]


def _letters(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def resolve_shape(spec: str | None, trace: Trace) -> tuple[str, ModelShape]:
    """(name, ModelShape) from a key / JSON file, or matched from the trace's model name; checked
    against the trace's num_experts and top_k."""
    if spec is not None and (Path(spec).suffix == ".json" or Path(spec).is_file()):
        from pydantic import ValidationError

        data = read_json(Path(spec), "model shape file", SimParamsError)
        try:
            name, shape = spec, ModelShape.model_validate(data)
        except ValidationError as e:
            raise SimParamsError(_pydantic_message(spec, e)) from None
    else:
        models = _default_params().models
        if spec is not None:
            if spec not in models:
                raise SimParamsError(f"--model-shape {spec!r}: not a model of {PARAMS_FILE} ({', '.join(sorted(models))}) "
                                     "nor an existing JSON file")
            name = spec
        else:
            model = str(trace.meta.get("model", "")) if isinstance(trace.meta, dict) else ""
            hits = [k for k in models if _letters(k) and _letters(k) in _letters(model)]
            if not hits:
                raise SimParamsError(f"no model shape for the trace's model {model!r}: pass --model-shape (a key of "
                                     f"{PARAMS_FILE}: {', '.join(sorted(models))}, or a JSON file with hidden_size, "
                                     "moe_intermediate_size, ...)")
            name = max(hits, key=len)
        shape = models[name]
    if shape.num_experts != trace.num_experts or shape.top_k != trace.top_k:
        raise SimParamsError(f"model shape {name!r} has num_experts={shape.num_experts}, top_k={shape.top_k} but the trace "
                             f"has num_experts={trace.num_experts}, top_k={trace.top_k}")
    return name, shape


def measured_phase_mix(trace: Trace, tokens_per_rank: dict[str, int], ep_size: int) -> float:
    """Share of prefill steps the trace's tokens would fill at these batch sizes."""
    n_pre = float(np.count_nonzero(trace.is_prefill))
    n_dec = float(trace.num_tokens) - n_pre
    steps_p = n_pre / (tokens_per_rank["prefill"] * ep_size)
    steps_d = n_dec / (tokens_per_rank["decode"] * ep_size)
    return steps_p / (steps_p + steps_d) if steps_p + steps_d > 0 else 1.0


def step_model(
    trace: Trace,
    ep_size: int,
    hardware: str,
    model_shape: str | None,
    phase_mix: float | None,
    prefill_tokens_per_rank: int,
    decode_tokens_per_rank: int,
) -> StepModel:
    hw_name, hw = resolve_hardware(hardware)
    shape_name, shape = resolve_shape(model_shape, trace)
    tpr = {"prefill": int(prefill_tokens_per_rank), "decode": int(decode_tokens_per_rank)}
    if phase_mix is None:
        mix, src = measured_phase_mix(trace, tpr, ep_size), "measured from the trace"
    else:
        mix, src = float(phase_mix), "given"
    return StepModel(hw_name, hw, shape_name, shape, tpr, mix, src)


def phase_batches(trace: Trace, model: StepModel, ep_size: int, seed: int = 0, steps: dict[str, int] | None = None,
                  routed: tuple[np.ndarray, tuple[tuple[int, ...], ...]] | None = None) -> dict[str, list[Batch]]:
    """Seeded batches per phase (phase tokens when the trace has them, else any token); `steps`
    batches per phase (default STEPS; 0 = none, for a phase the mix does not weigh). `routed` =
    (group of each token, ranks of each group): requests routed to groups of DP ranks
    (`sim.run.sample_batches`), else every token may start on any rank."""
    out = {}
    if steps is None:
        # A prefill batch beyond BIG_BATCH (token, expert) pairs is timed once, not twice: at
        # DeepSeek-R1 shape (EP64, 4096 tokens per rank, top-8) one batch is 2.1M pairs per layer
        # (the time that matters); the batches stay common to every layout compared.
        big = model.tokens_per_rank["prefill"] * ep_size * model.shape.top_k > BIG_BATCH
        steps = dict(STEPS, prefill=1) if big else STEPS
    for ph in PHASES:
        if steps[ph] == 0:
            out[ph] = []
            continue
        has = bool(np.any(trace.is_prefill == (ph == "prefill")))
        spec = BatchSpec(tokens_per_rank=model.tokens_per_rank[ph], phase=ph if has else "any", steps=steps[ph], seed=seed)
        out[ph] = sample_batches(trace, spec, ep_size, routed)
    return out


def batch_sources(trace: Trace) -> dict[str, str]:
    """Which tokens each phase's batches draw from (for reports)."""
    return {ph: (ph if np.any(trace.is_prefill == (ph == "prefill")) else "any (the trace has no such tokens)") for ph in PHASES}


def predict(
    layers: dict[int, np.ndarray], topology: Topology, trace: Trace, model: StepModel, batches: dict[str, list[Batch]]
) -> dict[str, float]:
    """Milliseconds of one MoE step (sum over layers) per phase, and the phase-mix average ("mix")."""
    out = {}
    for ph in PHASES:
        out[ph] = simulate(layers, topology, trace, model.hardware, model.shape, batches[ph]).total * 1e3
    out["mix"] = model.phase_mix * out["prefill"] + (1.0 - model.phase_mix) * out["decode"]
    return out


def layer_seconds(
    placement: np.ndarray, topology: Topology, trace: Trace, li: int, model: StepModel, batches: dict[str, list[Batch]]
) -> dict[str, float]:
    """Seconds of one MoE layer (trace layer index li) per phase, mean over the batches, and the mix."""
    out = {}
    E = trace.num_experts
    for ph in PHASES:
        tot = 0.0
        if not batches[ph]:  # a phase the mix does not weigh
            out[ph] = 0.0
            continue
        for b in batches[ph]:
            t = layer_traffic(placement, topology, E, trace.topk_ids[b.tokens, li, :], b.origins, model.hardware.node_aggregation,
                              spread=b.tokens)
            tot += layer_time(t, model.hardware, model.shape).total
        out[ph] = tot / len(batches[ph])
    out["mix"] = model.phase_mix * out["prefill"] + (1.0 - model.phase_mix) * out["decode"]
    return out
