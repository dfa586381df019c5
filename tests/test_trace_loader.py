"""The native trace loader (`vllm_moeplace.trace`): round trip, and one clear TraceError per kind of
malformed file (built as bad .npz files in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.trace import Trace, TraceError, load_trace, save_trace


def _arrays() -> dict[str, np.ndarray]:
    """A valid 5-token, 2-layer, top-2 trace as raw npz arrays."""
    return {
        "topk_ids": np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[3, 2], [1, 0]], [[0, 3], [2, 1]], [[2, 1], [0, 3]]], dtype=np.int16),
        "layer_ids": np.array([1, 3], dtype=np.int32),
        "request_ids": np.array([0, 0, 1, 1, 1], dtype=np.int32),
        "is_prefill": np.array([True, False, True, True, False]),
        "num_experts": np.array(4, dtype=np.int64),
        "meta": np.array(json.dumps({"model": "m", "top_k": 2})),
    }


def _write(tmp_path: Path, **changes) -> Path:
    arrays = _arrays()
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    path = tmp_path / "t.npz"
    np.savez(path, **arrays)
    return path


def test_round_trip_with_optional_keys(tmp_path: Path) -> None:
    a = _arrays()
    w = (np.arange(20, dtype=np.float16).reshape(5, 2, 2) / 20).astype(np.float16)
    t = Trace(a["topk_ids"], a["layer_ids"], a["request_ids"], a["is_prefill"], 4, {"model": "m"}, w, np.array(["x", "y"]))
    save_trace(tmp_path / "sub" / "t.npz", t)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["t.npz"]  # no temp file left behind
    u = load_trace(tmp_path / "sub" / "t.npz")
    for k in ("topk_ids", "layer_ids", "request_ids", "is_prefill", "topk_weights", "labels"):
        assert np.array_equal(getattr(u, k), getattr(t, k)) and getattr(u, k).dtype == getattr(t, k).dtype
    assert u.num_experts == 4 and u.meta == {"model": "m"}
    assert (u.num_tokens, u.num_layers, u.top_k, u.num_requests) == (5, 2, 2, 2)
    assert u.layer_index(3) == 1


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"topk_ids": None}, r"missing key\(s\) \['topk_ids'\]"),
        ({"meta": None, "is_prefill": None}, r"missing key\(s\) \['is_prefill', 'meta'\]"),
        ({"extra": np.zeros(1)}, r"unknown key\(s\) \['extra'\]"),
        ({"topk_ids": _arrays()["topk_ids"].astype(np.int32)}, r"key 'topk_ids': expected int16 \[T, L, K\], got int32"),
        ({"topk_ids": _arrays()["topk_ids"][:, :, 0]}, r"key 'topk_ids': expected int16 \[T, L, K\]"),
        ({"topk_ids": _arrays()["topk_ids"] + 1}, r"key 'topk_ids': expert id 4 at token \d+, layer \d out of range 0\.\.3"),
        ({"topk_ids": _arrays()["topk_ids"] - 1}, r"key 'topk_ids': expert id -1 .* out of range"),
        ({"topk_ids": np.zeros((5, 2, 2), dtype=np.int16)}, r"token 0, layer 0 chooses an expert twice"),
        ({"layer_ids": np.array([1, 3, 5], dtype=np.int32)}, r"key 'layer_ids': expected int32 \[2\]"),
        ({"layer_ids": np.array([1, 3], dtype=np.int64)}, r"key 'layer_ids': expected int32"),
        ({"layer_ids": np.array([3, 3], dtype=np.int32)}, r"key 'layer_ids': must be distinct"),
        ({"request_ids": np.zeros(4, dtype=np.int32)}, r"key 'request_ids': expected int32 \[5\]"),
        ({"request_ids": np.array([0, 0, -1, 1, 1], dtype=np.int32)}, r"key 'request_ids': negative request id -1"),
        ({"is_prefill": np.ones(5, dtype=np.int8)}, r"key 'is_prefill': expected bool \[5\]"),
        ({"is_prefill": np.ones(6, dtype=bool)}, r"key 'is_prefill': expected bool \[5\]"),
        ({"num_experts": np.array([4])}, r"key 'num_experts': expected an integer scalar"),
        ({"num_experts": np.array(4.0)}, r"key 'num_experts': expected an integer scalar"),
        ({"num_experts": np.array(0)}, r"key 'num_experts': expected a positive integer"),
        ({"meta": np.array("not json")}, r"key 'meta': expected a JSON object string"),
        ({"meta": np.array("[1, 2]")}, r"key 'meta': expected a JSON object string"),
        ({"topk_weights": np.zeros((5, 2, 2), dtype=np.float32)}, r"key 'topk_weights': expected float16 \[5, 2, 2\]"),
        ({"topk_weights": np.zeros((5, 2, 1), dtype=np.float16)}, r"key 'topk_weights': expected float16"),
        ({"labels": np.array(["only-one"])}, r"key 'labels': 1 labels but request ids go up to 1"),
        ({"labels": np.array([1, 2])}, r"key 'labels': expected a 1-D string array"),
        ({"topk_ids": np.array([None] * 20, dtype=object).reshape(5, 2, 2)}, r"key 'topk_ids': unreadable array \(Object arrays cannot be loaded"),
        ({"meta": np.array({"a": 1}, dtype=object)}, r"key 'meta': unreadable array \(Object arrays cannot be loaded"),
    ],
)
def test_malformed_files_are_rejected_with_file_and_key(tmp_path: Path, changes, match: str) -> None:
    path = _write(tmp_path, **changes)
    with pytest.raises(TraceError, match=match) as e:
        load_trace(path)
    assert str(path) in str(e.value) and isinstance(e.value, MoeplaceError)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"no such trace file"):
        load_trace(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK not really a zip")
    with pytest.raises(TraceError, match=r"junk\.npz: not a readable \.npz trace"):
        load_trace(tmp_path / "junk.npz")


def test_select_and_split_keep_requests_whole() -> None:
    a = _arrays()
    t = Trace(a["topk_ids"], a["layer_ids"], a["request_ids"], a["is_prefill"], 4, {})
    dec = t.select_tokens(~t.is_prefill)
    assert dec.request_ids.tolist() == [0, 1] and np.array_equal(dec.topk_ids, a["topk_ids"][[1, 4]])
    train, held = t.split_by_request(0.5)
    assert train.request_ids.tolist() == [0, 0] and held.request_ids.tolist() == [1, 1, 1]
    with pytest.raises(TraceError, match="train_fraction"):
        t.split_by_request(1.0)
    with pytest.raises(TraceError, match=r"decoder layer 2 is not in the trace's layer_ids \[1, 3\]"):
        t.layer_index(2)


def test_save_rejects_invalid_and_leaves_no_file(tmp_path: Path) -> None:
    a = _arrays()
    t = Trace(a["topk_ids"], a["layer_ids"], a["request_ids"], a["is_prefill"], 4, {})
    object.__setattr__(t, "num_experts", 2)  # corrupt after construction
    with pytest.raises(TraceError, match="out of range 0..1"):
        save_trace(tmp_path / "bad.npz", t)
    assert not list(tmp_path.iterdir())


def test_shared_dsv2_trace_loads(dsv2_trace_path: Path) -> None:
    t = load_trace(dsv2_trace_path)
    assert (t.num_tokens, t.num_layers, t.top_k, t.num_experts) == (94165, 26, 6, 64)
    # 999 prompts: request id = prompt number - 1, and prompt 317 is missing from the source
    assert np.unique(t.request_ids).size == 999 and 316 not in t.request_ids and t.num_requests == 1000
    assert t.is_prefill.all()
