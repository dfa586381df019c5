"""`vllm-routed-experts`: the routing replay arrays vLLM returns with `enable_return_routed_experts`.

In vLLM 0.33 `CompletionOutput.routed_experts` is an integer array [tokens, layers, top_k] per request
(vllm/outputs.py; uint8 when num_experts <= 256, else uint16; vllm/model_executor/layers/fused_moe/
routed_experts_capturer.py). Its layer axis spans ALL decoder layers (`get_total_num_hidden_layers`),
indexed by decoder-layer id; rows of dense layers are never written and stay 0. Its token axis holds
the prompt tokens from `SamplingParams.routed_experts_prompt_start` on, then the generated tokens
except the last one (which is sampled but never fed back).

Accepted sources:
  * one `.npz` holding one array per request (request order: natural order of the array names,
    `2` before `10`), plus optional reserved arrays `prompt_lens` (int [R]: how many leading rows of
    each request are prefill) and `labels` (str [R]);
  * `.npy` files and/or folders of them (one array per request, natural file-name order), with the
    same reserved names `prompt_lens.npy` / `labels.npy` allowed next to them.
`--num-experts` is required (the arrays cannot tell it). Layers: with `--layer-ids`, an array with
exactly that many layers is taken as already compact; a wider array (vLLM's all-decoder-layer
layout) has those decoder layers selected. Without it, when top_k >= 2 the layers whose rows are all
0 everywhere (impossible for a routed layer: top-k ids are distinct) are taken as dense and dropped,
and the rest keep their index as decoder-layer id; both cases leave a note in meta. Without
`prompt_lens`, every token is flagged prefill and a note says the split is unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from vllm_moeplace.profiling.formats.common import (
    ImportOptions,
    TraceImportError,
    assemble,
    natural_key,
)
from vllm_moeplace.npzio import read_npy, read_npz
from vllm_moeplace.trace import Trace

RESERVED = ("prompt_lens", "labels")


def _load_npy(path: Path) -> np.ndarray:
    return read_npy(path, "routed-experts array", TraceImportError)  # no pickles, header vs size


def _collect(src: Sequence[str | Path]) -> tuple[list[tuple[str, np.ndarray]], dict[str, tuple[str, np.ndarray]]]:
    """([(where, array)] per request in order, {reserved name: (where, array)})."""
    arrays: list[tuple[str, np.ndarray]] = []
    reserved: dict[str, tuple[str, np.ndarray]] = {}

    def add(name: str, where: str, a: np.ndarray) -> None:
        if name in RESERVED:
            if name in reserved:
                raise TraceImportError(f"{where}: '{name}' given twice (also in {reserved[name][0]})")
            reserved[name] = (where, a)
        else:
            arrays.append((where, a))

    for item in src:
        p = Path(item)
        if p.is_dir():
            files = sorted(p.glob("*.npy"), key=lambda f: natural_key(f.name))
            if not files:
                raise TraceImportError(f"{p}: no .npy files in this folder")
            for f in files:
                add(f.stem, str(f), _load_npy(f))
        elif p.is_file() and p.suffix == ".npz":
            z = read_npz(p, "routed-experts archive", TraceImportError)
            for name in sorted(z, key=natural_key):
                add(name, f"{p}:{name}", z[name])
        elif p.is_file():
            add(p.stem, str(p), _load_npy(p))
        else:
            raise TraceImportError(f"{p}: no such file or folder")
    if not arrays:
        raise TraceImportError(f"{[str(s) for s in src]}: no per-request arrays found")
    return arrays, reserved


def _choose_layers(arrays: list[tuple[str, np.ndarray]], opts: ImportOptions, notes: list[str]) -> tuple[list[int], list[int]]:
    """(indices into the array's layer axis, decoder-layer ids of the kept layers)."""
    n_layers, top_k = arrays[0][1].shape[1:]
    if opts.layer_ids is not None:
        ids = list(opts.layer_ids)
        if len(ids) == n_layers:
            return list(range(n_layers)), ids
        if max(ids) < n_layers and min(ids) >= 0:
            return ids, ids
        raise TraceImportError(
            f"--layer-ids {ids} fit neither a compact array ({len(ids)} layers) nor vLLM's all-decoder-layer "
            f"layout (ids < {n_layers}); the arrays have {n_layers} layers"
        )
    if top_k >= 2:
        zero = np.ones(n_layers, dtype=bool)
        for _, a in arrays:
            zero &= ~a.any(axis=(0, 2))
        keep = [i for i in range(n_layers) if not zero[i]]
        if not keep:
            raise TraceImportError("every layer of every array is all 0: no routed layer found")
        if len(keep) < n_layers:
            notes.append(
                f"--layer-ids not given: layers {[i for i in range(n_layers) if zero[i]]} are all 0 (dense, never "
                f"written by vLLM) and were dropped; the {len(keep)} others keep their index as decoder-layer id"
            )
        else:
            notes.append(f"--layer-ids not given: the {n_layers} layers are taken as decoder layers 0..{n_layers - 1}")
        return keep, keep
    notes.append(
        f"--layer-ids not given and top_k is 1: all {n_layers} layers are taken as decoder layers 0..{n_layers - 1} "
        "(dense layers cannot be told apart from expert 0); pass --layer-ids"
    )
    return list(range(n_layers)), list(range(n_layers))


def read(src: Sequence[str | Path], opts: ImportOptions) -> Trace:
    notes: list[str] = []
    if opts.num_experts is None:
        raise TraceImportError("format vllm-routed-experts needs --num-experts (the arrays do not record it)")
    arrays, reserved = _collect(src)
    where0, a0 = arrays[0]
    for where, a in arrays:
        if a.ndim != 3 or a.dtype.kind not in "iu":
            raise TraceImportError(f"{where}: expected an integer array [tokens, layers, top_k], got {a.dtype} shape {list(a.shape)}")
        if a.shape[1:] != a0.shape[1:]:
            raise TraceImportError(f"{where}: [layers, top_k] = {list(a.shape[1:])} differs from {where0}'s {list(a0.shape[1:])}")
        if a.size and (int(a.min()) < 0 or int(a.max()) >= opts.num_experts):
            bad = int(a.min()) if int(a.min()) < 0 else int(a.max())
            tok, lay, _ = np.argwhere(a == bad)[0]
            raise TraceImportError(f"{where}: expert id {bad} at token {tok}, layer {lay} is out of range 0..{opts.num_experts - 1}")
    if a0.shape[2] < 1 or a0.shape[1] < 1:
        raise TraceImportError(f"{where0}: shape {list(a0.shape)} has no layers or no top_k")
    cols, layer_ids = _choose_layers(arrays, opts, notes)
    per_req = [a[:, cols, :].astype(np.int64) for _, a in arrays]
    for (where, _), a in zip(arrays, per_req):
        srt = np.sort(a, axis=2)
        dup = (srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2)
        if dup.any():
            tok, lay = np.argwhere(dup)[0]
            raise TraceImportError(
                f"{where}: token {tok}, decoder layer {layer_ids[lay]} chooses an expert twice {a[tok, lay].tolist()} "
                "(a dense layer? pass --layer-ids with the MoE layers only)"
            )

    R = len(per_req)
    if "prompt_lens" in reserved:
        pwhere, pl = reserved["prompt_lens"]
        if pl.shape != (R,) or pl.dtype.kind not in "iu":
            raise TraceImportError(f"{pwhere}: expected an integer array [{R}] (one per request), got {pl.dtype} shape {list(pl.shape)}")
        for r, (n, a) in enumerate(zip(pl.tolist(), per_req)):
            if not 0 <= n <= len(a):
                raise TraceImportError(f"{pwhere}: request {r} ({arrays[r][0]}) has {len(a)} rows but prompt_lens says {n}")
        prefill = [np.arange(len(a)) < n for n, a in zip(pl.tolist(), per_req)]
    else:
        notes.append("no prompt_lens given: prefill/decode split unknown, every token is flagged prefill")
        prefill = [np.ones(len(a), dtype=np.bool_) for a in per_req]
    labels = None
    if "labels" in reserved:
        lwhere, lab = reserved["labels"]
        if lab.shape != (R,) or lab.dtype.kind not in "US":
            raise TraceImportError(f"{lwhere}: expected a string array [{R}] (one per request), got {lab.dtype} shape {list(lab.shape)}")
        labels = [str(x) for x in lab]
    elif opts.label is not None:
        labels = [opts.label] * R
    meta = {
        "model": opts.model_name or "unknown (vllm-routed-experts; pass --model-name)",
        "source": "vLLM enable_return_routed_experts",
        "format": "vllm-routed-experts",
        "label": opts.label or "",
        "source_paths": [str(s) for s in src],
    }
    return assemble(per_req, prefill, layer_ids, opts.num_experts, meta, labels, notes)
