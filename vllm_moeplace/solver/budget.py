"""How `--time-limit` is spent: the named constants of the budget arithmetic, in one place.

The limit covers the whole solve: its clock (`Budget.t0`) starts before the trace is read when the
command line runs it. The solve is a loop over layers; each layer gets an equal share of what is
left (deterministic mode: an equal share of the whole, so the work does not depend on the clock).
A layer pays its own setup out of its share; the rest is split between the search, the lower
bound and (with locality-placed copies) the copies. How many tokens the setup may cover is
`sample`'s decision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# Share of --time-limit handed to the layers; the rest covers the fixed per-layer work (patterns,
# bound, ranks) so that the whole solve stays inside the limit.
SEARCH_SHARE = 0.92
# No layer gets less than this, even when earlier layers overran.
MIN_LAYER_S = 0.05
# The lower bound takes a quarter of its layer's budget, at most 3 s (Frank-Wolfe converges slowly
# past that and the gap it closes is small).
BOUND_SHARE = 0.25
BOUND_MAX_S = 3.0
# --balance-target expected: share of each layer's budget spent on the candidate caps; the rest
# continues the search at the chosen cap.
FIRST_PASS = 0.5
# Budget below which one more candidate cap is not worth its fixed setup (greedy, repair, descent).
MIN_CANDIDATE_S = 0.09
# Locality-placed copies: share of a layer's budget for placing them, and the descent passes in
# deterministic mode (measured on DeepSeek-V2-Lite EP16/4: passes after the 6th rarely improve) and
# otherwise (a safety cap; the clock ends the descent first).
COPY_SHARE = 0.35
COPY_PASSES_DET = 6
COPY_PASSES = 50
# Iterated local search: 60 failed rounds in a row end a layer early (measured on DeepSeek-V2-Lite,
# benchmarks/results/solver_optimality.md: kicks keep finding better partitions for tens of rounds;
# after 60 failures the budget is better spent on the next layer).
STALL_ROUNDS = 60
# Deterministic mode: rounds per second of layer budget instead of the clock, and CP-SAT on every
# 4th round.
DET_ROUNDS_PER_S = 16
DET_CPSAT_EVERY = 4
# One CP-SAT neighbourhood gets its share of lns_fraction x budget over the node pairs, clipped
# to [0.2, 1] s: shorter calls rarely prove their small neighbourhood, longer ones stall.
CPSAT_CALL_MIN_S = 0.2
CPSAT_CALL_MAX_S = 1.0
# A round is not started this close to the deadline.
ROUND_SLACK_S = 0.02
# In-node rank repair and descent: a generous clock bound (they finish in milliseconds).
RANK_SEARCH_S = 5.0
# The least the node- and rank-level load repairs get when the layer's budget is already spent:
# balance is a constraint, not a goal. They stop as soon as the caps hold (milliseconds to tenths
# of a second on an idle 2-core machine at R1 shape); the floor only matters on a busy machine,
# where 0.1 s left R1 layers 6-11% over the cap (benchmarks/results/solver_scale.md).
REPAIR_MIN_S = 1.0


@dataclass(frozen=True)
class Budget:
    """The clock of one solve: `t0` its start (time.monotonic), `time_limit` in seconds."""

    t0: float
    time_limit: float
    deterministic: bool

    def _left(self) -> float:
        return self.t0 + SEARCH_SHARE * self.time_limit - time.monotonic()

    def layer(self, l: int, num_layers: int) -> float:
        """Seconds for layer l of num_layers (first or only pass)."""
        if self.deterministic:
            return self.time_limit / num_layers
        return max(MIN_LAYER_S, self._left() / (num_layers - l))

    def second_pass(self, l: int, num_layers: int) -> float:
        """--balance-target expected: seconds for continuing layer l at its chosen cap; below
        MIN_LAYER_S the pass stops."""
        if self.deterministic:
            return self.time_limit * (1 - FIRST_PASS) / num_layers
        return self._left() / (num_layers - l)


def bound_seconds(layer_budget: float) -> float:
    """Seconds of a layer's budget kept for its lower bound."""
    return min(BOUND_MAX_S, BOUND_SHARE * layer_budget)


def cpsat_call_seconds(layer_budget: float, lns_fraction: float, node_pairs: int) -> float:
    return max(CPSAT_CALL_MIN_S, min(CPSAT_CALL_MAX_S, layer_budget * lns_fraction / max(1, node_pairs)))


def deterministic_rounds(layer_budget: float) -> int:
    return max(1, int(layer_budget * DET_ROUNDS_PER_S))
