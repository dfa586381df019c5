"""Solver scale in trace length: DeepSeek-R1 shape (58 layers x 256 experts, top-8, EP64 over 8
nodes), `moeplace solve --time-limit 120` on 50k ... 1M synthetic train tokens, each plan scored on
the same held-out requests.

    python benchmarks/solver_scale_tokens.py prepare --dir /tmp/r1tokens
    python benchmarks/solver_scale_tokens.py calibrate --dir /tmp/r1tokens --tokens 400k   # sample.py constants
    python benchmarks/solver_scale_tokens.py sample-effect --dir /tmp/r1tokens --tokens 400k
    flock /tmp/moeplace-heavy.lock python benchmarks/solver_scale_tokens.py run --dir /tmp/r1tokens \
        [--tokens 50k,100k,200k,400k,1M] [--code /path/to/other/checkout --label before]

`prepare` draws ONE synthetic trace (`moeplace synth` generator, seed 0) of 1.05M tokens, keeps its
last requests (>= 50k tokens) as the held-out set, and writes train traces made of its first
requests up to each size, so every size is the same workload and is scored on the same held-out
tokens. `run` solves each train trace in its own process under /usr/bin/time -v (wall time and peak
RSS of the whole command: import, trace load, solve, plan write), then scores the plan on the
held-out trace, and rewrites the "Tokens sweep" section of benchmarks/results/solver_scale.md
(rows of earlier runs with another label are kept, so the before/after rows sit side by side).
Each row is also printed as one JSON line; `render --rows FILE` rewrites the table from such lines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "solver_scale.md"
SIZES = {"50k": 50_000, "100k": 100_000, "200k": 200_000, "400k": 400_000, "1M": 1_000_000}
HELD_OUT = 50_000
SHAPE = dict(num_layers=58, num_experts=256, top_k=8)
EP, PER_NODE = 64, 8
SECTION = "## Tokens sweep"


def prepare(d: Path) -> None:
    import numpy as np

    from vllm_moeplace.solver.synth import SynthConfig, synth_trace
    from vllm_moeplace.trace import save_trace

    d.mkdir(parents=True, exist_ok=True)
    tr = synth_trace(SynthConfig(**SHAPE, num_tokens=max(SIZES.values()) + HELD_OUT, seed=0))
    n = np.bincount(tr.request_ids)
    first_held = len(n) - (int(np.searchsorted(np.cumsum(n[::-1]), HELD_OUT)) + 1)
    save_trace(d / "heldout.npz", tr.select_tokens(tr.request_ids >= first_held))
    cum = np.cumsum(n)
    for name, size in SIZES.items():
        last = min(int(np.searchsorted(cum, size)), first_held - 1)
        save_trace(d / f"train_{name}.npz", tr.select_tokens(tr.request_ids <= last))
        print(f"train_{name}: {int(cum[last])} tokens, requests 0..{last}; held-out from request {first_held}", flush=True)


def _time_v(text: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) from /usr/bin/time -v output."""

    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", text)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    rss = float(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
    return 3600 * h + 60 * m + s, rss


def _cpu_share(text: str) -> float | None:
    """The 'Percent of CPU this job got' of /usr/bin/time -v: below 100% the machine was shared."""
    m = re.search(r"Percent of CPU this job got: (\d+)%", text)
    return float(m.group(1)) if m else None


def score(plan_path: Path, held_path: Path) -> dict:
    from vllm_moeplace.metrics import evaluate_layers
    from vllm_moeplace.plan import load_plan
    from vllm_moeplace.trace import load_trace

    plan = load_plan(plan_path)
    m = evaluate_layers(plan.layers, plan.topology, load_trace(held_path))
    s = plan.solver
    return {"held_node_sends": m.node_sends, "held_imbalance": m.imbalance, "train_objective": s["objective"],
            "gap": s["gap"], "cpsat_calls": s["cpsat_calls"], "train_imbalance": s["train_rank_imbalance"],
            "sample": s.get("sample"), "time_s": s["time_s"]}


