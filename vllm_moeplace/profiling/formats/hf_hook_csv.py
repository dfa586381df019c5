"""`hf-hook-csv`: per-prompt CSVs written by a forward hook on each MoE gate of a Hugging Face model
(the layout of ngavhane/moe-beyond `training_data_eamc/`; DeepSeek-V2-Lite there).

File `prompt_<n>_data.csv`, header `Layer ID,Batch Number,Token,Activated Expert IDs`, one row per
(MoE layer, batch row, token): the decoder-layer index, the row of the hook's batch dimension, the
token's text (CSV-quoted when it holds commas, quotes or newlines), and the chosen expert ids as a
JSON list in the router's order. Rows of one (layer, batch) come in token order.

Request order: ascending prompt number <n>, then batch number: each batch row of a file is its own
sequence (the hook flattens [B, T]), so it becomes its own request. The CSV holds one forward pass
over the prompt, so every token is prefill. The token text at a position must agree across layers;
a mismatch means rows were lost or reordered, and is an error naming the line.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from vllm_moeplace.profiling.formats.common import (
    ImportOptions,
    TraceImportError,
    assemble,
    expand_sources,
    resolve_num_experts,
)
from vllm_moeplace.trace import Trace

HEADER = ["Layer ID", "Batch Number", "Token", "Activated Expert IDs"]
NAME = re.compile(r"prompt_(\d+)_data\.csv$")


def _prompt_number(path: Path) -> int:
    m = NAME.search(path.name)
    if not m:
        raise TraceImportError(f"{path}: file name must be prompt_<n>_data.csv (n orders the requests)")
    return int(m.group(1))


def _read_file(path: Path) -> tuple[list[int], list[np.ndarray]]:
    """(sorted MoE layer ids, one ids array [tokens, L, K] per batch row) of one CSV."""
    # batch -> layer -> [(expert ids, token text, line)]
    rows: dict[int, dict[int, list[tuple[list[int], str, int]]]] = {}
    top_k: int | None = None
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header != HEADER:
                raise TraceImportError(f"{path}:1: expected header {','.join(HEADER)}, got {header}")
            for rec in reader:
                where = f"{path}:{reader.line_num}"  # the record's last physical line
                if not rec:
                    continue
                if len(rec) != 4:
                    raise TraceImportError(f"{path}:{reader.line_num}: expected 4 fields, got {len(rec)}: {rec!r}")
                layer_s, batch_s, token, ids_s = rec
                try:
                    layer, batch = int(layer_s), int(batch_s)
                except ValueError:
                    raise TraceImportError(f"{where}: 'Layer ID' and 'Batch Number' must be integers, got {layer_s!r}, {batch_s!r}") from None
                if layer < 0 or batch < 0:
                    raise TraceImportError(f"{where}: negative 'Layer ID' {layer} or 'Batch Number' {batch}")
                try:
                    ids = json.loads(ids_s)
                except (ValueError, RecursionError) as e:  # also a 5000-digit number or [[[[...]]]]
                    raise TraceImportError(f"{where}: 'Activated Expert IDs' is not a JSON list: {ids_s[:80]!r} "
                                           f"({getattr(e, 'msg', type(e).__name__)})") from None
                if not isinstance(ids, list) or not ids or not all(type(x) is int for x in ids):
                    raise TraceImportError(f"{where}: 'Activated Expert IDs' must be a non-empty JSON list of integers, got {ids_s!r}")
                if top_k is None:
                    top_k = len(ids)
                elif len(ids) != top_k:
                    raise TraceImportError(f"{where}: {len(ids)} expert ids but earlier rows have {top_k} (inconsistent top_k)")
                if min(ids) < 0:
                    raise TraceImportError(f"{where}: negative expert id in {ids}")
                if len(set(ids)) != len(ids):
                    raise TraceImportError(f"{where}: an expert is chosen twice: {ids}")
                rows.setdefault(batch, {}).setdefault(layer, []).append((ids, token, reader.line_num))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TraceImportError(f"{path}: not a readable UTF-8 CSV file ({e})") from None
    if not rows:
        raise TraceImportError(f"{path}: no data rows")
    layers: list[int] | None = None
    out: list[np.ndarray] = []
    for batch in sorted(rows):
        by_layer = rows[batch]
        these = sorted(by_layer)
        if layers is None:
            layers = these
        elif these != layers:
            raise TraceImportError(f"{path}: batch {batch} has layers {these} but batch {min(rows)} has {layers}")
        ref_layer = these[0]
        ref = by_layer[ref_layer]
        for layer in these[1:]:
            cur = by_layer[layer]
            if len(cur) != len(ref):
                raise TraceImportError(
                    f"{path}: batch {batch}, layer {layer} has {len(cur)} tokens but layer {ref_layer} has {len(ref)} (wrong layer row count)"
                )
            for (_, tok, line), (_, tok0, line0) in zip(cur, ref):
                if tok != tok0:
                    raise TraceImportError(
                        f"{path}:{line}: token {tok!r} differs from {tok0!r} at the same position of layer {ref_layer} (line {line0})"
                    )
        # [tokens, L, K]: token-major so a token's route through the layers is contiguous
        out.append(np.array([[by_layer[l][t][0] for l in these] for t in range(len(ref))], dtype=np.int64))
    assert layers is not None
    return layers, out


def read(src: Sequence[str | Path], opts: ImportOptions) -> Trace:
    notes: list[str] = []
    files = expand_sources(src, "prompt_*_data.csv", "prompt_<n>_data.csv")
    numbered = sorted(((_prompt_number(f), f) for f in files), key=lambda nf: nf[0])
    for (n0, f0), (n1, f1) in zip(numbered, numbered[1:]):
        if n0 == n1:
            raise TraceImportError(f"prompt number {n0} appears twice: {f0} and {f1}")
    per_req: list[np.ndarray] = []
    origin: list[Path] = []
    layers0: list[int] | None = None
    for n, f in numbered:
        layers, seqs = _read_file(f)
        if layers0 is None:
            layers0 = layers
        elif layers != layers0:
            raise TraceImportError(f"{f}: MoE layers {layers} differ from {numbered[0][1]}'s {layers0} (wrong layer count)")
        if per_req and seqs[0].shape[2] != per_req[0].shape[2]:
            raise TraceImportError(f"{f}: top_k {seqs[0].shape[2]} differs from {numbered[0][1]}'s {per_req[0].shape[2]}")
        per_req.extend(seqs)
        origin.extend([f] * len(seqs))
    assert layers0 is not None
    if opts.layer_ids is not None and list(opts.layer_ids) != layers0:
        raise TraceImportError(f"--layer-ids {list(opts.layer_ids)} differ from the 'Layer ID' values in the files {layers0}")
    hottest = int(np.argmax([a.max() for a in per_req]))
    num_experts = resolve_num_experts(int(per_req[hottest].max()), opts, None, notes, str(origin[hottest]))
    meta = {
        "model": opts.model_name or "unknown (hf-hook-csv; pass --model-name)",
        "source": "hf-hook-csv",
        "format": "hf-hook-csv",
        "label": opts.label or "",
        "source_paths": [str(s) for s in src],
        "prompt_numbers": [n for n, _ in numbered],
    }
    prefill = [np.ones(len(a), dtype=np.bool_) for a in per_req]
    labels = None if opts.label is None else [opts.label] * len(per_req)
    return assemble(per_req, prefill, layers0, num_experts, meta, labels, notes)
