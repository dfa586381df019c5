"""What every importer shares: its options, its error type, and the assembly of a `Trace`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.trace import Trace, TraceError

INT16_MAX = int(np.iinfo(np.int16).max)


class TraceImportError(MoeplaceError):
    """A source file of an importer is malformed; the message names the file, line/field and value."""


@dataclass(frozen=True)
class ImportOptions:
    """User overrides shared by all formats; None means "use the format's default or infer"."""

    model_name: str | None = None
    num_experts: int | None = None
    layer_ids: tuple[int, ...] | None = None
    label: str | None = None


def natural_key(name: str) -> tuple:
    """Sort key putting `prompt_2` before `prompt_10`: digit runs compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name))


def expand_sources(src: Sequence[str | Path], pattern: str, what: str) -> list[Path]:
    """Files named by `src`: each item is a file, or a folder whose files matching `pattern` are taken.

    The result is in natural (numeric) name order within each folder, folders in the given order.
    """
    files: list[Path] = []
    for item in src:
        p = Path(item)
        if p.is_dir():
            found = sorted((f for f in p.glob(pattern) if f.is_file()), key=lambda f: natural_key(f.name))
            if not found:
                raise TraceImportError(f"{p}: no {what} files matching '{pattern}' in this folder")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise TraceImportError(f"{p}: no such file or folder")
    if not files:
        raise TraceImportError(f"no {what} files given")
    return files


def resolve_num_experts(max_id: int, opts: ImportOptions, default: int | None, notes: list[str], where: str) -> int:
    """The trace's `num_experts`: the user's value, else the format default, else max id + 1 (noted)."""
    if max_id > INT16_MAX:  # before anything is cast to the trace's int16: an error, never a wrap-around
        raise TraceImportError(f"{where}: expert id {max_id} does not fit the trace's int16 ids (at most {INT16_MAX})")
    if opts.num_experts is not None:
        if opts.num_experts <= 0 or opts.num_experts > INT16_MAX + 1:
            raise TraceImportError(f"--num-experts must be in 1..{INT16_MAX + 1}, got {opts.num_experts}")
        if max_id >= opts.num_experts:
            raise TraceImportError(f"{where}: expert id {max_id} is out of range for --num-experts {opts.num_experts}")
        return opts.num_experts
    if default is not None:
        if max_id >= default:
            raise TraceImportError(
                f"{where}: expert id {max_id} is out of range for this format's default of {default} experts; "
                "pass --num-experts"
            )
        return default
    inferred = max_id + 1
    notes.append(
        f"num_experts not given: inferred {inferred} from the largest expert id seen; experts that were never "
        "chosen above it are missing, so pass --num-experts N when you know the model"
    )
    return inferred


def assemble(
    per_request: list[np.ndarray],
    prefill_per_request: list[np.ndarray],
    layer_ids: Sequence[int],
    num_experts: int,
    meta: dict[str, Any],
    labels: list[str] | None,
    notes: list[str],
) -> Trace:
    """Concatenate per-request [tokens, L, K] id arrays into one validated `Trace`.

    Request ids are the list positions (0-based). Notes (warnings for the user) go in meta["import_notes"].
    """
    if not per_request:
        raise TraceImportError("the source holds no requests")
    ids = np.concatenate(per_request, axis=0).astype(np.int16, copy=False)
    request_ids = np.concatenate(
        [np.full(len(a), r, dtype=np.int32) for r, a in enumerate(per_request)]
    )
    is_prefill = np.concatenate(prefill_per_request).astype(np.bool_, copy=False)
    meta = dict(meta, top_k=int(ids.shape[2]))
    if notes:
        meta["import_notes"] = list(notes)
    try:
        return Trace(
            topk_ids=ids,
            layer_ids=np.asarray(layer_ids, dtype=np.int32),
            request_ids=request_ids,
            is_prefill=is_prefill,
            num_experts=int(num_experts),
            meta=meta,
            labels=None if labels is None else np.asarray(labels, dtype=str),
        )
    except TraceError as e:  # e.g. an expert chosen twice for one token: still the source's fault
        raise TraceImportError(f"imported data is not a valid trace: {e}") from None
