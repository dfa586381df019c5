"""The physical -> logical JSON of vLLM's open static-map PR #49572
(`eplb_config.initial_expert_map_path`; not merged when read, see ../shared/notes/ecosystem.md).

Format, from the PR description: a JSON list of physical -> logical maps, one per MoE layer in the
model's MoE-layer order (or a single list shared by all layers), each `num_physical_experts` long,
every logical expert present. We always write the per-layer form.

Layer indexing: list position = MoE-layer ordinal (0 = the first MoE layer), the order of vLLM's
EPLB state (`EplbState`, one row per MoE layer), not decoder-layer ids: layer keys of our plan are
sorted and numbered 0..L-1.

Slots: physical p = r * S + s, as vLLM EPLB numbers them (linear physical layout). The vLLM
default for a layer left out is `build_initial_global_physical_to_logical_map`: p -> p mod E.

Choice among copies: vLLM's EPLB maps a token to replica hash(token index) % copies
(`eplb_map_to_physical_and_record`), not locality-aware. vllm-moeplace's own plugin serves the plan
file itself with our rule; this export is for a vLLM that has the PR and no plugin.
"""

from __future__ import annotations

import json

from vllm_moeplace.export.common import (
    ExportResult,
    check_uniform_ranks,
    default_filled,
    num_redundant,
    physical_to_logical,
    ranges,
    replica_note,
)
from vllm_moeplace.plan import Plan

SOURCE = "vllm-project/vllm PR #49572 (eplb_config.initial_expert_map_path)"


def export_vllm_map(plan: Plan) -> ExportResult:
    check_uniform_ranks(plan)
    layers = sorted(plan.moe_layers)
    table = [physical_to_logical(plan, l) for l in layers]
    notes = [
        f"list position i = the i-th MoE layer (decoder layers {layers[0]}..{layers[-1]} -> 0..{len(layers) - 1}); "
        "PR #49572 is not merged in vLLM: the flag exists only in a vLLM built with it"
        if layers else "the plan's model has no MoE layers",
    ]
    missing = default_filled(plan)
    if missing:
        notes.append(f"MoE layer(s) {ranges(missing)} are not placed by the plan: exported as slot p -> expert p mod {plan.num_experts}")
    notes += replica_note(plan, "vLLM EPLB picks replica hash(token index) mod copies, with no locality.")
    text = "[\n" + ",\n".join(" " + json.dumps(row, separators=(",", ":")) for row in table) + "\n]\n"
    red = num_redundant(plan)

    def flags(path: str) -> list[str]:
        cfg = json.dumps({"initial_expert_map_path": path, "num_redundant_experts": red})
        return [f"vllm serve ... --enable-expert-parallel --enable-eplb --eplb-config '{cfg}'  "
                f"(with PR #49572; EP size {plan.ep_size})",
                f"or, with the vllm-moeplace plugin (vLLM 0.32-0.33): vllm serve ... --moe-placement-plan {plan.source} "
                "(serves the plan with our replica rule; docs/serving.md)"]

    return ExportResult(text=text, flag_lines=flags, notes=notes)
