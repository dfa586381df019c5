"""`--objective step_time` against vLLM's linear layout, EPLB and today's node_sends plans: predicted
MoE step time per phase on the held-out half of the shared traces (issue 13's acceptance), and the
solve time at DeepSeek-R1 shape.

    flock /tmp/moeplace-heavy.lock python benchmarks/step_time.py            # everything (about 1 h on a busy box)
    flock /tmp/moeplace-heavy.lock python benchmarks/step_time.py --only r1  # the scale row alone

Every layout is fitted on the first half of the requests (`--train-fraction 0.5`) and simulated on
the held-out half with the simulator's time model (`vllm_moeplace/sim`, hardware `h800-deepep`),
with the same batches for every layout (the guard's: 2 prefill batches of 4096 tokens per rank and
4 decode batches of 128). `node_sends` is the default objective's plan as the simulator page
builds it (`sim.suite.cpsat_layers`: the cap loosened per layer where one expert alone breaks it,
`--keep-plan`), with the same deterministic budget as each step_time plan. A step_time plan is
solved per phase mix (0 = decode only, 0.5, 1 = prefill only) and written as the guard decides.
Writes benchmarks/results/step_time.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_moeplace.plan import Topology  # noqa: E402
from vllm_moeplace.sim.predict import phase_batches, predict, step_model  # noqa: E402
from vllm_moeplace.sim.suite import _load, cpsat_layers, load_named_trace, machine  # noqa: E402
from vllm_moeplace.solver.baselines import baseline_layers  # noqa: E402
from vllm_moeplace.metrics import evaluate_layers  # noqa: E402
from vllm_moeplace.solver.options import SolveOptions  # noqa: E402
from vllm_moeplace.solver.pipeline import solve  # noqa: E402

HW = "h800-deepep"
MIXES = (0.0, 0.5, 1.0)
CASES = [  # (trace key, EP, ranks per node)
    ("llama4_mmlu_algebra", 8, 4),
    ("llama4_mmlu_algebra", 16, 4),
    ("dsv2lite_puffin_a", 16, 4),
    ("dsv2lite_puffin_a", 32, 4),
]
OUT = ROOT / "benchmarks" / "results" / "step_time"


def run_case(key: str, ep: int, g: int, seconds: float, log, mixes: tuple[float, ...] = MIXES) -> list[dict]:
    trace = load_named_trace(key)
    train, test = trace.split_by_request(0.5)
    topo = Topology.uniform(ep, g)
    model = step_model(train, ep, HW, None, 0.5, 4096, 128)
    batches = phase_batches(test, model, ep)
    rows = []

    def add(name: str, layers, fit_s: float, extra: dict | None = None) -> None:
        t = predict(layers, topo, test, model, batches)
        m = evaluate_layers(layers, topo, test)
        rows.append({"trace": key, "ep": ep, "nodes": ep // g, "layout": name, "prefill_ms": t["prefill"], "decode_ms": t["decode"],
                     "node_sends": m.node_sends, "imbalance": m.imbalance, "fit_s": fit_s, **(extra or {})})
        log(f"{key} EP{ep}/{ep // g} {name}: prefill {t['prefill']:.2f} decode {t['decode']:.2f} ms ({fit_s:.0f} s)")

    for name in ("linear", "eplb"):
        add(name, baseline_layers(name, train, topo), 0.0)
    t0 = time.monotonic()
    add("node_sends", cpsat_layers(train, topo, seconds), time.monotonic() - t0)
    for mix in mixes:
        t0 = time.monotonic()
        plan = solve(trace, topo, SolveOptions(objective="step_time", phase_mix=mix, train_fraction=0.5, time_limit=seconds,
                                               deterministic=True))
        st = plan.solver["step_time"]
        add(f"step_time mix {mix:g}", plan.layers, time.monotonic() - t0,
            {"mix": mix, "written": st["written"], "kept": plan.solver["objective_report"]["kept_counts"]})
    for r in rows:
        r["seconds"] = seconds
    return rows


def run_r1(seconds: float, log) -> dict:
    from vllm_moeplace.solver.synth import SynthConfig, synth_trace

    trace = synth_trace(SynthConfig(num_layers=58, num_experts=256, top_k=8, num_tokens=50_000, seed=0))
    load0 = _load()
    c0 = time.process_time()
    t0 = time.monotonic()
    plan = solve(trace, Topology.uniform(64, 8), SolveOptions(objective="step_time", phase_mix=0.5, train_fraction=0.5,
                                                             time_limit=seconds, model_shape="deepseek-r1"))
    wall = time.monotonic() - t0
    cpu = time.process_time() - c0
    st = plan.solver["step_time"]
    row = {"wall_s": wall, "cpu_s": cpu, "load_before": load0, "load_after": _load(), "time_limit": seconds, "solver_time_s": plan.solver["time_s"],
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "predicted_ms": st["predicted_ms"],
           "written": st["written"], "kept": plan.solver["objective_report"]["kept_counts"]}
    log(f"R1 shape EP64/8: {wall:.0f} s wall, {json.dumps(st['predicted_ms'])}")
    return row


def _pct(x: float, ref: float) -> str:
    return f"{(x / ref - 1) * 100:+.1f}%"


def render(data: dict) -> str:
    md = [
        "# Step-time objective (issue 13): predicted MoE step time per phase, held-out requests",
        "",
        f"Produced by {' then '.join(f'`{c}`' for c in data['commands'])} (a later run replaces the rows it re-runs; the "
        "box was shared with other sessions' jobs throughout, some runs under `flock /tmp/moeplace-heavy.lock`, some beside "
        "it: `--deterministic` makes every plan and number here independent of the load, only wall times depend on it), "
        f"last on {data['date']}, commit {data['machine']['commit']}. Machine: "
        f"{data['machine']['nproc']} CPUs ({data['machine']['cpu']}), Python {data['machine']['python']}; load average before "
        f"{data['load_before']}, after {data['load_after']} (other sessions' jobs share the box); wall {data['wall_s']:.0f} s.",
        "",
        f"Hardware `{HW}` (`benchmarks/sim_params.json`), prefill 4096 and decode 128 tokens per rank, time model of "
        "`docs/simulator.md`. Every layout is fitted on the first half of the requests and simulated on the held-out half "
        "(same batches for every layout). `node_sends` = today's default-objective plan as the simulator page builds it; "
        f"every solve is `--deterministic` with the budget in its section's title (the same for `node_sends` and `step_time`). `written` = what the guard wrote (`plan` unless the plan "
        "was predicted slower than linear for its mix); `kept` = per-layer candidates the step_time objective kept after "
        "re-scoring (search / linear layout, `+descent` = after the surrogate's swap descent).",
        "",
    ]
    cur = None
    for r in data["rows"]:
        scen = (r["trace"], r["ep"], r["nodes"])
        if scen != cur:
            cur = scen
            lin = next(x for x in data["rows"] if (x["trace"], x["ep"], x["nodes"]) == scen and x["layout"] == "linear")
            ns = next(x for x in data["rows"] if (x["trace"], x["ep"], x["nodes"]) == scen and x["layout"] == "node_sends")
            md += [f"## {r['trace']}, EP{r['ep']} over {r['nodes']} nodes ({r.get('seconds', data['seconds']):g} s per solve)", "",
                   "| layout | prefill ms | vs linear | vs node_sends | decode ms | vs linear | vs node_sends | held-out node_sends | imbalance | fit s | written | kept |",
                   "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        md.append(
            f"| {r['layout']} | {r['prefill_ms']:.2f} | {_pct(r['prefill_ms'], lin['prefill_ms'])} | {_pct(r['prefill_ms'], ns['prefill_ms'])} | "
            f"{r['decode_ms']:.2f} | {_pct(r['decode_ms'], lin['decode_ms'])} | {_pct(r['decode_ms'], ns['decode_ms'])} | "
            f"{r['node_sends']:.3f} | {r['imbalance']:.3f} | {r['fit_s']:.0f} | {r.get('written', '')} | "
            f"{', '.join(f'{k} {v}' for k, v in r.get('kept', {}).items())} |")
        nxt = data["rows"].index(r) + 1
        if nxt == len(data["rows"]) or (data["rows"][nxt]["trace"], data["rows"][nxt]["ep"], data["rows"][nxt]["nodes"]) != scen:
            md.append("")
    if data.get("r1"):
        r = data["r1"]
        t = r["predicted_ms"]
        md += ["## DeepSeek-R1 shape (synthetic, 58 x 256, top-8, 50k tokens), EP64 over 8 nodes", "",
               f"`solve(objective=step_time, phase_mix=0.5, train_fraction=0.5, time_limit={r['time_limit']:g}, "
               "model_shape=deepseek-r1)`, clock-bounded (not deterministic):", "",
               f"- wall {r['wall_s']:.0f} s, CPU time {r.get('cpu_s', float('nan')):.0f} s (user + system of this process; "
               f"load average before {r.get('load_before')}, after {r.get('load_after')}); solver section `time_s` "
               f"{r['solver_time_s']:.0f} s (search + refinement; the rest is the guard's simulation of plan, linear and "
               f"EPLB); peak RSS {r['peak_rss_mb']:.0f} MB;",
               f"- held-out prediction: plan prefill {t['plan']['prefill']:.1f} / decode {t['plan']['decode']:.2f} ms, "
               f"linear {t['linear']['prefill']:.1f} / {t['linear']['decode']:.2f} ms, EPLB {t['eplb']['prefill']:.1f} / "
               f"{t['eplb']['decode']:.2f} ms; written: {r['written']}; kept: {r['kept']}.", ""]
    return "\n".join(md)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=13.0, help="deterministic budget per solve (default 13, as simulate.py)")
    p.add_argument("--r1-seconds", type=float, default=150.0, help="time limit of the R1-shape solve (default 150)")
    p.add_argument("--only", choices=["cases", "r1"], help="run only the trace cases or only the R1 row")
    p.add_argument("--case", type=int, action="append", help="indices into CASES (default all)")
    p.add_argument("--mixes", default=",".join(f"{m:g}" for m in MIXES), help="phase mixes to solve step_time plans for (default 0,0.5,1)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/step_time.py", *sys.argv[1:]])
    prev = json.loads(args.out.with_suffix(".json").read_text()) if args.out.with_suffix(".json").exists() else {}
    t0 = time.monotonic()
    data = {"commands": prev.get("commands", []) + [command], "machine": machine(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_before": _load(), "seconds": args.seconds, "rows": prev.get("rows", []), "r1": prev.get("r1")}
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.only != "r1":
        picked = [CASES[i] for i in (args.case or range(len(CASES)))]
        keep = [r for r in data["rows"] if (r["trace"], r["ep"], r["ep"] // r["nodes"]) not in picked]
        for r in data["rows"]:
            r.setdefault("seconds", prev.get("seconds", args.seconds))
        new = []
        for key, ep, g in picked:
            new += run_case(key, ep, g, args.seconds, log, tuple(float(m) for m in args.mixes.split(",")))
        order = {c: i for i, c in enumerate(CASES)}
        data["rows"] = sorted(keep + new, key=lambda r: order[(r["trace"], r["ep"], r["ep"] // r["nodes"])])
    if args.only != "cases":
        data["r1"] = run_r1(args.r1_seconds, log)
    data["wall_s"] = time.monotonic() - t0
    data["load_after"] = _load()
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(data))
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def rerender(path: Path = OUT) -> None:
    """Redraw step_time.md from step_time.json (after merging rows by hand or by a second run)."""
    data = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".md").write_text(render(data))
