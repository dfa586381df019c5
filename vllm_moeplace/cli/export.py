"""`moeplace export --to sglang|trtllm|vllm-map --plan plan.json --out PATH`: a plan in another
engine's format, and the flags that make the engine load it (see docs/ecosystem.md)."""

from __future__ import annotations

import argparse

from vllm_moeplace.export import TARGETS, export_plan, write_text_atomic
from vllm_moeplace.plan import load_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, choices=TARGETS, help="target engine format")
    parser.add_argument("--plan", required=True, help="plan file to export (validated first)")
    parser.add_argument("--out", required=True, help="file to write (atomically): .json for sglang/vllm-map, .yaml for trtllm")
    parser.add_argument("--num-layers", type=int, help="sglang: decoder layers of the model (config.num_hidden_layers; "
                        "default: the last MoE layer + 1)")


def run(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    result = export_plan(plan, args.to, num_layers=args.num_layers)
    write_text_atomic(args.out, result.text)
    print(f"wrote {args.out}: {args.to}, {plan.ep_size} EP ranks x {plan.slots_per_rank()} slots, "
          f"{len(plan.moe_layers)} MoE layers")
    print("pass to the engine:")
    for line in result.flags(args.out):
        print(f"  {line}")
    for note in result.notes:
        print(f"note: {note}")
    return 0
