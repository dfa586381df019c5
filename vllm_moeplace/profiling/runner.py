"""Drive the real vLLM engine over a prompt set and turn the captured router decisions into a Trace.

The engine runs in-process through the offline `LLM` API (vLLM spawns its engine core and workers:
callers must be `if __name__ == "__main__":`-safe). Requests are added in prompt-file order with
ids `moeplace-<i>` and the engine is stepped by hand (`LLMEngine.step`) so we own the progress bar.
The capture itself lives in the workers (`capture.py`); here we only switch it on, arm it after
engine init (so profile / warm-up dummy batches are never recorded), drain it and assemble.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.profiling import capture
from vllm_moeplace.profiling.prompts import PromptRecord
from vllm_moeplace.trace import Trace

REQUEST_PREFIX = "moeplace-"
# vLLM appends "-<8 random chars>" to external request ids to make them unique internally.
_REQ_RE = re.compile(rf"^{re.escape(REQUEST_PREFIX)}(\d+)(?:-[0-9A-Za-z]+)?$")


class ProfileError(MoeplaceError):
    """Bad profiling options or a capture that cannot be turned into a trace."""


@dataclass(frozen=True)
class ProfileOptions:
    model: str
    max_tokens: int = 32
    topk_weights: bool = False
    ignore_eos: bool = False
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for `vllm.LLM` (tensor_parallel_size, enable_expert_parallel, dtype, ...)."""

    def check(self) -> None:
        if self.max_tokens < 1:
            raise ProfileError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        ek = self.engine_kwargs
        if ek.get("enable_prefix_caching"):
            raise ProfileError("--enable-prefix-caching: cached prefix tokens never reach the router; profiling turns it off")
        if ek.get("worker_extension_cls") not in (None, capture.EXTENSION_CLS):
            raise ProfileError(f"worker_extension_cls={ek['worker_extension_cls']!r}: profiling needs its own ({capture.EXTENSION_CLS})")
        if (ek.get("data_parallel_size") or 1) > 1 or (ek.get("pipeline_parallel_size") or 1) > 1:
            raise ProfileError("data / pipeline parallelism is not supported while profiling (use TP [+ EP])")
        if ek.get("speculative_config"):
            raise ProfileError("speculative decoding is not supported while profiling (rejected drafts are routed too)")


@dataclass(frozen=True)
class ProfileResult:
    trace: Trace | None  # None when run without capture (benchmark baseline)
    seconds: float  # wall time of the generation loop (engine start excluded)
    prompt_tokens: int
    generated_tokens: int
    engine_init_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return (self.prompt_tokens + self.generated_tokens) / self.seconds if self.seconds > 0 else 0.0


def request_index(name: str) -> int:
    """`moeplace-17-1a2b3c4d` (vLLM's internal id of our request 17) -> 17."""
    m = _REQ_RE.match(name)
    if m is None:
        raise ProfileError(f"captured tokens of request {name!r}, which this profiling run did not submit")
    return int(m.group(1))


def assemble_trace(
    drained: list[dict[str, Any]],
    *,
    num_requests: int,
    layer_ids: list[int],
    num_experts: int,
    labels: list[str] | None,
    meta: dict[str, Any],
    with_weights: bool,
) -> Trace:
    """Worker drains -> one Trace, tokens ordered by (request, position).

    A token recorded twice (a preempted request recomputed after resumption) keeps its last
    recording. Every request must then have positions 0..n-1 without gaps: a gap means tokens that
    never reached the router, and we refuse rather than write a silently partial trace.
    """
    parts = [capture_arrays(d) for d in drained]
    ids = np.concatenate([p["ids"] for p in parts]) if parts else np.zeros((0, len(layer_ids), 1), np.int16)
    req = np.concatenate([p["req"] for p in parts]) if parts else np.zeros(0, np.int32)
    pos = np.concatenate([p["positions"] for p in parts]) if parts else np.zeros(0, np.int32)
    pre = np.concatenate([p["is_prefill"] for p in parts]) if parts else np.zeros(0, bool)
    w = np.concatenate([p["weights"] for p in parts]) if with_weights and parts else None
    if ids.shape[0] == 0:
        raise ProfileError("no tokens were captured (is the moeplace_capture plugin installed in this environment?)")
    if req.max() >= num_requests:
        raise ProfileError(f"captured request {int(req.max())} but only {num_requests} prompts were submitted")
    # Last occurrence of each (request, position) wins: reverse, stable-unique, restore order.
    key = req.astype(np.int64) << 32 | pos.astype(np.int64)
    rev = key[::-1]
    _, first_in_rev = np.unique(rev, return_index=True)
    keep = np.sort(len(key) - 1 - first_in_rev)
    order = keep[np.lexsort((pos[keep], req[keep]))]
    req, pos, pre, ids = req[order], pos[order], pre[order], ids[order]
    if w is not None:
        w = w[order]
    starts = np.r_[0, np.nonzero(np.diff(req))[0] + 1]
    expected = np.arange(len(req)) - np.repeat(starts, np.diff(np.r_[starts, len(req)]))
    if not np.array_equal(pos, expected):
        bad = int(np.nonzero(pos != expected)[0][0])
        raise ProfileError(
            f"request {int(req[bad])}: token position {int(pos[bad])} captured where {int(expected[bad])} was expected "
            "(tokens skipped the router: prefix caching or an unsupported scheduler feature)"
        )
    missing = sorted(set(range(num_requests)) - set(np.unique(req).tolist()))
    if missing:
        raise ProfileError(f"requests {missing[:10]} produced no captured tokens")
    return Trace(
        topk_ids=np.ascontiguousarray(ids, dtype=np.int16),
        layer_ids=np.asarray(layer_ids, dtype=np.int32),
        request_ids=req.astype(np.int32),
        is_prefill=pre.astype(bool),
        num_experts=int(num_experts),
        meta=meta,
        topk_weights=None if w is None else np.ascontiguousarray(w, dtype=np.float16),
        labels=None if labels is None else np.asarray(labels, dtype=str),
    )


