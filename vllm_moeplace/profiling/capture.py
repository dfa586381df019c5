"""Worker-side router capture for `moeplace profile` (the `moeplace_capture` vLLM general plugin).

How it works (vLLM 0.32/0.33 CPU and GPU model runner V1):

1. `register()` runs in every vLLM process. It does nothing unless capture was requested
   (environment variable `VLLM_MOEPLACE_CAPTURE=1`, set by `profiling/runner.py` before the engine
   starts, so spawned engine and worker processes inherit it). When requested it wraps
   `Worker.load_model` so that, in the worker, right after the weights are loaded and BEFORE the
   first forward (which is when torch.compile traces the model), step 2 happens.
2. `install(worker)` binds, on global rank 0 only, one callback per MoE layer through vLLM's own
   hook `BaseRouter.set_capture_fn`: the callback copies the router's top-k ids (logical ids,
   taken before any EPLB mapping) into a preallocated int16 buffer of that layer,
   [max_num_batched_tokens, K], and writes the row count into a one-element counter. Both are
   in-place ops on tensors: torch.compile traces them into the graph as input mutations (no
   Python side effect, no I/O, no graph break). The host checks the counters every step, so a
   callback missing from a compiled graph stops the run instead of recording stale rows.
   With `--topk-weights` the router's `_compute_routing` is wrapped the same way to copy the
   weights (float16) too.
3. The model runner's `execute_model` is wrapped (outside the compiled graph): after each real
   step it reads the first `total_num_scheduled_tokens` rows of every layer buffer and appends them
   to host-side int16 chunks together with, for each row, the vLLM request id and token position.
   Rows are laid out as the model runner builds its input batch: requests in
   `input_batch.req_ids` order, each request's scheduled tokens contiguous, positions starting at
   the request's `num_computed_tokens` (taken from the scheduler output). A token is prefill iff
   its position is < the request's prompt length. With a placement plan active the router emits
   physical ids; they are mapped back to logical ids with the serving plugin's map at drain. Dummy / profile / warm-up forwards never pass
   through `execute_model`, and recording only starts when the driver calls
   `moeplace_capture_start` after engine init.
4. The driver pulls the chunks with `LLM.collective_rpc("moeplace_capture_drain")` through
   `CaptureWorkerExtension` (passed as `worker_extension_cls`).

Memory: the in-graph buffers are fixed, L x max_num_batched_tokens x K x 2 bytes (x 2 more with
weights) + 8 x L bytes of counters; the host side grows only with tokens x L x K (int16,
+ float16 weights) plus 9 bytes of (request, position, prefill) per token.

Heavy imports (vllm, torch) only inside functions: this module is imported by the plugin loader of
every vLLM process and by the CLI.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ENV_FLAG = "VLLM_MOEPLACE_CAPTURE"
"""Set to "1" to request capture; every other value (or absence) makes `register()` a no-op."""

CONFIG_KEY = "moeplace_capture"
"""`additional_config` key with the capture options ({"weights": bool}). Being in the config it is
part of vLLM's compile-cache hash, so a graph compiled with capture is never reused without it."""

CAPTURE_ABI = 3
"""Bumped whenever the in-graph callbacks change, so stale compiled graphs are never reused."""

EXTENSION_CLS = "vllm_moeplace.profiling.capture.CaptureWorkerExtension"

_PATCH_MARK = "_moeplace_capture_wrapped"


def capture_requested() -> bool:
    return os.environ.get(ENV_FLAG, "") == "1"


def register() -> None:
    """vLLM general-plugin entry point. No-op unless capture is requested; safe to call twice."""
    if not capture_requested():
        return
    from vllm.v1.worker import gpu_worker  # CPUWorker subclasses this Worker

    worker_cls = gpu_worker.Worker
    original = worker_cls.load_model
    if getattr(original, _PATCH_MARK, False):
        return

    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        install(self)
        return result

    setattr(load_model, _PATCH_MARK, True)
    load_model.__wrapped__ = original  # type: ignore[attr-defined]
    load_model.__doc__ = original.__doc__
    worker_cls.load_model = load_model


# ---- in-graph callbacks ----------------------------------------------------------------------


class _CopyIds:
    """capture_fn of one MoE layer: rows [0, n) of `buf` <- topk_ids (int32 -> int16), rows <- n.

    A plain object with tensor attributes so torch.compile sees two in-place ops on graph inputs;
    nothing else happens here (no Python state changes, no host sync). `rows` lets the host check
    that the callback really ran in this step, over all of its tokens."""

    def __init__(self, buf, rows) -> None:
        self.buf = buf  # int16 [max_tokens, K]
        self.rows = rows  # int64 [1]

    def __call__(self, topk_ids) -> None:
        n = topk_ids.shape[0]
        self.buf[:n].copy_(topk_ids)
        self.rows.fill_(n)


