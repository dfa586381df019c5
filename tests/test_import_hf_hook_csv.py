"""`hf-hook-csv` importer: exact reproduction of the shared DeepSeek-V2-Lite trace, CSV quoting,
multi-batch files, and one clear error per kind of bad row."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from vllm_moeplace.cli.main import main
from vllm_moeplace.profiling.importers import ImportOptions, TraceImportError, import_trace
from vllm_moeplace.trace import load_trace

HEADER = ["Layer ID", "Batch Number", "Token", "Activated Expert IDs"]
# tokens a naive split(',') would break: commas, quotes, an embedded newline, the BOS token
TOKENS = ["<｜begin▁of▁sentence｜>", "a,b", 'say "hi"', "line\nbreak", '",']


def _ids(layer: int, batch: int, t: int) -> list[int]:
    """Identity-encoded top-2 in router order (not sorted), so misplaced rows are detected."""
    return [(layer * 7 + batch * 3 + t) % 16, (layer * 7 + batch * 3 + t + 5) % 16][::-1]


def _write(path: Path, layers=(1, 2), batches=(0,), tokens=TOKENS, extra_rows=()) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for layer in layers:
            for b in batches:
                for t, tok in enumerate(tokens):
                    w.writerow([layer, b, tok, str(_ids(layer, b, t))])
        for row in extra_rows:
            w.writerow(row)
    return path


def test_golden_quoting_order_and_batches(tmp_path: Path) -> None:
    _write(tmp_path / "prompt_10_data.csv", batches=(0, 1))
    _write(tmp_path / "prompt_9_data.csv", tokens=TOKENS[:2])
    t = import_trace("hf-hook-csv", tmp_path, ImportOptions(num_experts=16))
    assert t.layer_ids.tolist() == [1, 2] and t.top_k == 2 and t.num_experts == 16
    # prompt 9 first (numeric order), then prompt 10 batch 0, then prompt 10 batch 1
    assert t.request_ids.tolist() == [0] * 2 + [1] * 5 + [2] * 5
    assert t.is_prefill.all()
    expected = [(b, tt) for b, n in ((0, 2),) for tt in range(n)] + [(0, tt) for tt in range(5)] + [(1, tt) for tt in range(5)]
    for row, (b, tt) in enumerate(expected):
        for li, layer in enumerate((1, 2)):
            assert t.topk_ids[row, li].tolist() == _ids(layer, b, tt)
    assert t.meta["prompt_numbers"] == [9, 10]


def test_reproduces_shared_dsv2lite_requests_0_to_59(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "dsv2.npz"
    rc = main(["import", "--format", "hf-hook-csv", str(shared_data / "raw" / "hf-hook-csv-deepseek-v2-lite"),
               "--out", str(out), "--num-experts", "64", "--model-name", "deepseek-ai/DeepSeek-V2-Lite-Chat"])
    assert rc == 0
    got = load_trace(out)
    ref = load_trace(shared_data / "traces" / "dsv2lite_puffin_a.npz")
    keep = ref.request_ids < 60
    assert got.num_requests == 60 and got.num_experts == ref.num_experts == 64
    assert np.array_equal(got.layer_ids, ref.layer_ids) and got.layer_ids.tolist() == list(range(1, 27))
    assert np.array_equal(got.topk_ids, ref.topk_ids[keep])  # router order, not sorted
    assert np.array_equal(got.request_ids, ref.request_ids[keep])
    assert got.is_prefill.all() and np.array_equal(got.is_prefill, ref.is_prefill[keep])


@pytest.mark.parametrize(
    "extra, match",
    [
        ([[1, 0, "x", "[1, 2"]], r"prompt_7_data\.csv:14: 'Activated Expert IDs' is not a JSON list: '\[1, 2'"),
        ([[1, 0, "x", '{"a": 1}']], r"prompt_7_data\.csv:14: 'Activated Expert IDs' must be a non-empty JSON list of integers"),
        ([[1, 0, "x", "[1, 2, 3]"]], r"prompt_7_data\.csv:14: 3 expert ids but earlier rows have 2 \(inconsistent top_k\)"),
        ([[1, 0, "x", "[4, 4]"]], r"prompt_7_data\.csv:14: an expert is chosen twice"),
        ([[1, 0, "x", "[-1, 4]"]], r"prompt_7_data\.csv:14: negative expert id"),
        ([["one", 0, "x", "[1, 4]"]], r"prompt_7_data\.csv:14: 'Layer ID' and 'Batch Number' must be integers"),
        ([[1, 0, "x"]], r"prompt_7_data\.csv:14: expected 4 fields, got 3"),
        ([[1, 0, "x", "[1, 4]"]], r"batch 0, layer 2 has 5 tokens but layer 1 has 6 \(wrong layer row count\)"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, extra, match: str) -> None:
    # 1 header + 2 layers x 5 tokens (one spans 2 lines: the quoted newline) = 13 lines; the bad row is 14
    _write(tmp_path / "prompt_7_data.csv", extra_rows=extra)
    with pytest.raises(TraceImportError, match=match):
        import_trace("hf-hook-csv", tmp_path, ImportOptions(num_experts=16))


def test_bad_files(tmp_path: Path) -> None:
    _write(tmp_path / "prompt_1_data.csv", tokens=["a", "b"])
    _write(tmp_path / "prompt_2_data.csv", layers=(1, 2, 3), tokens=["a"])
    with pytest.raises(TraceImportError, match=r"prompt_2_data\.csv: MoE layers \[1, 2, 3\] differ .* \(wrong layer count\)"):
        import_trace("hf-hook-csv", tmp_path, ImportOptions(num_experts=16))
    _write(tmp_path / "prompt_2_data.csv", tokens=["a"])
    with pytest.raises(TraceImportError, match=r"prompt_1_data\.csv: expert id 15 is out of range for --num-experts 8"):
        import_trace("hf-hook-csv", tmp_path, ImportOptions(num_experts=8))
    with pytest.raises(TraceImportError, match=r"--layer-ids \[1, 3\] differ"):
        import_trace("hf-hook-csv", tmp_path, ImportOptions(num_experts=16, layer_ids=(1, 3)))
    bad = tmp_path / "b"
    bad.mkdir()
    (bad / "prompt_3_data.csv").write_text("Layer,Batch,Token,Ids\n")
    with pytest.raises(TraceImportError, match=r"prompt_3_data\.csv:1: expected header"):
        import_trace("hf-hook-csv", bad)
    other = tmp_path / "data.csv"
    other.write_text("x")
    with pytest.raises(TraceImportError, match=r"file name must be prompt_<n>_data\.csv"):
        import_trace("hf-hook-csv", [other])
    # a token that differs across layers at one position: rows lost or reordered
    mixed = tmp_path / "m"
    mixed.mkdir()
    p = _write(mixed / "prompt_4_data.csv", tokens=["a", "b"])
    p.write_text(p.read_text().replace("2,0,b,", "2,0,c,"))
    with pytest.raises(TraceImportError, match=r"prompt_4_data\.csv:5: token 'c' differs from 'b'"):
        import_trace("hf-hook-csv", mixed, ImportOptions(num_experts=16))
