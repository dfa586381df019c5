"""Options of `solve()` and of `moeplace solve`: one source for both. Each field's type, default
and docstring become its command-line flag, choices and help (`cli/solve.py` generates them);
`CLI_GROUPS` orders them in `--help`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Registered implementations: solver/objectives (OBJECTIVES), solver/balance (BALANCE_STRATEGIES);
# each registry checks at import that it matches its Literal.
ObjectiveName = Literal["node_sends", "rank_sends", "hop_cost", "step_time", "request_node_sends"]
BalanceTarget = Literal["train", "expected"]


class SolveOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    objective: ObjectiveName = "node_sends"
    """Primary objective. node_sends is always the node-level criterion; rank_sends adds the
    rank-level term inside nodes, hop_cost adds each expert's mean link cost from all origins;
    step_time minimises the predicted MoE step time for the phase mix on the hardware (the
    simulator's time model; docs/solver.md)."""
    inter_layer_weight: float = Field(default=0.0, ge=0.0)
    """Weight of inter_layer_node_sends (nodes a token newly needs at layer l+1); > 0 couples
    layers, which are then solved in order with layer l fixed when placing l+1."""
    max_imbalance: float = Field(default=1.05, ge=1.0)
    """Hard bound on max/mean load; what it bounds depends on balance_target."""
    balance_target: BalanceTarget = "train"
    """train: every layer's train max/mean load, per node and per rank, is <= max_imbalance
    (held-out drifts above it). expected: the mean over layers of the predicted held-out rank
    imbalance (request-sampling noise model, `allocate`) is <= max_imbalance; each layer's train
    cap is chosen from allocate.CAP_GRID to spend that budget where it saves most node_sends."""
    balance_confidence: float = Field(default=0.5, ge=0.5, lt=1.0)
    """balance_target=expected: bound this quantile of the held-out mean imbalance instead of its
    expectation (0.5: the expectation). The realised mean over layers of one held-out sample has a
    spread of its own (about 0.01 on DeepSeek-V2-Lite EP8/8); 0.9 keeps 1.28 of those under the bound."""
    redundant_per_rank: int = Field(default=0, ge=0)
    """Extra expert slots per rank filled with copies of experts (served by the replica rule)."""
    copy_placement: Literal["locality", "balance"] = "locality"
    """With redundant_per_rank: locality = copies chosen by their exact train node_sends decrease
    under the replica rule, within the rank load cap (`solver.replicas`), and every slot then
    re-optimised; balance = the earlier rule (EPLB-style copy counts, copies on the lightest ranks,
    `redundancy`), kept for comparison."""
    preserve_groups: int = Field(default=0, ge=0)
    """> 0: group-preserving mode for grouped top-k models (DeepSeek-V3/R1 n_group): the experts
    form this many contiguous id groups of E / n experts, and expert e may only sit in physical
    slots p = r * S + s of its own group (p // (E/n) == e // (E/n)), so upstream's node-limited
    group routing stays intact. No redundant copies in this mode (the extra slots p >= E belong
    to no group). 0: placed freely."""
    time_limit: float = Field(default=60.0, gt=0.0)
    """Wall-clock seconds for the whole solve (reading the trace, per-layer setup, search, bounds,
    writing the plan), shared over the layers; a trace longer than this can search is searched on
    a token sample (balance still on every token). With deterministic: the amount of work, not a
    wall-clock bound."""
    train_fraction: float = Field(default=1.0, gt=0.0, le=1.0)
    """Plan from the first fraction of requests; the rest is held out for the report."""
    balance_risk: float = Field(default=0.0, ge=0.0)
    """> 0: every node and rank must meet max_imbalance with this many standard deviations of
    request-sampling noise to spare (`trace_stats.load_risk`): balance that holds on unseen requests,
    not only on the train ones."""
    risk_scale: float | None = Field(default=None, gt=0.0)
    """Variance factor on the load-risk model (balance_risk and the held-out imbalance prediction).
    None: measured on the train requests alone (`trace_stats.risk_calibration`: first half vs second
    half), since request order drifts more than sampling predicts. 1.0: the raw model."""
    seed: int = 0
    """Seed of every random choice (kicks, neighbourhoods, CP-SAT, the noise model)."""
    deterministic: bool = False
    """Reproducible regardless of load: one CP-SAT worker bounded by deterministic time, and the
    local search bounded by iteration counts instead of the clock."""
    workers: int = Field(default=2, ge=1, le=2)
    """CP-SAT workers per neighbourhood (not deterministic mode, which uses one)."""
    hardware: str = "h800-deepep"
    """Hardware of the step-time prediction: a profile of benchmarks/sim_params.json or a JSON file
    (a parameter file, or one hardware record)."""
    model_shape: str | None = None
    """Model sizes of the step-time prediction: a key of benchmarks/sim_params.json's models or a
    JSON file; default: matched from the trace's model name."""
    phase_mix: float | None = Field(default=None, ge=0.0, le=1.0)
    """Share of prefill steps (0 = decode only, 1 = prefill only); default: measured from the trace
    (the steps its prefill and decode tokens fill at the batch sizes below)."""
    prefill_tokens_per_rank: int = Field(default=4096, gt=0, le=1 << 20)
    """Tokens per EP rank in one prefill step."""
    decode_tokens_per_rank: int = Field(default=128, gt=0, le=1 << 20)
    """Tokens per EP rank in one decode step."""
    keep_plan: bool = False
    """Write the plan even when it is predicted slower than vLLM's linear layout for the phase mix
    (default: write the fastest of linear and EPLB instead, and say so)."""
    lns_fraction: float = Field(default=0.4, ge=0.0, le=1.0)
    """Share of each layer's budget spent on CP-SAT re-optimisation of node pairs (the rest on
    perturb-and-descend local search)."""


# `moeplace solve --help` groups; fields not listed are Python-API knobs (CLI_INTERNAL).
CLI_GROUPS: dict[str, tuple[str, ...]] = {
    "core": ("max_imbalance", "time_limit", "redundant_per_rank", "train_fraction", "objective", "copy_placement",
             "preserve_groups", "inter_layer_weight"),
    "balance": ("balance_target", "balance_confidence", "balance_risk", "risk_scale"),
    "step time": ("hardware", "model_shape", "phase_mix", "prefill_tokens_per_rank", "decode_tokens_per_rank", "keep_plan"),
    "search": ("deterministic", "seed"),
}
# Internal: measured defaults that a user has no reason to change (the CP-SAT share of the search,
# the worker count of a 2-core machine); settable from Python for experiments.
CLI_INTERNAL: tuple[str, ...] = ("lns_fraction", "workers")
