"""The time model of one MoE forward step on a GPU cluster (stated in full in docs/simulator.md).

Inputs: per-layer placements {decoder_layer: int [R, S]} (logical expert in each slot), a
`Topology` (ranks grouped into nodes), a batch of tokens with their routed experts `ids` [B, K]
and their origin ranks `origins` [B], and the `Hardware` / `ModelShape` parameters.

Per MoE layer:
1. Which copy serves a (token, expert) pair: the one replica rule of `vllm_moeplace.replica`
   (origin-node-spread/v1: own rank, else copy (t*K + k) mod n among the n copies on the origin's
   node, else (t*K + k) mod c among all c copies, t = the token's spread key), exactly as the
   placement metrics and the server use it, so simulated traffic and `node_sends` / `rank_sends`
   count the same thing.
2. Messages (one message = one token's hidden vector). With node aggregation (DeepEP normal
   kernels): for each remote node m the token's experts touch, one RDMA message from the origin o
   to peer(o, m) = the rank of m with o's local index; then one NVLink message from the node's
   entry rank (o on o's own node, peer(o, m) on m) to each distinct host rank other than the entry.
   Without aggregation: one message from o to each distinct remote host rank, over NVLink if it
   is on o's node, else over RDMA.
3. A rank's transfer time per fabric is alpha-beta: latency (once, if the rank moves any byte on
   that fabric) + max(bytes sent, bytes received) / bandwidth (links are full duplex, so the busier
   direction bounds). Its dispatch time is max(RDMA, NVLink) when the two overlap, else the sum.
   Combine sends the same messages back (reversed), with the combine's bytes per element.
4. Compute time of a rank = max(FLOPs of the pairs it hosts / GPU FLOP/s, bytes of the weights of
   its experts that received at least one token / HBM bandwidth) (a roofline).
5. Layer time = max over ranks of dispatch + max over ranks of compute + max over ranks of combine
   (each phase ends with every rank waiting for the slowest). Step time = sum over MoE layers.

Pure numpy; no vLLM or torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm_moeplace.plan import Topology
from vllm_moeplace.sim.network import Hardware, ModelShape
from vllm_moeplace.replica import candidate_table, select

GB = 1e9
US = 1e-6


@dataclass(frozen=True)
class LayerTraffic:
    """Messages and work of one layer and one batch, per rank (all int64 [R])."""

    rdma_out: np.ndarray  # dispatch messages a rank sends over RDMA
    rdma_in: np.ndarray
    nvl_out: np.ndarray  # dispatch messages a rank sends over NVLink (incl. forwarded ones)
    nvl_in: np.ndarray
    pairs: np.ndarray  # (token, expert) pairs the rank computes
    active_experts: np.ndarray  # distinct experts on the rank that got >= 1 token

    @property
    def rdma_messages(self) -> int:
        return int(self.rdma_out.sum())

    @property
    def nvl_messages(self) -> int:
        return int(self.nvl_out.sum())


@dataclass(frozen=True)
class LayerTime:
    """Seconds of one layer's phases (each already the max over ranks)."""

    dispatch: float
    compute: float
    combine: float

    @property
    def total(self) -> float:
        return self.dispatch + self.compute + self.combine


def peer_table(topology: Topology) -> np.ndarray:
    """int [R, N]: peer(r, m), the rank of node m with r's local index (mod the node's size).

    DeepEP's internode kernels pair GPU i of one node with GPU i of every other node.
    """
    R, N = topology.ep_size, topology.num_nodes
    local = np.empty(R, dtype=np.int64)
    for ranks in topology.nodes:
        local[np.asarray(ranks, dtype=np.int64)] = np.arange(len(ranks))
    peer = np.empty((R, N), dtype=np.int64)
    for m, ranks in enumerate(topology.nodes):
        ranks = np.asarray(ranks, dtype=np.int64)
        peer[:, m] = ranks[local % len(ranks)]
    return peer


def _first_in_row(sorted_vals: np.ndarray) -> np.ndarray:
    """bool, same shape: True at the first occurrence of each value in each sorted row."""
    first = np.ones_like(sorted_vals, dtype=bool)
    first[:, 1:] = sorted_vals[:, 1:] != sorted_vals[:, :-1]
    return first


