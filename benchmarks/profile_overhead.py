"""Overhead of router capture: the same `moeplace profile` pass with vs without capture.

For each model: one engine WITHOUT capture and one WITH (`--topk-weights` off, as by default),
each runs one untimed warm-up pass then `--repeats` timed passes of the same prompt set (engine
start excluded: it is a one-off cost per profiling job). Reported: median and min wall time of
the generation loop, tokens/s, overhead = capture / baseline - 1 (on medians).

    flock /tmp/moeplace-heavy.lock python benchmarks/profile_overhead.py \
        --out benchmarks/results/profile_overhead.md

Models are built with the embedded tiny-model builder (random weights; routing cost is what is
measured, and the capture cost per token is independent of the weights). The default tiny model
is the worst case: its forward is so cheap that fixed per-step costs weigh most.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from _common import machine  # noqa: E402  (benchmarks/ is sys.path[0])
import tempfile
import time
from pathlib import Path

MODELS = {
    # name: tiny-model spec
    "tiny (2 layers, 8 experts, top-2, hidden 128)": dict(num_layers=2, num_experts=8, top_k=2),
    "small (6 layers, 32 experts, top-4, hidden 512)": dict(
        num_layers=6, num_experts=32, top_k=4, hidden_size=512, moe_intermediate_size=256
    ),
}




def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _passes(session, prompts, repeats: int) -> list[tuple[float, int, float]]:
    """(seconds, tokens, seconds spent in the worker's host-side recording) per timed pass."""
    session.run(prompts, progress=False)  # warm-up, untimed
    out = []
    for _ in range(repeats):
        p, g, s, drained = session.run(prompts, progress=False)
        out.append((s, p + g, sum(d.get("host_seconds", 0.0) for d in drained)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-copies", type=int, default=4, help="copies of the 24 default prompts per pass")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--enforce-eager", action="store_true", help="no torch.compile (default: compiled)")
    ap.add_argument("--only", choices=sorted(MODELS), help="one model only")
    ap.add_argument("--out", help="write the markdown result here")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm_moeplace.profiling.prompts import PromptRecord
    from vllm_moeplace.profiling.runner import ProfileOptions, ProfileSession
    from vllm_moeplace.tiny_model import build_tiny_model, default_prompts

    prompts = [PromptRecord(r["prompt"], r["label"]) for r in default_prompts()] * args.prompt_copies
    load_before = _load()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in MODELS.items():
            if args.only and name != args.only:
                continue
            model = build_tiny_model(Path(tmp) / f"m{len(rows)}", **spec)
            ek = dict(dtype="float32", max_model_len=512, max_num_seqs=args.max_num_seqs)
            if args.enforce_eager:
                ek["enforce_eager"] = True
            opts = ProfileOptions(model=str(model), max_tokens=args.max_tokens, ignore_eos=True, engine_kwargs=ek)
            res = {}
            for cap in (False, True):
                with ProfileSession(opts, with_capture=cap) as s:
                    res[cap] = _passes(s, prompts, args.repeats)
            base = statistics.median(t for t, _, _ in res[False])
            withc = statistics.median(t for t, _, _ in res[True])
            host = statistics.median(h for _, _, h in res[True])
            tokens = res[True][0][1]
            rows.append((name, tokens, base, min(t for t, _, _ in res[False]), withc, min(t for t, _, _ in res[True]), host))
            print(f"{name}: {tokens} tokens/pass, baseline {base:.3f}s, capture {withc:.3f}s (host recording "
                  f"{host:.3f}s), overhead {100 * (withc / base - 1):+.1f}%", flush=True)
    load_after = _load()

    cmd = "flock /tmp/moeplace-heavy.lock python " + " ".join([sys.argv[0], *sys.argv[1:]])
    lines = [
        "# Router-capture overhead of `moeplace profile`",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with `benchmarks/profile_overhead.py`.",
        "",
        f"- Command: `{cmd}`",
        f"- Machine: {machine()}; load average (1/5/15 min) before {load_before}, after {load_after}",
        f"- Workload per pass: {len(prompts)} prompts ({args.prompt_copies} x the embedded default set), "
        f"{args.max_tokens} new tokens each (greedy, ignore_eos), float32, max_num_seqs {args.max_num_seqs}, "
        f"{'enforce_eager' if args.enforce_eager else 'torch.compile (vLLM CPU default)'}; "
        f"1 warm-up + {args.repeats} timed passes per engine; engine start excluded.",
        "- Capture: ids only (no `--topk-weights`), rank 0, TP1.",
        "",
        "| model | tokens / pass | baseline median (min) s | capture median (min) s | of which host-side recording s | tok/s baseline | tok/s capture | overhead (medians) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, tokens, base, bmin, withc, cmin, host in rows:
        lines.append(
            f"| {name} | {tokens} | {base:.3f} ({bmin:.3f}) | {withc:.3f} ({cmin:.3f}) | {host:.3f} | {tokens / base:.0f} | "
            f"{tokens / withc:.0f} | {100 * (withc / base - 1):+.1f}% |"
        )
    lines += ["", "Target: <= 10% overhead."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