class _CopyPhysical:
    """Wraps a router's `_apply_eplb_mapping` when the placement plugin's logical->physical table is
    installed there (serving/mapping.py): also copies the PHYSICAL ids the table chose, so a
    benchmark can count what the serving path really dispatched (copies included)."""

    def __init__(self, apply, buf) -> None:
        self.apply = apply
        self.buf = buf  # int16 [max_tokens, K]

    def __call__(self, topk_ids):
        out = self.apply(topk_ids)
        self.buf[: out.shape[0]].copy_(out)
        return out


class _CopyWeights:
    """Wraps a router's `_compute_routing` to also copy the top-k weights (float16)."""

    def __init__(self, compute, buf) -> None:
        self.compute = compute
        self.buf = buf  # float16 [max_tokens, K]

    def __call__(self, hidden_states, router_logits, indices_type, **kwargs):
        topk_weights, topk_ids = self.compute(hidden_states, router_logits, indices_type, **kwargs)
        self.buf[: topk_weights.shape[0]].copy_(topk_weights)
        return topk_weights, topk_ids


# ---- per-worker state --------------------------------------------------------------------------


@dataclass
class _Chunk:
    ids: np.ndarray  # int16 [n, L, K]
    weights: np.ndarray | None  # float16 [n, L, K]
    req_index: np.ndarray  # int32 [n], index into _CaptureState.req_names
    positions: np.ndarray  # int32 [n]
    is_prefill: np.ndarray  # bool [n]
    physical: np.ndarray | None = None  # int16 [n, L, K]: ids after the plugin's table (mapped plans)
    batch_rows: np.ndarray | None = None  # int32 [n]: the token's row in its step's batch