def layer_traffic(
    placement: np.ndarray,
    topology: Topology,
    num_experts: int,
    ids: np.ndarray,
    origins: np.ndarray,
    node_aggregation: bool = True,
    spread: np.ndarray | None = None,
) -> LayerTraffic:
    """Count messages and work for tokens `ids` int [B, K] starting on ranks `origins` int [B].

    `spread`: the replica rule's spread key per token (default: its index in the batch; the
    simulator passes the token's trace row, as `moeplace evaluate` does)."""
    R, E = topology.ep_size, num_experts
    ids = np.asarray(ids, dtype=np.int64)
    origins = np.asarray(origins, dtype=np.int64)
    B, K = ids.shape
    a = np.asarray(placement, dtype=np.int64)
    key = np.arange(B, dtype=np.int64) if spread is None else np.asarray(spread, dtype=np.int64)
    if a.size == E and np.array_equal(np.sort(a.ravel()), np.arange(E)):
        # One copy per expert: the replica rule can only pick it (a shortcut, same answer).
        rank_of = np.empty(E, dtype=np.int64)
        rank_of[a.ravel()] = np.repeat(np.arange(a.shape[0]), a.shape[1])
        hosts = rank_of[ids]
    else:
        table = candidate_table(a, E, topology.node_of_rank)
        hosts = select(table, ids, origins, key) // a.shape[1]  # [B, K] ranks
    pairs = np.bincount(hosts.ravel(), minlength=R)
    # distinct (rank, expert) with work, per rank
    active = (np.bincount(hosts.ravel() * E + ids.ravel(), minlength=R * E).reshape(R, E) > 0).sum(axis=1)

    node = topology.node_of_rank
    hs = np.sort(hosts, axis=1)
    o = np.broadcast_to(origins[:, None], hs.shape)
    remote = _first_in_row(hs) & (hs != o)  # distinct host ranks other than the origin
    h_node, o_node = node[hs], node[o]
    off_node = h_node != o_node
    zeros = lambda: np.zeros(R, dtype=np.int64)  # noqa: E731
    if not node_aggregation:
        nv = remote & ~off_node
        rd = remote & off_node
        return LayerTraffic(
            rdma_out=np.bincount(o[rd], minlength=R), rdma_in=np.bincount(hs[rd], minlength=R),
            nvl_out=np.bincount(o[nv], minlength=R), nvl_in=np.bincount(hs[nv], minlength=R),
            pairs=pairs, active_experts=active,
        )
    peer = peer_table(topology)  # [R, N]
    entry = np.where(off_node, peer[o, h_node], o)  # the rank that holds the token on h's node
    nv = remote & (hs != entry)
    # One RDMA message per distinct remote node of the token.
    rn = np.sort(np.where(remote & off_node, h_node, -1), axis=1)
    rd = _first_in_row(rn) & (rn >= 0)
    rd_src = np.broadcast_to(origins[:, None], rn.shape)[rd]
    rd_dst = peer[rd_src, rn[rd]]
    traffic = LayerTraffic(
        rdma_out=np.bincount(rd_src, minlength=R) if rd_src.size else zeros(),
        rdma_in=np.bincount(rd_dst, minlength=R) if rd_dst.size else zeros(),
        nvl_out=np.bincount(entry[nv], minlength=R), nvl_in=np.bincount(hs[nv], minlength=R),
        pairs=pairs, active_experts=active,
    )
    return traffic


def _phase_seconds(out: np.ndarray, inn: np.ndarray, msg_bytes: float, bw_gbs: float, lat_us: float) -> np.ndarray:
    """float [R]: alpha-beta time of one fabric per rank (0 for a rank that moves nothing)."""
    busy = np.maximum(out, inn).astype(np.float64)
    return np.where(busy > 0, lat_us * US, 0.0) + busy * msg_bytes / (bw_gbs * GB)


def transfer_seconds(t: LayerTraffic, hw: Hardware, msg_bytes: float) -> np.ndarray:
    """float [R]: one all-to-all phase (dispatch or combine) per rank."""
    rdma = _phase_seconds(t.rdma_out, t.rdma_in, msg_bytes, hw.rdma_bandwidth_gbs, hw.rdma_latency_us)
    nvl = _phase_seconds(t.nvl_out, t.nvl_in, msg_bytes, hw.nvlink_bandwidth_gbs, hw.nvlink_latency_us)
    return np.maximum(rdma, nvl) if hw.overlap_rdma_nvlink else rdma + nvl


def compute_seconds(pairs: np.ndarray, active_experts: np.ndarray, hw: Hardware, shape: ModelShape) -> np.ndarray:
    """float [R]: roofline of the expert GEMMs per rank (FLOP-bound vs weight-read-bound)."""
    flop_t = np.asarray(pairs, dtype=np.float64) * shape.flops_per_pair / (hw.gpu_tflops * 1e12)
    if hw.hbm_bandwidth_tbs == 0:
        return flop_t
    mem_t = np.asarray(active_experts, dtype=np.float64) * shape.expert_weight_bytes / (hw.hbm_bandwidth_tbs * 1e12)
    return np.maximum(flop_t, mem_t)


def layer_time(t: LayerTraffic, hw: Hardware, shape: ModelShape) -> LayerTime:
    h = shape.hidden_size
    return LayerTime(
        dispatch=float(transfer_seconds(t, hw, h * shape.dispatch_bytes_per_element).max()),
        compute=float(compute_seconds(t.pairs, t.active_experts, hw, shape).max()),
        combine=float(transfer_seconds(t, hw, h * shape.combine_bytes_per_element).max()),
    )
