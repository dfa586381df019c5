"""Model-load time with and without a placement plan (target: <= 5% extra).

Runs the offline engine (TP2 + EP on CPU, float32, eager) alternately with vLLM's default layout
(plus the CPU EP kernel fix, which the default layout needs to run at all) and with a plan, and
reads each worker's own "Loading weights took X seconds" log line (DefaultModelLoader: checkpoint
streaming + weight loaders, which is where the remapper / the mapped loader runs).

Two plan kinds:
- `--plan-kind permutation` (default): a random permutation, served by renaming checkpoint
  tensors (writes benchmarks/results/load_time.md);
- `--plan-kind copies`: the solver's plan with `--redundant-per-rank N`, served by the mapping
  mechanism, each copy written by vLLM's loader (writes benchmarks/results/load_time_copies.md).
  Use a model big enough that loading takes seconds, not the 0.01 s log resolution:

    python benchmarks/load_time.py --plan-kind copies --repeats 4 --layers 4 --experts 64 \
        --hidden 1024 --moe-intermediate 512
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

from _common import machine  # noqa: E402  (benchmarks/ is sys.path[0])
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_moeplace.cli.random_plan import random_plan  # noqa: E402
from vllm_moeplace.tiny_model import build_tiny_model  # noqa: E402

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
       "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
LOAD_RE = re.compile(r"Loading weights took ([0-9.]+) seconds")




def one_run(model: Path, out: Path, plan: Path | None) -> dict:
    flags = ["--plan", str(plan)] if plan else ["--cpu-ep-fix"]
    cmd = [sys.executable, "-m", "vllm_moeplace.serving.probe", "--model", str(model), "--tp", "2",
           "--max-tokens", "1", "--no-inspect", "--out", str(out), *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=600)
    if r.returncode:
        raise SystemExit(f"run failed:\n{r.stderr[-3000:]}")
    loads = [float(x) for x in LOAD_RE.findall(r.stderr + r.stdout)]
    if not loads:  # vLLM logs it once per process; only some workers' lines reach the console
        raise SystemExit("no 'Loading weights took' line in the engine's log")
    return {"load_s": max(loads), "init_s": json.loads(out.read_text())["init_seconds"]}


def remapper_cost(model: Path, plan_path: Path, repeats: int = 5) -> tuple[float, float, int]:
    """In-process, no engine: stream the checkpoint as vLLM's loader does (safetensors iterator,
    every tensor touched) with and without the remapper. Returns (plain s, remapped s, tensors)."""
    import torch
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

    from vllm_moeplace.plan import load_plan
    from vllm_moeplace.serving.arch import ARCHITECTURES
    from vllm_moeplace.serving.remap import WeightRemapper

    files = sorted(str(f) for f in model.glob("*.safetensors"))
    plan = load_plan(plan_path)

    def stream(remap: bool) -> tuple[float, int]:
        it = safetensors_weights_iterator(files, False)
        if remap:
            it = WeightRemapper(plan, ARCHITECTURES["Qwen3MoeForCausalLM"])(it)
        t, n, acc = time.perf_counter(), 0, 0.0
        for _, tensor in it:
            acc += float(tensor.reshape(-1)[0])  # touch each tensor like a weight loader would
            n += 1
        return time.perf_counter() - t, n

    plain, remapped = [], []
    for i in range(repeats):
        for remap in ((False, True) if i % 2 == 0 else (True, False)):
            dt, n = stream(remap)
            (remapped if remap else plain).append(dt)
    return statistics.median(plain), statistics.median(remapped), n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default=str(ROOT / "out" / "bench" / "load_time"))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--moe-intermediate", type=int, default=256)
    p.add_argument("--plan-kind", choices=("permutation", "copies"), default="permutation")
    p.add_argument("--redundant-per-rank", type=int, default=1, help="copies per rank (--plan-kind copies)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.plan_kind == "copies":
        return copies_main(a)
    a.out = a.out or str(ROOT / "benchmarks" / "results" / "load_time.md")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work, a)
    plan_path = work / "plan.json"
    random_plan(model, ep_size=2, seed=0).save(plan_path)
    ckpt_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20

    load_before = os.getloadavg()
    plain_s, remap_s, n_tensors = remapper_cost(model, plan_path)
    runs: dict[str, list[dict]] = {"default": [], "plan": []}
    for i in range(a.repeats):
        # alternate the order so drift (page cache, other load) hits both sides alike
        order = ["default", "plan"] if i % 2 == 0 else ["plan", "default"]
        for kind in order:
            res = one_run(model, work / f"{kind}_{i}.json", plan_path if kind == "plan" else None)
            runs[kind].append(res)
            print(f"[{i}] {kind:7s} load {res['load_s']:.2f}s  engine init {res['init_s']:.1f}s", flush=True)
    load_after = os.getloadavg()

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[kind])

    d_load, p_load = med("default", "load_s"), med("plan", "load_s")
    d_init, p_init = med("default", "init_s"), med("plan", "init_s")
    extra = 100 * (p_load - d_load) / d_load
    cmd = f"flock /tmp/moeplace-heavy.lock python benchmarks/load_time.py --repeats {a.repeats}"
    md = f"""# Model-load time with and without a placement plan

