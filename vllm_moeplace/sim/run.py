"""Simulate whole steps: draw batches from a trace, time every MoE layer, sum over layers.

Batch model (docs/simulator.md): a step holds `tokens_per_rank` tokens on each of the R ranks.
They are drawn from the trace's tokens of the requested phase, without replacement when the trace
has enough of them (else with replacement), and dealt to ranks uniformly at random, exactly
`tokens_per_rank` each: the same uniform-origin assumption the placement metrics make. Each token
keeps its recorded routing at every layer. `steps` batches are drawn from one seed, and the same
batches are used for every layout compared (common random numbers), so differences between
layouts are not sampling noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_moeplace.plan import Topology, linear_layout
from vllm_moeplace.sim.model import LayerTime, layer_time, layer_traffic
from vllm_moeplace.sim.network import BatchSpec, Hardware, ModelShape, SimParamsError
from vllm_moeplace.trace import Trace


@dataclass(frozen=True)
class Batch:
    tokens: np.ndarray  # int [B]: token indices into the trace
    origins: np.ndarray  # int [B]: EP rank each token starts on


@dataclass(frozen=True)
class StepResult:
    """Mean over the drawn batches. Seconds per layer are float [L] in trace layer order."""

    layer_ids: np.ndarray
    dispatch: np.ndarray
    compute: np.ndarray
    combine: np.ndarray
    rdma_bytes: float  # dispatch + combine bytes over the network, whole step, all ranks
    nvlink_bytes: float
    pair_imbalance: float  # mean over layers of max rank pairs / mean rank pairs (sampled)

    @property
    def total(self) -> float:
        return float(self.dispatch.sum() + self.compute.sum() + self.combine.sum())

    @property
    def comm(self) -> float:
        return float(self.dispatch.sum() + self.combine.sum())


def sample_batches(trace: Trace, batch: BatchSpec, ep_size: int,
                   routed: tuple[np.ndarray, tuple[tuple[int, ...], ...]] | None = None) -> list[Batch]:
    """Seeded batches, every token dealt to any rank; `routed` = (group of each token, ranks of
    each group): requests routed to groups of DP ranks instead (`sample_routed_batches`)."""
    if routed is not None:
        return sample_routed_batches(trace, batch, routed[0], routed[1], ep_size)
    if batch.phase == "any":
        pool = np.arange(trace.num_tokens)
    else:
        pool = np.nonzero(trace.is_prefill == (batch.phase == "prefill"))[0]
    if pool.size == 0:
        raise SimParamsError(f"batch phase '{batch.phase}': the trace has no {batch.phase} tokens")
    rng = np.random.default_rng(batch.seed)
    B = batch.tokens_per_rank * ep_size
    out = []
    for _ in range(batch.steps):
        tokens = rng.choice(pool, size=B, replace=pool.size < B)
        origins = rng.permutation(np.repeat(np.arange(ep_size), batch.tokens_per_rank))
        out.append(Batch(tokens=tokens, origins=origins))
    return out


def sample_routed_batches(trace: Trace, batch: BatchSpec, token_group: np.ndarray,
                          group_ranks: tuple[tuple[int, ...], ...], ep_size: int) -> list[Batch]:
    """Batches when requests are routed to groups of DP ranks (request-aware placement): every rank
    still holds `tokens_per_rank` tokens, drawn from the tokens (of the phase) of the requests its
    group was routed, so its origin is a rank of the token's group. token_group int [T] (-1: the
    router spread the request; such tokens may land on any rank)."""
    pool_mask = np.ones(trace.num_tokens, dtype=bool) if batch.phase == "any" else (
        trace.is_prefill == (batch.phase == "prefill"))
    rng = np.random.default_rng(batch.seed)
    group_of_rank = np.full(ep_size, -1, dtype=np.int64)
    for g, ranks in enumerate(group_ranks):
        group_of_rank[list(ranks)] = g
    pools = {}
    for r in range(ep_size):
        g = group_of_rank[r]
        pool = np.nonzero(pool_mask & ((token_group == g) | (token_group < 0)))[0]
        if pool.size == 0:
            raise SimParamsError(f"batch phase '{batch.phase}': no {batch.phase} tokens routed to the group of rank {r}")
        pools[r] = pool
    out = []
    for _ in range(batch.steps):
        toks = [rng.choice(pools[r], size=batch.tokens_per_rank, replace=pools[r].size < batch.tokens_per_rank)
                for r in range(ep_size)]
        out.append(Batch(tokens=np.concatenate(toks), origins=np.repeat(np.arange(ep_size), batch.tokens_per_rank)))
    return out


def simulate(
    layers: dict[int, np.ndarray],
    topology: Topology,
    trace: Trace,
    hw: Hardware,
    shape: ModelShape,
    batches: list[Batch],
) -> StepResult:
    """Time one step per batch for the per-layer placements (a missing layer = vLLM's linear)."""
    if shape.num_experts != trace.num_experts or shape.top_k != trace.top_k:
        raise SimParamsError(
            f"model shape has num_experts={shape.num_experts}, top_k={shape.top_k} but the trace has "
            f"num_experts={trace.num_experts}, top_k={trace.top_k}"
        )
    L = trace.num_layers
    d, c, x = (np.zeros(L) for _ in range(3))
    rdma = nvl = imb = 0.0
    h = shape.hidden_size
    per_msg = h * (shape.dispatch_bytes_per_element + shape.combine_bytes_per_element)
    for li, lid in enumerate(trace.layer_ids.tolist()):
        a = layers.get(lid)
        if a is None:
            a = linear_layout(trace.num_experts, topology.ep_size)
        for b in batches:
            t = layer_traffic(
                a, topology, trace.num_experts, trace.topk_ids[b.tokens, li, :], b.origins, hw.node_aggregation, spread=b.tokens
            )
            lt: LayerTime = layer_time(t, hw, shape)
            d[li] += lt.dispatch
            x[li] += lt.compute
            c[li] += lt.combine
            rdma += t.rdma_messages * per_msg
            nvl += t.nvl_messages * per_msg
            imb += t.pairs.max() / t.pairs.mean()
    n = len(batches)
    return StepResult(
        layer_ids=trace.layer_ids.astype(np.int64),
        dispatch=d / n,
        compute=x / n,
        combine=c / n,
        rdma_bytes=rdma / n,
        nvlink_bytes=nvl / n,
        pair_imbalance=imb / (n * L),
    )
