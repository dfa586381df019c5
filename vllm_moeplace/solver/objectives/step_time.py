"""step_time: the predicted MoE step time for the phase mix on the given hardware (the simulator's
time model, docs/simulator.md), not a proxy.

Per layer the objective gives the search three things:
1. node terms: node_sends (with per-node aggregation, one RDMA message per remote node a token
   touches: the communication part of the step);
2. the balance load the node and rank caps are about: each expert's expected compute seconds in
   the phase mix (`step_search.PhaseCost.balance_load`: prefill FLOPs of its pairs, decode weight
   reads times the probability it is active in a step), so the caps balance what the slowest rank
   spends rather than token counts; the cap is loosened per layer to 1.02 x what the heaviest
   expert alone forces (one hot expert must not make the whole solve infeasible);
3. `refine`: after Steps 1-2, the surrogate's swap descent over all ranks (`step_search`), from
   the search's layout and from vLLM's linear layout; the four layouts (each start, before and
   after its descent) are re-scored exactly by the simulator on batches drawn from the train
   requests; among those within `MARGIN` of the fastest for the phase mix, the one with the lowest
   surrogate is kept (linear on ties: the sample cannot tell equally fast layouts apart).

The reported objective and bound stay node_sends of the node partition (the communication term);
the predicted step times are in the plan's `solver.step_time` (`guard`).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.plan import Topology, linear_layout
from vllm_moeplace.sim.predict import PHASES, StepModel, layer_seconds, phase_batches
from vllm_moeplace.solver.instance import LayerInstance
from vllm_moeplace.solver.objectives.base import BoundInputs, NodeTerms, Objective, node_sends_weights
from vllm_moeplace.solver.objectives.node_sends import NodeSends
from vllm_moeplace.solver.step_search import PhaseCost, StepDescent, phase_cost
from vllm_moeplace.solver.swap_search import SwapSearch
from vllm_moeplace.trace import Trace
from vllm_moeplace.trace_stats import expert_load

# Re-scoring batches are a sample: candidates whose simulated train time is within this share of
# the fastest are taken as equally fast, and among them the surrogate (an expectation, free of
# sampling noise) decides, ties going to vLLM's linear layout.
MARGIN = 0.005
# Batches per phase for the per-layer re-scoring (the simulator's cost is linear in them; a prefill
# batch at EP32 is 131k tokens).
RESCORE_STEPS = {"prefill": 1, "decode": 2}
# Cap loosening: 2% above the hottest expert's share of a rank's mean balance load.
HOT_SLACK = 1.02
# Share of the refinement time for the two descents (clock mode; deterministic mode bounds them
# by rounds).
DESCENT_SHARE = 0.5
# Descent rounds per expert (an upper bound; a descent stops when no swap lowers the surrogate).
ROUNDS_PER_EXPERT = 4


class StepTimeError(MoeplaceError):
    """The step_time objective cannot be used as asked (names the option)."""


class StepTime(Objective):
    name: ClassVar[str] = "step_time"
    metric: ClassVar[str] = "node_sends"
    # Share of each layer's budget kept for `refine` (descents and the simulator re-scoring).
    refine_share: ClassVar[float] = 0.3

    def __init__(self, train: Trace, topology: Topology, model: StepModel, seed: int):
        self.model = model
        self.topology = topology
        R = topology.ep_size
        self.train = train
        # Re-scoring batches: fewer than the guard's (RESCORE_STEPS), none for a phase of weight 0.
        steps = {ph: n if (model.phase_mix if ph == "prefill" else 1.0 - model.phase_mix) > 0 else 0
                 for ph, n in RESCORE_STEPS.items()}
        self.batches = phase_batches(train, model, R, seed=seed, steps=steps)
        hw, shape = model.hardware, model.shape
        self.flop_per_pair_s = shape.flops_per_pair / (hw.gpu_tflops * 1e12)
        self.weight_read_s = shape.expert_weight_bytes / (hw.hbm_bandwidth_tbs * 1e12) if hw.hbm_bandwidth_tbs > 0 else 0.0
        msg = shape.hidden_size * (shape.dispatch_bytes_per_element + shape.combine_bytes_per_element)
        self.p: dict[str, np.ndarray] = {}
        for ph in PHASES:
            mask = train.is_prefill == (ph == "prefill")
            if not mask.any():
                mask = np.ones(train.num_tokens, dtype=bool)  # the trace has no such tokens: all of them
            self.p[ph] = expert_load(train, mask).astype(np.float64) / float(mask.sum())  # [L, E]
        self.comm = {ph: model.tokens_per_rank[ph] * msg / (hw.rdma_bandwidth_gbs * 1e9) for ph in PHASES}
        self.share = {"prefill": model.phase_mix, "decode": 1.0 - model.phase_mix}
        self.choices: dict[int, str] = {}  # decoder layer -> the candidate kept
        self.unscored = 0  # layers whose candidates the clock left to the surrogate alone

    @classmethod
    def create(cls, **context: Any) -> "StepTime":
        options, model = context.get("options"), context.get("step_model")
        if model is None or options is None:
            raise StepTimeError("--objective step_time needs a step model (--hardware and --model-shape)")
        refused = [(options.redundant_per_rank > 0, "--redundant-per-rank"), (options.preserve_groups > 1, "--preserve-groups"),
                   (options.inter_layer_weight > 0, "--inter-layer-weight"), (options.balance_target != "train", "--balance-target expected")]
        for bad, flag in refused:
            if bad:
                raise StepTimeError(f"--objective step_time does not support {flag} yet; drop it or use --objective node_sends")
        return cls(context["train"], context["topology"], model, options.seed)

    # ---- the search's terms ---------------------------------------------------------------------
    def node_terms(self, topology: Topology, load: np.ndarray) -> NodeTerms:
        return NodeTerms(node_sends_weights(topology), None)

    def lower_bound(self, terms: NodeTerms, inputs: BoundInputs) -> float:
        return NodeSends().lower_bound(terms, inputs)

    def phases(self, l: int) -> list[PhaseCost]:
        R = self.topology.ep_size
        return [
            phase_cost(self.p[ph][l], self.share[ph], self.model.tokens_per_rank[ph] * R, self.flop_per_pair_s,
                       self.weight_read_s, self.comm[ph], R)
            for ph in PHASES
        ]

    def balance_load(self, l: int, load: np.ndarray) -> np.ndarray:
        return sum(ph.share * ph.balance_load() for ph in self.phases(l))

    def layer_cap(self, bal: np.ndarray, ep_size: int, cap: float) -> float:
        mean = bal.sum() / ep_size
        return max(cap, float(bal.max() / mean) * HOT_SLACK) if mean > 0 else cap

    def report(self) -> dict[str, Any]:
        kept = list(self.choices.values())
        return {
            "candidates": "search / linear layout, each before and after the surrogate's swap descent; re-scored by the "
                          f"simulator on train batches; among those within {MARGIN:.1%} of the fastest for the phase mix, "
                          "the lowest surrogate is kept (linear on ties)",
            "kept_per_layer": {str(k): v for k, v in self.choices.items()},
            "kept_counts": {n: kept.count(n) for n in sorted(set(kept))},
            "layers_decided_by_surrogate_alone": self.unscored,
        }

    # ---- after Steps 1-2 ------------------------------------------------------------------------
    def refine(self, l: int, layout: np.ndarray, inst: LayerInstance, deterministic: bool, seconds: float) -> np.ndarray:
        topo = self.topology
        R, S = layout.shape
        E = inst.num_experts
        end = time.monotonic() + seconds
        deadline = time.monotonic() + DESCENT_SHARE * seconds  # the rest: the simulator re-scoring
        phases = self.phases(l)
        cands = {"linear": linear_layout(E, R), "search": layout}
        surrogate: dict[str, float] = {}
        for name in ("linear", "search"):
            rank_of = rank_of_layout(cands[name], E)
            ns = SwapSearch(inst, topo.node_of_rank[rank_of], node_sends_weights(topo))
            d = StepDescent(phases, rank_of, topo.node_of_rank, ns, norm=R * inst.total)
            surrogate[name] = d.value()
            if not deterministic and time.monotonic() > deadline:
                continue
            # Half the refinement time per start; the re-scoring after it is not clock-bounded.
            stop = float("inf") if deterministic else time.monotonic() + (deadline - time.monotonic()) / (2 if name == "linear" else 1)
            surrogate[name + "+descent"] = d.descend(ROUNDS_PER_EXPERT * E, deadline=stop)
            cands[name + "+descent"] = layout_of(d.rank_of, R, S)
        times: dict[str, float] = {}
        for n, a in cands.items():
            same = next((m for m in times if np.array_equal(cands[m], a)), None)  # a descent that moved nothing
            if same:
                times[n] = times[same]
            elif deterministic or time.monotonic() < end:
                times[n] = layer_seconds(a, topo, self.train, l, self.model, self.batches)["mix"]
        if len(times) < len(cands):  # out of time (clock mode): the surrogate alone decides
            self.unscored += 1
            times = dict(surrogate)
        best = pick(times, surrogate)
        self.choices[int(self.train.layer_ids[l])] = best
        return cands[best]


def pick(times: dict[str, float], surrogate: dict[str, float]) -> str:
    """The candidate kept: among those within MARGIN of the fastest simulated time, the lowest
    surrogate, linear first on ties (dict order: linear is the first candidate)."""
    fastest = min(times.values())
    near = [n for n in times if times[n] <= fastest * (1.0 + MARGIN)]
    low = min(surrogate[n] for n in near)
    return next(n for n in near if surrogate[n] <= low * (1.0 + 1e-9))


def rank_of_layout(layout: np.ndarray, num_experts: int) -> np.ndarray:
    out = np.empty(num_experts, dtype=np.int64)
    for r, row in enumerate(layout):
        out[row] = r
    return out


def layout_of(rank_of: np.ndarray, R: int, S: int) -> np.ndarray:
    order = np.lexsort((np.arange(len(rank_of)), rank_of))
    return order.reshape(R, S).astype(np.int64)
