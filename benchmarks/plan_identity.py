"""Recorded check for refactors that must not change behaviour: re-solve fixed cases with
`--deterministic` and compare the plans with reference files written before the change.

    python benchmarks/plan_identity.py record  --ref /tmp/ref17      # before the change
    python benchmarks/plan_identity.py compare --ref /tmp/ref17      # after it

Compared: every layer's layout (exactly) and the `solver` provenance section, except the fields
that measure wall time (they differ run to run by nature). Exit status 1 on any difference.
Cases use the shared real traces (../shared/data); Llama-4 is imported from its raw JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DSV2 = DATA / "traces" / "dsv2lite_puffin_a.npz"
L4_RAW = DATA / "raw" / "orders-in-chaos-llama4-mmlu-abstract_algebra"

# name -> (trace key, solve flags). Modest time limits: --deterministic turns them into fixed work.
CASES: dict[str, tuple[str, list[str]]] = {
    "dsv2_ep16_4": ("dsv2", ["--ep-size", "16", "--ranks-per-node", "4", "--time-limit", "20"]),
    "dsv2_ep8_8": ("dsv2", ["--ep-size", "8", "--ranks-per-node", "1", "--time-limit", "10"]),
    "l4_ep16_4_r1": ("l4", ["--ep-size", "16", "--ranks-per-node", "4", "--redundant-per-rank", "1", "--time-limit", "10"]),
    # The other balance strategy and a second objective: both are moved by the refactor too.
    "dsv2_ep8_8_expected": ("dsv2", ["--ep-size", "8", "--ranks-per-node", "1", "--time-limit", "5",
                                     "--balance-target", "expected", "--max-imbalance", "1.12"]),
    "dsv2_ep16_4_rank_sends": ("dsv2", ["--ep-size", "16", "--ranks-per-node", "4", "--time-limit", "5",
                                        "--objective", "rank_sends"]),
}
COMMON = ["--train-fraction", "0.5", "--deterministic"]
# Wall-clock fields of the provenance: they differ run to run by nature.
TIMING_FIELDS = {"time_s", "timings"}
# Provenance text that names a module: the refactor of issue 17 renamed cpsat_bound -> bounds.
MODULE_RENAMES = {"cpsat_bound": "bounds"}
# Options removed by issue 17 because they measured no better; only their default (off) is accepted
# in a reference plan, so removing them cannot change a plan that did not use them.
REMOVED_OPTIONS = {"balance_folds": 1}
# Options added by issue 13 (the step-time guard and objective), with the values a compare run
# uses: a reference plan predates them. `compare` passes --keep-plan so that what is compared is
# the search's plan; the guard's verdict is printed beside it (its record, `solver.step_time`,
# and the objective's `objective_report` are new sections, not compared).
ADDED_OPTIONS = {"hardware": "h800-deepep", "model_shape": None, "phase_mix": None, "prefill_tokens_per_rank": 4096,
                 "decode_tokens_per_rank": 128, "keep_plan": True}
ADDED_SECTIONS = ("step_time", "objective_report")
COMPARE_FLAGS = ["--keep-plan"]


def _moeplace(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "vllm_moeplace", *args], check=True, cwd=ROOT)


def _traces(ref: Path) -> dict[str, Path]:
    l4 = ref / "llama4.npz"
    if not l4.exists():
        _moeplace("import", "--format", "orders-in-chaos", str(L4_RAW), "--num-experts", "128", "--out", str(l4))
    return {"dsv2": DSV2, "l4": l4}


def solve_case(name: str, ref: Path, out: Path, extra: list[str] | None = None) -> float:
    trace_key, flags = CASES[name]
    t0 = time.monotonic()
    _moeplace("solve", "--trace", str(_traces(ref)[trace_key]), *flags, *COMMON, *(extra or []), "--out", str(out))
    return time.monotonic() - t0


def _normalise(solver: dict) -> dict:
    """The provenance with the renames and removals above applied (a removed option must have been
    at its default, or the comparison fails)."""
    out = json.loads(json.dumps(solver))
    for k in ("method", "bound_method"):
        for old, new in MODULE_RENAMES.items():
            if isinstance(out.get(k), str):
                out[k] = out[k].replace(old, new)
    opts = out.get("options") or {}
    for k, default in REMOVED_OPTIONS.items():
        if opts.get(k, default) == default:
            opts.pop(k, None)
    for k, value in ADDED_OPTIONS.items():
        if opts.get(k, value) == value:
            opts.pop(k, None)
    for k in ADDED_SECTIONS:
        out.pop(k, None)
    return out


def differences(ref_plan: dict, new_plan: dict) -> list[str]:
    """What differs between two plan files, ignoring wall-clock provenance fields."""
    out = []
    if ref_plan["layers"] != new_plan["layers"]:
        bad = [k for k in ref_plan["layers"] if ref_plan["layers"][k] != new_plan["layers"].get(k)]
        out.append(f"layers differ at {bad[:8]}{' ...' if len(bad) > 8 else ''}")
    a, b = _normalise(ref_plan.get("solver", {})), _normalise(new_plan.get("solver", {}))
    for k in sorted(set(a) | set(b)):
        if k in TIMING_FIELDS:
            continue
        if a.get(k) != b.get(k):
            out.append(f"solver.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    for k in set(ref_plan) - {"layers", "solver"}:
        if ref_plan[k] != new_plan.get(k):
            out.append(f"{k}: {ref_plan[k]!r} -> {new_plan.get(k)!r}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["record", "compare"])
    p.add_argument("--ref", type=Path, default=Path("/tmp/ref17"))
    p.add_argument("--case", action="append", choices=sorted(CASES), help="default: all")
    args = p.parse_args()
    args.ref.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in args.case or list(CASES):
        ref_file = args.ref / f"{name}.json"
        if args.mode == "record":
            # Same flags as compare: the step-time guard must not swap either side's plan for a baseline.
            wall = solve_case(name, args.ref, ref_file, COMPARE_FLAGS)
            print(f"{name}: recorded {ref_file} ({wall:.0f} s)")
            continue
        new_file = args.ref / f"{name}.new.json"
        wall = solve_case(name, args.ref, new_file, COMPARE_FLAGS)
        new_plan = json.loads(new_file.read_text())
        diff = differences(json.loads(ref_file.read_text()), new_plan)
        st = new_plan.get("solver", {}).get("step_time", {})
        verdict = (f"guard: predicted {st['plan_vs_linear']:.3f} x linear for phase mix {st['phase_mix']:.3f}"
                   + (", would write " + min((n for n in st["predicted_ms"] if n != "plan"), key=lambda n: st["predicted_ms"][n]["mix"])
                      if st.get("slower_than_linear") else "") if st.get("checked") else f"guard: {st.get('reason', 'no record')}")
        print(f"{name}: {'IDENTICAL' if not diff else 'DIFFERENT'} ({wall:.0f} s); {verdict}")
        for d in diff:
            print(f"  {d}")
        failed += bool(diff)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
