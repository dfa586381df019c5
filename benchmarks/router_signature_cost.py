"""What a cheap arrival-time signature costs the router (issue 12 item 4, colocated DP).

    flock /tmp/moeplace-heavy.lock python benchmarks/router_signature_cost.py [--seeds 0,1,2]

A colocated deployment must choose the DP rank before the request's real prefill, so
`moeplace route --signature-prefix-tokens N` computes the signature from a short prefill of the
prompt's first N tokens. On the Llama-4-Maverick MMLU trace (EP8 over 2 nodes, random request
halves as in request_aware.py) the same request-aware plan is scored with held-out requests routed
from the first N prefill tokens' routing and from the whole prompt's: agreement of the chosen
groups, and held-out decode node_sends over the plain plan's (requests spread evenly).

Writes benchmarks/results/router_signature_cost.md.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

from _common import command, commit, loadavg, machine  # noqa: E402  (benchmarks/ is sys.path[0])
from request_aware import load_llama4, random_split  # noqa: E402

from vllm_moeplace.plan import Topology
from vllm_moeplace.request_routing import route_trace
from vllm_moeplace.routed_metrics import evaluate_routed, score_routing
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.pipeline import solve
from vllm_moeplace.solver.request_groups import RequestGroupOptions

OUT = Path(__file__).resolve().parent / "results" / "router_signature_cost.md"
PREFIXES = (0, 32, 16, 8, 4, 1)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--time-limit", type=float, default=10.0)
    args = p.parse_args()
    trace = load_llama4()
    topo = Topology.uniform(8, 4)
    pre_len = np.bincount(trace.request_ids[trace.is_prefill])
    lines = ["# Router signature at arrival: what a prompt prefix costs (issue 12, colocated DP)", "", "```sh",
             command(), "```", "", f"Commit {commit()}; machine: {machine()}; load average at start {loadavg()}.", "",
             f"Llama-4-Maverick MMLU abstract_algebra, {trace.num_requests} requests, prompts of "
             f"{int(pre_len.min())}-{int(pre_len.max())} tokens (median {int(np.median(pre_len))}); EP8 over 2 nodes, "
             "one group per node, 2 copies per rank, cap 1.05, signature = all MoE layers, `--deterministic`, "
             f"`--time-limit {args.time_limit:g}`. Per seed: one plain and one request-aware solve on the train half; "
             "held-out requests routed one at a time by the plan's router (share cap 1.10) from the routing of their "
             "first N prompt tokens (N = all: the whole prefill, the disaggregated shape). *agree* = share of "
             "held-out requests sent to the same group as with the whole prompt.", "",
             "| seed | first N prompt tokens | agree | decode node_sends | / plain | rank imbalance | share |",
             "|---|---|---|---|---|---|---|"]
    summary: dict[int, list[tuple[float, float]]] = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        train, held = random_split(trace, seed)
        opts = SolveOptions(time_limit=args.time_limit, deterministic=True, seed=seed, redundant_per_rank=2,
                            max_imbalance=1.05, keep_plan=True)  # the search's plans (the guard judges them separately)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = solve(train, topo, opts)
            aware = solve(train, topo, opts, request_groups=RequestGroupOptions(2, 0))
        base = evaluate_routed(plain.layers, topo, held, np.full(held.num_tokens, -1), ()).node_sends_decode
        full = route_trace(aware.request_routing, held)[1]
        for n in PREFIXES:
            sc = score_routing(aware, held, prefix_tokens=n)
            agree = float(np.mean(route_trace(aware.request_routing, held, prefix_tokens=n)[1] == full))
            ratio = sc.routed.node_sends_decode / base
            summary.setdefault(n, []).append((agree, ratio))
            lines.append(f"| {seed} | {'all' if n == 0 else n} | {agree:.2f} | {sc.routed.node_sends_decode:.3f} | "
                         f"{ratio:.3f} | {sc.routed.imbalance:.3f} | {sc.share_imbalance:.3f} |")
            print(lines[-1], flush=True)
        OUT.write_text("\n".join(lines) + "\n")
    lines += ["", "Means over seeds (agree, decode node_sends / plain): " +
              "; ".join(f"{'all' if n == 0 else n}: {np.mean([a for a, _ in v]):.2f}, {np.mean([r for _, r in v]):.3f}"
                        for n, v in summary.items()), ""]
    OUT.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
