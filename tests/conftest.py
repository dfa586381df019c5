"""Shared fixtures: the real traces in ../shared/data and the tiny model builder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MOEPLACE_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _isolated_environ():
    """Restore os.environ after every test: building a real TP2 VllmConfig in this process makes
    vLLM's CPU platform export LD_PRELOAD, LOCAL_WORLD_SIZE, VLLM_WORKER_MULTIPROC_METHOD and
    TORCHINDUCTOR_* settings, which every engine started by a later test would inherit."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


NEEDED = SHARED_DATA / "traces" / "dsv2lite_puffin_a.npz"
_skipped_for_data: list[str] = []


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real traces recorded by others). Tests that need it skip when it is absent,
    and the run's summary names the missing data once (pytest_terminal_summary below)."""
    if not NEEDED.exists():
        pytest.skip(f"needs the shared real traces ({NEEDED})")
    return SHARED_DATA


def pytest_runtest_logreport(report):
    if report.skipped and "needs the shared real traces" in str(report.longrepr):
        _skipped_for_data.append(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    if _skipped_for_data:
        terminalreporter.write_sep(
            "!", f"MISSING DATA: {NEEDED} not found; {len(_skipped_for_data)} real-trace tests skipped", red=True, bold=True)
        terminalreporter.write_line(
            "Place the shared data folder beside the project (../shared/data, see its README) or set "
            "MOEPLACE_SHARED_DATA; these tests check the solver and simulator on real recorded routing:")
        for nodeid in _skipped_for_data:
            terminalreporter.write_line(f"  {nodeid}")


@pytest.fixture(scope="session")
def dsv2_trace_path(shared_data: Path) -> Path:
    return shared_data / "traces" / "dsv2lite_puffin_a.npz"


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Build (once per session and spec) a tiny random-weight MoE checkpoint folder.

    Usage: `path = tiny_model_factory(arch="qwen3_moe", num_layers=2, num_experts=8)`.
    """
    from vllm_moeplace.tiny_model import TinyModelSpec, build_tiny_model

    cache: dict = {}

    def make(**kw) -> Path:
        spec = TinyModelSpec(**kw)
        if spec not in cache:
            d = tmp_path_factory.mktemp(f"tiny_{spec.arch}")
            cache[spec] = build_tiny_model(d, spec)
        return cache[spec]

    return make
