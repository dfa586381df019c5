"""The public routing traces the project uses, where they live online, and where they land here.

Each dataset is a pinned commit of a public GitHub repository (raw files at
raw.githubusercontent.com, so no API token or git is needed), a checksum manifest of its files
(`<name>.sha256` beside this module, `sha256sum` format, computed from the files at that commit
and checked against the copies in ../shared/data), and the importer that turns them into the
native trace (docs/datasets.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from vllm_moeplace.profiling.formats.common import ImportOptions
from vllm_moeplace.trace import Trace

# The source checkout; ../shared/data beside it holds the traces when the project is developed here.
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str  # one line: model and workload
    repo: str  # GitHub owner/name
    commit: str  # pinned: the checksums are of the files at this commit
    folder: str  # folder inside the repository holding the files
    importer: str  # `moeplace import --format` of the files
    options: ImportOptions
    size_mb: int  # download size, for the user's information
    shared_trace: str | None = None  # the same trace, converted, under ../shared/data (if it is there)
    finish: Callable[[Trace], Trace] | None = None  # adjusts the imported trace
    manifest: Path | None = None  # default: `<name>.sha256` beside this module

    @property
    def base_url(self) -> str:
        return f"https://raw.githubusercontent.com/{self.repo}/{self.commit}/{self.folder}/"

    @property
    def source(self) -> str:
        return f"github.com/{self.repo} @ {self.commit[:12]}, {self.folder}/"

    def files(self) -> list[tuple[str, str]]:
        """(file name, expected sha256) in request order."""
        out = []
        for line in (self.manifest or Path(__file__).with_name(f"{self.name}.sha256")).read_text().splitlines():
            digest, _, name = line.partition("  ")
            out.append((name, digest))
        return out


def _request_id_is_prompt_number(t: Trace) -> Trace:
    """Request id = prompt number - 1, as in the shared trace (id 316, prompt 317, stays unused),
    so both copies are the same arrays."""
    numbers = np.asarray(t.meta["prompt_numbers"], dtype=t.request_ids.dtype)
    assert len(numbers) == t.num_requests, "one request per prompt file"
    return replace(t, request_ids=numbers[t.request_ids] - 1, meta={**t.meta, "label": "puffin prompts 1-1000 (317 missing)"})


DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            name="dsv2lite-puffin",
            title="DeepSeek-V2-Lite-Chat router decisions on Puffin chat prompts 1-1000 (prefill; 999 requests, 94,165 tokens)",
            repo="ngavhane/moe-beyond",
            commit="4dca2eacb7bc0a3086770a4de7a57cc0b81479bd",
            folder="training_data_eamc",
            importer="hf-hook-csv",
            # prompt 317 is not in the shared trace (../shared/data/README.md: missing from the
            # source) and prompt 1001 is not at this commit; the manifest holds the other 999, so
            # the converted trace equals the shared one.
            options=ImportOptions(model_name="deepseek-ai/DeepSeek-V2-Lite-Chat", num_experts=64),
            size_mb=93,
            shared_trace="traces/dsv2lite_puffin_a.npz",
            finish=_request_id_is_prompt_number,
        ),
        Dataset(
            name="llama4-mmlu-abstract-algebra",
            title="Llama-4-Maverick router decisions on 100 MMLU abstract_algebra questions (prefill + 128 decode steps)",
            repo="andronius-yang/cse223b-proj",  # a subset of the Orders-in-Chaos data (arXiv 2510.05497)
            commit="7f4e46fd6e3c2ef5b161adc3ecbcee64ac7c3758",
            folder="traffic-gen/llama4-mmlu-abstract_algebra",
            importer="orders-in-chaos",
            options=ImportOptions(num_experts=128, label="mmlu/abstract_algebra"),
            size_mb=33,
        ),
    )
}


def shared_data_root() -> Path:
    return Path(os.environ.get("MOEPLACE_SHARED_DATA", REPO.parent / "shared" / "data"))


def cache_root() -> Path:
    """$MOEPLACE_CACHE, else $XDG_CACHE_HOME/vllm-moeplace, else ~/.cache/vllm-moeplace."""
    if os.environ.get("MOEPLACE_CACHE"):
        return Path(os.environ["MOEPLACE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # the XDG spec says a relative value is to be ignored
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "vllm-moeplace"


def dataset_dir(ds: Dataset) -> Path:
    return cache_root() / "datasets" / ds.name


def cached_trace(ds: Dataset) -> Path:
    return dataset_dir(ds) / "trace.npz"


def fetch_command(ds: Dataset) -> str:
    return f"moeplace datasets fetch {ds.name}"


def locate(name: str) -> Path | None:
    """The converted trace of dataset `name`: ../shared/data first, then the user cache; None if neither."""
    ds = DATASETS[name]
    if ds.shared_trace and (shared_data_root() / ds.shared_trace).is_file():
        return shared_data_root() / ds.shared_trace
    return cached_trace(ds) if cached_trace(ds).is_file() else None
