"""`trtllm-expert-statistic`: TensorRT-LLM's expert statistics folder (`EXPERT_STATISTIC_PATH`).

Read from TensorRT-LLM's source: tensorrt_llm/_torch/expert_statistic.py (the writer) and
examples/wide_ep/ep_load_balancer/utils.py (`load_expert_statistic`, their reader). With
`EXPERT_STATISTIC_ITER_RANGE=start-stop` every rank counts, per iteration and MoE layer, how many of
its tokens chose each expert (`torch.bincount` of `token_selected_experts`), and writes
  * `meta_info.json` (rank 0): {"num_experts": ..., "num_experts_per_token": ...};
  * `rank{r}.safetensors`: one 1-D integer tensor per key "{iter}_{layer}" (`layer` = the MoE
    module's `layer_idx`, the decoder-layer index), length num_experts.
Their reader sums the tensors of all rank files key by key and requires every (iteration, layer)
pair present; so does this importer. Newer versions also write `rank{r}_raw.safetensors` (raw
per-token ids) and older ones `cooccurrence_rank{r}.safetensors`; both are skipped here, as their
reader skips `_raw`.

The result is a load-only trace (`load_trace.py`), one window per iteration. With the load balancer
on, TensorRT-LLM counts SLOT ids (`num_slots` long) instead of expert ids; such a folder cannot be
mapped back without the assignment it ran with and is refused when `--num-experts` says so.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

from vllm_moeplace.load_trace import LoadTrace
from vllm_moeplace.jsonio import read_json
from vllm_moeplace.profiling.formats.common import ImportOptions, TraceImportError
from vllm_moeplace.profiling.formats.safetensors_np import read_safetensors
from vllm_moeplace.trace import TraceError

RANK_FILE = re.compile(r"^rank(\d+)\.safetensors$")
KEY = re.compile(r"^(\d+)_(\d+)$")


def _folder(src: Sequence[str | Path]) -> Path:
    if len(src) != 1 or not Path(src[0]).is_dir():
        raise TraceImportError(f"{[str(s) for s in src]}: trtllm-expert-statistic takes one folder (EXPERT_STATISTIC_PATH)")
    return Path(src[0])


def _meta(folder: Path) -> dict:
    path = folder / "meta_info.json"
    if not path.exists():
        raise TraceImportError(f"{path}: missing (TensorRT-LLM rank 0 writes it beside rank*.safetensors)")
    meta = read_json(path, "TensorRT-LLM meta_info.json", TraceImportError)
    for k in ("num_experts", "num_experts_per_token"):
        v = meta.get(k) if isinstance(meta, dict) else None
        if type(v) is not int or v <= 0:
            raise TraceImportError(f"{path}: field '{k}': expected a positive integer, got {v!r}")
    return meta


def read(src: Sequence[str | Path], opts: ImportOptions) -> LoadTrace:
    folder = _folder(src)
    meta_info = _meta(folder)
    n = meta_info["num_experts"]
    if opts.num_experts is not None and opts.num_experts != n:
        raise TraceImportError(
            f"{folder / 'meta_info.json'}: field 'num_experts': {n}, but --num-experts is {opts.num_experts}; "
            "a statistic recorded with the load balancer on counts slots, not experts, and cannot be imported"
        )
    files = sorted((f for f in folder.iterdir() if RANK_FILE.match(f.name)), key=lambda f: int(RANK_FILE.match(f.name).group(1)))
    if not files:
        raise TraceImportError(f"{folder}: no rank{{r}}.safetensors files")
    total: dict[tuple[int, int], np.ndarray] = {}
    for f in files:
        for key, counts in read_safetensors(f).items():
            m = KEY.match(key)
            if not m:
                raise TraceImportError(f"{f}: tensor '{key}': expected a key '{{iteration}}_{{layer}}'")
            if counts.shape != (n,) or counts.dtype.kind not in "iu":
                raise TraceImportError(f"{f}: tensor '{key}': expected {n} integer counts (meta num_experts), "
                                       f"got {counts.dtype} shape {list(counts.shape)}")
            k = (int(m.group(1)), int(m.group(2)))
            total[k] = total.get(k, 0) + counts.astype(np.int64)
    iters = sorted({i for i, _ in total})
    layers = sorted({l for _, l in total})
    missing = [(i, l) for i in iters for l in layers if (i, l) not in total]
    if missing:
        i, l = missing[0]
        raise TraceImportError(f"{folder}: no counts for iteration {i}, layer {l} in any rank file "
                               f"({len(missing)} (iteration, layer) pairs missing)")
    if opts.layer_ids is not None and sorted(opts.layer_ids) != layers:
        raise TraceImportError(f"--layer-ids {list(opts.layer_ids)} differ from the layers in {folder}: {layers}")
    load = np.stack([np.stack([total[(i, l)] for l in layers]) for i in iters])
    notes = [f"load only: {len(iters)} iterations {iters[0]}..{iters[-1]} summed over {len(files)} rank file(s); "
             "no per-token routing, so only --objective balance can use it"]
    if iters[-1] - iters[0] + 1 != len(iters):
        notes.append(f"iterations are not contiguous ({len(iters)} between {iters[0]} and {iters[-1]})")
    meta = {
        "model": opts.model_name or "unknown (trtllm-expert-statistic; pass --model-name)",
        "source": "TensorRT-LLM EXPERT_STATISTIC_PATH",
        "format": "trtllm-expert-statistic",
        "window": "iteration",
        "iterations": iters,
        "top_k": meta_info["num_experts_per_token"],
        "label": opts.label or "",
        "source_paths": [str(folder)],
        "import_notes": notes,
    }
    try:
        return LoadTrace(expert_load=load, layer_ids=np.asarray(layers, dtype=np.int32), num_experts=n, meta=meta)
    except TraceError as e:
        raise TraceImportError(f"{folder}: imported data is not a valid load trace: {e}") from None