def run(d: Path, names: list[str], time_limit: float, code: Path, label: str) -> list[dict]:
    rows = []
    env = dict(os.environ, PYTHONPATH=str(code))
    for name in names:
        out = d / f"plan_{label}_{name}.json"
        load0 = os.getloadavg()[0]
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "vllm_moeplace", "solve", "--trace", str(d / f"train_{name}.npz"),
               "--ep-size", str(EP), "--ranks-per-node", str(PER_NODE), "--time-limit", str(time_limit), "--out", str(out)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode:
            print(p.stdout, p.stderr, file=sys.stderr)
            raise SystemExit(f"{name}: solve failed ({p.returncode})")
        wall, rss = _time_v(p.stderr)
        row = {"label": label, "tokens": name, "time_limit": time_limit, "wall_s": wall, "peak_rss_mb": rss,
               "cpu_percent": _cpu_share(p.stderr), "load_start": load0, "load_end": os.getloadavg()[0],
               **score(out, d / "heldout.npz")}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def sample_effect(d: Path, name: str, sizes: list[int], layers: int, seconds_per_layer: float) -> list[dict]:
    """Held-out node_sends of the first `layers` layers solved on token samples of each size, in
    deterministic mode (the same search work per layer whatever the size and the machine load),
    balance on all train tokens as in a real solve: the effect of the sample alone."""
    import numpy as np

    from vllm_moeplace.metrics import evaluate_layers
    from vllm_moeplace.plan import Topology
    from vllm_moeplace.solver import sample as S
    from vllm_moeplace.solver.options import SolveOptions
    from vllm_moeplace.solver.pipeline import solve
    from vllm_moeplace.trace import Trace, load_trace

    def first(t: Trace) -> Trace:
        return Trace(topk_ids=np.ascontiguousarray(t.topk_ids[:, :layers]), layer_ids=t.layer_ids[:layers],
                     request_ids=t.request_ids, is_prefill=t.is_prefill, num_experts=t.num_experts, labels=t.labels)

    train, held = first(load_trace(d / f"train_{name}.npz")), first(load_trace(d / "heldout.npz"))
    topo = Topology.uniform(EP, EP // PER_NODE)
    rows = []
    real = S.sample_size
    try:
        for n in sizes:
            S.DET_MIN_TOKENS = 0
            S.sample_size = lambda *a, n=n: min(n, train.num_tokens)  # noqa: E731
            plan = solve(train, topo, SolveOptions(time_limit=seconds_per_layer * layers, deterministic=True, seed=0))
            m = evaluate_layers(plan.layers, topo, held)
            rows.append({"train": name, "sample": n, "layers": layers, "held_node_sends": m.node_sends,
                         "held_imbalance": m.imbalance, "train_objective": plan.solver["objective"]})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        S.sample_size = real
    return rows


def calibrate(d: Path, name: str) -> None:
    """The constants of `solver/sample.py`, in CPU seconds (so a busy machine does not bias them):
    the probe's cost per (token, expert) pair, and one layer's setup (solve_layer with no search
    time) on 20k / 50k / 100k-token samples of the `name` train trace."""
    import time

    import numpy as np

    from vllm_moeplace.plan import Topology
    from vllm_moeplace.solver import sample as S
    from vllm_moeplace.solver.layer import solve_layer
    from vllm_moeplace.solver.noise import layer_q
    from vllm_moeplace.solver.objectives import get_objective
    from vllm_moeplace.solver.options import SolveOptions
    from vllm_moeplace.trace import load_trace

    tr = load_trace(d / f"train_{name}.npz")
    topo, opt = Topology.uniform(EP, EP // PER_NODE), SolveOptions(risk_scale=1.0)
    order = np.random.default_rng(0).permutation(tr.num_tokens)
    for n in (20_000, 50_000, 100_000):
        idx = np.sort(order[:n])
        c = time.process_time()
        S.probe_s_per_pair(tr, idx[: S.PROBE_TOKENS], topo.num_nodes)
        u = (time.process_time() - c) / (S.PROBE_TOKENS * tr.top_k)
        sub, setup = tr.select_tokens(idx), []
        for l in (1, 2):
            load = np.bincount(tr.topk_ids[:, l, :].ravel().astype(np.int64), minlength=tr.num_experts).astype(float)
            q = layer_q(tr, l, opt)
            c = time.process_time()
            solve_layer(sub, l, topo, opt, get_objective("node_sends"), 0.05, np.random.default_rng(0), q=q, load=load)
            setup.append(time.process_time() - c)
        print(json.dumps({"sample": n, "probe_cpu_s_per_pair": u, "setup_cpu_s": float(np.mean(setup))}), flush=True)


def _row_md(r: dict) -> str:
    smp = r["sample"]
    sample = f"{smp['tokens']} ({100 * smp['share']:.0f}%)" if smp else "all"
    return (f"| {r['label']} | {r['tokens']} | {r['time_limit']:g} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {sample} | "
            f"{r['cpsat_calls']} | {r['train_objective']:.4f} | {100 * r['gap']:.0f}% | {r['train_imbalance']:.3f} | {r['held_node_sends']:.4f} | "
            f"{r['held_imbalance']:.3f} | {r.get('cpu_percent') or '?'} | {r['load_start']:.1f} / {r['load_end']:.1f} |")


def write(rows: list[dict], command: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Solver scale\n"
    head, _, rest = text.partition(SECTION)
    old_rows = [l for l in rest.splitlines() if l.startswith("| ") and not l.startswith("| code |")]
    new_labels = {r["label"] for r in rows}
    kept = [l for l in old_rows if l.split("|")[1].strip() not in new_labels]
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    lines = [
        SECTION, "",
        f"Command: `{command}` (commit {sha}). One synthetic trace at DeepSeek-R1 shape (58 x 256, top-8, seed 0,",
        "1.05M tokens); train = its first requests up to each size, held-out = its last requests (50k tokens), the",
        "same for every row. `moeplace solve --ep-size 64 --ranks-per-node 8 --time-limit 120` under",
        "`/usr/bin/time -v`: wall and peak RSS are the whole command (imports, trace load, solve, plan write).",
        "sample: train tokens the search used (`solver.sample` in the plan; balance is on all of them).",
        "held-out node_sends / imbalance: `metrics.evaluate_layers` of the plan on the held-out trace.",
        "CPU %: /usr/bin/time's share of one core the command got (100% x wall = CPU seconds; well below",
        "100% means other jobs held the 2 cores, and wall time then measures the machine, not the solver).",
        "",
        "| code | train tokens | time limit s | wall s | peak RSS MB | sample | CP-SAT calls | train objective | gap | train rank imbalance | held-out node_sends | held-out imbalance | CPU % | load start/end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *kept, *[_row_md(r) for r in rows], "",
    ]
    RESULTS.write_text(head.rstrip() + "\n\n" + "\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["prepare", "run", "render", "sample-effect", "calibrate"])
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--tokens", default=",".join(SIZES))
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--code", type=Path, default=ROOT, help="checkout whose vllm_moeplace is solved with (default this one)")
    ap.add_argument("--label", default="after")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--rows", type=Path, help="render: a file of the JSON rows `run` printed (one per line)")
    ap.add_argument("--command", help="render: the command(s) that produced the rows, for the results file")
    a = ap.parse_args()
    if a.mode == "prepare":
        prepare(a.dir)
        return 0
    if a.mode == "sample-effect":  # printed only; the results file quotes it
        sample_effect(a.dir, a.tokens, [20_000, 50_000, 100_000, 200_000], layers=6, seconds_per_layer=2.0)
        return 0
    if a.mode == "calibrate":  # printed only; sample.py's comments quote it
        calibrate(a.dir, a.tokens)
        return 0
    if a.mode == "render":  # the table again from rows printed by earlier runs
        rows = [json.loads(l) for l in a.rows.read_text().splitlines() if l.startswith("{")]
        write(rows, a.command or "python " + " ".join(sys.argv))
        return 0
    names = [t.strip() for t in a.tokens.split(",") if t.strip()]
    bad = [t for t in names if t not in SIZES]
    if bad:
        raise SystemExit(f"--tokens: unknown size(s) {bad}; choose from {', '.join(SIZES)}")
    rows = run(a.dir, names, a.time_limit, a.code, a.label)
    if not a.no_write:
        write(rows, "python " + " ".join(sys.argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
