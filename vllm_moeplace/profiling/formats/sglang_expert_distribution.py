"""`sglang-expert-distribution`: dumps of SGLang's expert distribution recorder.

Read from SGLang's source, python/sglang/srt/eplb/expert_distribution.py: with
`--expert-distribution-recorder-mode M`, `/dump_expert_distribution_record` writes `torch.save`
files into SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR:
  * `stat` / `stat_approx` (`_StatAccumulator.dump`, rank 0 only): `expert_distribution_recorder_{time}.pt`
    = {"rank", "logical_count": int tensor [steps, layers, logical experts] (already all-reduced over
    ranks and mapped to logical ids), "average_utilization_rate_over_window"} -> a LOAD-ONLY trace,
    one window per step;
  * `per_pass` / `per_token` (`_DetailAccumulator.dump`, every rank):
    `expert_distribution_recorder_{time}_{rank}.pt` = {"records": [one dict per forward pass],
    "last_physical_to_logical_map": [layers, physical experts]}. A `per_token` record holds
    `topk_ids_of_layer` int [layers, tokens, 8] of PHYSICAL ids (recorded after the logical ->
    physical dispatch; unused top-k columns and unrouted layers are -1), `input_ids`, `positions`,
    `extend_seq_lens` and `forward_mode` -> a full native trace, ids mapped back to logical with
    the map; a `per_pass` record holds only `global_physical_count` [layers, physical] -> a load-only
    trace, one window per pass.
Layer axis: `num_layers` of the model's expert-location config = config.num_hidden_layers, i.e.
decoder layers, dense ones included (their rows stay 0 / -1). Layers that are zero (or -1)
everywhere are taken as dense and dropped, unless `--layer-ids` names the MoE layers.

What the dumps do not hold: request ids (the recorder's `rids` field is commented out in the
source). A per_token trace therefore numbers one request per (rank, forward pass); tokens of a
pass whose `forward_mode` is DECODE (value 2 in `ForwardMode`,
python/sglang/srt/model_executor/forward_batch_info.py) are decode tokens, all others prefill.
Ranks that saw the same batch (plain TP, no DP attention) record the same tokens; such duplicate
records are kept once.

Needs torch to read the `.pt` files (loaded with `weights_only=True`: plain tensors and containers only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vllm_moeplace.load_trace import LoadTrace
from vllm_moeplace.profiling.formats.common import (
    ImportOptions,
    TraceImportError,
    assemble,
    expand_sources,
)
from vllm_moeplace.trace import Trace, TraceError

DECODE_MODE = 2  # ForwardMode.DECODE: EXTEND = 1, DECODE = 2, MIXED = 3, IDLE = 4 (auto() order)


def _load(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise TraceImportError(f"{path}: reading SGLang .pt dumps needs torch (pip install torch)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; any of them means "not a dump"
        # torch's unpickling errors run to a page of advice; its first line says what failed
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise TraceImportError(f"{path}: not a readable torch.save file ({type(e).__name__}: {first})") from None
    if not isinstance(obj, dict) or not ({"logical_count", "records"} & set(obj)):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise TraceImportError(f"{path}: not an SGLang expert distribution dump (expected key 'logical_count' or "
                               f"'records', got {keys})")
    return obj


def _np(x: Any, where: str, ndim: int) -> np.ndarray:
    a = x.numpy() if hasattr(x, "numpy") else np.asarray(x)
    if a.ndim != ndim or a.dtype.kind not in "iu":
        raise TraceImportError(f"{where}: expected an integer array of {ndim} dimensions, got {a.dtype} shape {list(a.shape)}")
    return a.astype(np.int64)


def _moe_rows(used: np.ndarray, opts: ImportOptions, n_rows: int, where: str, notes: list[str]) -> list[int]:
    """Decoder-layer rows that are MoE layers: --layer-ids, else the rows with any routing."""
    if opts.layer_ids is not None:
        bad = [l for l in opts.layer_ids if not 0 <= l < n_rows]
        if bad:
            raise TraceImportError(f"{where}: --layer-ids {bad} are outside the dump's {n_rows} decoder layers")
        return sorted(opts.layer_ids)
    rows = [int(l) for l in np.flatnonzero(used)]
    if not rows:
        raise TraceImportError(f"{where}: no layer has any routed token (empty recording?)")
    if len(rows) < n_rows:
        notes.append(f"--layer-ids not given: decoder layers {[l for l in range(n_rows) if l not in rows]} have no "
                     f"routed token and were taken as dense; the {len(rows)} others are the MoE layers")
    return rows


def _meta(opts: ImportOptions, files: list[Path], mode: str, window: str | None) -> dict:
    meta = {
        "model": opts.model_name or "unknown (sglang-expert-distribution; pass --model-name)",
        "source": "SGLang expert distribution recorder",
        "format": "sglang-expert-distribution",
        "recorder_mode": mode,
        "label": opts.label or "",
        "source_paths": [str(f) for f in files],
    }
    if window:
        meta["window"] = window
    return meta


def _load_trace(load: np.ndarray, rows: list[int], E: int, meta: dict, notes: list[str], where: str) -> LoadTrace:
    notes.append("load only: no per-token routing, so only --objective balance can use it")
    meta["import_notes"] = notes
    try:
        return LoadTrace(expert_load=load[:, rows, :], layer_ids=np.asarray(rows, dtype=np.int32), num_experts=E, meta=meta)
    except TraceError as e:
        raise TraceImportError(f"{where}: imported data is not a valid load trace: {e}") from None


def _stat(dumps: list[tuple[Path, dict]], opts: ImportOptions) -> LoadTrace:
    notes: list[str] = []
    parts = []
    for path, d in dumps:
        a = d["logical_count"]
        a = _np(a, f"{path}: key 'logical_count'", a.dim() if hasattr(a, "dim") else np.ndim(a))
        if a.ndim == 2:  # SGLang's own reader accepts [layers, experts] as one step (init_by_eplb)
            a = a[None]
        if a.ndim != 3:
            raise TraceImportError(f"{path}: key 'logical_count': expected [steps, layers, experts], got shape {list(a.shape)}")
        if parts and a.shape[1:] != parts[0].shape[1:]:
            raise TraceImportError(f"{path}: key 'logical_count': [layers, experts] {list(a.shape[1:])} differ from "
                                   f"{dumps[0][0]}'s {list(parts[0].shape[1:])}")
        parts.append(a)
    load = np.concatenate(parts)
    E = load.shape[2]
    if opts.num_experts is not None and opts.num_experts != E:
        raise TraceImportError(f"{dumps[0][0]}: key 'logical_count': {E} logical experts, but --num-experts is {opts.num_experts}")
    rows = _moe_rows(load.any(axis=(0, 2)), opts, load.shape[1], str(dumps[0][0]), notes)
    return _load_trace(load, rows, E, _meta(opts, [p for p, _ in dumps], "stat", "step"), notes, str(dumps[0][0]))


def _p2l(path: Path, d: dict) -> np.ndarray:
    return _np(d.get("last_physical_to_logical_map"), f"{path}: key 'last_physical_to_logical_map'", 2)


def _per_pass(dumps: list[tuple[Path, dict]], opts: ImportOptions) -> LoadTrace:
    notes: list[str] = []
    windows = []
    E = None
    for path, d in dumps:
        p2l = _p2l(path, d)
        E = int(p2l.max()) + 1 if E is None else E
        for i, rec in enumerate(d["records"]):
            phys = _np(rec.get("global_physical_count"), f"{path}: records[{i}].global_physical_count", 2)
            if phys.shape != p2l.shape:
                raise TraceImportError(f"{path}: records[{i}].global_physical_count: shape {list(phys.shape)}, "
                                       f"the map's is {list(p2l.shape)}")
            logical = np.zeros((p2l.shape[0], E), dtype=np.int64)
            np.add.at(logical, (np.arange(p2l.shape[0])[:, None], p2l), phys)  # copies add up to their expert
            windows.append(logical)
    if not windows:
        raise TraceImportError(f"{dumps[0][0]}: the dump holds no records")
    load = np.stack(windows)
    rows = _moe_rows(load.any(axis=(0, 2)), opts, load.shape[1], str(dumps[0][0]), notes)
    notes.append("per_pass records of all ranks are separate windows (each rank counts its own tokens)")
    return _load_trace(load, rows, E, _meta(opts, [p for p, _ in dumps], "per_pass", "forward pass"), notes, str(dumps[0][0]))


def _per_token(dumps: list[tuple[Path, dict]], opts: ImportOptions) -> Trace:
    notes: list[str] = []
    seen: set = set()
    per_req, prefill = [], []
    rows: list[int] | None = None
    top_k = None
    dup = 0
    for path, d in dumps:
        p2l = _p2l(path, d)
        for i, rec in enumerate(d["records"]):
            where = f"{path}: records[{i}]"
            ids = _np(rec["topk_ids_of_layer"], f"{where}.topk_ids_of_layer", 3)  # [layers, tokens, 8]
            if ids.shape[1] == 0:
                continue  # an idle pass
            key = (rec.get("forward_pass_id"), tuple(rec.get("input_ids") or ()), tuple(rec.get("positions") or ()))
            if key in seen:
                dup += 1
                continue
            seen.add(key)
            if ids.shape[0] != p2l.shape[0]:
                raise TraceImportError(f"{where}.topk_ids_of_layer: {ids.shape[0]} layers, the map has {p2l.shape[0]}")
            if rows is None:
                rows = _moe_rows((ids >= 0).any(axis=(1, 2)), opts, ids.shape[0], where, notes)
            sel = ids[rows]  # [L, tokens, 8]
            k = int((sel[0, 0] >= 0).sum())
            top_k = top_k or k
            if k != top_k or (sel[:, :, :top_k] < 0).any() or (sel[:, :, top_k:] >= 0).any():
                raise TraceImportError(f"{where}.topk_ids_of_layer: expected {top_k} routed ids then -1 padding for every "
                                       "token of every MoE layer (a dense layer in --layer-ids?)")
            phys = sel[:, :, :top_k]
            if phys.max() >= p2l.shape[1]:
                raise TraceImportError(f"{where}.topk_ids_of_layer: physical id {int(phys.max())} is outside the map's "
                                       f"{p2l.shape[1]} physical experts")
            logical = np.take_along_axis(p2l[rows][:, None, :], phys.reshape(len(rows), 1, -1), axis=2)
            per_req.append(logical.reshape(phys.shape).transpose(1, 0, 2))  # [tokens, L, K]
            decode = rec.get("forward_mode") == DECODE_MODE
            prefill.append(np.full(ids.shape[1], not decode, dtype=np.bool_))
    if not per_req:
        raise TraceImportError(f"{dumps[0][0]}: the dump holds no routed tokens")
    if dup:
        notes.append(f"{dup} records repeated on another rank (the same batch, e.g. plain TP) were kept once")
    notes.append("SGLang records no request ids: each (rank, forward pass) is one request; tokens of DECODE passes "
                 "are decode, all others prefill")
    E = max(int(_p2l(p, d).max()) + 1 for p, d in dumps)
    if opts.num_experts is not None:
        if opts.num_experts < E:
            raise TraceImportError(f"{dumps[0][0]}: key 'last_physical_to_logical_map' names {E} logical experts, "
                                   f"but --num-experts is {opts.num_experts}")
        E = opts.num_experts
    assert rows is not None
    return assemble(per_req, prefill, rows, E, _meta(opts, [p for p, _ in dumps], "per_token", None), None, notes)


def read(src: Sequence[str | Path], opts: ImportOptions) -> Trace | LoadTrace:
    files = expand_sources(src, "*.pt", "SGLang expert distribution (.pt)")
    dumps = [(f, _load(f)) for f in files]
    kinds = {"stat" if "logical_count" in d else ("per_token" if _has_tokens(d) else "per_pass") for _, d in dumps}
    if len(kinds) > 1:
        raise TraceImportError(f"{[str(f) for f in files]}: dumps of different recorder modes {sorted(kinds)}; import them separately")
    kind = kinds.pop()
    if kind == "stat":
        return _stat(dumps, opts)
    return _per_token(dumps, opts) if kind == "per_token" else _per_pass(dumps, opts)


def _has_tokens(d: dict) -> bool:
    recs = d.get("records")
    if not isinstance(recs, list):
        raise TraceImportError("an SGLang per_pass/per_token dump must hold a list under 'records'")
    return any("topk_ids_of_layer" in r for r in recs if isinstance(r, dict))
