"""What an objective is to the solver: the interface every objective module implements.

The search optimises one cost shape, per MoE layer, over an assignment a[e] of experts to nodes:

    cost(a) = Σ_p count_p Σ_n w[n] s_p [pattern p touches node n]  +  Σ_e lin[e, a_e]

(`NodeTerms`: w = `unit_weight`, lin = `linear`, s_p = `pattern_scale` times the inter-layer
weights when that term is on). Everything the search needs is derived from these terms by the
search itself, so an objective supplies only them:

- the swap search (`swap_search.SwapSearch`) prices every single-expert move and confirms swaps
  with exact incremental deltas over the two experts' patterns;
- a CP-SAT neighbourhood (`neighbourhood.reoptimise_units`) projects the patterns on its free
  experts and uses the same w and lin as its coefficients;
- the reported lower bound is the objective's own (`lower_bound`), or the trivial one.

An objective may also say what the load caps balance (`balance_load`, `layer_cap`: default the
token pairs at max_imbalance) and refine the layer's layout after the search (`refine`, with
`refine_share` of the layer's budget; step_time re-scores candidates with the simulator there).

Inside a node, which rank holds an expert changes no node term; `rank_weight` says whether the
objective also prices ranks (a token touching rank r costs rank_weight[r]) or leaves the ranks to
balance alone. An objective that cannot be written in this shape needs a new search, not a new
module here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from vllm_moeplace.plan import Topology
from vllm_moeplace.solver.instance import LayerInstance, node_weights
from vllm_moeplace.trace import Trace


@dataclass(frozen=True)
class NodeTerms:
    unit_weight: np.ndarray  # float64 [N]: cost of a token touching node n (scaled x R)
    linear: np.ndarray | None  # float64 [E, N]: cost of expert e sitting on node n, or None
    pattern_scale: float = 1.0  # factor on per-pattern weights (the inter-layer term's)


@dataclass(frozen=True)
class BoundInputs:
    """What a search-based lower bound may use: the layer, the node sizes, the incumbent (a
    starting point for bound searches) and the seconds it may take."""

    inst: LayerInstance
    sizes: np.ndarray  # int [N]: expert slots per node
    node_assign: np.ndarray  # int64 [E]: the incumbent's node of every expert
    deterministic: bool
    seconds: float


class Objective(ABC):
    """One objective of `SolveOptions.objective`; registered in `objectives.OBJECTIVES`."""

    name: ClassVar[str]
    # The `Metrics` field (vllm_moeplace.metrics) this objective is scored by.
    metric: ClassVar[str]

    @classmethod
    def create(cls, **context: Any) -> "Objective":
        """Build the objective for one solve. context: train (Trace), topology, options
        (SolveOptions), step_model (sim.predict.StepModel or None). Default: needs none of it."""
        return cls()

    @abstractmethod
    def node_terms(self, topology: Topology, load: np.ndarray) -> NodeTerms:
        """The node-level cost terms of one layer. load: float64 [E] (token, expert) pairs."""

    def layer_patterns(self, train: Trace, l: int, topology: Topology) -> tuple[LayerInstance, np.ndarray] | None:
        """The layer's patterns with a weight row each, float [P, N] (x R, counts not included),
        when touching a node costs a token something that depends on the token (its origin), or
        None: the plain patterns of `instance`, every row `node_terms().unit_weight`."""
        return None

    def origins(self, topology: Topology) -> np.ndarray | None:
        """float [R, T_train]: probability that train token t starts on rank o, or None: uniform
        over all ranks (every objective but request_node_sends)."""
        return None

    # Step 3 with per-pattern weights (`layer_patterns`): also give the hottest experts a copy on
    # every node before the locality copies, as the plain solver does (request_node_sends option).
    everywhere_copies: bool = False

    # Share of each layer's budget kept for `refine` (0: no refinement).
    refine_share: ClassVar[float] = 0.0

    def balance_load(self, l: int, load: np.ndarray) -> np.ndarray:
        """float [E]: what the node and rank load caps of layer index l are about (default: the
        (token, expert) pairs themselves)."""
        return load

    def layer_cap(self, bal: np.ndarray, ep_size: int, cap: float) -> float:
        """The cap factor for a layer whose balance load is `bal` (default: max_imbalance as given;
        a cap below what the hottest expert forces is then an error)."""
        return cap

    def refine(self, l: int, layout: np.ndarray, inst: LayerInstance, deterministic: bool, seconds: float) -> np.ndarray:
        """The layer's final layout [R, S] after Steps 1-2 (default: unchanged). May move experts
        across nodes; the node-level objective is then re-scored on the result."""
        return layout

    def report(self) -> dict[str, Any] | None:
        """What the objective adds to the plan's `solver` section (default: nothing)."""
        return None

    def rank_weight(self, topology: Topology) -> np.ndarray | None:
        """float [R]: cost of a token touching rank r inside its nodes, or None when ranks are
        placed for balance only (the default)."""
        return None

    def trivial_bound(self, inst: LayerInstance, terms: NodeTerms) -> float:
        """Valid for any placement: every pattern touches at least one node (0 with a linear
        term, which may be negative relative to the others)."""
        return float(inst.counts.sum() * terms.unit_weight.min()) if terms.linear is None else 0.0

    def lower_bound(self, terms: NodeTerms, inputs: BoundInputs) -> float:
        """The best lower bound this objective knows on the layer's node-level cost, valid for
        every load cap. Default: the trivial one."""
        return self.trivial_bound(inputs.inst, terms)


def node_sends_weights(topology: Topology) -> np.ndarray:
    """The node_sends unit weights (x R): touching node n costs R - g_n."""
    return node_weights(topology.ranks_per_node, topology.ep_size)
