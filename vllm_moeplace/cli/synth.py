"""`moeplace synth --layers L --experts E --top-k K --tokens T [--seed S] --out T.npz`.

A synthetic routing trace with realistic structure (see solver/synth.py; defaults calibrated
against the real DeepSeek-V2-Lite trace, benchmarks/results/synth_calibration.md).
"""

from __future__ import annotations

import argparse
import time

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.limits import MAX_TRACE_IDS
from vllm_moeplace.solver.synth import SynthConfig, synth_trace
from vllm_moeplace.trace import save_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, required=True, help="MoE layers L")
    parser.add_argument("--experts", type=int, required=True, help="routed experts per layer E")
    parser.add_argument("--top-k", type=int, required=True, help="experts per token K")
    parser.add_argument("--tokens", type=int, required=True, help="tokens T")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same trace)")
    parser.add_argument("--requests", type=int, help="requests (default: tokens / 100)")
    parser.add_argument("--domains", type=int, default=4, help="workload domains (request labels), default 4")
    parser.add_argument("--first-layer", type=int, default=1, help="decoder-layer id of the first MoE layer (default 1)")
    d = SynthConfig(1, 1, 1, 1)
    parser.add_argument("--skew", type=float, default=d.skew, help=f"per-expert load skew (default {d.skew})")
    parser.add_argument("--clusters", type=int, help="co-activation clusters per layer (default experts / 8)")
    parser.add_argument("--cluster-strength", type=float, default=d.cluster_strength,
                        help=f"log-weight boost of a token's cluster (default {d.cluster_strength}; 0 = no co-activation)")
    parser.add_argument("--layer-coupling", type=float, default=d.layer_coupling,
                        help=f"probability the next layer's cluster follows this layer's (default {d.layer_coupling})")
    parser.add_argument("--out", required=True, help="trace file to write (.npz, atomically)")


def run(args: argparse.Namespace) -> int:
    ids = args.tokens * args.layers * args.top_k
    if ids > MAX_TRACE_IDS:  # checked before synth_trace allocates [T, L, K] (and more beside it)
        raise MoeplaceError(f"--tokens {args.tokens} x --layers {args.layers} x --top-k {args.top_k} = {ids} expert ids: "
                            f"more than the {MAX_TRACE_IDS} a trace may hold (tokens x layers x top_k)")
    cfg = SynthConfig(
        num_layers=args.layers, num_experts=args.experts, top_k=args.top_k, num_tokens=args.tokens,
        seed=args.seed, num_requests=args.requests, num_domains=args.domains, first_layer=args.first_layer,
        skew=args.skew, num_clusters=args.clusters, cluster_strength=args.cluster_strength,
        layer_coupling=args.layer_coupling,
    )
    t0 = time.perf_counter()
    trace = synth_trace(cfg)
    save_trace(args.out, trace)
    print(f"wrote {args.out}: {trace.num_tokens} tokens ({int(trace.is_prefill.sum())} prefill), {trace.num_requests} requests, "
          f"{trace.num_layers} MoE layers {int(trace.layer_ids[0])}..{int(trace.layer_ids[-1])}, {trace.num_experts} experts, "
          f"top-{trace.top_k}, seed {args.seed} ({time.perf_counter() - t0:.1f} s)")
    return 0
