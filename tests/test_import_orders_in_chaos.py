"""`orders-in-chaos` importer: golden hand-made files, labels from folders, bad files, the real dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_moeplace.cli.main import main
from vllm_moeplace.profiling.importers import ImportOptions, TraceImportError, import_trace
from vllm_moeplace.trace import load_trace

N_DECODER = 4  # decoder layers 0..3; MoE on the odd ones, as in Llama-4-Maverick


def _step(tokens: list[list[int]]) -> dict:
    """One step: layer 1 gets ids, layer 3 gets ids + 10 (identity-encoded), even layers dense."""
    return {
        "0": None,
        "1": [list(t) for t in tokens],
        "2": None,
        "3": [[x + 10 for x in t] for t in tokens],
    }


def _write(path: Path, prefill: list[list[int]], decode: list[list[int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([_step(prefill)] + [_step([d]) for d in decode]))
    return path


def test_golden_flat_folder(tmp_path: Path) -> None:
    src = tmp_path / "abstract_algebra"
    _write(src / "10.json", [[5], [6]], [[7]])  # numeric order: 2 before 10
    _write(src / "2.json", [[1], [2], [3]], [[4], [0]])
    t = import_trace("orders-in-chaos", src, ImportOptions(num_experts=32))
    assert t.layer_ids.tolist() == [1, 3]
    assert t.top_k == 1 and t.num_experts == 32
    assert t.topk_ids[:, 0, 0].tolist() == [1, 2, 3, 4, 0, 5, 6, 7]
    assert t.topk_ids[:, 1, 0].tolist() == [11, 12, 13, 14, 10, 15, 16, 17]
    assert t.request_ids.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert t.is_prefill.tolist() == [True, True, True, False, False, True, True, False]
    assert t.labels.tolist() == ["abstract_algebra", "abstract_algebra"]
    assert "import_notes" not in t.meta


def test_nested_folders_give_labels_and_label_override(tmp_path: Path) -> None:
    _write(tmp_path / "mmlu" / "anatomy" / "0.json", [[1]], [[2]])
    _write(tmp_path / "mmlu" / "abstract_algebra" / "0.json", [[3]], [])
    t = import_trace("orders-in-chaos", tmp_path, ImportOptions(num_experts=16))
    assert t.labels.tolist() == ["mmlu/abstract_algebra", "mmlu/anatomy"]
    assert t.topk_ids[:, 0, 0].tolist() == [3, 1, 2]
    flat = import_trace("orders-in-chaos", tmp_path / "mmlu" / "anatomy", ImportOptions(num_experts=16, label="mmlu/anatomy"))
    assert flat.labels.tolist() == ["mmlu/anatomy"]


def test_num_experts_inferred_with_a_note(tmp_path: Path) -> None:
    _write(tmp_path / "q" / "0.json", [[1], [4]], [[2]])
    t = import_trace("orders-in-chaos", tmp_path / "q")
    assert t.num_experts == 15  # layer 3 holds 14
    assert any("inferred 15" in n for n in t.meta["import_notes"])


@pytest.mark.parametrize(
    "steps, match",
    [
        ([{"1": [[1]], "3": [[2]]}, {"1": [[1]], "3": None}], r"1\.json: step 1: MoE layers \[1\] differ"),
        ([{"1": [[1], [2]], "3": [[2]]}], r"step 0, layer 3: 1 tokens but layer 1 has 2"),
        ([{"1": [[1]], "3": [[2]]}, {"1": [[1], [2]], "3": [[2], [3]]}], r"decode step must hold 1 token"),
        ([{"1": [[1]], "3": [[2, 3]]}], r"layer 3, token 0: 2 experts but top_k is 1"),
        ([{"1": [["a"]], "3": [[2]]}], r"layer 1, token 0: expected a list of integer expert ids"),
        ([{"1": [[-1]], "3": [[2]]}], r"negative expert id"),
        ([{"x": [[1]]}], r"layer keys must be decoder-layer indices"),
        ([{"0": None}], r"no MoE layer"),
        ({"0": None}, r"expected a non-empty JSON list"),
    ],
)
def test_bad_files_name_file_step_and_layer(tmp_path: Path, steps, match: str) -> None:
    (tmp_path / "1.json").write_text(json.dumps(steps))
    with pytest.raises(TraceImportError, match=match):
        import_trace("orders-in-chaos", tmp_path / "1.json", ImportOptions(num_experts=8))


def test_out_of_range_and_inconsistent_files(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "0.json", [[1]], [])
    with pytest.raises(TraceImportError, match=r"a/0\.json: expert id 11 is out of range for --num-experts 8"):
        import_trace("orders-in-chaos", tmp_path / "a", ImportOptions(num_experts=8))
    (tmp_path / "a" / "1.json").write_text(json.dumps([{"1": [[1]], "5": [[2]]}]))
    with pytest.raises(TraceImportError, match=r"1\.json: MoE layers \[1, 5\] differ from .*0\.json's \[1, 3\]"):
        import_trace("orders-in-chaos", tmp_path / "a", ImportOptions(num_experts=16))
    (tmp_path / "a" / "1.json").write_text("[{")
    with pytest.raises(TraceImportError, match=r"1\.json: malformed JSON at line 1"):
        import_trace("orders-in-chaos", tmp_path / "a", ImportOptions(num_experts=16))


def test_real_llama4_abstract_algebra(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "raw" / "orders-in-chaos-llama4-mmlu-abstract_algebra"
    out = tmp_path / "llama4.npz"
    rc = main(["import", "--format", "orders-in-chaos", str(src), "--out", str(out),
               "--num-experts", "128", "--label", "mmlu/abstract_algebra"])
    assert rc == 0
    t = load_trace(out)
    assert t.layer_ids.tolist() == list(range(1, 48, 2))  # 24 MoE layers, the odd decoder layers
    assert t.top_k == 1 and t.num_experts == 128 and t.num_requests == 100
    assert set(t.labels.tolist()) == {"mmlu/abstract_algebra"}
    # step 0 (prefill) comes first in each request, then exactly 128 decode tokens
    for r in (0, 57, 99):
        pf = t.is_prefill[t.request_ids == r]
        n_pre = int(pf.sum())
        assert n_pre > 1 and pf[:n_pre].all() and not pf[n_pre:].any() and len(pf) - n_pre == 128
    # request 0 is 0.json: its first prefill token chose expert 106 at layer 1 (read off the file)
    first = json.loads((src / "0.json").read_text())
    assert int(t.topk_ids[0, 0, 0]) == first[0]["1"][0][0] == 106
    assert int(t.topk_ids[t.request_ids == 0][-1, -1, 0]) == first[-1]["47"][0][0]
