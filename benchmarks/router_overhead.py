"""What `moeplace route` adds to a request's latency (issue 12 item 4), on real vLLM servers.

    python benchmarks/router_overhead.py [--rounds 3] [--max-tokens 16]

Two TP1 `vllm serve` processes (tiny Qwen3-MoE, float32, eager) stand for two DP ranks, rank 0
doubling as the signature server (routing capture), as in tests/test_router_e2e.py. The router's
plan has two centroids: the real signatures of the first prompt of two labels of the embedded
prompt set. Per round, the prompt set is sent one request at a time (concurrency 1) in the order
A B B A: A = straight to a rank's server (alternating ranks, what vLLM's own spreading would do),
B = through the router (signature prefill at rank 0, then the chosen rank). Reported: median and
spread (min-max over rounds of each round's median) of time to first token and of whole-request
latency, and the router's own median signature time. On this 2-core box both servers share the
cores, so the signature prefill competes with the request itself.

Writes benchmarks/results/router_overhead.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np

from _common import command, commit, loadavg, machine  # noqa: E402  (benchmarks/ is sys.path[0])

from vllm_moeplace.bench.load import run_load
from vllm_moeplace.bench.server import VllmServer
from vllm_moeplace.request_routing import normalize_counts
from vllm_moeplace.router.signature import SignatureClient
from vllm_moeplace.tiny_model import TinyModelSpec, build_tiny_model, default_prompts

OUT = Path(__file__).resolve().parent / "results" / "router_overhead.md"
ENGINE = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024"]
LAYERS = [1, 2, 3]


def signature(url: str, model: str, prompt: str) -> list[float]:
    async def go():
        async with httpx.AsyncClient(timeout=120) as c:
            sc = SignatureClient(c, url, layers=LAYERS, num_experts=16)
            await sc.check()
            return await sc.counts("/v1/completions", {"model": model, "prompt": prompt})

    return normalize_counts(asyncio.run(go())).ravel().tolist()


def start_router(plan: Path, backends: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    f = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "vllm_moeplace", "route", "--plan", str(plan), *sum(
        (["--backend", b] for b in backends), []), "--port", "0"], stdout=f, stderr=subprocess.STDOUT)
    for _ in range(240):
        text = log.read_text()
        if "listening on " in text:
            return proc, text.split("listening on ", 1)[1].split()[0]
        if proc.poll() is not None:
            raise RuntimeError(text)
        time.sleep(0.5)
    raise RuntimeError("router did not start: " + log.read_text())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    args = p.parse_args()
    records = default_prompts()
    prompts = [r["prompt"] for r in records]
    labels = sorted({r["label"] for r in records})
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = str(build_tiny_model(d / "model", TinyModelSpec(num_layers=4, num_experts=16, top_k=4)))
        s0 = VllmServer(model, ENGINE + ["--worker-extension-cls", "vllm_moeplace.router.extension.RouterSignatureExtension",
                                         "--additional-config", json.dumps({"moeplace_capture": {"weights": False}})],
                        env={"VLLM_MOEPLACE_CAPTURE": "1", "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"},
                        log_path=d / "rank0.log")
        s1 = VllmServer(model, ENGINE, env={"VLLM_CPU_OMP_THREADS_BIND": "1"}, log_path=d / "rank1.log")
        threads = [threading.Thread(target=s.start) for s in (s0, s1)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        router = None
        try:
            subprocess.run([sys.executable, "-m", "vllm_moeplace", "random-plan", "--model", model, "--ep-size", "2",
                            "--ranks-per-node", "1", "--out", str(d / "base.json")], check=True, capture_output=True)
            plan = json.loads((d / "base.json").read_text())
            firsts = [next(r["prompt"] for r in records if r["label"] == lab) for lab in labels[:2]]
            plan["request_routing"] = {
                "version": 1, "signature": {"kind": "prefill_expert_histogram", "layers": LAYERS},
                "groups": [{"ranks": [g], "centroid": signature(s0.base_url, model, firsts[g])} for g in (0, 1)]}
            (d / "plan.json").write_text(json.dumps(plan))
            router, url = start_router(d / "plan.json", [s0.base_url, s1.base_url], d / "router.log")
            name = s0.model_name()
            # warm-up (not measured): every path once
            for u in (s0.base_url, s1.base_url, url):
                run_load(u, name, prompts[:2], max_tokens=args.max_tokens, concurrency=1)

            def direct() -> list:
                out = []
                for i, pr in enumerate(prompts):
                    out += run_load((s0, s1)[i % 2].base_url, name, [pr], max_tokens=args.max_tokens,
                                    concurrency=1).requests
                return out

            def routed() -> list:
                return list(run_load(url, name, prompts, max_tokens=args.max_tokens, concurrency=1).requests)

            rows: dict[str, list[tuple[float, float]]] = {"direct": [], "router": []}
            for rnd in range(args.rounds):
                for kind in ("direct", "router", "router", "direct"):
                    reqs = direct() if kind == "direct" else routed()
                    rows[kind].append((float(np.median([r.ttft for r in reqs])) * 1e3,
                                       float(np.median([r.done - r.sent for r in reqs])) * 1e3))
                    print(rnd, kind, rows[kind][-1], flush=True)
            stats = json.loads(urllib.request.urlopen(url + "/moeplace/router", timeout=10).read())
        finally:
            if router is not None:
                router.terminate()
                router.wait(timeout=30)
            s0.stop()
            s1.stop()

    def cell(xs: list[float]) -> str:
        return f"{np.median(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}]"

    lines = ["# Router overhead on real vLLM servers (issue 12, `moeplace route`)", "", "```sh", command(), "```", "",
             f"Commit {commit()}; machine: {machine()}; load average at start of writing {loadavg()}.", "",
             f"Two TP1 `vllm serve` (tiny Qwen3-MoE 4 layers x 16 experts top-4, float32, eager), {len(prompts)} "
             f"prompts of the embedded set, {args.max_tokens} output tokens, concurrency 1, {args.rounds} rounds of "
             "A B B A (A = direct to alternating ranks, B = through the router). Cells: median over the measured "
             "runs of each run's median, [min-max] of the run medians.", "",
             "| path | time to first token ms | request latency ms | runs |", "|---|---|---|---|"]
    for kind, vals in rows.items():
        lines.append(f"| {kind} | {cell([v[0] for v in vals])} | {cell([v[1] for v in vals])} | {len(vals)} |")
    lines += ["", f"Router: median signature time {stats['signature_ms_median']:.1f} ms; requests per group "
              f"{stats['requests_per_group']}; fallbacks {stats['fallbacks'] or 'none'}.", ""]
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
