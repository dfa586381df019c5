"""Bounds every reader and flag checks before allocating anything sized by user input.

Generous for any real model or cluster, small enough that a typo (or a hostile file) is refused
with a message instead of a multi-GB allocation, a hang or a silent wrap-around.
"""

from __future__ import annotations

MAX_EXPERTS = 1 << 15
"""Routed experts per layer: trace expert ids are int16, so ids 0..32767 (E <= 32768)."""
MAX_EP_SIZE = 4096
"""EP ranks (the largest deployments today use a few hundred). A topology holds a node x node
link-cost matrix, so this also bounds that to 128 MiB."""
MAX_LAYERS = 100_000
"""Decoder layers of a model / largest decoder-layer index (real models: < 200)."""
MAX_TRACE_IDS = 1 << 30
"""tokens x layers x top_k of one trace held in memory (int16: 2 GiB); real traces: < 10^8."""
MAX_NPZ_BYTES = 8 << 30
"""Uncompressed bytes of all arrays of one .npz (a zip bomb stops here, not in the allocator)."""
MAX_SEED = (1 << 31) - 1
"""Seeds reach CP-SAT's int32 random_seed."""
