"""`moeplace demo`: the main job, end to end, on the embedded default.

tiny model -> profile it in vLLM (TP2 + EP) -> solve a placement from the profiled trace ->
serve with vLLM's default layout and with the plan, same workload, and check the tokens are
identical -> count the traffic each layout needed -> solve and score a cluster-scale placement on
the real DeepSeek-V2-Lite trace (../shared/data, else the cache `moeplace datasets fetch
dsv2lite-puffin` fills; without either that part is skipped and the report says how to get it)
-> one report.

Every stage runs as the `moeplace` command a user would type (printed, and written into the
report), so each figure in the report comes with the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from vllm_moeplace.bench.server import CPU_ENV
from vllm_moeplace.datasets import DATASETS, cached_trace, fetch_command, locate, shared_data_root
from vllm_moeplace.errors import MoeplaceError

REAL = DATASETS["dsv2lite-puffin"]  # the cluster-scale half's trace (`moeplace datasets`)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    p.add_argument("--real-trace", type=Path,
                   help="real routing trace for the cluster-scale part (default: the DeepSeek-V2-Lite trace from "
                        f"../shared/data, else from the cache `{fetch_command(REAL)}` fills)")
    p.add_argument("--max-tokens", type=int, default=16, help="generated tokens per prompt (profile and bench)")
    p.add_argument("--solve-time", type=float, default=20.0, help="CP-SAT time limit for the tiny model's plan")
    p.add_argument("--real-solve-time", type=float, default=60.0, help="time limit for the real-trace plan")


class _Stages:
    def __init__(self, out: Path):
        self.out = out
        self.log: list[tuple[str, str, float]] = []
        # Every vLLM stage here is TP2 on CPU; on a 2-core machine vLLM's automatic OpenMP
        # binding asserts ("Not enough allowed NUMA nodes"), so bind one core per worker.
        self.env = {**os.environ, **CPU_ENV, **{k: os.environ[k] for k in CPU_ENV if k in os.environ}}

    def run(self, title: str, *args: str, capture: bool = False) -> str:
        cmd = ["moeplace", *args]
        shown = " ".join(shlex.quote(a) for a in cmd)
        print(f"\n=== {title}\n$ {shown}", flush=True)
        t0 = time.perf_counter()
        exe = [sys.executable, "-m", "vllm_moeplace", *args]
        res = subprocess.run(exe, stdout=subprocess.PIPE if capture else None, text=True, env=self.env)
        dt = time.perf_counter() - t0
        if res.returncode != 0:
            raise MoeplaceError(f"demo stage '{title}' failed (exit {res.returncode}): {shown}")
        self.log.append((title, shown, dt))
        if capture:
            return res.stdout
        return ""


def run(args: argparse.Namespace) -> int:
    from vllm_moeplace.tiny_model import default_prompts

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    st = _Stages(out)
    model, trace, plan = out / "model", out / "trace.npz", out / "plan.json"
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in default_prompts()))
    t_start = time.perf_counter()

    st.run("1. build the tiny model (random weights, local tokenizer)", "tiny-model", "--arch", "qwen3_moe",
           "--layers", "4", "--experts", "16", "--top-k", "4", "--out", str(model))
    st.run("2. profile it in vLLM (TP2 + expert parallel, CPU)", "profile", str(model), "--prompts", str(prompts),
           "--out", str(trace), "--max-tokens", str(args.max_tokens), "--tensor-parallel-size", "2",
           "--enable-expert-parallel", "--dtype", "float32", "--moe-cpu-ep-fix", "--enforce-eager", "--no-progress")
    # (--enforce-eager: a one-shot profile need not pay torch.compile; the routing capture inside
    # compiled graphs is exercised by stage 4, whose `vllm serve` runs compiled and captures.)
    # One redundant copy per rank: what production placements (EPLB, SGLang, TensorRT-LLM) rely on,
    # and it makes the server use the mapping mechanism (docs/serving.md), the general one.
    st.run("3. solve a placement for EP2 (each rank its own node, one redundant copy per rank)", "solve",
           "--trace", str(trace), "--ep-size", "2", "--ranks-per-node", "1", "--redundant-per-rank", "1",
           "--time-limit", str(args.solve_time), "--train-fraction", "0.5",
           "--max-imbalance", "1.1", "--deterministic", "--model-name", str(model), "--out", str(plan))
    st.run("4. serve with the default layout and with the plan; benchmark and compare", "bench", str(model),
           "--plan", str(plan), "--prompts", str(prompts), "--max-tokens", str(args.max_tokens),
           # one round: each extra round costs two server starts (~1 min here); the benchmark's own
           # protocol (3 interleaved rounds) is benchmarks/serve_bench.py -> benchmarks/results/serving.md
           "--rounds", "1", "--concurrency", "4", "--repeat", "4", "--out", str(out / "serving"))

    real_section = ["## Cluster scale on a real trace", ""]
    real_trace, missing = find_real_trace(args.real_trace)
    if real_trace is not None:
        real_plan = out / "real_plan_ep16x4.json"
        st.run("5. solve EP16 over 4 nodes on the real DeepSeek-V2-Lite trace (first half of requests)", "solve",
               "--trace", str(real_trace), "--ep-size", "16", "--ranks-per-node", "4", "--time-limit",
               str(args.real_solve_time), "--train-fraction", "0.5", "--deterministic",
               "--model-name", "deepseek-ai/DeepSeek-V2-Lite-Chat", "--out", str(real_plan))
        js = st.run("6. score it against vLLM's layouts, EPLB and the co-activation greedy on held-out requests",
                    "evaluate", "--plan", str(real_plan), "--trace", str(real_trace), "--json", capture=True)
        scores = json.loads(js)
        (out / "real_trace_scores.json").write_text(json.dumps(scores, indent=1) + "\n")
        real_section += _real_table(scores, st.log[-2][1], st.log[-1][1])
    else:
        print(f"\n=== 5-6. cluster scale on a real trace: skipped\n{missing}", flush=True)
        real_section.append(f"Skipped: {missing}")

    report = out / "report.md"
    serving = (out / "serving" / "serving_report.md").read_text()
    plan_info = json.loads(plan.read_text())["solver"]
    lines = [
        "# vllm-moeplace demo report",
        "",
        f"Total time {time.perf_counter() - t_start:.0f} s on {os.cpu_count()} cores. Commands, in order:",
        "",
        *[f"{i + 1}. `{cmd}` ({dt:.0f} s)" for i, (_, cmd, dt) in enumerate(st.log)],
        "",
        "## The tiny model's plan",
        "",
        "```json",
        json.dumps({k: plan_info.get(k) for k in ("method", "objective", "status", "objective_value", "bound", "gap",
                                                  "train_fraction", "time_s") if k in plan_info}, indent=1),
        "```",
        "",
        serving.replace("# Serving benchmark", "## Serving benchmark", 1),
        "The demo serves each layout once (`--rounds 1`) to stay short, so its timings are one run each, not a "
        "comparison: single runs here differ by more than the layouts do. The timing comparison is the "
        "benchmark's interleaved protocol (3 rounds, warm-up excluded, median [min-max]): "
        "benchmarks/results/serving.md. The token, routing and traffic checks above hold exactly in every run.",
        "",
        *real_section,
        "",
    ]
    report.write_text("\n".join(lines))
    print(f"\nreport: {report}")
    return 0


def find_real_trace(given: Path | None) -> tuple[Path | None, str]:
    """(trace to use, None) or (None, why it is missing and the exact command that gets it)."""
    if given is not None:
        return (given, "") if given.exists() else (None, f"real trace {given} not found.")
    found = locate(REAL.name)
    if found is not None:
        return found, ""
    return None, (
        f"the real DeepSeek-V2-Lite trace is neither in the shared data ({shared_data_root() / str(REAL.shared_trace)}) "
        f"nor in the cache ({cached_trace(REAL)}). Get it with `{fetch_command(REAL)}` "
        f"(~{REAL.size_mb} MB from {REAL.source}, checksummed), then run the demo again."
    )


def _real_table(scores: dict, solve_cmd: str, eval_cmd: str) -> list[str]:
    rows = [
        f"Plan: `{solve_cmd}`; scores: `{eval_cmd}`. Held-out = requests not used to build any layout.",
        "",
        "| layout | node_sends (held-out) | x linear | rank_sends | imbalance |",
        "|---|---|---|---|---|",
    ]
    lin = scores.get("linear", {}).get("held_out", {}).get("node_sends")
    for name, s in scores.items():
        h = s["held_out"]
        ratio = f"{h['node_sends'] / lin:.3f}" if lin else "-"
        label = "moeplace solve" if s.get("kind") == "plan" else name
        rows.append(f"| {label} | {h['node_sends']:.3f} | {ratio} | {h['rank_sends']:.3f} | {h['imbalance']:.3f} |")
    return rows
