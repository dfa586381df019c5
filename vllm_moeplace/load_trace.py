"""The load-only trace (`.npz`): tokens per expert, without per-token routing.

What engines' own statistics give (SGLang's `stat` recorder, TensorRT-LLM's EXPERT_STATISTIC_PATH):
enough to balance load and to place redundant copies, not enough for any locality objective (which
experts a token needs together). `moeplace solve` takes it with `--objective balance`
(`load_balance.py`) and refuses the other objectives with one message.

| key          | dtype, shape     | meaning                                                             |
|--------------|------------------|---------------------------------------------------------------------|
| expert_load  | int64 [W, L, E]  | tokens routed to expert e at the l-th MoE layer in window w          |
| layer_ids    | int32 [L]        | decoder-layer index of each MoE layer                                |
| num_experts  | int scalar       | logical routed experts per MoE layer (= E)                           |
| meta         | str scalar JSON  | model, source, format, window (what one w is: a step, an iteration)  |

A file is a load-only trace iff it has exactly these keys (a native trace has `topk_ids`).
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vllm_moeplace.limits import MAX_EXPERTS
from vllm_moeplace.npzio import read_npz
from vllm_moeplace.trace import TraceError, parse_meta

LOAD_KEYS = ("expert_load", "layer_ids", "num_experts", "meta")


@dataclass(frozen=True)
class LoadTrace:
    expert_load: np.ndarray  # int64 [W, L, E]
    layer_ids: np.ndarray  # int32 [L]
    num_experts: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_load_trace(self, "<load trace>")

    @property
    def num_layers(self) -> int:
        return int(self.expert_load.shape[1])

    @property
    def num_windows(self) -> int:
        return int(self.expert_load.shape[0])

    def total(self) -> np.ndarray:
        """int64 [L, E]: load summed over windows."""
        return self.expert_load.sum(axis=0)


def validate_load_trace(t: LoadTrace, src: str) -> None:
    a = t.expert_load
    if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.ndim != 3:
        raise TraceError(f"{src}: key 'expert_load': expected int64 [W, L, E], got "
                         f"{getattr(a, 'dtype', type(a))} shape {list(getattr(a, 'shape', []))}")
    W, L, E = a.shape
    if W < 1 or L < 1:
        raise TraceError(f"{src}: key 'expert_load': shape {list(a.shape)} has no window or no layer")
    if E != t.num_experts or not 0 < E <= MAX_EXPERTS:
        raise TraceError(f"{src}: key 'num_experts': {t.num_experts}, but expert_load has {E} experts per layer")
    if (a < 0).any():
        w, l, e = np.argwhere(a < 0)[0]
        raise TraceError(f"{src}: key 'expert_load': negative count {int(a[w, l, e])} at window {w}, layer {l}, expert {e}")
    ids = t.layer_ids
    if ids.dtype != np.int32 or ids.shape != (L,) or np.unique(ids).size != L or (ids < 0).any():
        raise TraceError(f"{src}: key 'layer_ids': expected {L} distinct non-negative int32 decoder-layer ids, "
                         f"got {ids.dtype} {ids.tolist()}")


def is_load_trace(path: str | os.PathLike) -> bool:
    """True when `path` is an .npz with the load-only keys (no error if it is not readable: the
    reader that runs next names the problem). Reads the archive's member names only."""
    try:
        with zipfile.ZipFile(path) as zf:
            return {n.removesuffix(".npy") for n in zf.namelist()} == set(LOAD_KEYS)
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def load_load_trace(path: str | os.PathLike) -> LoadTrace:
    src = str(path)
    arrays = read_npz(path, "load trace", TraceError)
    if set(arrays) != set(LOAD_KEYS):
        raise TraceError(f"{src}: a load-only trace has keys {list(LOAD_KEYS)}; found {sorted(arrays)}")
    ne = arrays["num_experts"]
    if ne.shape != () or ne.dtype.kind not in "iu":
        raise TraceError(f"{src}: key 'num_experts': expected an integer scalar, got {ne.dtype} shape {list(ne.shape)}")
    meta = parse_meta(arrays["meta"], src)
    t = object.__new__(LoadTrace)
    for k, v in dict(expert_load=arrays["expert_load"], layer_ids=arrays["layer_ids"], num_experts=int(ne), meta=meta).items():
        object.__setattr__(t, k, v)
    validate_load_trace(t, src)
    if not t.expert_load.any():
        raise TraceError(f"{src}: key 'expert_load': every count is 0: no routed tokens to balance")
    return t


def save_load_trace(path: str | os.PathLike, t: LoadTrace) -> None:
    """Write `t` atomically (an interrupted write leaves no partial file)."""
    validate_load_trace(t, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(
                f, expert_load=t.expert_load, layer_ids=t.layer_ids,
                num_experts=np.array(t.num_experts, dtype=np.int64), meta=np.array(json.dumps(t.meta)),
            )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
