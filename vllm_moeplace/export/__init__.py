"""Write a plan in the formats other serving engines load (`moeplace export`).

    result = export_plan(plan, "sglang", num_layers=27)
    write_text_atomic(out, result.text)
    print(*result.flags(out), sep="\n")

One module per target; each turns the plan into the engine's own physical -> logical table, with
the engine's layer indexing, and says which flags make the engine load it and where the engine's
own choice among redundant copies differs from ours (`replica.REPLICA_RULE`). See docs/ecosystem.md.
"""

from __future__ import annotations

from vllm_moeplace.export.common import ExportError, ExportResult
from vllm_moeplace.jsonio import write_text_atomic
from vllm_moeplace.export.sglang import export_sglang
from vllm_moeplace.export.trtllm import export_trtllm
from vllm_moeplace.export.vllm_map import export_vllm_map
from vllm_moeplace.plan import Plan

__all__ = ["TARGETS", "ExportError", "ExportResult", "export_plan", "write_text_atomic"]

TARGETS = ("sglang", "trtllm", "vllm-map")


def export_plan(plan: Plan, target: str, *, num_layers: int | None = None) -> ExportResult:
    """The file text for `target`, the flags to pass and notes. num_layers: decoder layers of the
    model (SGLang indexes its table by decoder layer, dense ones included)."""
    if target == "sglang":
        return export_sglang(plan, num_layers=num_layers)
    if num_layers is not None:
        raise ExportError(f"--num-layers applies to --to sglang only (target {target} lists MoE layers only)")
    if target == "trtllm":
        return export_trtllm(plan)
    if target == "vllm-map":
        return export_vllm_map(plan)
    raise ExportError(f"unknown export target {target!r}; choose one of {', '.join(TARGETS)}")
