"""`moeplace` command line: one subcommand per module under `vllm_moeplace/cli/`.

Each command module defines `add_arguments(parser)` and `run(args) -> int`, and is imported only
when its command runs, so `moeplace solve` never imports vLLM or torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import NoReturn

from vllm_moeplace.cli.flags import Kind, OutputGuard, check_output, harden_numeric_flags
from vllm_moeplace.errors import MoeplaceError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny-model": ("vllm_moeplace.cli.tiny_model", "build a tiny random-weight MoE model + local tokenizer"),
    "random-plan": ("vllm_moeplace.cli.random_plan", "write a seeded random-permutation plan for a model"),
    "profile": ("vllm_moeplace.cli.profile", "run a model in vLLM and record router top-k per token"),
    "import": ("vllm_moeplace.cli.import_trace", "convert a published routing trace to the native .npz"),
    "datasets": ("vllm_moeplace.cli.datasets", "list or fetch the public routing traces the project uses"),
    "analyze": ("vllm_moeplace.cli.analyze", "report routing statistics of a trace (markdown + PNG)"),
    "synth": ("vllm_moeplace.cli.synth", "generate a synthetic routing trace with realistic structure"),
    "solve": ("vllm_moeplace.cli.solve", "compute a topology-aware placement plan (CP-SAT)"),
    "baseline": ("vllm_moeplace.cli.baseline", "write a baseline plan (linear, round_robin, eplb, greedy)"),
    "evaluate": ("vllm_moeplace.cli.evaluate", "score plans and baselines on a trace"),
    "validate": ("vllm_moeplace.cli.validate", "check a plan file against the specification"),
    "export": ("vllm_moeplace.cli.export", "write a plan for SGLang, TensorRT-LLM or vLLM's static-map PR"),
    "route": ("vllm_moeplace.cli.route", "request router of a request-aware plan, in front of vLLM's DP ranks"),
    "bench": ("vllm_moeplace.cli.bench", "serving benchmark: default layout vs plans on real vLLM"),
    "demo": ("vllm_moeplace.cli.demo", "the main job end to end on the embedded default"),
}


# Commands whose numpy work is small dense algebra (the solver's E x E matrices).
SINGLE_BLAS_THREAD = frozenset({"solve"})

# Outputs each command writes (argparse dest -> file or folder): checked before the command runs,
# and removed again if it fails (cli/flags.py).
OUTPUTS: dict[str, dict[str, Kind]] = {
    "random-plan": {"out": "file"},
    "import": {"out": "file"},
    "analyze": {"out": "dir"},
    "synth": {"out": "file"},
    "solve": {"out": "file"},
    "baseline": {"out": "file"},
    "export": {"out": "file"},
    "tiny-model": {"out": "dir"},
    "profile": {"out": "file"},
}
# Long runs whose folder holds server logs: the path is checked before anything starts, but a run
# that fails later keeps what it wrote (the logs say why it failed).
CHECKED_ONLY: dict[str, dict[str, Kind]] = {
    "bench": {"out": "dir"},
    "demo": {"out": "dir"},
}


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (`moeplace solve: error: argument --seed: ...`), like every other
    error; `--help` still prints the full usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeplace", description="Expert placement for MoE serving in vLLM.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints help or the usage error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_ = COMMANDS[name]
    if name in SINGLE_BLAS_THREAD:
        # Before numpy loads OpenBLAS: its small (E x E) products gain nothing from threads, and on
        # a busy machine a second BLAS thread spin-waits (eigh of 256 x 256: 0.05 s on one
        # thread, 1.4 s on two under load), time that --time-limit would have to absorb.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            print(f"moeplace: command '{name}' is not available in this build", file=sys.stderr)
            return 2
        raise
    parser = OneLineParser(prog=f"moeplace {name}", description=help_)
    module.add_arguments(parser)
    harden_numeric_flags(parser)
    args = parser.parse_args(rest)
    outputs = [(dest, kind) for dest, kind in OUTPUTS.get(name, {}).items() if getattr(args, dest, None) is not None]
    checked = [(d, k) for d, k in CHECKED_ONLY.get(name, {}).items() if getattr(args, d, None) is not None]
    try:
        for dest, kind in outputs + checked:
            check_output(str(getattr(args, dest)), f"--{dest.replace('_', '-')}", kind)
        with OutputGuard([(Path(getattr(args, dest)), kind) for dest, kind in outputs]):
            return int(module.run(args) or 0)
    except MoeplaceError as e:
        print(f"moeplace {name}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2


def _one_line(msg: str) -> str:
    """Messages quote input values, which may hold newlines: keep the error on one line."""
    return msg.replace("\r", "\\r").replace("\n", "\\n")


if __name__ == "__main__":
    sys.exit(main())
