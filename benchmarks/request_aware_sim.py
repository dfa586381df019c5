"""Request-aware placement in the cluster-scale simulator (issue 12, item 5; a first cut).

    python benchmarks/request_aware_sim.py [--time-limit 10]

For Llama-4 (MMLU) and DeepSeek-V2-Lite at EP8 over 2 nodes, on the default hardware profile of
benchmarks/sim_params.json: the plain solver plan with tokens dealt to ranks uniformly (the
simulator's batch model, `sim.run.sample_batches`) against the request-aware plan with each rank's
batch drawn from the requests its group was routed (`sim.run.sample_routed_batches`; origins from
the plan's router, never from decode routing). Plans from the first half of the requests,
simulated on the second half, as `benchmarks/simulate.py` does. Not yet rows of simulate.py's suite.

Writes benchmarks/results/request_aware_sim.md.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from _common import command, commit, loadavg, machine  # noqa: E402  (benchmarks/ is sys.path[0])

from vllm_moeplace.plan import Topology
from vllm_moeplace.request_routing import route_trace
from vllm_moeplace.sim.network import load_params
from vllm_moeplace.sim.run import sample_batches, sample_routed_batches, simulate
from vllm_moeplace.sim.suite import load_named_trace
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.pipeline import solve
from vllm_moeplace.solver.request_groups import RequestGroupOptions

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "request_aware_sim.md"

CASES = [
    # (trace key, model key, batches, solve options, signature layers)
    ("llama4_mmlu_algebra", "llama-4-maverick", ("prefill-phase", "decode-phase"),
     dict(redundant_per_rank=2, max_imbalance=1.05), 0),
    ("dsv2lite_puffin_a", "deepseek-v2-lite", ("prefill",), dict(max_imbalance=1.10), 1),
]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--time-limit", type=float, default=10.0)
    args = p.parse_args()
    params = load_params(ROOT / "benchmarks" / "sim_params.json")
    hw_name = params.default_hardware
    hw = params.hardware[hw_name]
    topo = Topology.uniform(8, 4)
    lines = ["# Request-aware placement in the simulator (issue 12, first cut)", "", "```sh", command(), "```", "",
             f"Commit {commit()}; machine: {machine()}; load average at start {loadavg()}. Hardware profile "
             f"`{hw_name}`, EP8 over 2 nodes, `--deterministic`, `--time-limit {args.time_limit:g}`; plans from the first "
             "half of the requests, simulated on the second. *plain*: the solver's plan, tokens dealt to ranks "
             "uniformly; *aware*: the request-aware plan (one group per node), each rank's batch drawn from the "
             "requests routed to its group.", "",
             "| trace | batch | plan | step ms | dispatch ms | combine ms | RDMA GB | pair imbalance |",
             "|---|---|---|---|---|---|---|---|"]
    for key, model, batch_names, kw, depth in CASES:
        trace = load_named_trace(key)
        train, test = trace.split_by_request(0.5)
        opts = SolveOptions(time_limit=args.time_limit, deterministic=True, keep_plan=True, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = solve(train, topo, opts)
            aware = solve(train, topo, opts, request_groups=RequestGroupOptions(2, depth))
        tok_group, _ = route_trace(aware.request_routing, test)
        shape = params.models[model]
        for b in batch_names:
            spec = params.batches[b]
            runs = (("plain", plain.layers, sample_batches(test, spec, 8)),
                    ("aware", aware.layers,
                     sample_routed_batches(test, spec, tok_group, aware.request_routing.group_ranks, 8)))
            for name, layers, batches in runs:
                r = simulate(layers, topo, test, hw, shape, batches)
                lines.append(f"| {key} | {b} | {name} | {r.total * 1e3:.3f} | {r.dispatch.sum() * 1e3:.3f} | "
                             f"{r.combine.sum() * 1e3:.3f} | {r.rdma_bytes / 1e9:.3f} | {r.pair_imbalance:.3f} |")
                print(lines[-1], flush=True)
                OUT.write_text("\n".join(lines) + "\n")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
