"""`vllm-routed-experts` importer: vLLM 0.33's all-decoder-layer layout (dense rows 0), compact
arrays with --layer-ids, .npy folders, prompt_lens/labels, and bad arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vllm_moeplace.cli.main import main
from vllm_moeplace.profiling.importers import ImportOptions, TraceImportError, import_trace
from vllm_moeplace.trace import load_trace

N_DECODER, MOE, K, E = 5, (1, 2, 4), 2, 16  # decoder layers 0..4, dense at 0 and 3


def _request(n_tokens: int, seed: int) -> np.ndarray:
    """vLLM layout [tokens, all decoder layers, K] uint8; routed ids identity-encoded, dense rows 0."""
    a = np.zeros((n_tokens, N_DECODER, K), dtype=np.uint8)
    for t in range(n_tokens):
        for layer in MOE:
            first = (seed * 5 + t * 3 + layer) % E
            a[t, layer] = [first, (first + 1 + layer) % E]
    return a


def test_vllm_layout_npz_drops_dense_layers_and_splits_prefill(tmp_path: Path) -> None:
    reqs = {"10": _request(3, 1), "2": _request(4, 2)}  # natural order: 2 then 10
    np.savez(tmp_path / "r.npz", **reqs, prompt_lens=np.array([3, 1]), labels=np.array(["code", "math"]))
    t = import_trace("vllm-routed-experts", tmp_path / "r.npz", ImportOptions(num_experts=E))
    assert t.layer_ids.tolist() == list(MOE)
    assert np.array_equal(t.topk_ids[:4], reqs["2"][:, list(MOE)])
    assert np.array_equal(t.topk_ids[4:], reqs["10"][:, list(MOE)])
    assert t.request_ids.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert t.is_prefill.tolist() == [True, True, True, False, True, False, False]
    assert t.labels.tolist() == ["code", "math"]
    assert any("layers [0, 3] are all 0" in n for n in t.meta["import_notes"])
    # the same with explicit --layer-ids: no note about inference
    t2 = import_trace("vllm-routed-experts", tmp_path / "r.npz", ImportOptions(num_experts=E, layer_ids=MOE))
    assert np.array_equal(t2.topk_ids, t.topk_ids) and "import_notes" not in t2.meta


def test_compact_npy_folder_with_layer_ids_via_cli(tmp_path: Path) -> None:
    src = tmp_path / "npy"
    src.mkdir()
    a = _request(3, 7)[:, list(MOE)].astype(np.int32)  # compact: MoE layers only
    np.save(src / "0.npy", a)
    out = tmp_path / "t.npz"
    rc = main(["import", "--format", "vllm-routed-experts", str(src), "--out", str(out),
               "--num-experts", str(E), "--layer-ids", "1,2,4", "--label", "chat"])
    assert rc == 0
    t = load_trace(out)
    assert t.layer_ids.tolist() == [1, 2, 4] and np.array_equal(t.topk_ids, a)
    assert t.is_prefill.all() and t.labels.tolist() == ["chat"]
    assert any("prefill/decode split unknown" in n for n in t.meta["import_notes"])


def test_round_trip_of_real_dsv2_requests(dsv2_trace_path: Path, tmp_path: Path) -> None:
    ref = load_trace(dsv2_trace_path)
    reqs = {}
    for r in range(3):  # as vLLM would return them: 27 decoder layers, layer 0 dense
        ids = ref.topk_ids[ref.request_ids == r]
        full = np.zeros((len(ids), 27, ref.top_k), dtype=np.uint8)
        full[:, ref.layer_ids] = ids
        reqs[f"req{r}"] = full
    np.savez(tmp_path / "v.npz", **reqs)
    t = import_trace("vllm-routed-experts", tmp_path / "v.npz", ImportOptions(num_experts=64))
    keep = ref.request_ids < 3
    assert t.layer_ids.tolist() == ref.layer_ids.tolist()
    assert np.array_equal(t.topk_ids, ref.topk_ids[keep]) and np.array_equal(t.request_ids, ref.request_ids[keep])


def test_bad_inputs(tmp_path: Path) -> None:
    good = _request(2, 0)
    with pytest.raises(TraceImportError, match="needs --num-experts"):
        import_trace("vllm-routed-experts", tmp_path, ImportOptions())
    cases = [
        ({"0": good.astype(np.float32)}, {}, r"r\.npz:0: expected an integer array \[tokens, layers, top_k\]"),
        ({"0": good[:, :, 0]}, {}, r"expected an integer array"),
        ({"0": good, "1": good[:, :4]}, {}, r"r\.npz:1: \[layers, top_k\] = \[4, 2\] differs"),
        ({"0": good + 20}, {}, r"r\.npz:0: expert id 3[0-9] at token \d, layer \d is out of range 0\.\.15"),
        ({"0": good, "prompt_lens": np.array([3])}, {}, r"request 0 .* has 2 rows but prompt_lens says 3"),
        ({"0": good, "prompt_lens": np.array([1, 1])}, {}, r"prompt_lens: expected an integer array \[1\]"),
        ({"0": good, "labels": np.array([1])}, {}, r"labels: expected a string array \[1\]"),
        ({"0": good}, {"layer_ids": (0, 1)}, r"chooses an expert twice .* pass --layer-ids with the MoE layers only"),
        ({"0": good}, {"layer_ids": (1, 9)}, r"--layer-ids \[1, 9\] fit neither"),
    ]
    for arrays, extra, match in cases:
        np.savez(tmp_path / "r.npz", **arrays)
        with pytest.raises(TraceImportError, match=match):
            import_trace("vllm-routed-experts", tmp_path / "r.npz", ImportOptions(num_experts=E, **extra))
    (tmp_path / "x.npz").write_text("not a zip")
    with pytest.raises(TraceImportError, match=r"x\.npz: not a readable \.npz"):
        import_trace("vllm-routed-experts", tmp_path / "x.npz", ImportOptions(num_experts=E))
