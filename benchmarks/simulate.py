"""Reproduce every simulator figure in benchmarks/results/ (simulation.md, simulation.json, sim_*.png).

    python benchmarks/simulate.py            # full suite, a few minutes on 2 cores
    python benchmarks/simulate.py --quick    # the required scenarios only, shorter solver budgets
    python benchmarks/simulate.py --trace my.npz --model deepseek-v2-lite --topologies 8x2,16x4

The logic is `vllm_moeplace.sim.suite` (importable and tested); this file is its command line.
Run it under the shared lock: `flock /tmp/moeplace-heavy.lock python benchmarks/simulate.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_moeplace.sim.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
