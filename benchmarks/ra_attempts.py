"""Bounded attempts at issue 12's Llama-4 line, one setting per run (rows appended to a results page).

    nice -n 5 python benchmarks/ra_attempts.py --copies 4 --cap 1.05 [--max-share 1.10] [--balance-risk 0]
        [--signature-layers 0] [--seeds 0,1,2] [--time-limit 10]

Per seed (random request halves, `request_aware.random_split`): the solver's plan without request
groups (requests spread evenly: the line's baseline) and with `--request-groups 2` under the same
options, both `--deterministic`; held-out decode node_sends aware / plain, held-out rank imbalance
(`routed_metrics`, exact replica rule) and the larger group's share of held-out requests, for the
router one request at a time and with a 10-request window. Plans are cached (`ra_drift_floor.py`'s
cache), so a setting re-run or shared with the floor script is scored without solving again.
Appends to benchmarks/results/ra_attempts.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _common import command, commit, loadavg  # noqa: E402  (benchmarks/ is sys.path[0])
from ra_drift_floor import TOPO, cached_plan, llama4
from request_aware import random_split

from vllm_moeplace.routed_metrics import evaluate_routed, score_routing
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.request_groups import RequestGroupOptions

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "ra_attempts.md"
HEADER = """# Request-aware placement on Llama-4: attempts at issue 12's line

Each block is one `benchmarks/ra_attempts.py` run (its command, commit and load above its rows).
Columns per seed: held-out decode node_sends plain -> aware (router one request at a time), aware /
plain, held-out rank imbalance aware (plain), larger group's share of held-out requests; then the same
for a 10-request router window. The line: aware / plain <= 0.70 with imbalance <= 1.15 and share <= 1.10.

| setting | seed | plain decode | aware decode | aware / plain | imb. aware (plain) | share | window 10: / plain, imb., share | meets line (w1 / w10) | solve s plain / aware |
|---|---|---|---|---|---|---|---|---|---|
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, required=True)
    ap.add_argument("--cap", type=float, required=True)
    ap.add_argument("--max-share", type=float, default=1.10)
    ap.add_argument("--balance-risk", type=float, default=0.0)
    ap.add_argument("--signature-layers", type=int, default=0)
    ap.add_argument("--everywhere", action="store_true", help="RequestGroupOptions.everywhere_copies")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--cache", default="/tmp/ra_plans")
    args = ap.parse_args()
    trace = llama4(Path("/tmp"))
    cache = Path(args.cache)
    label = (f"{args.copies} copies, cap {args.cap:g}, share cap {args.max_share:g}"
             + (f", balance-risk {args.balance_risk:g}" if args.balance_risk else "")
             + (f", signature {args.signature_layers} layers" if args.signature_layers else "")
             + (", hottest copied on every node" if args.everywhere else ""))
    if not OUT.exists():
        OUT.write_text(HEADER)
    with OUT.open("a") as f:
        f.write(f"| `{command()}` (commit {commit()}, load {loadavg()}) | | | | | | | | | |\n")
    for seed in (int(s) for s in args.seeds.split(",")):
        train, held = random_split(trace, seed)
        opts = SolveOptions(time_limit=args.time_limit, deterministic=True, seed=seed, redundant_per_rank=args.copies,
                            max_imbalance=args.cap, balance_risk=args.balance_risk, keep_plan=True)
        key = f"c{args.copies}_cap{args.cap:g}_s{seed}_t{args.time_limit:g}" + (f"_br{args.balance_risk:g}" if args.balance_risk else "")
        plain, tp = cached_plan(cache, f"plain_{key}", train, opts, None)
        akey = key + (f"_ms{args.max_share:g}" if args.max_share != 1.10 else "") + (
            f"_sig{args.signature_layers}" if args.signature_layers else "") + ("_ev" if args.everywhere else "")
        aware, ta = cached_plan(cache, f"aware_{akey}", train, opts,
                                RequestGroupOptions(2, args.signature_layers, args.max_share, args.everywhere))
        base = evaluate_routed(plain.layers, TOPO, held, np.full(held.num_tokens, -1), ())
        s1, s10 = score_routing(aware, held), score_routing(aware, held, window=10)
        p = base.node_sends_decode

        def meets(s) -> str:
            return "yes" if (s.routed.node_sends_decode <= 0.70 * p and s.routed.imbalance <= 1.15
                             and s.share_imbalance <= 1.10) else "no"

        row = (f"| {label} | {seed} | {p:.3f} | {s1.routed.node_sends_decode:.3f} | **{s1.routed.node_sends_decode / p:.3f}** | "
               f"{s1.routed.imbalance:.3f} ({base.imbalance:.3f}) | {s1.share_imbalance:.2f} | "
               f"{s10.routed.node_sends_decode / p:.3f}, {s10.routed.imbalance:.3f}, {s10.share_imbalance:.2f} | "
               f"{meets(s1)} / {meets(s10)} | {tp:.0f} / {ta:.0f} |")
        print(row, flush=True)
        with OUT.open("a") as f:
            f.write(row + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
