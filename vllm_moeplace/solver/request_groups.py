"""Request groups for the solver (`moeplace solve --request-groups G`): group the train requests
by their prefill signature, give each group a node's ranks, and tell the objective where each
train token starts (`objectives.request_sends`).

The grouping is fitted before the placement (balanced spherical k-means, `request_routing`), and
the train requests are then routed by the very router the plan will carry (not by their k-means
label), so the placement is optimised for the origins the served router produces."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_moeplace.plan import Topology
from vllm_moeplace.request_routing import (
    DEFAULT_MAX_SHARE,
    RequestRouting,
    RoutingError,
    first_layers,
    fit_groups,
    group_ranks,
    route_trace,
    share_imbalance,
    signatures,
)
from vllm_moeplace.trace import Trace


@dataclass(frozen=True)
class RequestGroupOptions:
    num_groups: int
    """Groups of DP ranks (a multiple of the node count; nodes: one group per node)."""
    signature_layers: int = 0
    """The signature reads the prefill routing of the first this-many MoE layers (0: all)."""
    max_share: float = DEFAULT_MAX_SHARE
    """The router's cap on a group's share of requests, x its fair share."""
    everywhere_copies: bool = False
    """With locality copies: first give the hottest experts a copy on every node (`replicas.everywhere_set`,
    as the plain solver does), then the group-priced locality copies."""

    def __post_init__(self) -> None:
        if self.num_groups < 1:
            raise RoutingError(f"--request-groups {self.num_groups}: must be >= 1")
        if self.max_share < 1.0:
            raise RoutingError(f"--max-group-share {self.max_share}: must be >= 1")


@dataclass(frozen=True)
class Grouping:
    routing: RequestRouting
    token_group: np.ndarray  # int64 [T_train]: group of each train token's request (as routed)
    train_share_imbalance: float  # max group share / fair share of the train requests, as routed


def fit_request_routing(train: Trace, topology: Topology, opts: RequestGroupOptions, seed: int = 0) -> Grouping:
    """The routing section of the plan and the train tokens' home nodes."""
    layers = first_layers(train, opts.signature_layers)
    ranks = group_ranks(topology.nodes, opts.num_groups)
    _, X, ok = signatures(train, layers)
    if ok.sum() < opts.num_groups:
        raise RoutingError(f"--request-groups {opts.num_groups}: the train split has {int(ok.sum())} request(s) with "
                           "prefill tokens; a group needs at least one")
    _, cents = fit_groups(X[ok], opts.num_groups, seed=seed)
    routing = RequestRouting(layers, cents, ranks, opts.max_share)
    tok_group, req_group = route_trace(routing, train)
    return Grouping(routing, tok_group, share_imbalance(req_group, opts.num_groups))
