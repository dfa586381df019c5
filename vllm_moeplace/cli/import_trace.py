"""`moeplace import --format FORMAT SRC... --out trace.npz`: convert a published trace to the native .npz
(or, for sources that hold expert counts only, to a load-only .npz, `load_trace.py`)."""

from __future__ import annotations

import argparse
import shlex
import sys

from vllm_moeplace.load_trace import LoadTrace, save_load_trace
from vllm_moeplace.profiling.importers import FORMATS, ImportOptions, import_trace
from vllm_moeplace.trace import save_trace


def _layer_ids(text: str) -> tuple[int, ...]:
    """'1-26' or '1,3,5' or '1-47:2' (start-stop:step, inclusive) -> decoder-layer ids."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                rng, _, step = part.partition(":")
                lo, hi = (int(x) for x in rng.split("-"))
                out.extend(range(lo, hi + 1, int(step or 1)))
            else:
                out.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. '1-26', '1,3,5' or '1-47:2', got {text!r}") from None
    return tuple(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", nargs="+", help="source files or folders (see docs/formats.md for each format)")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="source format")
    parser.add_argument("--out", required=True, help="native trace to write (.npz, written atomically)")
    parser.add_argument("--model-name", help="model name recorded in meta (default: the format's model, if known)")
    parser.add_argument("--num-experts", type=int, help="routed experts per MoE layer (default: the format's, else max id + 1 with a note)")
    parser.add_argument("--layer-ids", type=_layer_ids, help="decoder-layer ids of the MoE layers, e.g. '1-26' or '1-47:2'")
    parser.add_argument("--label", help="label for all requests of a flat source (default: the folder name, where the format has one)")


def _command(args: argparse.Namespace) -> str:
    cmd = ["moeplace", "import", "--format", args.format, *args.src, "--out", args.out]
    for flag, value in (("--model-name", args.model_name), ("--num-experts", args.num_experts), ("--label", args.label)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.layer_ids is not None:
        cmd += ["--layer-ids", ",".join(map(str, args.layer_ids))]
    return shlex.join(cmd)


def run(args: argparse.Namespace) -> int:
    opts = ImportOptions(model_name=args.model_name, num_experts=args.num_experts, layer_ids=args.layer_ids, label=args.label)
    trace = import_trace(args.format, args.src, opts)
    # how the file was made, so reports built from it can show the full recipe
    trace.meta["import_command"] = _command(args)
    for note in trace.meta.get("import_notes", []):
        print(f"moeplace import: note: {note}", file=sys.stderr)
    if isinstance(trace, LoadTrace):
        save_load_trace(args.out, trace)
        print(
            f"wrote {args.out}: load-only trace, {trace.num_windows} {trace.meta.get('window', 'window')}(s), "
            f"{trace.num_layers} MoE layers {trace.layer_ids.min()}..{trace.layer_ids.max()}, {trace.num_experts} experts, "
            f"{int(trace.expert_load.sum())} routed token-slots; solve it with --objective balance"
        )
        return 0
    save_trace(args.out, trace)
    labels = "" if trace.labels is None else f", {len(set(trace.labels.tolist()))} label(s)"
    print(
        f"wrote {args.out}: {trace.num_tokens} tokens ({int(trace.is_prefill.sum())} prefill), "
        f"{trace.num_requests} requests, {trace.num_layers} MoE layers {trace.layer_ids.min()}..{trace.layer_ids.max()}, "
        f"top_k {trace.top_k}, {trace.num_experts} experts{labels}"
    )
    return 0
