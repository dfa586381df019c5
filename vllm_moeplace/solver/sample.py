"""How much of a trace the budget can use: a token sample for the per-layer search.

The per-layer work before and around the search (pattern counting, co-activation, the swap
search's counts, one descent step, the bounds' arrays) grows with the number of distinct routing
patterns, and at DeepSeek-R1 shape (top-8 of 256) nearly every token is its own pattern: 400k
train tokens cost more setup per layer than a 120 s budget gives a layer in total. So the search
works on a uniform sample of the train tokens, sized so that this setup takes about SETUP_SHARE
of a layer's budget; the rest is search. Expert loads (the balance caps) and the load-risk model
still come from every train token, so balance is exact on train; only the communication
objective is estimated from the sample (unbiased: uniform tokens).

The setup cost is measured at the start of the solve on a probe (part of the real setup work, on
PROBE_TOKENS tokens of the first layer), so a busy machine samples less. Model of one layer's
setup, in units of the probe's seconds per (token, expert) pair `u`:
    setup(n) = u * (SETUP_PER_PAIR * n * K + SETUP_PER_E2 * E^2)
(the E^2 part: warm start, the swap searches' E x E candidate matrices, the noise model).
Deterministic mode uses STATIC_S_PER_PAIR for u (no clock) and never samples below
DET_MIN_TOKENS, so its plans on traces up to that size are the same as without sampling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from vllm_moeplace import trace_stats
from vllm_moeplace.solver.instance import LayerInstance
from vllm_moeplace.trace import Trace

# Share of a layer's budget the sample's setup may take (the search gets the rest, less the
# bound's quarter). Chosen, not tuned: at R1 shape the search after the warm start changes the
# train objective by < 0.5% (solver_scale.md), while 20k -> 100k sample tokens is 0.35% held-out.
SETUP_SHARE = 0.4
# No sample below this many tokens (the co-activation estimate gets noisy; at R1 shape 20k
# tokens are about 600 (token, expert) pairs per expert).
MIN_TOKENS = 20_000
# Deterministic mode: never sample traces up to this size (keeps the shared traces' plans).
DET_MIN_TOKENS = 100_000
# The probe's CPU seconds per pair on an idle core of this project's 2-core machine (AMD EPYC) at
# R1 shape: 2.8-3.1e-7 (`benchmarks/solver_scale_tokens.py calibrate`); deterministic mode's `u`.
STATIC_S_PER_PAIR = 3.0e-7
PROBE_TOKENS = 10_000
# One layer's setup (solve_layer with no search time, CPU seconds) over the probe's per-pair cost,
# measured at R1 shape on 20k / 50k / 100k-token samples of the 400k trace: 0.33 / 0.53 / 0.92 s
# with u = 2.9e-7, i.e. 3.2 x u per pair plus 0.19 s = 10 x u x E^2.
SETUP_PER_PAIR = 3.2
SETUP_PER_E2 = 10.0


@dataclass(frozen=True)
class TokenSample:
    """The train tokens the search works on. tokens: sorted indices into the train trace, or
    None for all of them."""

    tokens: np.ndarray | None
    train_tokens: int
    s_per_pair: float  # the probe's seconds per (token, expert) pair `u` the size was chosen with
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
            "probe_s_per_pair": self.s_per_pair,
            "cost_source": "probe" if self.probed else "static",
        }


def sample_size(train_tokens: int, top_k: int, num_experts: int, layer_budget: float, s_per_pair: float, floor: int) -> int:
    """Tokens whose setup (the model above, `u` = s_per_pair) fits SETUP_SHARE of `layer_budget`
    seconds; at least `floor`, at most all of them."""
    u = max(s_per_pair, 1e-12)
    spare = SETUP_SHARE * layer_budget - u * SETUP_PER_E2 * num_experts**2
    fit = int(max(0.0, spare) / (u * SETUP_PER_PAIR * top_k))
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
    n = sample_size(T, K, train.num_experts, layer_budget, rate, floor)
    return TokenSample(None if n >= T else np.sort(order[:n]), T, rate, probed)


def probe_s_per_pair(train: Trace, tokens: np.ndarray, num_nodes: int) -> float:
    """`u`: seconds per (token, expert) pair of part of a layer's setup on this machine now (the
    pattern count, co-activation and swap-search counts of layer 0 on `tokens`)."""
    from vllm_moeplace.solver.swap_search import SwapSearch

    t0 = time.monotonic()
    ids = train.topk_ids[tokens, 0, :]
    pats, counts = trace_stats.count_patterns(ids, train.num_experts)
    trace_stats.pair_counts(ids, ids, train.num_experts)
    inst = LayerInstance(pats, counts.astype(np.float64), train.num_experts)
    assign = np.arange(train.num_experts) % max(1, num_nodes)
    SwapSearch(inst, assign, np.ones(max(1, num_nodes))).move_deltas()
    return (time.monotonic() - t0) / max(1, ids.size)
