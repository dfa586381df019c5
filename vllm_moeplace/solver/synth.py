"""Synthetic routing traces with the structure real MoE routers show, for scale tests.

Generative model (all knobs in `SynthConfig`; defaults calibrated against the real
DeepSeek-V2-Lite trace, see benchmarks/synth_calibration.py and its result file):

- Requests: `num_requests` requests with log-normal lengths summing to `num_tokens`; each has a
  domain (label `domain<d>`); the first part of each request is prefill, the rest decode.
- Per-layer popularity: expert e at layer l has base log-weight ~ N(0, skew^2) (skewed load).
- Co-activation clusters: at each layer the experts are split into `num_clusters` random
  clusters (random ids, so vLLM's contiguous layout does not line up with them). A token at
  layer l is in one cluster c_l and the experts of c_l get their weight multiplied by
  exp(cluster_strength): experts of one cluster fire together.
- Domain mixture: each domain has its own distribution over clusters at each layer
  (Dirichlet(domain_concentration)) and a small per-expert log-weight bias (domain_bias).
- Inter-layer correlation: with probability `layer_coupling` the token's cluster at layer l+1 is
  a fixed function of its cluster at l (a random map per layer), else drawn from its domain's
  distribution, so experts at consecutive layers are predictable from each other.
- Prefill / decode: decode tokens get a small extra per-expert log-weight bias (phase_bias).

A token's K experts are drawn without replacement in proportion to its weights (the exponential
race: the K smallest of Exp(1) / w), in descending-score order like a router's top-k.

Memory-lean: tokens are generated in chunks (`chunk` x E floats at a time), so DeepSeek-R1 shape
(58 layers x 256 experts, top-8, 50k tokens) needs ~100 MB beyond the int16 output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.trace import Trace


class SynthError(MoeplaceError):
    """Impossible synthetic-trace parameters (names the value)."""


@dataclass(frozen=True)
class SynthConfig:
    num_layers: int
    num_experts: int
    top_k: int
    num_tokens: int
    seed: int = 0
    num_requests: int | None = None
    """default: about one request per 100 tokens"""
    num_domains: int = 4
    first_layer: int = 1
    """decoder-layer id of the first MoE layer (layer_ids = first_layer .. first_layer + L - 1)"""
    skew: float = 0.25
    """std of per-expert base log-weight: load skew"""
    num_clusters: int | None = None
    """co-activation clusters per layer; default E / 8 (at least 2)"""
    cluster_strength: float = 2.7
    """log-weight boost of the token's cluster"""
    domain_concentration: float = 0.5
    """Dirichlet concentration of each domain's cluster distribution (small = domains specialise)"""
    domain_bias: float = 0.2
    """std of each domain's per-expert log-weight bias"""
    layer_coupling: float = 0.85
    """probability that the next layer's cluster follows from this layer's"""
    prefill_fraction: float = 0.8
    """mean fraction of a request's tokens that are prefill"""
    phase_bias: float = 0.2
    """std of the decode-phase per-expert log-weight bias"""
    chunk: int = 8192

    def validate(self) -> None:
        c = self
        for name in ("num_layers", "num_experts", "top_k", "num_tokens", "num_domains", "chunk"):
            if getattr(c, name) <= 0:
                raise SynthError(f"{name} must be positive, got {getattr(c, name)}")
        if c.top_k > c.num_experts:
            raise SynthError(f"top_k {c.top_k} exceeds num_experts {c.num_experts}")
        if c.num_experts > 32767:
            raise SynthError(f"num_experts {c.num_experts} does not fit the trace's int16 expert ids")
        if c.num_requests is not None and not 1 <= c.num_requests <= c.num_tokens:
            raise SynthError(f"num_requests must be in 1..num_tokens ({c.num_tokens}), got {c.num_requests}")
        if c.num_clusters is not None and not 1 <= c.num_clusters <= c.num_experts:
            raise SynthError(f"num_clusters must be in 1..num_experts ({c.num_experts}), got {c.num_clusters}")
        if not 0.0 <= c.layer_coupling <= 1.0 or not 0.0 <= c.prefill_fraction <= 1.0:
            raise SynthError(f"layer_coupling and prefill_fraction must be in [0, 1], got {c.layer_coupling}, {c.prefill_fraction}")
        if min(c.skew, c.cluster_strength, c.domain_bias, c.phase_bias) < 0 or c.domain_concentration <= 0:
            raise SynthError("skew, cluster_strength, domain_bias, phase_bias must be >= 0 and domain_concentration > 0")
        if c.first_layer < 0:
            raise SynthError(f"first_layer must be >= 0, got {c.first_layer}")