@dataclass
class _CaptureState:
    layer_ids: list[int]
    top_k: int
    num_experts: int
    max_tokens: int
    ids_bufs: list  # per layer int16 [max_tokens, K]
    weight_bufs: list | None
    phys_to_log: dict[int, np.ndarray] | None = None  # decoder layer -> [E] (a placement plan is active)
    phys_bufs: list | None = None  # per layer int16 [max_tokens, K] (the plugin's mapping mechanism)
    armed: bool = False
    chunks: list[_Chunk] = field(default_factory=list)
    req_names: list[str] = field(default_factory=list)
    req_lookup: dict[str, int] = field(default_factory=dict)
    prompt_lens: dict[str, int] = field(default_factory=dict)
    row_counts: list = field(default_factory=list)  # per layer int64 [1]: rows the callback wrote
    steps: int = 0
    host_seconds: float = 0.0  # time spent in record_step (reported by the benchmark)

    def info(self) -> dict[str, Any]:
        return {
            "layer_ids": list(self.layer_ids),
            "top_k": self.top_k,
            "num_experts": self.num_experts,
            "max_tokens": self.max_tokens,
            "weights": self.weight_bufs is not None,
            "ids_remapped_by_plan": sorted(self.phys_to_log) if self.phys_to_log else [],
            "buffer_bytes": int(sum(b.numel() * b.element_size() for b in self.ids_bufs + (self.weight_bufs or []))),
            "host_seconds": self.host_seconds,
        }

    def reset(self) -> None:
        self.chunks.clear()
        self.req_names.clear()
        self.req_lookup.clear()
        self.steps = 0
        self.host_seconds = 0.0

    def _req(self, name: str) -> int:
        i = self.req_lookup.get(name)
        if i is None:
            i = self.req_lookup[name] = len(self.req_names)
            self.req_names.append(name)
        return i

    def record_step(self, runner, scheduler_output) -> None:
        """Copy this step's buffer rows out and label each with (request, position, prefill)."""
        import torch

        t0 = time.perf_counter()
        so = scheduler_output
        total = int(so.total_num_scheduled_tokens)
        start: dict[str, int] = {}
        for new in so.scheduled_new_reqs:
            n_prompt = len(new.prompt_token_ids) if new.prompt_token_ids is not None else None
            if n_prompt is None:  # prompt embeddings: the runner's own state knows the length
                n_prompt = int(runner.requests[new.req_id].num_prompt_tokens)
            self.prompt_lens[new.req_id] = n_prompt
            start[new.req_id] = int(new.num_computed_tokens)
        cached = so.scheduled_cached_reqs
        start.update(zip(cached.req_ids, cached.num_computed_tokens))
        ib = runner.input_batch
        order = ib.req_ids[: ib.num_reqs]
        nst = so.num_scheduled_tokens
        n = len(order)
        counts = np.fromiter((nst.get(r, 0) for r in order), np.int64, n)
        if int(counts.sum()) != total:
            raise RuntimeError(
                f"moeplace capture: input batch has {int(counts.sum())} scheduled tokens, scheduler says {total}; "
                "the row -> request mapping would be wrong"
            )
        live = counts > 0
        order = [r for r, keep in zip(order, live) if keep]
        counts = counts[live]
        first = np.fromiter((start[r] for r in order), np.int64, len(order))
        plen = np.fromiter((self.prompt_lens[r] for r in order), np.int64, len(order))
        req = np.fromiter((self._req(r) for r in order), np.int32, len(order))
        with torch.no_grad():
            rows = torch.cat(self.row_counts).numpy()
            if (rows < total).any():
                layer = self.layer_ids[int(np.argmin(rows))]
                raise RuntimeError(
                    f"moeplace capture: layer {layer} routed {int(rows.min())} rows in a step of {total} tokens "
                    "(capture callback missing from the compiled graph, or tokens split across ranks)"
                )
            for r in self.row_counts:
                r.fill_(-1)  # the next step must write it again
            ids = torch.stack([b[:total] for b in self.ids_bufs], dim=1).numpy()
            weights = physical = None
            if self.weight_bufs is not None:
                weights = torch.stack([b[:total] for b in self.weight_bufs], dim=1).numpy()
            if self.phys_bufs is not None:
                physical = torch.stack([b[:total] for b in self.phys_bufs], dim=1).numpy()
        # Row i belongs to request req[j] for the j whose block holds i; its position is the
        # request's first position plus the offset inside the block.
        block_start = np.cumsum(counts) - counts
        owner = np.repeat(np.arange(len(order)), counts)
        positions = (first[owner] + np.arange(total) - block_start[owner]).astype(np.int32)
        self.chunks.append(_Chunk(ids, weights, req[owner], positions, positions < plen[owner], physical,
                                  np.arange(total, dtype=np.int32)))
        self.steps += 1
        for rid in so.finished_req_ids:
            self.prompt_lens.pop(rid, None)
        self.host_seconds += time.perf_counter() - t0

    def drain(self) -> dict[str, Any]:
        """Everything recorded since the last drain, as plain arrays (then forgotten here)."""
        L, K = len(self.layer_ids), self.top_k
        if self.chunks:
            out = {
                "ids": np.concatenate([c.ids for c in self.chunks]),
                "req_index": np.concatenate([c.req_index for c in self.chunks]),
                "positions": np.concatenate([c.positions for c in self.chunks]),
                "is_prefill": np.concatenate([c.is_prefill for c in self.chunks]),
                "batch_rows": np.concatenate([c.batch_rows for c in self.chunks]),
            }
            if self.weight_bufs is not None:
                out["weights"] = np.concatenate([c.weights for c in self.chunks])
            if self.phys_bufs is not None:
                out["physical"] = np.concatenate([c.physical for c in self.chunks])
        else:
            out = {
                "ids": np.zeros((0, L, K), np.int16),
                "req_index": np.zeros(0, np.int32),
                "positions": np.zeros(0, np.int32),
                "is_prefill": np.zeros(0, np.bool_),
                "batch_rows": np.zeros(0, np.int32),
            }
            if self.weight_bufs is not None:
                out["weights"] = np.zeros((0, L, K), np.float16)
            if self.phys_bufs is not None:
                out["physical"] = np.zeros((0, L, K), np.int16)
        if self.phys_to_log:
            # With a plan the router emits PHYSICAL ids (its rows were permuted at load time);
            # the trace records LOGICAL (checkpoint) ids.
            for li, layer in enumerate(self.layer_ids):
                perm = self.phys_to_log.get(layer)
                if perm is not None:
                    out["ids"][:, li] = perm.astype(np.int16)[out["ids"][:, li]]
        packed: dict[str, Any] = {k: pack_array(v) for k, v in out.items()}
        packed["req_names"] = list(self.req_names)
        packed["steps"] = self.steps
        packed["host_seconds"] = self.host_seconds
        self.reset()
        return packed