Target: a plan adds at most 5% to model loading.

| | default layout (+ CPU EP fix) | random-permutation plan | extra |
|---|---|---|---|
| weight loading, median of {a.repeats} (s, slowest logged worker) | {d_load:.2f} | {p_load:.2f} | **{extra:+.1f}%** |
| whole engine init, median (s) | {d_init:.1f} | {p_init:.1f} | {100 * (p_init - d_init) / d_init:+.1f}% |

Isolated cost of the remapper (in-process, no engine; streaming all {n_tensors} checkpoint tensors
through vLLM's `safetensors_weights_iterator`, median of 5): {1000 * plain_s:.1f} ms plain,
{1000 * remap_s:.1f} ms with the plan's renaming + router-row permutation, i.e.
**{1000 * (remap_s - plain_s):+.1f} ms** per worker = {100 * (remap_s - plain_s) / max(d_load, 1e-9):+.1f}% of the
median weight-loading time above.

Spread of weight loading over runs: default {min(r['load_s'] for r in runs['default']):.2f}-{max(r['load_s'] for r in runs['default']):.2f} s,
plan {min(r['load_s'] for r in runs['plan']):.2f}-{max(r['load_s'] for r in runs['plan']):.2f} s. At ~0.1 s of loading (page-cached checkpoint) and 0.01 s log
resolution, run-to-run noise on this shared 2-core box is larger than the 5% target; the isolated
remapper cost is the figure that measures what the plan adds.

Per run (load s / init s): default {[(r['load_s'], round(r['init_s'], 1)) for r in runs['default']]};
plan {[(r['load_s'], round(r['init_s'], 1)) for r in runs['plan']]}.

Weight loading = the workers' own `Loading weights took X seconds` lines (vLLM's
DefaultModelLoader: reading the checkpoint and running the weight loaders, where the plan's
renaming and router-row permutation happen; vLLM prints 2 decimals, so 0.01 s resolution;
with TP2 only rank 0's line reaches the console here).
Engine init = `LLM(...)` construction in the probe (process spawn, load, KV cache, warm-up), noisy.

- Model: tiny random Qwen3-MoE, {a.layers} layers, {a.experts} experts, hidden {a.hidden},
  expert intermediate {a.moe_intermediate}, float32, {ckpt_mb:.0f} MiB of safetensors.
- Serving: vllm-cpu 0.32.0, TP2 + EP (ep_size 2), eager, `VLLM_CPU_OMP_THREADS_BIND='0|1'`.
- Machine: {machine()}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}
  (1-min; the box is shared with other engineers, heavy jobs serialised by the lock).
