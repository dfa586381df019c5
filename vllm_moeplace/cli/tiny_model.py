"""`moeplace tiny-model`: build the embedded default model (random weights, local tokenizer)."""

from __future__ import annotations

import argparse

from vllm_moeplace.tiny_model import ARCHS, TinyModelSpec


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TinyModelSpec()
    p.add_argument("--arch", choices=ARCHS, default=d.arch)
    p.add_argument("--out", required=True, help="output folder (a Hugging Face checkpoint)")
    p.add_argument("--layers", type=int, default=d.num_layers, help="decoder layers")
    p.add_argument("--dense-layers", type=int, default=d.first_dense_layers, help="leading dense (non-MoE) layers")
    p.add_argument("--experts", type=int, default=d.num_experts, help="routed experts per MoE layer")
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--groups", type=int, default=d.num_groups,
                   help="deepseek_v3: expert groups of grouped top-k (n_group; topk_group = groups/2)")
    p.add_argument("--hidden-size", type=int, default=d.hidden_size, help="multiple of 32")
    p.add_argument("--moe-intermediate-size", type=int, default=d.moe_intermediate_size, help="multiple of 32")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--seed", type=int, default=d.seed)


def run(args: argparse.Namespace) -> int:
    from vllm_moeplace.tiny_model import build_tiny_model

    spec = TinyModelSpec(
        arch=args.arch,
        num_layers=args.layers,
        first_dense_layers=args.dense_layers,
        num_experts=args.experts,
        top_k=args.top_k,
        num_groups=args.groups,
        hidden_size=args.hidden_size,
        moe_intermediate_size=args.moe_intermediate_size,
        vocab_size=args.vocab_size,
        seed=args.seed,
    )
    spec.check()
    out = build_tiny_model(args.out, spec)
    print(f"tiny {spec.arch} model: {spec.num_layers} layers ({spec.first_dense_layers} dense), "
          f"{spec.num_experts} experts, top-{spec.top_k}, hidden {spec.hidden_size} -> {out}")
    return 0
