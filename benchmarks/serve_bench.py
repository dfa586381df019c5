"""Serving benchmark on real vLLM (CPU, TP2 + expert parallel): vLLM's default layout vs a plan
solved from a profiled trace vs a random permutation plan, same workload.

Pipeline: tiny model -> `moeplace profile` -> `moeplace solve` -> `moeplace random-plan` ->
`moeplace bench` (3 interleaved rounds, a fresh `vllm serve` per layout and round). Writes benchmarks/results/serving.md (+ JSON).
Run it under the shared lock (it starts vLLM engines):

    flock /tmp/moeplace-heavy.lock python benchmarks/serve_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, command, commit, loadavg, machine  # noqa: E402


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def moeplace(*args: str) -> None:
    print("$ moeplace " + " ".join(args), flush=True)
    from vllm_moeplace.bench.server import CPU_ENV

    # TP2 on CPU: one core per worker (vLLM's automatic binding asserts on a 2-core machine)
    env = {**os.environ, **CPU_ENV, **{k: os.environ[k] for k in CPU_ENV if k in os.environ}}
    subprocess.run([sys.executable, "-m", "vllm_moeplace", *args], check=True, env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per layout (moeplace bench --rounds)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--keep", type=Path, default=None, help="also copy the bench folder (server logs, traces) here")
    args = ap.parse_args()
    from vllm_moeplace.tiny_model import default_prompts

    t0, load0, up0 = time.perf_counter(), loadavg(), uptime()
    with tempfile.TemporaryDirectory(prefix="moeplace-serve-bench-") as d:
        d = Path(d)
        model, prompts = d / "model", d / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(r) + "\n" for r in default_prompts()))
        moeplace("tiny-model", "--arch", "qwen3_moe", "--layers", "4", "--experts", "16", "--top-k", "4", "--out", str(model))
        moeplace("profile", str(model), "--prompts", str(prompts), "--out", str(d / "trace.npz"), "--max-tokens",
                 str(args.max_tokens), "--tensor-parallel-size", "2", "--enable-expert-parallel", "--dtype", "float32",
                 "--moe-cpu-ep-fix", "--no-progress")
        moeplace("solve", "--trace", str(d / "trace.npz"), "--ep-size", "2", "--ranks-per-node", "1", "--time-limit", "20",
                 "--train-fraction", "0.5", "--max-imbalance", "1.1", "--deterministic", "--out", str(d / "solved.json"))
        # the demo's kind of plan: one redundant copy per rank, served by the mapping mechanism
        moeplace("solve", "--trace", str(d / "trace.npz"), "--ep-size", "2", "--ranks-per-node", "1", "--time-limit", "20",
                 "--train-fraction", "0.5", "--max-imbalance", "1.1", "--redundant-per-rank", "1", "--deterministic",
                 "--out", str(d / "copies.json"))
        moeplace("random-plan", "--model", str(model), "--ep-size", "2", "--ranks-per-node", "1", "--seed", "1",
                 "--out", str(d / "random.json"))
        moeplace("bench", str(model), "--plan", str(d / "solved.json"), "--plan", str(d / "random.json"),
                 "--plan", str(d / "copies.json"),
                 "--prompts", str(prompts), "--max-tokens", str(args.max_tokens), "--concurrency",
                 str(args.concurrency), "--repeat", str(args.repeat), "--rounds", str(args.rounds), "--out", str(d / "bench"))
        report = (d / "bench" / "serving_report.md").read_text()
        if args.keep is not None:
            shutil.copytree(d / "bench", args.keep, dirs_exist_ok=True)
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(d / "bench" / "serving_results.json", args.out / "serving.json")
        # per-request timings of every run: the data behind the TTFT explanation on the page
        shutil.copy(d / "bench" / "serving_requests.json", args.out / "serving_requests.json")
    header = (
        f"Command: `flock /tmp/moeplace-heavy.lock {command()}` (commit {commit()}, {time.perf_counter() - t0:.0f} s)\n\n"
        f"Machine: {machine()}; load average before {load0}, after {loadavg()}.\n\n"
        f"`uptime` before: `{up0}`; after: `{uptime()}`. The machine is shared with other jobs (2 cores), so "
        "timings move between runs of the same layout; a difference inside the min-max spread over rounds "
        "is no difference.\n\n"
        "Layouts: `default` = vLLM's linear layout (with only the CPU EP kernel fix); `plan0:solved` = "
        "`moeplace solve` on a trace profiled from the same model and prompts (first half of requests); "
        "`plan1:random` = a seeded random permutation; `plan2:copies` = `moeplace solve` as for plan0 with one "
        "redundant copy per rank (the demo's kind of plan, served by the mapping mechanism).\n\n"
    )
    (args.out / "serving.md").write_text(report.replace("\n\n", "\n\n" + header, 1))
    print(f"wrote {args.out / 'serving.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
