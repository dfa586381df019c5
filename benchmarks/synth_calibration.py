"""Synthetic traces vs the real DeepSeek-V2-Lite trace: routing statistics side by side.

    flock /tmp/moeplace-heavy.lock python benchmarks/synth_calibration.py

Prints and writes benchmarks/results/synth_calibration.md:
- `routing_summary` (load skew max/mean, Gini, co-activation lift of top pairs, share of
  co-activations on lift>2 pairs, inter-layer transition concentration) of the real trace and of
  `moeplace synth` at the same shape (26 layers x 64 experts, top-6, 94,165 tokens, 999 requests)
  for a few seeds;
- what a co-activation-aware placement gains: held-out node_sends of the co-activation greedy /
  vLLM linear at EP16 over 4 nodes (plan from the first half of requests), and EPLB's imbalance;
- generation time and peak memory at DeepSeek-R1 shape (58 x 256, top-8, 50k tokens), measured in
  a child process.
"""

from __future__ import annotations

import resource
import subprocess
import sys

from _common import loadavg, machine  # noqa: E402  (benchmarks/ is sys.path[0])
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vllm_moeplace.plan import Topology  # noqa: E402
from vllm_moeplace.solver.baselines import available_baselines, baseline_layers  # noqa: E402
from vllm_moeplace.metrics import evaluate_layers  # noqa: E402
from vllm_moeplace.trace_stats import routing_summary  # noqa: E402
from vllm_moeplace.solver.synth import SynthConfig, synth_trace  # noqa: E402
from vllm_moeplace.trace import Trace, load_trace  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "traces" / "dsv2lite_puffin_a.npz"
OUT = ROOT / "benchmarks" / "results" / "synth_calibration.md"
STATS = ("load_max_over_mean", "load_gini", "coact_top_lift", "coact_lift_gt2_share", "transition_topk_share")


def placement_gain(trace: Trace) -> dict[str, float]:
    train, test = trace.split_by_request(0.5)
    topo = Topology.uniform(16, 4)
    lin = evaluate_layers({}, topo, test)
    out = {"linear node_sends": lin.node_sends, "linear imbalance": lin.imbalance}
    ep = evaluate_layers(baseline_layers("eplb", train, topo), topo, test)
    out["eplb imbalance"] = ep.imbalance
    if "greedy" in available_baselines():
        g = evaluate_layers(baseline_layers("greedy", train, topo), topo, test)
        out["greedy / linear node_sends"] = g.node_sends / lin.node_sends
        out["greedy imbalance"] = g.imbalance
    return out


R1_CHILD = """
import time
from vllm_moeplace.solver.synth import SynthConfig, synth_trace
t0 = time.perf_counter()
tr = synth_trace(SynthConfig(num_layers=58, num_experts=256, top_k=8, num_tokens=50000, seed=0))
dt = time.perf_counter() - t0
# VmHWM is this process's own peak (ru_maxrss would carry the parent's peak across exec).
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(dt, hwm / 1024, tr.topk_ids.nbytes / 2**20)
"""




def main() -> int:
    if not REAL.exists():
        print(f"real trace not found at {REAL}", file=sys.stderr)
        return 1
    mach_before = f"{machine()}, load average {loadavg()}"
    real = load_trace(REAL)
    rows: dict[str, dict[str, float]] = {"real DeepSeek-V2-Lite": {**routing_summary(real), **placement_gain(real)}}
    for seed in (0, 1, 2):
        cfg = SynthConfig(num_layers=26, num_experts=64, top_k=6, num_tokens=real.num_tokens, num_requests=999, seed=seed)
        syn = synth_trace(cfg)
        rows[f"synth seed {seed}"] = {**routing_summary(syn), **placement_gain(syn)}
    # Control: same generator without co-activation / inter-layer structure.
    flat = synth_trace(SynthConfig(num_layers=26, num_experts=64, top_k=6, num_tokens=real.num_tokens, num_requests=999,
                                   cluster_strength=0.0, layer_coupling=0.0, domain_bias=0.0, phase_bias=0.0))
    rows["synth, no structure (control)"] = {**routing_summary(flat), **placement_gain(flat)}
    child = subprocess.run([sys.executable, "-c", R1_CHILD], capture_output=True, text=True, cwd=ROOT, check=True)
    r1_s, r1_mb, r1_ids_mb = (float(x) for x in child.stdout.split())
    cols = list(STATS) + [k for k in rows["real DeepSeek-V2-Lite"] if k not in STATS]
    lines = [
        "# Synthetic traces vs the real DeepSeek-V2-Lite trace",
        "",
        "Command: `flock /tmp/moeplace-heavy.lock python benchmarks/synth_calibration.py`",
        f"Machine: {mach_before}",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "Shape: 26 MoE layers x 64 experts, top-6, 94,165 tokens, 999 requests (synth default knobs).",
        "Statistics are means over layers (`vllm_moeplace.trace_stats.routing_summary`); placement rows:",
        "EP16 over 4 nodes, plan from the first half of requests, scored held-out.",
        "",
        "| statistic | " + " | ".join(rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for c in cols:
        lines.append(f"| {c} | " + " | ".join(f"{r.get(c, float('nan')):.3f}" for r in rows.values()) + " |")
    lines += [
        "",
        f"DeepSeek-R1 shape (58 layers x 256 experts, top-8, 50,000 tokens): generated in {r1_s:.1f} s, "
        f"peak RSS {r1_mb:.0f} MB (the int16 ids alone are {r1_ids_mb:.0f} MB; the interpreter + numpy + pydantic "
        f"baseline is included in the RSS).",
        "",
        "Reading: load skew and inter-layer concentration are close to the real trace's; co-activation is",
        "spread differently (the real trace has fewer, stronger pairs: higher top-pair lift, lower share of",
        "co-activations on lift>2 pairs; one cluster per token is a simplification). The property that matters",
        "for placement matches: a co-activation-aware placement gains about as much over vLLM's linear layout",
        "as on the real trace (greedy / linear node_sends), and the control without structure loses that gain.",
    ]
    text = "\n".join(lines) + "\n"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)
    print(f"wrote {OUT} (peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