def capture_arrays(d: dict[str, Any]) -> dict[str, np.ndarray]:
    """One worker drain (packed arrays + vLLM request names) -> arrays with prompt indices."""
    arrays = {k: capture.unpack_array(v) for k, v in d.items() if isinstance(v, dict)}
    names = np.array([request_index(n) for n in d["req_names"]], dtype=np.int32)
    arrays["req"] = names[arrays.pop("req_index")] if len(names) else np.zeros(0, np.int32)
    return arrays


def _engine_kwargs(opts: ProfileOptions, with_capture: bool) -> dict[str, Any]:
    ek = dict(opts.engine_kwargs)
    ek["enable_prefix_caching"] = False
    extra = dict(ek.pop("additional_config", None) or {})
    if with_capture:
        # The capture options live in additional_config: part of vLLM's config hash, so a compiled
        # graph with capture callbacks is cached apart from one without.
        extra[capture.CONFIG_KEY] = {"weights": bool(opts.topk_weights), "abi": capture.CAPTURE_ABI}
        ek["worker_extension_cls"] = capture.EXTENSION_CLS
    if extra:
        ek["additional_config"] = extra
    return ek


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


class ProfileSession:
    """One vLLM engine, with or without capture, that can run the profiling pass several times
    (the benchmark compares passes on warm engines). Use as a context manager."""

    def __init__(self, opts: ProfileOptions, *, with_capture: bool = True) -> None:
        opts.check()
        self.opts = opts
        self.with_capture = with_capture
        self.engine_kwargs = _engine_kwargs(opts, with_capture)
        self.llm: Any = None
        self.info: dict[str, Any] | None = None
        self.init_seconds = 0.0

    def __enter__(self) -> "ProfileSession":
        saved = os.environ.get(capture.ENV_FLAG)
        t0 = time.perf_counter()
        try:
            if self.with_capture:
                os.environ[capture.ENV_FLAG] = "1"
                # Idempotent; makes forked (not spawned) engine processes inherit the hook even
                # when vLLM already loaded its plugins in this process without capture.
                capture.register()
            else:
                os.environ.pop(capture.ENV_FLAG, None)
            from vllm import LLM

            self.llm = LLM(self.opts.model, **self.engine_kwargs)
        finally:
            if saved is None:
                os.environ.pop(capture.ENV_FLAG, None)
            else:
                os.environ[capture.ENV_FLAG] = saved
        self.init_seconds = time.perf_counter() - t0
        if self.with_capture:
            infos = [i for i in self.llm.collective_rpc("moeplace_capture_info") if i is not None]
            if len(infos) != 1:
                _shutdown(self.llm)
                raise ProfileError(
                    f"expected the capture on exactly one worker, found {len(infos)} "
                    "(is vllm-moeplace installed so vLLM sees its 'moeplace_capture' plugin entry point?)"
                )
            self.info = infos[0]
        return self

    def __exit__(self, *exc) -> None:
        if self.llm is not None:
            _shutdown(self.llm)
            self.llm = None

    def run(self, prompts: list[PromptRecord], progress: bool = True) -> tuple[int, int, float, list[dict[str, Any]]]:
        """One pass over `prompts`: (prompt tokens, generated tokens, seconds, worker drains).

        Recording is armed (and anything older discarded) right before the first request, so
        the engine's own dummy / warm-up batches never appear in the trace."""
        if self.with_capture:
            self.llm.collective_rpc("moeplace_capture_start")
        (prompt_tokens, generated), seconds = _generate(self.llm, self.opts, prompts, progress)
        drained: list[dict[str, Any]] = []
        if self.with_capture:
            self.llm.collective_rpc("moeplace_capture_stop")
            drained = [d for d in self.llm.collective_rpc("moeplace_capture_drain") if d is not None]
        return prompt_tokens, generated, seconds, drained

    def trace(self, prompts: list[PromptRecord], drained: list[dict[str, Any]], seconds: float) -> Trace:
        import vllm

        info = self.info
        assert info is not None
        ek = self.engine_kwargs
        labels = [p.label or "" for p in prompts] if any(p.label is not None for p in prompts) else None
        meta = {
            "model": self.opts.model,
            "source": "vllm-profile",
            "top_k": info["top_k"],
            "vllm_version": vllm.__version__,
            "engine_options": _json_safe({k: v for k, v in ek.items() if k != "worker_extension_cls"}),
            "max_tokens": self.opts.max_tokens,
            "ignore_eos": self.opts.ignore_eos,
            "num_prompts": len(prompts),
            "expert_ids": "logical",
            "placement_plan": (ek.get("additional_config") or {}).get("moe_placement_plan"),
            "ids_remapped_by_plan_layers": info.get("ids_remapped_by_plan", []),
            "capture": {
                "mechanism": "BaseRouter.set_capture_fn on global rank 0",
                "buffer_rows": info["max_tokens"],
                "buffer_bytes": info["buffer_bytes"],
            },
            "generation_seconds": round(seconds, 3),
        }
        return assemble_trace(
            drained,
            num_requests=len(prompts),
            layer_ids=info["layer_ids"],
            num_experts=info["num_experts"],
            labels=labels,
            meta=meta,
            with_weights=self.opts.topk_weights,
        )


