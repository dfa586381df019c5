"""A bounded, closed-loop HTTP workload against one OpenAI-compatible vLLM server on loopback.

Each request is a greedy streaming completion with a fixed output length (`ignore_eos`), so every
layout generates the same number of tokens and the token ids can be compared across layouts.
TTFT = first streamed token - request sent; TPOT = (last - first token) / (tokens - 1).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RequestResult:
    index: int
    token_ids: tuple[int, ...]
    sent: float
    first_token: float
    done: float

    @property
    def ttft(self) -> float:
        return self.first_token - self.sent

    @property
    def tpot(self) -> float:
        n = len(self.token_ids)
        return (self.done - self.first_token) / (n - 1) if n > 1 else 0.0


@dataclass(frozen=True)
class LoadResult:
    requests: tuple[RequestResult, ...]
    wall_s: float

    def summary(self) -> dict[str, float]:
        ttft = np.array([r.ttft for r in self.requests])
        tpot = np.array([r.tpot for r in self.requests])
        out_tokens = sum(len(r.token_ids) for r in self.requests)
        return {
            "requests": len(self.requests),
            "output_tokens": out_tokens,
            "wall_s": self.wall_s,
            "throughput_tok_s": out_tokens / self.wall_s,
            "ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3),
            "ttft_p99_ms": float(np.percentile(ttft, 99) * 1e3),
            "tpot_p50_ms": float(np.percentile(tpot, 50) * 1e3),
            "tpot_p99_ms": float(np.percentile(tpot, 99) * 1e3),
        }

    def per_request(self) -> list[dict[str, float]]:
        """Every request's timing (ms, times relative to the first request sent), for diagnosis."""
        t0 = min((r.sent for r in self.requests), default=0.0)
        return [
            {"index": r.index, "sent_ms": round((r.sent - t0) * 1e3, 2), "ttft_ms": round(r.ttft * 1e3, 2),
             "tpot_ms": round(r.tpot * 1e3, 3), "done_ms": round((r.done - t0) * 1e3, 2)}
            for r in self.requests
        ]


def _stream_one(host: str, port: int, model: str, index: int, prompt: str, max_tokens: int, timeout: float) -> RequestResult:
    body = json.dumps({
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "return_token_ids": True,
    })
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        sent = time.perf_counter()
        # The request id names the prompt, so routed tokens captured in the engine can be matched
        # to prompts across layouts (vLLM takes it from this header).
        headers = {"Content-Type": "application/json", "X-Request-Id": f"moeplace-{index}"}
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"request {index}: HTTP {resp.status}: {resp.read()[:500]!r}")
        ids: list[int] = []
        first = None
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            new = chunk["choices"][0].get("token_ids") or []
            if new and first is None:
                first = time.perf_counter()
            ids.extend(new)
        done = time.perf_counter()
    finally:
        conn.close()
    return RequestResult(index, tuple(ids), sent, first if first is not None else done, done)


def run_load(
    base_url: str, model: str, prompts: list[str], *, max_tokens: int, concurrency: int, timeout: float = 600.0
) -> LoadResult:
    """Send every prompt once, at most `concurrency` in flight; returns per-request timings and ids."""
    host, port = base_url.removeprefix("http://").split(":")
    lock = threading.Lock()
    results: list[RequestResult] = []

    def task(i: int) -> None:
        r = _stream_one(host, int(port), model, i, prompts[i], max_tokens, timeout)
        with lock:
            results.append(r)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for f in [pool.submit(task, i) for i in range(len(prompts))]:
            f.result()
    wall = time.perf_counter() - t0
    return LoadResult(tuple(sorted(results, key=lambda r: r.index)), wall)
