"""The native routing-trace format (`.npz`), read and written by every tool of the project.

Layout (frozen; documented in ../shared/data/README.md and docs/formats.md):

| key            | dtype, shape        | meaning                                                   |
|----------------|---------------------|-----------------------------------------------------------|
| topk_ids       | int16 [T, L, K]     | logical expert ids chosen for token t at the l-th MoE layer |
| layer_ids      | int32 [L]           | decoder-layer index of each MoE layer                      |
| request_ids    | int32 [T]           | request each token belongs to, 0-based, arrival order      |
| is_prefill     | bool [T]            | token processed in prefill (True) or decode (False)        |
| num_experts    | int scalar          | logical routed experts per MoE layer                       |
| meta           | str scalar (JSON)   | model, source, label, top_k, ...                            |
| topk_weights   | float16 [T, L, K]   | optional: router weights of the chosen experts             |
| labels         | str [num_requests]  | optional: label / domain of each request id                |

Pure numpy: no vLLM or torch here.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.limits import MAX_EXPERTS
from vllm_moeplace.npzio import read_npz

REQUIRED_KEYS = ("topk_ids", "layer_ids", "request_ids", "is_prefill", "num_experts", "meta")
OPTIONAL_KEYS = ("topk_weights", "labels")


class TraceError(MoeplaceError):
    """A trace file is malformed. The message names the file, the key and the value."""


@dataclass(frozen=True)
class Trace:
    topk_ids: np.ndarray  # int16 [T, L, K]
    layer_ids: np.ndarray  # int32 [L]
    request_ids: np.ndarray  # int32 [T]
    is_prefill: np.ndarray  # bool [T]
    num_experts: int
    meta: dict[str, Any] = field(default_factory=dict)
    topk_weights: np.ndarray | None = None  # float16 [T, L, K]
    labels: np.ndarray | None = None  # str [num_requests]
    source: str = field(default="<trace>", compare=False)  # file it was read from, for messages

    def __post_init__(self) -> None:
        validate_trace(self, self.source)

    # ---- shape accessors ----------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[2])

    @property
    def num_requests(self) -> int:
        return int(self.request_ids.max()) + 1 if self.request_ids.size else 0

    # ---- selections ---------------------------------------------------------------------------
    def select_tokens(self, mask: np.ndarray) -> "Trace":
        """A trace of the tokens where `mask` is True (request ids and labels kept as they are)."""
        return Trace(
            topk_ids=self.topk_ids[mask],
            layer_ids=self.layer_ids,
            request_ids=self.request_ids[mask],
            is_prefill=self.is_prefill[mask],
            num_experts=self.num_experts,
            meta=dict(self.meta),
            topk_weights=None if self.topk_weights is None else self.topk_weights[mask],
            labels=self.labels,
            source=self.source,
        )

    def split_by_request(self, train_fraction: float) -> tuple["Trace", "Trace"]:
        """(train, held-out): the first `train_fraction` of request ids vs the rest.

        Splitting by request (not by token) keeps a prompt's tokens together, so held-out scores
        measure generalisation to unseen requests.
        """
        if not 0.0 < train_fraction < 1.0:
            raise TraceError(f"train_fraction must be in (0, 1), got {train_fraction}")
        reqs = np.unique(self.request_ids)
        n_train = int(np.ceil(len(reqs) * train_fraction))
        if n_train >= len(reqs):
            # An empty held-out part would score plans on nothing (0/0 metrics): refuse, saying why.
            raise TraceError(
                f"{self.source}: key 'request_ids': train fraction {train_fraction:g} of its {len(reqs)} request(s) "
                f"leaves the held-out split empty (the first {n_train} request(s) all train); lower the train "
                "fraction or use a trace with more requests"
            )
        cut = reqs[n_train - 1]
        train = self.request_ids <= cut
        return self.select_tokens(train), self.select_tokens(~train)

    def layer_index(self, decoder_layer: int) -> int:
        hits = np.nonzero(self.layer_ids == decoder_layer)[0]
        if not hits.size:
            raise TraceError(f"decoder layer {decoder_layer} is not in the trace's layer_ids {self.layer_ids.tolist()}")
        return int(hits[0])


def _fail(src: str, key: str, msg: str) -> TraceError:
    return TraceError(f"{src}: key '{key}': {msg}")


# Tokens per step of the duplicate-expert check (bounds its temporary copies).
_CHECK_CHUNK = 1 << 16


def validate_trace(t: Trace, src: str) -> None:
    """The specification of a valid trace."""
    ids = t.topk_ids
    if not isinstance(ids, np.ndarray) or ids.dtype != np.int16 or ids.ndim != 3:
        raise _fail(src, "topk_ids", f"expected int16 [T, L, K], got {getattr(ids, 'dtype', type(ids))} shape {getattr(ids, 'shape', None)}")
    T, L, K = ids.shape
    if K < 1 or L < 1:
        raise _fail(src, "topk_ids", f"shape {list(ids.shape)} has no layers or no experts per token")
    if t.layer_ids.dtype != np.int32 or t.layer_ids.shape != (L,):
        raise _fail(src, "layer_ids", f"expected int32 [{L}], got {t.layer_ids.dtype} shape {list(t.layer_ids.shape)}")
    if np.unique(t.layer_ids).size != L or (t.layer_ids < 0).any():
        raise _fail(src, "layer_ids", f"must be distinct non-negative layer indices, got {t.layer_ids.tolist()}")
    if t.request_ids.dtype != np.int32 or t.request_ids.shape != (T,):
        raise _fail(src, "request_ids", f"expected int32 [{T}], got {t.request_ids.dtype} shape {list(t.request_ids.shape)}")
    if T and t.request_ids.min() < 0:
        raise _fail(src, "request_ids", f"negative request id {int(t.request_ids.min())}")
    if t.is_prefill.dtype != np.bool_ or t.is_prefill.shape != (T,):
        raise _fail(src, "is_prefill", f"expected bool [{T}], got {t.is_prefill.dtype} shape {list(t.is_prefill.shape)}")
    E = t.num_experts
    if not isinstance(E, (int, np.integer)) or isinstance(E, bool) or not 0 < E <= MAX_EXPERTS:
        raise _fail(src, "num_experts", f"expected a positive integer <= {MAX_EXPERTS} (expert ids are int16), got {E!r}")
    if T:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= E:
            bad = lo if lo < 0 else hi
            where = np.argwhere(ids == bad)[0]
            raise _fail(src, "topk_ids", f"expert id {bad} at token {where[0]}, layer {where[1]} out of range 0..{E - 1}")
        # In token chunks: a sorted copy of a 1M-token R1 trace would be another 0.9 GB.
        for s in range(0, T, _CHECK_CHUNK):
            srt = np.sort(ids[s : s + _CHECK_CHUNK], axis=2)
            dup = (srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2)
            if dup.any():
                tt, ll = np.argwhere(dup)[0]
                tt += s
                raise _fail(src, "topk_ids", f"token {tt}, layer {ll} chooses an expert twice: {ids[tt, ll].tolist()}")
    if t.topk_weights is not None:
        w = t.topk_weights
        if w.dtype != np.float16 or w.shape != ids.shape:
            raise _fail(src, "topk_weights", f"expected float16 {list(ids.shape)}, got {w.dtype} shape {list(w.shape)}")
    if t.labels is not None:
        if t.labels.ndim != 1 or t.labels.dtype.kind not in "US":
            raise _fail(src, "labels", f"expected a 1-D string array, got {t.labels.dtype} shape {list(t.labels.shape)}")
        if T and t.labels.shape[0] < int(t.request_ids.max()) + 1:
            raise _fail(src, "labels", f"{t.labels.shape[0]} labels but request ids go up to {int(t.request_ids.max())}")


def load_trace(path: str | os.PathLike) -> Trace:
    """Read and validate a native `.npz` trace. Every failure is a TraceError naming the file
    (`npzio.read_npz`: no pickles, headers checked against the stored bytes before allocating)."""
    src = str(path)
    z = read_npz(path, "trace", TraceError)
    keys = set(z)
    missing = [k for k in REQUIRED_KEYS if k not in keys]
    if missing:
        raise TraceError(f"{src}: missing key(s) {missing}; found {sorted(keys)}")
    unknown = sorted(keys - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if unknown:
        raise TraceError(f"{src}: unknown key(s) {unknown}")
    ne = z["num_experts"]
    if ne.shape != () or ne.dtype.kind not in "iu":
        raise _fail(src, "num_experts", f"expected an integer scalar, got {ne.dtype} shape {list(ne.shape)}")
    meta = parse_meta(z["meta"], src)
    t = object.__new__(Trace)  # validate with the file name in the message, then freeze
    fields = {k: z[k] for k in ("topk_ids", "layer_ids", "request_ids", "is_prefill")}
    fields.update(num_experts=int(ne), meta=meta, topk_weights=z.get("topk_weights"), labels=z.get("labels"), source=src)
    for k, v in fields.items():
        object.__setattr__(t, k, v)
    validate_trace(t, src)
    if t.num_tokens == 0:
        raise _fail(src, "topk_ids", "the trace has zero tokens: nothing to place, score or analyse")
    return t


def parse_meta(raw: np.ndarray, src: str) -> dict[str, Any]:
    """The `meta` key: a string scalar holding a JSON object (free-form provenance, so any JSON
    value is kept; only the type is checked)."""
    if raw.shape != () or raw.dtype.kind not in "US":
        raise _fail(src, "meta", f"expected a JSON object string, got {raw.dtype} shape {list(raw.shape)}")
    try:
        meta = json.loads(str(raw[()]))
    except (ValueError, RecursionError) as e:
        raise _fail(src, "meta", f"expected a JSON object string ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(meta, dict):
        raise _fail(src, "meta", f"expected a JSON object string, got {type(meta).__name__}")
    return meta


def save_trace(path: str | os.PathLike, t: Trace) -> None:
    """Write `t` atomically: an interrupted write leaves no partial file at `path`."""
    validate_trace(t, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "topk_ids": t.topk_ids,
        "layer_ids": t.layer_ids,
        "request_ids": t.request_ids,
        "is_prefill": t.is_prefill,
        "num_experts": np.array(t.num_experts, dtype=np.int64),
        "meta": np.array(json.dumps(t.meta)),
    }
    if t.topk_weights is not None:
        arrays["topk_weights"] = t.topk_weights
    if t.labels is not None:
        arrays["labels"] = t.labels
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