def run_profile(
    opts: ProfileOptions,
    prompts: list[PromptRecord],
    *,
    with_capture: bool = True,
    progress: bool = True,
) -> ProfileResult:
    """Start vLLM, run every prompt once (greedy, `max_tokens` new tokens), return the trace."""
    if not prompts:
        raise ProfileError("no prompts to profile")
    with ProfileSession(opts, with_capture=with_capture) as session:
        prompt_tokens, generated, seconds, drained = session.run(prompts, progress)
        trace = session.trace(prompts, drained, seconds) if with_capture else None
    return ProfileResult(trace, seconds, prompt_tokens, generated, session.init_seconds)


def _generate(llm, opts: ProfileOptions, prompts: list[PromptRecord], progress: bool) -> tuple[tuple[int, int], float]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=opts.max_tokens, temperature=0.0, ignore_eos=opts.ignore_eos)
    engine = llm.llm_engine
    tok = llm.get_tokenizer()
    est_prompt = [len(tok(p.prompt).input_ids) for p in prompts]
    total_est = sum(est_prompt) + len(prompts) * opts.max_tokens
    seen: dict[str, int] = {}
    done_tokens = 0
    prompt_tokens = generated = 0

    bar = _Bar(total_est, enabled=progress)
    t0 = time.perf_counter()
    with bar:
        for i, p in enumerate(prompts):
            engine.add_request(f"{REQUEST_PREFIX}{i}", p.prompt, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                n_prompt = len(out.prompt_token_ids or [])
                n_gen = len(out.outputs[0].token_ids) if out.outputs else 0
                now = n_prompt + n_gen
                done_tokens += now - seen.get(out.request_id, 0)
                seen[out.request_id] = now
                if out.finished:
                    prompt_tokens += n_prompt
                    generated += n_gen
            bar.update(done_tokens, time.perf_counter() - t0)
        bar.update(done_tokens, time.perf_counter() - t0, final=True)
    return (prompt_tokens, generated), time.perf_counter() - t0


class _Bar:
    """rich progress bar over processed tokens (prompt + generated), with tokens/s."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("profiling"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("tokens"),
                TextColumn("{task.fields[rate]:>8.1f} tok/s"),
                TimeElapsedColumn(),
            )
            self.task = self.progress.add_task("profile", total=total, rate=0.0)

    def __enter__(self):
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)

    def update(self, done: int, elapsed: float, final: bool = False) -> None:
        if not self.enabled:
            return
        rate = done / elapsed if elapsed > 0 else 0.0
        total = done if final else max(self.total, done)
        self.progress.update(self.task, completed=done, total=total, rate=rate)


def _shutdown(llm) -> None:
    """Stop the engine's processes now (tests start several engines in one process)."""
    try:
        engine = llm.llm_engine
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    except Exception:  # noqa: BLE001 - best effort at teardown; the engine may already be gone
        pass
