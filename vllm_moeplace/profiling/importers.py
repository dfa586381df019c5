"""Import routing traces others publish into the native `Trace` (see docs/formats.md).

    trace = import_trace("orders-in-chaos", ["path/to/folder"], ImportOptions(num_experts=128))

Warnings an importer wants the user to see (e.g. an inferred `num_experts`) are kept in
`trace.meta["import_notes"]`; every malformed input raises `TraceImportError` naming file and line.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Sequence

from vllm_moeplace.load_trace import LoadTrace
from vllm_moeplace.profiling.formats.common import ImportOptions, TraceImportError
from vllm_moeplace.trace import Trace

__all__ = ["FORMATS", "ImportOptions", "TraceImportError", "import_trace"]

# format name -> module under vllm_moeplace.profiling.formats defining `read(src, opts) -> Trace`
FORMATS: dict[str, str] = {
    "hf-hook-csv": "hf_hook_csv",
    "orders-in-chaos": "orders_in_chaos",
    "vllm-routed-experts": "vllm_routed_experts",
    # engines' own statistics (docs/ecosystem.md); load-only sources return a LoadTrace
    "sglang-expert-distribution": "sglang_expert_distribution",
    "trtllm-expert-statistic": "trtllm_expert_statistic",
}


def import_trace(fmt: str, src: Sequence[str | Path] | str | Path, opts: ImportOptions | None = None) -> Trace | LoadTrace:
    """Read `src` (files and/or folders) in format `fmt` into a validated `Trace`, or a `LoadTrace`
    when the source holds expert counts only (load_trace.py)."""
    if fmt not in FORMATS:
        raise TraceImportError(f"unknown import format '{fmt}'; known: {', '.join(FORMATS)}")
    if isinstance(src, (str, Path)):
        src = [src]
    module = importlib.import_module(f"vllm_moeplace.profiling.formats.{FORMATS[fmt]}")
    return module.read(list(src), opts or ImportOptions())
