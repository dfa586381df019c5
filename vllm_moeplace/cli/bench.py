"""`moeplace bench`: serve a model with vLLM's default layout and with plans; compare."""

from __future__ import annotations

import argparse
from pathlib import Path

from vllm_moeplace.errors import MoeplaceError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder (e.g. from `moeplace tiny-model`)")
    p.add_argument("--plan", action="append", default=[], type=Path, help="placement plan (repeatable)")
    p.add_argument("--prompts", type=Path, default=None,
                   help="prompt file (JSON lines with prompt/label, or text); default: the embedded prompt set")
    p.add_argument("--repeat", type=int, default=4, help="send the prompt set this many times (a longer measurement)")
    p.add_argument("--rounds", type=int, default=3,
                   help="serve each layout this many times, interleaved (A B B A A B ...), each on a fresh server; "
                        "timings are reported as median [min-max] over rounds")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up requests each server gets before measuring, excluded from every number "
                        "(default: --concurrency)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--ranks-per-node", type=int, default=1, help="virtual topology for traffic counting")
    p.add_argument("--out", type=Path, required=True, help="output folder (report, results JSON, traces, logs)")


def run(args: argparse.Namespace) -> int:
    from vllm_moeplace.bench.serve_bench import run_benchmark
    from vllm_moeplace.profiling.prompts import read_prompts
    from vllm_moeplace.tiny_model import default_prompts

    if args.prompts is None:
        records = default_prompts()
        prompts, labels = [r["prompt"] for r in records], [r["label"] for r in records]
    else:
        recs = read_prompts(args.prompts)
        prompts, labels = [r.prompt for r in recs], [r.label or "" for r in recs]
    if args.repeat < 1:
        raise MoeplaceError(f"--repeat must be >= 1, got {args.repeat}")
    if args.rounds < 1:
        raise MoeplaceError(f"--rounds must be >= 1, got {args.rounds}")
    if args.warmup is not None and args.warmup < 0:
        raise MoeplaceError(f"--warmup must be >= 0, got {args.warmup}")
    prompts, labels = prompts * args.repeat, labels * args.repeat
    res = run_benchmark(args.model, args.plan, prompts, out_dir=args.out, labels=labels,
                        max_tokens=args.max_tokens, concurrency=args.concurrency, ranks_per_node=args.ranks_per_node,
                        rounds=args.rounds, warmup=args.warmup)
    print((args.out / "serving_report.md").read_text())
    bad = [n for n, x in res["layouts"].items()
           if not (x["tokens_identical_to_default"] in (None, True) and x["agrees_within_1pct"] and x.get("replica_rule_honoured") in (None, 1.0))]
    if bad:
        print(f"moeplace bench: FAILED checks for {bad} (tokens differ from the default layout, counted traffic "
              "disagrees with moeplace evaluate, or the engine's copy choices differ from the replica rule)")
        return 1
    print(f"report: {args.out / 'serving_report.md'}")
    return 0
