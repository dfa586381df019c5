"""Held-out placement quality: plan from the first half of requests, scored on the second half.

    flock /tmp/moeplace-heavy.lock python benchmarks/solver_heldout.py [--time-limit 52] [--long-time-limit 200]

Writes benchmarks/results/solver_heldout.md (table + command + machine + load).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from _common import loadavg, machine  # noqa: E402  (benchmarks/ is sys.path[0])
import time
from pathlib import Path

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.plan import Topology
from vllm_moeplace.solver.baselines import baseline_layers
from vllm_moeplace.metrics import evaluate_layers
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.pipeline import solve
from vllm_moeplace.trace import load_trace

ROOT = Path(__file__).resolve().parents[1]
DSV2 = ROOT.parent / "shared" / "data" / "traces" / "dsv2lite_puffin_a.npz"
L4 = ROOT.parent / "shared" / "data" / "raw" / "orders-in-chaos-llama4-mmlu-abstract_algebra"




def rows_for(trace, R, G, variants, time_limit, redundant=0):
    """Baselines, then one `moeplace solve` per variant: (extra CLI flags, SolveOptions overrides)."""
    train, held = trace.split_by_request(0.5)
    topo = Topology.uniform(R, G)
    out = []
    for name in ("linear", "round_robin", "eplb", "eplb_global", "greedy"):
        t0 = time.monotonic()
        m = evaluate_layers(baseline_layers(name, train, topo, redundant), topo, held)
        out.append((name, m, time.monotonic() - t0, ""))
    for flags, kw in variants:
        kw = {"time_limit": time_limit, "train_fraction": 0.5, "redundant_per_rank": redundant, "seed": 0, **kw}
        t0 = time.monotonic()
        try:
            plan = solve(trace, topo, SolveOptions(**kw))
        except MoeplaceError as e:  # an unreachable bound is a result too: record what it said
            out.append((f"moeplace solve {flags}", None, time.monotonic() - t0, f"refused: {e}"))
            continue
        m = evaluate_layers(plan.layers, topo, held)
        s = plan.solver
        if kw.get("inter_layer_weight"):
            note = "no node_sends bound with the inter-layer term"
        else:
            note = f"train obj {s['objective']:.3f}, bound {s['best_bound']:.3f}, gap {100 * s['gap']:.0f}%, cp-sat {s['cpsat_improvements']}/{s['cpsat_calls']}"
        if s.get("expected_imbalance") is not None:
            note += f"; predicted held-out imbalance {s['expected_imbalance']:.3f}"
        out.append((f"moeplace solve {flags}", m, s["time_s"], note))
    return out


def cap(b: float, **kw):
    """A `--max-imbalance b` variant (train-load cap unless balance_target says otherwise)."""
    flags = f"--max-imbalance {b}"
    if kw.get("balance_target") == "expected":
        flags = "--balance-target expected " + flags
    if kw.get("balance_risk"):
        flags += f" --balance-risk {kw['balance_risk']}"
    if kw.get("inter_layer_weight"):
        flags += f" --inter-layer-weight {kw['inter_layer_weight']}"
    if kw.get("balance_confidence"):
        flags += f" --balance-confidence {kw['balance_confidence']}"
    if kw.get("seed"):
        flags += f" --seed {kw['seed']}"
    if kw.get("time_limit"):
        flags += f" --time-limit {kw['time_limit']:g}"
    if kw.get("copy_placement"):
        flags += f" --copy-placement {kw['copy_placement']}"
    return flags, {"max_imbalance": b, **kw}


def table(title, rows, lin) -> list[str]:
    lines = [f"### {title}", "", "| layout | node_sends | x linear | rank_sends | imbalance | inter_layer | time s | notes |", "|---|---|---|---|---|---|---|---|"]
    for name, m, t, note in rows:
        if m is None:
            lines.append(f"| {name} | - | - | - | - | - | {t:.1f} | {note} |")
            continue
        lines.append(f"| {name} | {m.node_sends:.3f} | {m.node_sends / lin:.3f} | {m.rank_sends:.3f} | {m.imbalance:.3f} | {m.inter_layer_node_sends:.3f} | {t:.1f} | {note} |")
    return lines + [""]


def header(title: str) -> list[str]:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return [f"# {title}", "", f"Command: `flock /tmp/moeplace-heavy.lock python {' '.join(sys.argv)}`", "", f"Code: commit {commit}. Machine: {machine()}, load {loadavg()} (at start)", ""]


def copy_tables(trace, time_limit: float) -> list[str]:
    """Redundant copies (1 per rank) under the replica rule: locality placement (the default) at
    several caps, and the earlier balance-only placement for comparison."""
    lines = []
    variants = [cap(b) for b in (1.02, 1.05, 1.10)] + [cap(1.05, balance_risk=1.0), cap(1.10, balance_risk=1.0)]
    variants += [cap(1.05, copy_placement="balance")]
    rows = rows_for(trace, 16, 4, variants, time_limit, redundant=1)
    lines += table(f"DeepSeek-V2-Lite (`{DSV2.name}`), EP16 over 4 nodes, 1 redundant copy per rank, train = first half of requests", rows, rows[0][1].node_sends)
    try:
        from vllm_moeplace.profiling.importers import import_trace

        l4 = import_trace("orders-in-chaos", L4)
        rows = rows_for(l4, 16, 4, [cap(1.01), cap(1.03), cap(1.01, copy_placement="balance")], time_limit / 2, redundant=1)
        lines += table("Llama-4-Maverick MMLU (orders-in-chaos), EP16 over 4 nodes, 1 redundant copy per rank", rows, rows[0][1].node_sends)
    except Exception as e:  # the importer belongs to another module; report, do not hide
        lines += [f"Llama-4 row not produced: {type(e).__name__}: {e}", ""]
    return lines


def copies_only(args) -> int:
    out = args.out or str(ROOT / "benchmarks" / "results" / "solver_heldout_copies.md")
    lines = header("Held-out placement quality with redundant copies (replica rule origin-node-spread/v1)")
    lines += [
        "Every layout, baselines included, is scored by `moeplace evaluate`'s metrics under the one replica rule "
        "(`vllm_moeplace/replica.py`): own copy, else copy (t*K+k) mod n on the origin's node, else (t*K+k) mod c "
        "overall; rank load = expected pairs served, averaged over origins (docs/metrics.md).",
        "",
    ]
    lines += copy_tables(load_trace(DSV2), args.time_limit)
    lines.append(f"Load at end: {os.getloadavg()}")
    Path(out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--time-limit", type=float, default=52.0)
    ap.add_argument("--caps", type=float, nargs="+", default=[1.02, 1.05, 1.10, 1.15])
    ap.add_argument("--expected", type=float, nargs="+", default=[1.12, 1.15], help="--balance-target expected bounds")
    ap.add_argument("--long-time-limit", type=float, default=200.0, help="the longer EP8/8 expected-target rows")
    ap.add_argument("--out", default=None, help="default: results/solver_heldout.md (--only copies: solver_heldout_copies.md)")
    ap.add_argument(
        "--only", choices=["all", "copies"], default="all",
        help="copies: only the redundant-copy tables (DeepSeek-V2-Lite EP16/4 and Llama-4, 1 copy per rank), "
        "scored with the replica rule; about 12 minutes instead of 45",
    )
    args = ap.parse_args()
    if args.only == "copies":
        return copies_only(args)
    args.out = args.out or str(ROOT / "benchmarks" / "results" / "solver_heldout.md")
    lines = ["# Held-out placement quality", "", f"Command: `flock /tmp/moeplace-heavy.lock python {' '.join(sys.argv)}`", "", f"Code: commit {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=ROOT).stdout.strip()}. Machine: {machine()}, load {loadavg()} (at start)", ""]
    trace = load_trace(DSV2)
    # Train-load caps (the plain mode), then the held-out-aware modes that the acceptance bound
    # (held-out imbalance <= 1.15) is about, then the inter-layer term.
    expected = [cap(b, balance_target="expected") for b in args.expected]
    # EP8/8 sits at the acceptance line (<= 0.74 x linear at held-out imbalance <= 1.15), where one
    # held-out sample's noise (~0.01 in imbalance) decides: other seeds, a confidence bound, longer runs.
    ep8_more = (
        [cap(1.25), cap(1.25, balance_target="expected")]
        + [cap(1.15, balance_target="expected", seed=s) for s in (1, 2, 3)]
        + [cap(1.15, balance_target="expected", balance_confidence=0.9)]
        + [cap(b, balance_target="expected", time_limit=args.long_time_limit) for b in (1.13, 1.15)]
    )
    for R, G, label, more in ((16, 4, "EP16 over 4 nodes", []), (8, 1, "EP8 over 8 nodes", ep8_more)):
        variants = [cap(b) for b in args.caps] + [cap(1.15, balance_risk=1.0)] + expected + more + [cap(1.05, inter_layer_weight=0.5)]
        rows = rows_for(trace, R, G, variants, args.time_limit)
        lines += table(f"DeepSeek-V2-Lite (`{DSV2.name}`), {label}, train = first half of requests", rows, rows[0][1].node_sends)
    lines += copy_tables(trace, args.time_limit)
    lines.append(f"Load at end: {os.getloadavg()}")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