- Command: `{cmd}`
- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
"""
    Path(a.out).write_text(md)
    print(md)


def build_model(work: Path, a: argparse.Namespace) -> Path:
    spec = dict(arch="qwen3_moe", num_layers=a.layers, num_experts=a.experts, hidden_size=a.hidden,
                moe_intermediate_size=a.moe_intermediate, top_k=2)
    model = work / "model"
    stamp = work / "spec.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == spec):
        build_tiny_model(model, **spec)
        stamp.write_text(json.dumps(spec))
    return model


def copies_main(a: argparse.Namespace) -> None:
    """Default layout vs the solver's plan with redundant copies (mapping mechanism)."""
    from vllm_moeplace.solver.options import SolveOptions
    from vllm_moeplace.solver.pipeline import solve
    from vllm_moeplace.plan import Topology
    from vllm_moeplace.tiny_model import skewed_routing_trace

    out = Path(a.out or ROOT / "benchmarks" / "results" / "load_time_copies.md")
    work = Path(a.work + "_copies")
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work, a)
    plan = solve(skewed_routing_trace(model, 2000, 2, 0), Topology.uniform(2, 1),
                 SolveOptions(redundant_per_rank=a.redundant_per_rank, deterministic=True, time_limit=5.0,
                              max_imbalance=1.3), model_name=str(model))
    plan_path = work / "plan.json"
    plan.save(plan_path)
    S0, S = a.experts // 2, plan.slots_per_rank()
    ckpt_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20

    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"default": [], "plan": []}
    for i in range(a.repeats):
        order = ["default", "plan"] if i % 2 == 0 else ["plan", "default"]  # A B, B A, ...
        for kind in order:
            res = one_run(model, work / f"{kind}_{i}.json", plan_path if kind == "plan" else None)
            runs[kind].append(res)
            print(f"[{i}] {kind:7s} load {res['load_s']:.2f}s  engine init {res['init_s']:.1f}s", flush=True)
    load_after = os.getloadavg()
    load = {k: [r["load_s"] for r in v] for k, v in runs.items()}
    d, c = statistics.median(load["default"]), statistics.median(load["plan"])
    paired = [100 * (pl - de) / de for de, pl in zip(load["default"], load["plan"])]
    extra = 100 * (c - d) / d
    spread_d = (min(load["default"]), max(load["default"]))
    inside = spread_d[0] <= c <= spread_d[1]
    cmd = (f"python benchmarks/load_time.py --plan-kind copies --repeats {a.repeats} --layers {a.layers} "
           f"--experts {a.experts} --hidden {a.hidden} --moe-intermediate {a.moe_intermediate} "
           f"--redundant-per-rank {a.redundant_per_rank}")
    md = f"""# Model-load time with redundant copies (mapping mechanism) vs the default layout

Target (issue 10): extra weight-load time with a redundant plan <= 5% of the default layout's.

| | default layout (+ CPU EP fix) | solver plan, {a.redundant_per_rank} copy per rank | extra |
|---|---|---|---|
| weight loading, median of {a.repeats} (s, slowest logged worker) | {d:.2f} ({spread_d[0]:.2f}-{spread_d[1]:.2f}) | {c:.2f} ({min(load['plan']):.2f}-{max(load['plan']):.2f}) | **{extra:+.1f}%** ({'inside' if inside else 'outside'} the default's spread) |
| paired rounds (plan vs default, same round) | | | {', '.join(f'{x:+.1f}%' for x in paired)} |
| whole engine init, median (s) | {statistics.median(r['init_s'] for r in runs['default']):.1f} | {statistics.median(r['init_s'] for r in runs['plan']):.1f} | |

What the copies must cost: each rank holds {S} expert slots per MoE layer instead of {S0}, so it
writes {100 * (S - S0) / S0:.1f}% more expert bytes; the checkpoint it reads is the same. vLLM's
loader writes each copy from the same checkpoint tensor (one read, {S - S0} extra copy per layer and
rank). Anything above that share would be the mechanism's own overhead.

Per run (load s / init s): default {[(r['load_s'], round(r['init_s'], 1)) for r in runs['default']]};
plan {[(r['load_s'], round(r['init_s'], 1)) for r in runs['plan']]}.

- Model: tiny random Qwen3-MoE, {a.layers} layers, {a.experts} experts, top-2, hidden {a.hidden},
  expert intermediate {a.moe_intermediate}, float32, {ckpt_mb:.0f} MiB of safetensors (page-cached
  after the first run; the first run of each kind is inside the rounds, not excluded).
- Plan: `moeplace solve --redundant-per-rank {a.redundant_per_rank}` on a skewed synthetic trace
  (EP2, deterministic): {S} slots per rank, {2 * S} physical experts for {a.experts} logical.
- Serving: vllm-cpu 0.32.0, offline engine, TP2 + EP (ep_size 2), eager, `VLLM_CPU_OMP_THREADS_BIND='0|1'`.
  Weight loading = the workers' own `Loading weights took X seconds` lines (2 decimals).
- Machine: {machine()}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1-min).
- Command: `{cmd}`
- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
"""
    out.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
