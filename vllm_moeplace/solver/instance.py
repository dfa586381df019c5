"""One MoE layer as a weighted set-partition instance: unique routing patterns with counts.

`node_sends` of a token depends only on *which* nodes host its experts, so tokens with the same
expert set are interchangeable: aggregating them into patterns (a few x 10^4 per layer on
DeepSeek-V2-Lite instead of 10^5 tokens) is exact, not an approximation.

Vocabulary used by the search modules:
- *unit*: a bin the experts are partitioned into (a node at the node level, a rank inside one node
  at the rank level); each unit u has a fixed number of expert slots `size[u]`.
- *unit weight* w[u]: what touching unit u costs one token (node_sends: 1 - g_u / R).
- *assignment* a[E]: unit of each expert.

Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vllm_moeplace import trace_stats as stats
from vllm_moeplace.trace import Trace


@dataclass(frozen=True)
class LayerInstance:
    patterns: np.ndarray  # int64 [P, K]: sorted distinct expert ids of one routing pattern
    counts: np.ndarray  # float64 [P]: tokens (train) that chose exactly this pattern
    num_experts: int
    _inc: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Incidence lists in CSR form: inc_ptr[e]:inc_ptr[e+1] slices `inc_idx` to the patterns
        # containing expert e (sorted), so a swap's exact delta touches only those patterns.
        flat = self.patterns.ravel()
        order = np.argsort(flat, kind="stable")
        pat_of = (order // self.patterns.shape[1]).astype(np.int64)
        ptr = np.zeros(self.num_experts + 1, dtype=np.int64)
        np.cumsum(np.bincount(flat, minlength=self.num_experts), out=ptr[1:])
        object.__setattr__(self, "_inc", (ptr, pat_of))

    @classmethod
    def from_trace(cls, trace: Trace, layer_idx: int) -> "LayerInstance":
        """The patterns of MoE layer index `layer_idx` (0-based position in trace.layer_ids)."""
        pats, counts = stats.unique_patterns(trace, layer_idx)
        return cls(pats, counts.astype(np.float64), int(trace.num_experts))

    @property
    def num_patterns(self) -> int:
        return int(self.patterns.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.patterns.shape[1])

    @property
    def total(self) -> float:
        return float(self.counts.sum())

    def expert_load(self) -> np.ndarray:
        """float64 [E]: (token, expert) pairs per expert."""
        return np.bincount(self.patterns.ravel(), weights=np.repeat(self.counts, self.top_k), minlength=self.num_experts)

    def patterns_of(self, e: int) -> np.ndarray:
        ptr, idx = self._inc
        return idx[ptr[e] : ptr[e + 1]]

    def unit_counts(self, assign: np.ndarray, num_units: int) -> np.ndarray:
        """int32 [P, U]: how many of each pattern's experts sit on each unit."""
        P, K = self.patterns.shape
        flat = np.repeat(np.arange(P), K) * num_units + assign[self.patterns.ravel()]
        return np.bincount(flat, minlength=P * num_units).reshape(P, num_units).astype(np.int32)

    def cost(self, assign: np.ndarray, unit_weight: np.ndarray) -> float:
        """Σ_p count_p Σ_u w_u [pattern p touches unit u]."""
        cnt = self.unit_counts(assign, len(unit_weight))
        return float(self.counts @ ((cnt > 0) @ unit_weight))


def node_weights(node_sizes: np.ndarray, ep_size: int) -> np.ndarray:
    """Integer unit weights for node_sends, scaled by R: touching node n costs (R - g_n) / R."""
    return (ep_size - np.asarray(node_sizes, dtype=np.int64)).astype(np.float64)
