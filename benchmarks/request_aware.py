"""Request-aware placement (issue 12): held-out requests routed by the plan's router.

    flock /tmp/moeplace-heavy.lock python benchmarks/request_aware.py [--seeds 0,1,2] [--time-limit 10]

Llama-4-Maverick MMLU (prefill + decode) at EP8 over 2 nodes: for each seed the requests are split
at random into train and held-out halves; per setting the same solver runs twice on train, plain
(tokens start on a uniform rank) and with `--request-groups` (one group per node), and both plans
are scored on the held-out requests (the request-aware plan with each request routed by its own
prefill signature, `routed_metrics.score_routing`). DeepSeek-V2-Lite (prefill only): the same
with signatures from the first MoE layers, scored on prefill node_sends.

Writes benchmarks/results/request_aware.md (tables + command + machine + load).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from _common import command, commit, loadavg, machine  # noqa: E402  (benchmarks/ is sys.path[0])

from vllm_moeplace.plan import Topology
from vllm_moeplace.routed_metrics import evaluate_routed, score_routing
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.pipeline import solve
from vllm_moeplace.solver.request_groups import RequestGroupOptions
from vllm_moeplace.trace import Trace, load_trace

ROOT = Path(__file__).resolve().parents[1]
DSV2 = ROOT.parent / "shared" / "data" / "traces" / "dsv2lite_puffin_a.npz"
L4 = ROOT.parent / "shared" / "data" / "raw" / "orders-in-chaos-llama4-mmlu-abstract_algebra"
OUT = ROOT / "benchmarks" / "results" / "request_aware.md"


def load_llama4() -> Trace:
    """The shared Llama-4 MMLU trace, imported from its raw JSON by the `moeplace import` command."""
    with tempfile.TemporaryDirectory() as tmp:
        l4 = Path(tmp) / "llama4.npz"
        subprocess.run([sys.executable, "-m", "vllm_moeplace", "import", "--format", "orders-in-chaos", str(L4),
                        "--num-experts", "128", "--out", str(l4)], check=True, capture_output=True)
        return load_trace(l4)


def random_split(trace: Trace, seed: int) -> tuple[Trace, Trace]:
    """Requests split at random into halves (seed), tokens kept with their request."""
    reqs = np.unique(trace.request_ids)
    train_reqs = np.random.default_rng(seed).permutation(reqs)[: len(reqs) // 2]
    mask = np.isin(trace.request_ids, train_reqs)
    return trace.select_tokens(mask), trace.select_tokens(~mask)


def run_case(train: Trace, held: Trace, topo: Topology, opts: SolveOptions, groups: RequestGroupOptions) -> dict:
    """Plain plan and request-aware plan, both scored on `held`. The options carry keep_plan: the
    pages compare the searches' plans; the step-time guard's verdict is a separate question."""
    spread = np.full(held.num_tokens, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # node-level cap warnings: the imbalance column says it
        t0 = time.monotonic()
        plain = solve(train, topo, opts)
        t1 = time.monotonic()
        aware = solve(train, topo, opts, request_groups=groups)
        t2 = time.monotonic()
    base = evaluate_routed(plain.layers, topo, held, spread, ())
    sc = score_routing(aware, held)
    w10 = score_routing(aware, held, window=10)
    return {"plain": base, "routed": sc.routed, "spread": sc.spread, "share": sc.share_imbalance, "w10": w10,
            "token_share": sc.token_share_imbalance, "t_plain": t1 - t0, "t_aware": t2 - t1,
            "train_share": aware.solver["request_groups"]["train_share_imbalance"]}


def fmt(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{x:.3f}"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--time-limit", type=float, default=10.0)
    p.add_argument("--dsv2-time-limit", type=float, default=30.0)
    p.add_argument("--skip-dsv2", action="store_true")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = ["# Request-aware placement (issue 12)", "", "```sh", command(), "```", "",
             f"Commit {commit()}; machine: {machine()}; load average at start {loadavg()}.", ""]
    trace = load_llama4()
    topo = Topology.uniform(8, 4)
    lines += [
        "## Llama-4-Maverick MMLU abstract_algebra, EP8 over 2 nodes",
        "",
        f"{trace.num_requests} requests ({int(trace.is_prefill.sum())} prefill, {int((~trace.is_prefill).sum())} decode "
        "tokens), split at random by request into halves per seed. Every solve `--deterministic`, "
        f"`--time-limit {args.time_limit:g}`, one group per node (`--request-groups`, router share cap 1.10). "
        "Columns (held-out requests): *plain* = the solver without request groups, requests spread evenly (the "
        "baseline of the acceptance line); *aware* = with request groups, each request routed by the plan's router "
        "from its own prefill signature; *aware spread* = the same request-aware placement with requests spread "
        "evenly. node_sends decode / prefill; imbalance = mean over layers of max/mean rank load (routed origins); "
        "share = the largest group's requests / fair share. Window 10: the same plan with the router assigning 10 "
        "consecutive arrivals at a time (`--router-window 10`; balanced by regret under the same share cap).",
        "",
        "| setting | seed | plain decode | aware decode | aware spread decode | aware / plain | aware prefill "
        "(plain) | imbalance aware (plain) | share held-out (train) | window 10: decode, / plain, imbalance, share "
        "| solve s plain / aware |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    settings = [
        ("no copies, cap 8 (the hottest expert alone: up to 7.99x)", dict(redundant_per_rank=0, max_imbalance=8.0), 0),
        ("2 copies/rank, cap 1.05, signature all layers", dict(redundant_per_rank=2, max_imbalance=1.05), 0),
        ("2 copies/rank, cap 1.05, signature first MoE layer", dict(redundant_per_rank=2, max_imbalance=1.05), 1),
        ("4 copies/rank, cap 1.10, signature all layers", dict(redundant_per_rank=4, max_imbalance=1.10), 0),
    ]
    summary: dict[str, list[float]] = {}
    for name, kw, depth in settings:
        for seed in seeds:
            train, held = random_split(trace, seed)
            # keep_plan: the step-time guard would otherwise write EPLB / linear layouts for these
            # Llama-4 plans (predicted slower in decode), and this benchmark scores the solver's plan.
            opts = SolveOptions(time_limit=args.time_limit, deterministic=True, seed=seed, keep_plan=True, **kw)
            r = run_case(train, held, topo, opts, RequestGroupOptions(2, depth))
            ratio = r["routed"].node_sends_decode / r["plain"].node_sends_decode
            w = r["w10"]
            summary.setdefault(name, []).append(ratio)
            lines.append(
                f"| {name} | {seed} | {fmt(r['plain'].node_sends_decode)} | {fmt(r['routed'].node_sends_decode)} | "
                f"{fmt(r['spread'].node_sends_decode)} | **{ratio:.3f}** | {fmt(r['routed'].node_sends_prefill)} "
                f"({fmt(r['plain'].node_sends_prefill)}) | {fmt(r['routed'].imbalance)} ({fmt(r['plain'].imbalance)}) | "
                f"{r['share']:.3f} ({r['train_share']:.3f}) | {fmt(w.routed.node_sends_decode)}, "
                f"{w.routed.node_sends_decode / r['plain'].node_sends_decode:.3f}, {fmt(w.routed.imbalance)}, "
                f"{w.share_imbalance:.3f} | {r['t_plain']:.0f} / {r['t_aware']:.0f} |")
            print(lines[-1], flush=True)
            OUT.write_text("\n".join(lines) + "\n")
    lines += ["", "Mean aware / plain decode node_sends over seeds: " +
              "; ".join(f"{k}: {np.mean(v):.3f}" for k, v in summary.items()), ""]
    OUT.write_text("\n".join(lines) + "\n")
    if not args.skip_dsv2:
        ds = load_trace(DSV2)
        lines += [
            "## DeepSeek-V2-Lite (Puffin chat, prefill only), EP8 over 2 nodes",
            "",
            f"{ds.num_requests} requests, prefill only. No copies, cap 1.10, `--time-limit {args.dsv2_time_limit:g}`, "
            "one group per node. The signature is the prefill routing of the first N MoE layers; all prefill "
            "tokens are then scored with origins on their group's node (the signature layers' own routing included: "
            "in a disaggregated deployment those layers ran on the prefill instance).",
            "",
            "| signature layers | seed | plain prefill | aware prefill | aware spread prefill | aware / plain | "
            "imbalance aware (plain) | share held-out (train) | solve s plain / aware |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for depth in (1, 2):
            for seed in seeds[:2]:
                train, held = random_split(ds, seed)
                opts = SolveOptions(time_limit=args.dsv2_time_limit, deterministic=True, seed=seed, max_imbalance=1.10,
                                    keep_plan=True)
                r = run_case(train, held, topo, opts, RequestGroupOptions(2, depth))
                ratio = r["routed"].node_sends_prefill / r["plain"].node_sends_prefill
                lines.append(
                    f"| {depth} | {seed} | {fmt(r['plain'].node_sends_prefill)} | {fmt(r['routed'].node_sends_prefill)} | "
                    f"{fmt(r['spread'].node_sends_prefill)} | **{ratio:.3f}** | {fmt(r['routed'].imbalance)} "
                    f"({fmt(r['plain'].imbalance)}) | {r['share']:.3f} ({r['train_share']:.3f}) | "
                    f"{r['t_plain']:.0f} / {r['t_aware']:.0f} |")
                print(lines[-1], flush=True)
                OUT.write_text("\n".join(lines) + "\n")
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
