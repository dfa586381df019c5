"""`moeplace analyze trace.npz --out DIR [--ranks 8,16]`: routing statistics as markdown + PNG."""

from __future__ import annotations

import argparse
import shlex

from vllm_moeplace.trace import load_trace


def _ranks(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected EP sizes like '8,16', got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive EP sizes like '8,16', got {text!r}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="native trace (.npz)")
    parser.add_argument("--out", required=True, help="folder for report.md and the PNG figures")
    parser.add_argument("--ranks", type=_ranks, default=(), help="EP sizes for the contiguous-layout rank imbalance, e.g. '8,16'")


def run(args: argparse.Namespace) -> int:
    from vllm_moeplace.profiling.analyze import findings, write_report

    trace = load_trace(args.trace)
    cmd = ["moeplace", "analyze", args.trace, "--out", args.out]
    if args.ranks:
        cmd += ["--ranks", ",".join(map(str, args.ranks))]
    commands = [shlex.join(cmd)]
    if "import_command" in trace.meta:  # an imported trace: show how it was made too
        commands.insert(0, str(trace.meta["import_command"]))
    a = write_report(trace, args.out, commands, args.trace, args.ranks)
    print(f"wrote {args.out}/report.md")
    for line in findings(a):
        print(f"- {line}")
    return 0
