"""request_node_sends: node_sends when a token starts on its request's group's node, not on a
uniform rank (issue 12, request-aware placement).

The train requests are grouped first (`solver.request_groups`); a token of a request whose group
is homed on node h pays 1 for every *other* node its experts sit on, so placing a group's experts
on its own node is free. A token whose request has no group (no signature: the router spreads it
evenly) pays the uniform-origin node_sends weights. Per-token origins make the weight of touching
a node depend on the token, so the layer's patterns are keyed by (expert set, home node) with a
weight row each (`layer_patterns`), the same shape the swap search and the CP-SAT neighbourhoods
already take for the inter-layer term: no new search.

No search-based bound: a pattern touching only its home node costs 0, so the bound is 0."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from vllm_moeplace.plan import Topology
from vllm_moeplace.solver.instance import LayerInstance
from vllm_moeplace.solver.objectives.base import BoundInputs, NodeTerms, Objective, node_sends_weights
from vllm_moeplace.trace import Trace


class RequestNodeSends(Objective):
    name: ClassVar[str] = "request_node_sends"
    # Scored by `moeplace evaluate` on a plan with a request_routing section (origins from the router).
    metric: ClassVar[str] = "node_sends"

    def __init__(self, token_group: np.ndarray | None = None, group_ranks: tuple[tuple[int, ...], ...] = (),
                 node_of_rank: np.ndarray | None = None, everywhere_copies: bool = False):
        # int64 [T_train]: group of each train token's request (-1: no group, spread evenly), the
        # groups' ranks, and from them the home node of each token (-1: none).
        self.token_group = token_group
        self.group_ranks = group_ranks
        self.token_home = None
        self.everywhere_copies = everywhere_copies  # Objective.everywhere_copies, read by Step 3
        if token_group is not None and node_of_rank is not None:
            home = np.array([node_of_rank[r[0]] for r in group_ranks] + [-1], dtype=np.int64)
            self.token_home = home[np.asarray(token_group)]  # index -1 picks the trailing -1

    def origins(self, topology: Topology) -> np.ndarray | None:
        from vllm_moeplace.routed_metrics import origin_weights

        if self.token_group is None:
            return None
        return origin_weights(np.asarray(self.token_group), self.group_ranks, topology.ep_size)

    def node_terms(self, topology: Topology, load: np.ndarray) -> NodeTerms:
        return NodeTerms(node_sends_weights(topology), None)

    def layer_patterns(self, train: Trace, l: int, topology: Topology) -> tuple[LayerInstance, np.ndarray]:
        """Patterns keyed by (sorted expert set, home node); weights [P, N] scaled x R like
        node_sends: R for a node other than the home, 0 for the home, R - g_n with no home."""
        if self.token_home is None or len(self.token_home) != train.num_tokens:
            raise ValueError("request_node_sends needs the train tokens' home nodes (solve with request groups)")
        R, N = topology.ep_size, topology.num_nodes
        ids = np.sort(train.topk_ids[:, l, :].astype(np.int64), axis=1)
        key = np.concatenate([ids, self.token_home[:, None]], axis=1)
        uniq, counts = np.unique(key, axis=0, return_counts=True)
        K = ids.shape[1]
        inst = LayerInstance(uniq[:, :K], counts.astype(np.float64), train.num_experts)
        home = uniq[:, K]
        w = np.where(np.arange(N)[None, :] == home[:, None], 0.0, float(R))
        w[home < 0] = node_sends_weights(topology)
        return inst, w

    def trivial_bound(self, inst: LayerInstance, terms: NodeTerms) -> float:
        return 0.0

    def lower_bound(self, terms: NodeTerms, inputs: BoundInputs) -> float:
        return 0.0
