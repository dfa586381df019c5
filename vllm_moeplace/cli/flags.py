"""Checks every command gets for free from `cli.main`: numeric flags and output paths.

Numeric flags: every `type=int` / `type=float` argument of a command is parsed by `int_flag` /
`float_flag` instead, so NaN, Infinity and integers beyond 64 bits never reach a command, and the
flags named in INT_BOUNDS / FLOAT_BOUNDS are range-checked by name (a `--seed -1`, an
`--ep-size 10**12` or a `--ranks-per-node 0` is refused instead of crashing, allocating or being
silently read as "default"). Commands keep declaring plain `type=int`; `moeplace solve`'s flags,
generated from `SolveOptions`, are covered the same way.

Output paths: `check_output` refuses a folder, a path inside a file, or a place where no file can
be created, before the command computes anything; `OutputGuard` removes (or restores) what a
failing command wrote, so a failure never leaves an output file behind.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.limits import MAX_EP_SIZE, MAX_EXPERTS, MAX_LAYERS, MAX_SEED, MAX_TRACE_IDS

INT64_MAX = (1 << 63) - 1

# dest -> inclusive (min, max). Names mean the same in every command that has them.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "seed": (0, MAX_SEED),
    "ep_size": (1, MAX_EP_SIZE),
    "ranks_per_node": (1, MAX_EP_SIZE),
    "redundant_per_rank": (0, MAX_EXPERTS),
    "num_groups": (1, MAX_EXPERTS),
    "groups": (1, MAX_EXPERTS),
    "preserve_groups": (0, MAX_EXPERTS),  # its bare-flag sentinel (-1) is a const, never parsed
    "experts": (1, MAX_EXPERTS),
    "num_experts": (1, MAX_EXPERTS),
    "top_k": (1, MAX_EXPERTS),
    "clusters": (1, MAX_EXPERTS),
    "layers": (1, MAX_LAYERS),
    "num_layers": (1, MAX_LAYERS),
    "dense_layers": (0, MAX_LAYERS),
    "first_layer": (0, MAX_LAYERS - 1),
    "tokens": (1, MAX_TRACE_IDS),
    "requests": (1, MAX_TRACE_IDS),
    "domains": (1, 1 << 16),
    "balance_folds": (1, 8),
    "prefill_tokens_per_rank": (1, 1 << 20),
    "decode_tokens_per_rank": (1, 1 << 20),
}
# dest -> (min, strict): the value must be > min (strict) or >= min.
FLOAT_BOUNDS: dict[str, tuple[float, bool]] = {
    "time_limit": (0.0, True),
    "solve_time": (0.0, True),
    "real_solve_time": (0.0, True),
    "inter_layer_weight": (0.0, False),
    "balance_risk": (0.0, False),
    "risk_scale": (0.0, True),
    "skew": (0.0, False),
    "cluster_strength": (0.0, False),
    "phase_mix": (0.0, False),
}


def int_flag(lo: int = -INT64_MAX - 1, hi: int = INT64_MAX) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"value {text[:40]!r}: expected an integer") from None
        if not lo <= value <= hi:
            shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:12]}...({len(str(value))} digits)"
            raise argparse.ArgumentTypeError(f"value {shown}: expected an integer in {lo}..{hi}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


def float_flag(lo: float | None = None, strict: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"value {text[:40]!r}: expected a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"value {text[:40]!r}: must be a finite number (no NaN / Infinity)")
        if lo is not None and (value <= lo if strict else value < lo):
            raise argparse.ArgumentTypeError(f"value {value:g}: must be {'>' if strict else '>='} {lo:g}")
        return value

    parse.__name__ = "float"
    return parse


def harden_numeric_flags(parser: argparse.ArgumentParser) -> None:
    """Swap every plain int/float argument type of `parser` for the checked ones above."""
    for action in parser._actions:  # argparse has no public iterator over its actions
        if action.type is int:
            action.type = int_flag(*INT_BOUNDS.get(action.dest, (-INT64_MAX - 1, INT64_MAX)))
        elif action.type is float:
            action.type = float_flag(*FLOAT_BOUNDS.get(action.dest, (None, False)))


Kind = Literal["file", "dir"]


def check_output(path: str, flag: str, kind: Kind) -> None:
    """Refuse an output path that cannot be written, before any computation: a folder where a
    file is due (or a file where a folder is due), a path under an existing file, a device, or a
    place where no file can be created (probed by creating and removing a temporary file)."""
    p = Path(path)
    if not str(path):
        raise MoeplaceError(f"{flag}: empty path")
    if kind == "file" and p.is_dir():
        raise MoeplaceError(f"{flag} {path}: is a folder; give a file path")
    if kind == "file" and p.exists() and not p.is_file():
        raise MoeplaceError(f"{flag} {path}: exists and is not a regular file")
    if kind == "dir" and p.exists() and not p.is_dir():
        raise MoeplaceError(f"{flag} {path}: is a file; give a folder")
    anchor = p if kind == "dir" and p.is_dir() else p.parent
    while not anchor.exists():  # the first existing ancestor is where missing folders get created
        anchor = anchor.parent
    if not anchor.is_dir():
        raise MoeplaceError(f"{flag} {path}: {anchor} is a file, so nothing can be created inside it")
    try:
        fd, tmp = tempfile.mkstemp(dir=anchor, prefix=".moeplace-probe.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise MoeplaceError(f"{flag} {path}: cannot create files in {anchor} ({e.strerror or e})") from None


@dataclass
class OutputGuard:
    """Undo a failed command's writes: outputs that did not exist are removed, files that did are
    restored from a hard link taken before the run (an atomic write replaces the inode, so the
    link keeps the old content)."""

    outputs: list[tuple[Path, Kind]]
    _existed: set[Path] = field(default_factory=set)
    _backups: dict[Path, Path] = field(default_factory=dict)

    def __enter__(self) -> "OutputGuard":
        for p, kind in self.outputs:
            if p.exists():
                self._existed.add(p)
                if kind == "file":
                    backup = p.with_name(f".{p.name}.moeplace-backup")
                    try:
                        backup.unlink(missing_ok=True)
                        os.link(p, backup)
                        self._backups[p] = backup
                    except OSError:
                        pass  # no hard links here: an overwrite cannot be undone, only a new file
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        failed = exc_type is not None
        for p, kind in self.outputs:
            if failed and p not in self._existed and p.exists():
                shutil.rmtree(p) if kind == "dir" and p.is_dir() else p.unlink(missing_ok=True)
            backup = self._backups.get(p)
            if backup is not None:
                if failed:
                    os.replace(backup, p)  # a no-op when p was never replaced (same inode) ...
                backup.unlink(missing_ok=True)  # ... so drop the link explicitly
