"""hop_cost: each expert pays its load times the mean link cost from all origin ranks to the
node it sits on (a linear term per expert and node); node_sends is kept as a 10^-3 tie-break so
that, on a symmetric topology where the hop term is placement-invariant, co-activation still
decides. No search-based bound: the linear term makes the node_sends bounds inapplicable."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from vllm_moeplace.plan import Topology
from vllm_moeplace.solver.objectives.base import NodeTerms, Objective, node_sends_weights

# Weight of the node_sends tie-break relative to the hop term.
TIE_BREAK = 1e-3


class HopCost(Objective):
    name: ClassVar[str] = "hop_cost"
    metric: ClassVar[str] = "hop_cost"

    def node_terms(self, topology: Topology, load: np.ndarray) -> NodeTerms:
        g = topology.ranks_per_node
        h = (g[:, None] * topology.link_cost).sum(axis=0)  # [N]: Σ_o link_cost[node(o)][n], x R already
        return NodeTerms(node_sends_weights(topology) * TIE_BREAK, load[:, None] * h[None, :], TIE_BREAK)
