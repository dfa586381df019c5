"""SGLang `--init-expert-location FILE.json`: `{"physical_to_logical_map": [layers][physical experts]}`.

Read from SGLang's source (python/sglang/srt/eplb/expert_location.py,
`compute_initial_expert_location_metadata` and `ExpertLocationMetadata.init_by_mapping`): a `.json`
path is parsed with `json.loads`; a dict with key `physical_to_logical_map` is used as the table as
is, its shape [num_layers, num_physical_experts]. `num_physical_experts` = the model's routed
experts + `--ep-num-redundant-experts`, which must divide by the EP size; physical expert p lives on
GPU p // (num_physical_experts / ep_size) (`_compute_gpu_id_of_physical_expert`), the same
rank-major order as our slots.

Layer indexing: rows are DECODER layers. `num_layers` comes from the model's
`get_model_config_for_expert_location`, which returns `config.num_hidden_layers` for the MoE models
(e.g. models/deepseek_v2.py, qwen3_moe.py), so dense layers have rows too. We fill them, and MoE
layers the plan leaves out, with SGLang's own trivial layout (`init_trivial`: physical p holds
logical p mod E).

Choice among copies (python/sglang/srt/eplb/expert_location_dispatch.py): `--ep-dispatch-algorithm
static` sends a token to a copy on its own GPU if there is one, else to a per-(GPU, expert) fixed
copy drawn by a seeded fair shuffle (`compute_logical_to_rank_dispatch_physical_map`), with no node
preference; `dynamic` draws a copy uniformly at random per token.
"""

from __future__ import annotations

import json

from vllm_moeplace.export.common import (
    ExportError,
    ExportResult,
    check_uniform_ranks,
    default_filled,
    num_redundant,
    physical_to_logical,
    ranges,
    replica_note,
)
from vllm_moeplace.plan import Plan

SOURCE = "sglang python/sglang/srt/eplb/expert_location.py (init_by_mapping)"


def export_sglang(plan: Plan, *, num_layers: int | None = None) -> ExportResult:
    check_uniform_ranks(plan)
    last_moe = max(plan.moe_layers) if plan.moe_layers else -1
    notes: list[str] = []
    if num_layers is None:
        num_layers = last_moe + 1
        notes.append(
            f"rows are decoder layers 0..{num_layers - 1} (the last MoE layer + 1); SGLang wants one row per "
            "decoder layer (config.num_hidden_layers): pass --num-layers N if the model has dense layers after "
            "its last MoE layer"
        )
    elif num_layers <= last_moe:
        raise ExportError(
            f"--num-layers {num_layers}: the plan's model.moe_layers go up to decoder layer {last_moe}, so the model "
            f"has at least {last_moe + 1} decoder layers"
        )
    moe = set(plan.moe_layers)
    dense = [l for l in range(num_layers) if l not in moe]
    table = [physical_to_logical(plan, l) for l in range(num_layers)]
    if dense:
        notes.append(f"decoder layer(s) {ranges(dense)} are dense: their rows hold SGLang's trivial layout (never read)")
    missing = default_filled(plan)
    if missing:
        notes.append(f"MoE layer(s) {ranges(missing)} are not placed by the plan: exported with the trivial layout")
    notes += replica_note(
        plan,
        "SGLang's --ep-dispatch-algorithm static uses a copy on the token's own GPU, else a fixed seeded-random copy "
        "per (GPU, expert) with no node preference; dynamic picks a copy at random per token.",
    )
    text = json.dumps({"physical_to_logical_map": table}, separators=(",", ":")) + "\n"
    red = num_redundant(plan)

    def flags(path: str) -> list[str]:
        line = f"--ep-size {plan.ep_size} --init-expert-location {path} --ep-num-redundant-experts {red}"
        if red:
            line += " --ep-dispatch-algorithm static"
        return [f"sglang.launch_server ... {line}"]

    return ExportResult(text=text, flag_lines=flags, notes=notes)

