"""`moeplace analyze` end to end: report.md with the command, every section, PNG figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vllm_moeplace.cli.main import main
from vllm_moeplace.profiling.analyze import analyze
from vllm_moeplace.trace import Trace, load_trace, save_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _labelled_trace() -> Trace:
    """Three labels, prefill + decode, top-2 over 8 experts, 3 MoE layers; seeded random routing."""
    rng = np.random.default_rng(3)
    T, L, K, E = 120, 3, 2, 8
    ids = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)]).astype(np.int16)
    req = np.repeat(np.arange(6, dtype=np.int32), T // 6)
    pf = np.tile(np.arange(T // 6) < 5, 6)
    return Trace(ids, np.array([1, 2, 3], dtype=np.int32), req, pf, E, {"model": "toy"},
                 labels=np.array(["code", "math", "chat", "code", "math", "chat"]))


def test_report_has_command_sections_and_figures(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    save_trace(path, _labelled_trace())
    out = tmp_path / "rep"
    assert main(["analyze", str(path), "--out", str(out), "--ranks", "2,4"]) == 0
    md = (out / "report.md").read_text()
    assert f"moeplace analyze {path} --out {out} --ranks 2,4" in md
    for section in ("## 1. Expert load skew", "## 2. Co-activation", "## 3. Layer-to-layer", "## 4. Prefill vs decode",
                    "## 5. Per-label hot experts", "## 6. Stability"):
        assert section in md
    assert "Not applicable" not in md  # this trace exercises every statistic
    figs = ["load_skew.png", "load_heatmap.png", "coactivation_lift.png", "transitions.png", "prefill_decode.png",
            "label_jaccard.png", "stability.png"]
    for f in figs:
        assert f"]({f})" in md and (out / f).read_bytes()[:8] == PNG_MAGIC
    # the per-layer table carries the same numbers as the analysis
    a = analyze(load_trace(path), (2, 4))
    assert f"| 1 | {a.max_over_mean[0]:.2f} | {a.gini[0]:.3f} |" in md
    assert "EP2 rank max/mean" in md and "EP4 rank max/mean" in md


def test_report_of_imported_llama4_shows_both_commands(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "raw" / "orders-in-chaos-llama4-mmlu-abstract_algebra"
    trace = tmp_path / "llama4.npz"
    assert main(["import", "--format", "orders-in-chaos", str(src), "--out", str(trace), "--num-experts", "128"]) == 0
    out = tmp_path / "rep"
    assert main(["analyze", str(trace), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert f"moeplace import --format orders-in-chaos {src} --out {trace} --num-experts 128" in md
    assert "top_k = 1" in md and "Spearman" in md and "## 2. Co-activation" in md
    assert json.loads(str(np.load(trace)["meta"]))["import_command"].startswith("moeplace import")


def test_analyze_bad_trace_is_one_line_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.npz").write_bytes(b"nope")
    assert main(["analyze", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.npz: not a readable .npz trace" in err and "Traceback" not in err
