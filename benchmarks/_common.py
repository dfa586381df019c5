"""Shared by the benchmark scripts: the machine description and provenance every result carries."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """`x86_64, nproc = 2, AMD EPYC ...` (what a reader needs to compare figures)."""
    cpu = "unknown CPU"
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if line.startswith("Model name:"):
            cpu = line.split(":", 1)[1].strip()
    return f"{platform.machine()}, nproc = {os.cpu_count()}, {cpu}"


def commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, check=False).stdout.strip()
    return (r.stdout.strip() or "unknown") + (" (+ uncommitted changes)" if dirty else "")


def command() -> str:
    """The command line that is running, as a user would type it from the repo root."""
    script = os.path.relpath(sys.argv[0], ROOT)
    return " ".join(["python", shlex.quote(script), *map(shlex.quote, sys.argv[1:])])


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())
