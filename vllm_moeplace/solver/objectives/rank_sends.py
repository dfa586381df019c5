"""rank_sends: node_sends decides the node partition; inside each node, the in-node swap search
also minimises the distinct ranks a token touches (each costs (R - 1) / R, scaled x R). Node
membership is untouched by the rank step, so node_sends is never traded for it."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from vllm_moeplace.plan import Topology
from vllm_moeplace.solver.objectives.base import NodeTerms, Objective, node_sends_weights


class RankSends(Objective):
    name: ClassVar[str] = "rank_sends"
    metric: ClassVar[str] = "rank_sends"

    def node_terms(self, topology: Topology, load: np.ndarray) -> NodeTerms:
        return NodeTerms(node_sends_weights(topology), None)

    def rank_weight(self, topology: Topology) -> np.ndarray:
        return np.full(topology.ep_size, float(topology.ep_size - 1))
