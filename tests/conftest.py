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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real traces recorded by others); tests that need it skip when absent."""
    if not (SHARED_DATA / "traces" / "dsv2lite_puffin_a.npz").exists():
        pytest.skip(f"shared real traces not found at {SHARED_DATA}")
    return SHARED_DATA


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