def _requests(cfg: SynthConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(request id [T], domain of each request [N], is_prefill [T])."""
    T = cfg.num_tokens
    N = cfg.num_requests or max(1, T // 100)
    raw = rng.lognormal(0.0, 0.8, size=N)
    lengths = np.maximum(1, np.floor(raw / raw.sum() * (T - N)).astype(np.int64) + 1)
    lengths[: T - lengths.sum()] += 1  # distribute the rounding remainder (T - sum < N)
    lengths[np.argmax(lengths)] -= lengths.sum() - T  # ...or take back an excess
    req = np.repeat(np.arange(N, dtype=np.int32), lengths)
    domains = rng.integers(0, cfg.num_domains, size=N)
    frac = np.clip(rng.normal(cfg.prefill_fraction, 0.1, size=N), 0.0, 1.0)
    start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(T) - start[req]
    prefill = pos < np.ceil(frac[req] * lengths[req])
    return req, domains, prefill


def synth_trace(cfg: SynthConfig) -> Trace:
    """Generate a synthetic trace (deterministic for a given config, including the seed)."""
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    T, L, E, K, D = cfg.num_tokens, cfg.num_layers, cfg.num_experts, cfg.top_k, cfg.num_domains
    C = cfg.num_clusters or max(2, E // 8)
    req, domains, prefill = _requests(cfg, rng)
    dom_t = domains[req]  # [T]
    phase_t = (~prefill).astype(np.int64)  # 0 prefill, 1 decode

    # Per layer: log-weight tables. log_w[l, d, phase, c, e] is factorised to keep memory small.
    base = rng.normal(0.0, cfg.skew, size=(L, E))
    dom_bias = rng.normal(0.0, cfg.domain_bias, size=(L, D, E))
    phase_bias = np.stack([np.zeros((L, E)), rng.normal(0.0, cfg.phase_bias, size=(L, E))], axis=1)  # [L, 2, E]
    cluster_of = np.stack([rng.permutation(E) % C for _ in range(L)])  # [L, E] cluster of each expert
    cluster_dist = rng.dirichlet(np.full(C, cfg.domain_concentration), size=(L, D))  # [L, D, C]
    follow = np.stack([rng.permutation(C) for _ in range(L)])  # [L, C]: cluster at l -> cluster at l+1

    # Each token's cluster at every layer: [T, L] (small ints), the Markov chain over layers.
    cl = np.empty((T, L), dtype=np.int64)
    cl[:, 0] = _draw(cluster_dist[0][dom_t], rng)
    for l in range(1, L):
        fresh = _draw(cluster_dist[l][dom_t], rng)
        keep = rng.random(T) < cfg.layer_coupling
        cl[:, l] = np.where(keep, follow[l - 1][cl[:, l - 1]], fresh)

    ids = np.empty((T, L, K), dtype=np.int16)
    boost = float(np.exp(cfg.cluster_strength))
    for l in range(L):
        # weight without the cluster factor, per (domain, phase): [D, 2, E]
        w0 = np.exp(base[l][None, None, :] + dom_bias[l][:, None, :] + phase_bias[l][None, :, :]).astype(np.float32)
        in_cluster = cluster_of[l][None, :] == np.arange(C)[:, None]  # [C, E]
        for s in range(0, T, cfg.chunk):
            e = min(T, s + cfg.chunk)
            w = w0[dom_t[s:e], phase_t[s:e]]  # [n, E]
            w = w * np.where(in_cluster[cl[s:e, l]], np.float32(boost), np.float32(1.0))
            # Exponential race: the K smallest Exp(1)/w are a weighted sample without replacement.
            keys = rng.standard_exponential(size=w.shape, dtype=np.float32) / w
            top = np.argpartition(keys, K - 1, axis=1)[:, :K]
            order = np.argsort(np.take_along_axis(keys, top, axis=1), axis=1)
            ids[s:e, l, :] = np.take_along_axis(top, order, axis=1)
    meta = {
        "model": f"synthetic-L{L}-E{E}-K{K}",
        "source": "moeplace synth",
        "top_k": K,
        "synth": {k: v for k, v in asdict(cfg).items() if k != "chunk"},
    }
    return Trace(
        topk_ids=ids,
        layer_ids=np.arange(cfg.first_layer, cfg.first_layer + L, dtype=np.int32),
        request_ids=req,
        is_prefill=prefill,
        num_experts=E,
        meta=meta,
        labels=np.array([f"domain{d}" for d in domains]),
    )


def _draw(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per row of p [n, C] (rows sum to 1)."""
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), p.shape[1] - 1)
