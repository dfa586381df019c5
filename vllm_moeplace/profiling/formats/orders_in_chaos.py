"""`orders-in-chaos`: the per-query JSON of the "Orders in Chaos" routing dataset (arXiv 2510.05497,
dataset `core12345/MoE_expert_selection_trace`; Llama-4-Maverick, MMLU subjects).

One file `<q>.json` per query: a JSON list of steps. Step 0 is the prefill (one entry per prompt
token), steps 1.. are decode steps (one token each). A step maps decoder-layer index "0".."N-1" to
null (dense layer) or to a list with one entry per token, each entry the list of chosen expert ids.

Accepted sources (SRC, one or more):
  * a file `<q>.json`;
  * a folder holding `<q>.json` files directly: one label for all, the folder's name (or --label);
  * a folder of subject folders, e.g. `mmlu/abstract_algebra/<q>.json`: each request's label is
    its folder's path relative to SRC (`mmlu/abstract_algebra`).
Request order: folders in name order, files in numeric order (`2.json` before `10.json`).
MoE layers are the keys that are non-null in step 0; every step of every file must agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from vllm_moeplace.jsonio import read_json
from vllm_moeplace.profiling.formats.common import (
    ImportOptions,
    TraceImportError,
    assemble,
    natural_key,
    resolve_num_experts,
)
from vllm_moeplace.trace import Trace

MODEL = "meta-llama/Llama-4-Maverick-17B-128E-Instruct"
SOURCE = "arXiv 2510.05497 dataset core12345/MoE_expert_selection_trace"


def _collect(src: Sequence[str | Path], label: str | None) -> list[tuple[Path, str]]:
    """(file, label) pairs in request order."""
    out: list[tuple[Path, str]] = []
    for item in src:
        root = Path(item)
        if root.is_file():
            out.append((root, label or root.parent.name))
            continue
        if not root.is_dir():
            raise TraceImportError(f"{root}: no such file or folder")
        files = [f for f in root.rglob("*.json") if f.is_file()]
        if not files:
            raise TraceImportError(f"{root}: no <q>.json files in this folder or below")
        for f in sorted(files, key=lambda f: [natural_key(p) for p in f.relative_to(root).parts]):
            rel = f.parent.relative_to(root)
            # flat folder: the folder itself names the workload; nested: the sub-path is the label
            lab = (label or root.resolve().name) if rel == Path(".") else rel.as_posix()
            out.append((f, lab))
    return out


def _read_file(path: Path) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(MoE decoder-layer ids, ids [tokens, L, K], is_prefill [tokens]) of one query file."""
    steps = read_json(path, "orders-in-chaos query file", TraceImportError)  # UTF-8, depth, NaN, size
    if not isinstance(steps, list) or not steps:
        raise TraceImportError(f"{path}: expected a non-empty JSON list of steps, got {type(steps).__name__}")
    moe_layers: list[int] | None = None
    rows: list[list[list[int]]] = []  # per token: per MoE layer: expert ids
    prefill: list[bool] = []
    top_k: int | None = None
    for s, step in enumerate(steps):
        where = f"{path}: step {s}"
        if not isinstance(step, dict):
            raise TraceImportError(f"{where}: expected an object of layer -> token lists, got {type(step).__name__}")
        try:
            layers = sorted((int(k), v) for k, v in step.items())
        except ValueError:
            raise TraceImportError(f"{where}: layer keys must be decoder-layer indices, got {sorted(step)}") from None
        routed = [(li, v) for li, v in layers if v is not None]
        ids_here = [li for li, _ in routed]
        if moe_layers is None:
            if not routed:
                raise TraceImportError(f"{where}: every layer is null (no MoE layer)")
            moe_layers = ids_here
        elif ids_here != moe_layers:
            raise TraceImportError(f"{where}: MoE layers {ids_here} differ from step 0's {moe_layers}")
        n_tok = None
        for li, v in routed:
            if not isinstance(v, list) or not v:
                raise TraceImportError(f"{where}, layer {li}: expected a non-empty list of per-token expert lists")
            if n_tok is None:
                n_tok = len(v)
            elif len(v) != n_tok:
                raise TraceImportError(f"{where}, layer {li}: {len(v)} tokens but layer {routed[0][0]} has {n_tok}")
        if s > 0 and n_tok != 1:
            # decode steps carry one token; more would mean a layout we do not understand
            raise TraceImportError(f"{where}: a decode step must hold 1 token, got {n_tok}")
        for t in range(n_tok or 0):
            tok: list[list[int]] = []
            for li, v in routed:
                e = v[t]
                if not isinstance(e, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in e):
                    raise TraceImportError(f"{where}, layer {li}, token {t}: expected a list of integer expert ids, got {e!r}")
                if top_k is None:
                    top_k = len(e)
                    if top_k == 0:
                        raise TraceImportError(f"{where}, layer {li}, token {t}: empty expert list")
                elif len(e) != top_k:
                    raise TraceImportError(f"{where}, layer {li}, token {t}: {len(e)} experts but top_k is {top_k} elsewhere in the file")
                if any(x < 0 for x in e):
                    raise TraceImportError(f"{where}, layer {li}, token {t}: negative expert id in {e}")
                if len(set(e)) != len(e):
                    raise TraceImportError(f"{where}, layer {li}, token {t}: an expert is chosen twice: {e}")
                tok.append(e)
            rows.append(tok)
            prefill.append(s == 0)
    assert moe_layers is not None and top_k is not None
    ids = np.asarray(rows, dtype=np.int64)  # [tokens, L, K]
    return moe_layers, ids, np.asarray(prefill, dtype=np.bool_)


def read(src: Sequence[str | Path], opts: ImportOptions) -> Trace:
    notes: list[str] = []
    pairs = _collect(src, opts.label)
    per_req, prefill, labels = [], [], []
    layers0: list[int] | None = None
    first: Path | None = None
    for path, lab in pairs:
        layers, ids, pf = _read_file(path)
        if layers0 is None:
            layers0, first = layers, path
        elif layers != layers0:
            raise TraceImportError(f"{path}: MoE layers {layers} differ from {first}'s {layers0}")
        if per_req and ids.shape[2] != per_req[0].shape[2]:
            raise TraceImportError(f"{path}: top_k {ids.shape[2]} differs from {first}'s {per_req[0].shape[2]}")
        per_req.append(ids)
        prefill.append(pf)
        labels.append(lab)
    assert layers0 is not None
    if opts.layer_ids is not None and list(opts.layer_ids) != layers0:
        raise TraceImportError(f"--layer-ids {list(opts.layer_ids)} differ from the MoE layers in the files {layers0}")
    hottest = int(np.argmax([a.max() for a in per_req]))  # the file to blame if an id is out of range
    num_experts = resolve_num_experts(int(per_req[hottest].max()), opts, None, notes, str(pairs[hottest][0]))
    meta = {
        "model": opts.model_name or MODEL,
        "source": SOURCE,
        "format": "orders-in-chaos",
        "label": ", ".join(dict.fromkeys(labels)),
        "source_paths": [str(s) for s in src],
    }
    return assemble(per_req, prefill, layers0, num_experts, meta, labels, notes)
