"""How much of a trace the budget can use: a token sample for the per-layer search.

The per-layer work before and around the search (pattern counting, co-activation, the swap
search's counts, one descent step, the bounds' arrays) grows with the number of distinct routing
patterns, and at DeepSeek-R1 shape (top-8 of 256) nearly every token is its own pattern: 400k
train tokens cost more setup per layer than a 120 s budget gives a layer in total. So the search
works on a uniform sample of the train tokens, sized so that this setup takes about SETUP_SHARE
of a layer's budget; the rest is search. Expert loads (the balance caps) and the load-risk model
still come from every train token, so balance is exact on train; only the communication
objective is estimated from the sample (unbiased: uniform tokens).

The setup cost per token is measured at the start of the solve on a probe (the real setup work
on PROBE_TOKENS tokens of the first layer), so a busy machine samples less. Deterministic mode
uses STATIC_S_PER_TOKEN instead (no clock) and never samples below DET_MIN_TOKENS, so its plans
on traces up to that size are the same as without sampling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from vllm_moeplace import trace_stats
from vllm_moeplace.solver.instance import LayerInstance
from vllm_moeplace.trace import Trace

# Share of a layer's budget the sample's setup may take (the search gets the rest, less the
# bound's share): measured on the R1 shape (benchmarks/results/solver_scale.md, tokens sweep).
SETUP_SHARE = 0.4
# No sample below this many tokens (the co-activation estimate gets noisy; at R1 shape 20k
# tokens are about 600 (token, expert) pairs per expert).
MIN_TOKENS = 20_000
# Deterministic mode: never sample traces up to this size (keeps the shared traces' plans).
DET_MIN_TOKENS = 100_000
# Per-layer setup seconds per token and per expert chosen (top-k), when not probed: measured on
# this project's 2-core machine at R1 shape (see solver_scale.md).
STATIC_S_PER_PAIR = 2.5e-6
# Probe size; the probe's work is a fixed fraction of a layer's setup (PROBE_FACTOR, measured).
PROBE_TOKENS = 10_000
PROBE_FACTOR = 3.0


@dataclass(frozen=True)
class TokenSample:
    """The train tokens the search works on. tokens: sorted indices into the train trace, or
    None for all of them."""

    tokens: np.ndarray | None
    train_tokens: int
    s_per_pair: float  # per-layer setup seconds per (token, expert) pair the size was chosen with
    probed: bool  # measured on this run (else STATIC_S_PER_PAIR)

    @property
    def size(self) -> int:
        return self.train_tokens if self.tokens is None else int(self.tokens.size)

    def trace(self, train: Trace) -> Trace:
        return train if self.tokens is None else train.select_tokens(self.tokens)

    def to_json(self) -> dict:
        return {
            "tokens": self.size,
            "of": self.train_tokens,
            "share": self.size / max(1, self.train_tokens),
            "setup_s_per_pair": self.s_per_pair,
            "cost_source": "probe" if self.probed else "static",
        }


def sample_size(train_tokens: int, top_k: int, layer_budget: float, s_per_pair: float, floor: int) -> int:
    """Tokens whose setup fits SETUP_SHARE of `layer_budget` seconds (at least `floor`, at most
    all of them)."""
    fit = int(SETUP_SHARE * layer_budget / max(s_per_pair * top_k, 1e-12))
    return int(min(train_tokens, max(floor, fit)))


def choose_sample(train: Trace, layer_budget: float, num_nodes: int, deterministic: bool, seed: int) -> TokenSample:
    """The token sample for a solve whose layers get about `layer_budget` seconds each."""
    T, K = train.num_tokens, train.top_k
    floor = DET_MIN_TOKENS if deterministic else MIN_TOKENS
    if T <= floor:
        return TokenSample(None, T, STATIC_S_PER_PAIR, False)
    order = np.random.default_rng(seed).permutation(T)
    rate, probed = STATIC_S_PER_PAIR, False
    if not deterministic:
        rate, probed = probe_s_per_pair(train, np.sort(order[:PROBE_TOKENS]), num_nodes), True
    n = sample_size(T, K, layer_budget, rate, floor)
    return TokenSample(None if n >= T else np.sort(order[:n]), T, rate, probed)


def probe_s_per_pair(train: Trace, tokens: np.ndarray, num_nodes: int) -> float:
    """Seconds of per-layer setup per (token, expert) pair on this machine now: the pattern
    count, co-activation and swap-search counts of layer 0 on `tokens`, x PROBE_FACTOR."""
    from vllm_moeplace.solver.swap_search import SwapSearch

    t0 = time.monotonic()
    ids = train.topk_ids[tokens, 0, :]
    pats, counts = trace_stats.count_patterns(ids, train.num_experts)
    trace_stats.pair_counts(ids, ids, train.num_experts)
    inst = LayerInstance(pats, counts.astype(np.float64), train.num_experts)
    assign = np.arange(train.num_experts) % max(1, num_nodes)
    SwapSearch(inst, assign, np.ones(max(1, num_nodes))).move_deltas()
    return PROBE_FACTOR * (time.monotonic() - t0) / max(1, ids.size)
