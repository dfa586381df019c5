"""node_sends (the default): nodes other than the token's own that its experts live on, with
the origin uniform over ranks: Σ_{n touched} (R - g_n) / R per token. Ranks: balance only."""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np

from vllm_moeplace.plan import Topology
from vllm_moeplace.solver.bounds import pair_relaxation_bound, star_lower_bound
from vllm_moeplace.solver.objectives.base import BoundInputs, NodeTerms, Objective, node_sends_weights

# Deterministic mode: a fixed number of Frank-Wolfe steps instead of a time budget.
_FW_ITERS_DET = 10
# Otherwise: share of the bound's seconds for the star bound (the rest for Frank-Wolfe).
_STAR_SHARE = 0.5


class NodeSends(Objective):
    name: ClassVar[str] = "node_sends"
    metric: ClassVar[str] = "node_sends"

    def node_terms(self, topology: Topology, load: np.ndarray) -> NodeTerms:
        return NodeTerms(node_sends_weights(topology), None)

    def lower_bound(self, terms: NodeTerms, inputs: BoundInputs) -> float:
        """max(one node per pattern, star bound, Frank-Wolfe bound of the consistent-companion
        relaxation; `bounds`): all ignore the load caps, so they hold for every cap."""
        inst, w_min, m = inputs.inst, float(terms.unit_weight.min()), int(inputs.sizes.max())
        if inputs.deterministic:
            fw = pair_relaxation_bound(inst, m, inputs.node_assign, w_min, 1e9, max_iters=_FW_ITERS_DET)
            star = star_lower_bound(inst, m, w_min)
        else:
            # Both bounds share the seconds: the star bound is anytime (weakest terms past its
            # deadline), Frank-Wolfe stops at its own.
            t0 = time.monotonic()
            star = star_lower_bound(inst, m, w_min, deadline=t0 + _STAR_SHARE * inputs.seconds)
            fw = pair_relaxation_bound(inst, m, inputs.node_assign, w_min, max(0.0, t0 + inputs.seconds - time.monotonic()))
        return max(self.trivial_bound(inst, terms), star, fw)