def pack_array(a: np.ndarray) -> dict[str, Any]:
    """An ndarray as plain msgpack-able values (vLLM's RPC reply path does not decode ndarrays)."""
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def unpack_array(d: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


class CaptureError(RuntimeError):
    """The model cannot be captured (unsupported router / kernel / configuration)."""


def _moe_runners(model) -> list:
    from vllm.model_executor.layers.fused_moe.runner.moe_runner_interface import MoERunnerInterface

    return [m for m in model.modules() if isinstance(m, MoERunnerInterface)]


def install(worker) -> _CaptureState | None:
    """Bind the capture callbacks in this worker's freshly loaded model (rank 0 only)."""
    import torch
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    cfg = (worker.vllm_config.additional_config or {}).get(CONFIG_KEY)
    if not cfg:
        return None
    if getattr(worker, "_moeplace_capture", None) is not None:
        return worker._moeplace_capture
    if worker.rank != 0:
        # Every TP/EP rank computes the same routing for every token (no all2all on this path);
        # one copy is enough.
        return None
    pc = worker.vllm_config.parallel_config
    if pc.data_parallel_size > 1 or pc.pipeline_parallel_size > 1:
        # DP splits tokens across engines; PP leaves later layers on other ranks.
        raise CaptureError("moeplace capture: data or pipeline parallelism is not supported (use TP [+ EP])")
    if worker.vllm_config.speculative_config is not None:
        raise CaptureError("moeplace capture: speculative decoding is not supported (rejected draft tokens are routed too)")
    runner = worker.model_runner
    model = runner.get_model()
    moe = _moe_runners(model)
    if not moe:
        raise CaptureError("moeplace capture: the model has no vLLM MoE layers")
    moe.sort(key=lambda m: m.layer_id)
    top_k = {int(m.router.top_k) for m in moe}
    if len(top_k) != 1:
        raise CaptureError(f"moeplace capture: MoE layers disagree on top_k {sorted(top_k)}")
    K = top_k.pop()
    max_tokens = int(runner.max_num_tokens)
    want_weights = bool(cfg.get("weights", False))
    ids_bufs, row_counts, weight_bufs = [], [], ([] if want_weights else None)
    from vllm_moeplace.serving import mapping

    mapped = [mapping.is_installed(m.router) for m in moe]
    if any(mapped) and not all(mapped):
        raise CaptureError("moeplace capture: the placement plan maps some MoE layers and not others")
    phys_bufs = [] if any(mapped) else None
    for m in moe:
        router = m.router
        if not isinstance(router, BaseRouter):
            raise CaptureError(f"moeplace capture: layer {m.layer_id}: router {type(router).__name__} has no capture hook")
        if m.is_monolithic:
            raise CaptureError(f"moeplace capture: layer {m.layer_id}: monolithic MoE kernels route inside the kernel")
        buf = torch.zeros(max_tokens, K, dtype=torch.int16)
        rows = torch.full((1,), -1, dtype=torch.int64)
        router.set_capture_fn(_CopyIds(buf, rows))
        ids_bufs.append(buf)
        row_counts.append(rows)
        if phys_bufs is not None:
            pbuf = torch.zeros(max_tokens, K, dtype=torch.int16)
            router._apply_eplb_mapping = _CopyPhysical(router._apply_eplb_mapping, pbuf)
            phys_bufs.append(pbuf)
        if want_weights:
            wbuf = torch.zeros(max_tokens, K, dtype=torch.float16)
            router._compute_routing = _CopyWeights(router._compute_routing, wbuf)
            weight_bufs.append(wbuf)
    num_experts = int(getattr(moe[0].moe_config, "num_logical_experts", 0) or moe[0].router.global_num_experts)
    state = _CaptureState(
        phys_to_log=_plan_map(worker.vllm_config),
        layer_ids=[int(m.layer_id) for m in moe],
        top_k=K,
        num_experts=num_experts,
        max_tokens=max_tokens,
        ids_bufs=ids_bufs,
        weight_bufs=weight_bufs,
        row_counts=row_counts,
        phys_bufs=phys_bufs,
    )
    original = runner.execute_model

    def execute_model(scheduler_output, *args, **kwargs):
        out = original(scheduler_output, *args, **kwargs)
        if state.armed and scheduler_output.total_num_scheduled_tokens > 0:
            state.record_step(runner, scheduler_output)
        return out

    runner.execute_model = execute_model
    worker._moeplace_capture = state
    return state


def _plan_map(vllm_config) -> dict[int, np.ndarray] | None:
    """The serving plugin's physical -> logical expert map of the active placement plan, if any."""
    from vllm_moeplace.serving.settings import physical_to_logical_map

    return physical_to_logical_map(vllm_config)


class CaptureWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`) for `LLM.collective_rpc` calls.

    Ranks without capture (rank != 0, or capture not requested) answer None."""

    def moeplace_capture_info(self) -> dict[str, Any] | None:
        state = getattr(self, "_moeplace_capture", None)
        return None if state is None else state.info()

    def moeplace_capture_start(self) -> dict[str, Any] | None:
        state = getattr(self, "_moeplace_capture", None)
        if state is None:
            return None
        state.reset()
        state.armed = True
        return state.info()

    def moeplace_capture_drain(self) -> dict[str, Any] | None:
        state = getattr(self, "_moeplace_capture", None)
        return None if state is None else state.drain()

    def moeplace_capture_stop(self) -> None:
        state = getattr(self, "_moeplace_capture", None)
        if state is not None:
            state.armed = False
