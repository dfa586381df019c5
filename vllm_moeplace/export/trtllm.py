"""TensorRT-LLM wide-EP load balancer YAML (`moe_config.load_balancer: FILE.yaml`).

Read from TensorRT-LLM's source, examples/wide_ep/ep_load_balancer/README.md and
generate_eplb_config.py: a mapping with `num_slots` (physical slots over all ranks),
`initial_global_assignments` {MoE layer index: [logical expert id per slot, num_slots long]},
consecutive num_slots / ep_size slots per rank, and `layer_updates_per_iter` (0 = static: weights
never move during inference). Their generator writes lists in flow style (`[1, 2, 3]`) with
`yaml.dump`; we write the same structure by hand (plain integers and flow lists need no YAML
library, and no new dependency).

Layer indexing: keys are the MoE modules' `layer_idx`, which is the DECODER-layer index (the README's
DeepSeek-R1 example lists layers 3..60; its first 3 layers are dense and have no entry). So keys
are our plan's layer keys unchanged, and dense layers are absent.

Choice among copies: TensorRT-LLM's load balancer routes a token to one of an expert's slots in its
own routing kernel (`_load_balancer_route` in the fused-MoE modules); it does not know our
node-preferring rule.
"""

from __future__ import annotations

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

SOURCE = "TensorRT-LLM examples/wide_ep/ep_load_balancer/generate_eplb_config.py, README.md"


def export_trtllm(plan: Plan) -> ExportResult:
    check_uniform_ranks(plan)
    num_slots = plan.slots_per_rank() * plan.ep_size
    lines = [f"num_slots: {num_slots}", "initial_global_assignments:"]
    for layer in sorted(plan.moe_layers):
        lines.append(f"  {layer}: [{', '.join(map(str, physical_to_logical(plan, layer)))}]")
    lines.append("layer_updates_per_iter: 0")
    notes = [
        f"keys are decoder-layer indices of the MoE layers ({len(plan.moe_layers)} layers); dense layers have no entry",
    ]
    missing = default_filled(plan)
    if missing:
        notes.append(f"MoE layer(s) {ranges(missing)} are not placed by the plan: exported as slot p -> expert p mod {plan.num_experts}")
    notes += replica_note(plan, "TensorRT-LLM's load balancer picks among an expert's slots in its own routing kernel.")
    red = num_redundant(plan)

    def flags(path: str) -> list[str]:
        return [
            "extra_llm_api_options YAML:",
            "  moe_config:",
            "    backend: WideEP",
            f"    load_balancer: {path}",
            f"trtllm-serve / trtllm-bench ... --ep {plan.ep_size} --extra_llm_api_options <that YAML>"
            + (f"  ({red} redundant slots: num_slots {num_slots} = {plan.num_experts} experts + {red})" if red else ""),
        ]

    return ExportResult(text="\n".join(lines) + "\n", flag_lines=flags, notes=notes)
