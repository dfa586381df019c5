"""Solver scale: DeepSeek-R1 shape (58 x 256, top-8, EP64 over 8 nodes, 50k synthetic tokens), the
DeepSeek-V2-Lite shape at EP16, and a sweep over experts, layers and ranks.

    flock /tmp/moeplace-heavy.lock python benchmarks/solver_scale.py

Each configuration runs in its own process so its peak memory (ru_maxrss) is its own.
Writes benchmarks/results/solver_scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DSV2 = ROOT.parent / "shared" / "data" / "traces" / "dsv2lite_puffin_a.npz"


def one(cfg: dict) -> dict:
    from vllm_moeplace.plan import Topology
    from vllm_moeplace.solver.options import SolveOptions
    from vllm_moeplace.solver.pipeline import solve
    from vllm_moeplace.solver.synth import SynthConfig, synth_trace
    from vllm_moeplace.trace import load_trace

    if cfg["trace"] == "dsv2":
        trace = load_trace(DSV2)
    else:
        trace = synth_trace(SynthConfig(num_layers=cfg["L"], num_experts=cfg["E"], top_k=cfg["K"], num_tokens=cfg["T"], seed=0))
    topo = Topology.uniform(cfg["R"], cfg["G"])
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    det = bool(cfg.get("deterministic", False))
    plan = solve(trace, topo, SolveOptions(time_limit=cfg["time_limit"], max_imbalance=cfg.get("B", 1.05), seed=0, deterministic=det))
    wall = time.monotonic() - t0
    s = plan.solver
    return {
        **cfg,
        "wall_s": wall,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "objective": s["objective"],
        "bound": s["best_bound"],
        "gap": s["gap"],
        "warm_start": s["warm_start_objective"],
        "train_imbalance": s["train_rank_imbalance"],
        "load_1min_start": load0,
        "load_1min_end": os.getloadavg()[0],
    }


CONFIGS = [
    dict(name="DeepSeek-R1 shape", trace="synth", L=58, E=256, K=8, T=50_000, R=64, G=8, time_limit=240),
    dict(name="DeepSeek-V2-Lite (real trace)", trace="dsv2", L=26, E=64, K=6, T=94_165, R=16, G=4, time_limit=52),
]
# Sweep in deterministic mode: fixed work per layer (greedy, full swap descent, 4 LNS rounds,
# bound), so wall time measures how the work grows, not the budget.
_SW = dict(trace="synth", K=8, T=20_000, deterministic=True, B=1.25)  # 1.25: EP64 has 2 experts per rank
SWEEP = (
    [dict(_SW, name=f"sweep E={e}", L=8, E=e, R=16, G=4, time_limit=8) for e in (64, 128, 256)]
    + [dict(_SW, name=f"sweep L={l}", L=l, E=128, R=16, G=4, time_limit=l) for l in (4, 16, 32)]
    + [dict(_SW, name=f"sweep R={r}", L=8, E=128, R=r, G=max(1, r // 8), time_limit=8) for r in (8, 32, 64)]
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--only-sweep", action="store_true")
    ap.add_argument("--out", default=None, help="default results/solver_scale.md (solver_scale_sweep.md with --only-sweep)")
    args = ap.parse_args()
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / ("solver_scale_sweep.md" if args.only_sweep else "solver_scale.md"))
    if args.one:
        print(json.dumps(one(json.loads(args.one))))
        return 0
    cpu = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if l.startswith("Model name")), "?")
    lines = [
        "# Solver scale",
        "",
        f"Command: `flock /tmp/moeplace-heavy.lock python {' '.join(sys.argv)}`",
        "",
        f"Code: commit {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=ROOT).stdout.strip()}. Machine: nproc {os.cpu_count()}, CPU {cpu}. Load (1-min average) recorded per run: other engineers share the box.",
        "`time_limit` is the solver's total budget (the R1 and V2-Lite rows use it all unless every",
        "neighbourhood stalls). Sweep rows run `--deterministic` (1 s of budget per layer = a fixed 4 LNS",
        "rounds after the warm start and full swap descent, 10 Frank-Wolfe bound steps), so their wall",
        "time measures work, not budget; they use --max-imbalance 1.25 (EP64 x 128 experts = 2 per rank).",
        "",
        "| run | layers x experts, top-k | tokens | EP / nodes | time limit s | wall s | peak RSS MB | train node_sends | warm start | bound | gap | train imbalance | load start/end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    todo = ([] if args.only_sweep else CONFIGS) + ([] if args.skip_sweep else SWEEP)
    for cfg in todo:
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True)
        if out.returncode:
            lines.append(f"| {cfg['name']} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        lines.append(
            f"| {r['name']} | {r['L']} x {r['E']}, {r['K']} | {r['T']} | {r['R']} / {r['R'] // r['G']} | {r['time_limit']} | {r['wall_s']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['objective']:.3f} | {r['warm_start']:.3f} | {r['bound']:.3f} | {100 * r['gap']:.0f}% | "
            f"{r['train_imbalance']:.3f} | {r['load_1min_start']:.1f} / {r['load_1min_end']:.1f} |"
        )
        print(lines[-1], flush=True)
    # Keep the sections other scripts write into the same file (solver_scale_tokens.py's "## ...").
    out = Path(args.out)
    rest = out.read_text().partition("\n## ")[2] if out.exists() else ""
    out.write_text("\n".join(lines) + "\n" + (f"\n## {rest}" if rest else ""))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
