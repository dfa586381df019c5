"""The `solver` section of a plan: what was solved, how, how well, with which options; built in
one place (`SolveReport.to_json`) from the per-layer results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from vllm_moeplace.solver.balance import BalanceOutcome
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.sample import TokenSample

METHOD = (
    "expert->node partition over aggregated patterns: load-capped co-activation greedy, exact-delta swaps, "
    "LNS alternating CP-SAT exact neighbourhoods (2 nodes x 5 / 3 nodes x 4 free experts) and kicks; "
    "experts->ranks by LPT + in-node swaps"
)
BOUND_METHOD = (
    "max(1 node per pattern, star decomposition, Frank-Wolfe bound of the consistent-companion "
    "relaxation) per layer (bounds); node_sends objective only"
)
OVERFLOW_WARNING = "some layers exceed --max-imbalance on train at node level; kept the best found"


@dataclass(frozen=True)
class SolveReport:
    options: SolveOptions  # as solved (risk_scale resolved)
    metric: str  # the objective's metric name
    outcome: BalanceOutcome
    train_tokens: int
    num_layers: int
    ep_size: int
    trace_path: str | None
    seconds: float
    sample: TokenSample | None = None  # the token sample searched, when not the whole train trace

    @property
    def overflow(self) -> bool:
        return any(r.node_overflow > 0 for r in self.outcome.results)

    def to_json(self) -> dict[str, Any]:
        o, res = self.options, self.outcome.results
        obj = sum(r.objective for r in res)
        bound = sum(r.bound for r in res)
        # Per token, origin and layer: the scaled sums are x R over all searched tokens (train, or
        # its sample) of all layers.
        searched = self.train_tokens if self.sample is None else self.sample.size
        denom = float(searched * self.num_layers * self.ep_size) or 1.0
        gap = (obj - bound) / obj if obj > 0 else 0.0
        expected = self.outcome.expected
        out: dict[str, Any] = {
            "method": METHOD,
            "objective_name": self.metric,
            "objective": obj / denom,
            "best_bound": bound / denom,
            "gap": gap,
            "bound_method": BOUND_METHOD,
            # OPTIMAL only when the bound closes the gap of the whole decision; copies are placed
            # heuristically after the bounded node partition.
            "status": "OPTIMAL" if gap <= 1e-9 and not o.redundant_per_rank else "FEASIBLE",
            "bound_scope": (
                "none: locality-placed copies (objective = train node-level cost with copies under the replica rule)"
                if o.redundant_per_rank and o.copy_placement == "locality"
                else "node-level objective of the primary copies (train)"
            ),
            "warm_start_objective": sum(r.start_objective for r in res) / denom,
            "cpsat_calls": sum(r.cpsat_calls for r in res),
            "cpsat_improvements": sum(r.cpsat_improvements for r in res),
            "cpsat_last_status": next((r.cpsat_status for r in reversed(res) if r.cpsat_calls), "NOT_RUN"),
            "train_rank_imbalance": float(np.mean([r.rank_imbalance for r in res])),
            # Predicted mean held-out rank imbalance under request-sampling noise
            # (allocate.NoiseModel); absent with redundant copies.
            "expected_imbalance": float(np.mean(expected)) if expected else None,
            # The balance_confidence quantile of the same (normal approximation, layers independent).
            "imbalance_quantile": self.outcome.imbalance_quantile,
            "balance_confidence": o.balance_confidence,
            "balance_target": o.balance_target,
            # Variance factor of the load-risk model (measured on the train requests unless given).
            "risk_scale": o.risk_scale,
            "layer_caps": self.outcome.layer_caps or None,
            "options": o.model_dump(),
            "trace": self.trace_path,
            "train_fraction": o.train_fraction,
            "train_tokens": self.train_tokens,
            "seed": o.seed,
            "time_s": self.seconds,
        }
        if self.sample is not None:
            # objective, bound and gap are then on the sample (loads and balance on all of train).
            out["sample"] = self.sample.to_json()
        if self.overflow:
            out["warning"] = OVERFLOW_WARNING
        return out
