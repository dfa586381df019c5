"""The router's HTTP server: OpenAI-compatible completions and chat completions, proxied to the
DP rank the plan's `request_routing` chooses for each request.

Per request: signature (signature.py) -> group (`request_routing.Router`: most similar centroid
within the share cap; no signature -> the group with the fewest requests, logged with the reason)
-> the group's rank with the fewest requests in flight -> that rank's API server, body unchanged
(one server per DP rank, vLLM's external load-balancing shape), or the single API server with
vLLM's `X-data-parallel-rank` header (its internal load balancer, pinned per request). The reply is
streamed back as the backend sent it, with `x-moeplace-group`, `x-moeplace-dp-rank` and
`x-moeplace-route` ("signature" or "fallback: reason") headers.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vllm_moeplace.request_routing import RequestRouting, Router, normalize_counts
from vllm_moeplace.router.signature import RouterSetupError, SignatureClient, SignatureError

log = logging.getLogger("vllm_moeplace.router")

PROXIED = ("/v1/completions", "/v1/chat/completions")
DP_RANK_HEADER = "X-data-parallel-rank"  # vLLM 0.33: entrypoints/generate/base/serving.py


@dataclass(frozen=True)
class Backend:
    url: str
    header_rank: int | None = None  # set: one API server for all DP ranks, pinned by header


def backends_for(urls: list[str], dp_ranks: int) -> list[Backend]:
    """One backend per DP rank, from `--backend` URLs in DP-rank order.

    - one URL per DP rank: vLLM's external load-balancing shape (`--data-parallel-rank` per server);
    - a URL listed k times: that API server fronts k consecutive DP ranks (vLLM's hybrid shape, one
      API server per node) and the request is pinned by `X-data-parallel-rank` = the rank's index
      among that server's ranks (vLLM indexes its engines in rank order);
    - one URL for all DP ranks: the same with a single API server (internal load balancer)."""
    urls = [u.rstrip("/") for u in urls]
    if len(urls) == 1:
        urls = urls * dp_ranks
    if len(urls) != dp_ranks:
        raise RouterSetupError(f"--backend: {len(urls)} URL(s) given; the plan's request_routing has {dp_ranks} DP "
                               f"ranks (give one URL per DP rank in rank order, repeating a URL for each DP rank its "
                               f"API server fronts, or one URL whose API server fronts all {dp_ranks})")
    out, seen = [], {}
    for u in urls:
        shared = urls.count(u) > 1
        out.append(Backend(u, seen.get(u, 0) if shared else None))
        seen[u] = seen.get(u, 0) + 1
    return out


@dataclass
class RouterState:
    routing: RequestRouting
    backends: list[Backend]
    signature: SignatureClient
    router: Router = field(init=False)
    inflight: np.ndarray = field(init=False)
    served: np.ndarray = field(init=False)
    fallbacks: dict[str, int] = field(default_factory=dict)
    # The last signature times only: a long-running router must not grow with its traffic.
    signature_seconds: deque = field(default_factory=lambda: deque(maxlen=1024))

    def __post_init__(self) -> None:
        self.router = Router(self.routing)
        self.inflight = np.zeros(len(self.backends), dtype=np.int64)
        self.served = np.zeros(len(self.backends), dtype=np.int64)

    async def choose(self, path: str, body: dict[str, Any]) -> tuple[int, int, str]:
        """(group, DP rank, how) for one request."""
        t0 = time.perf_counter()
        try:
            counts = await self.signature.counts(path, body)
            sig = normalize_counts(counts).ravel()
            if not np.any(sig):
                raise SignatureError("no prompt token reached the signature layers")
        except SignatureError as e:
            reason = str(e)
            self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
            g = self.router.route(None, reason)  # logs the reason (request_routing.Router)
            how = f"fallback: {reason}"
        else:
            g = self.router.route(sig)
            how = "signature"
        self.signature_seconds.append(time.perf_counter() - t0)
        ranks = self.routing.group_ranks[g]
        rank = min(ranks, key=lambda r: (int(self.inflight[r]), r))
        return g, int(rank), how

    def stats(self) -> dict[str, Any]:
        s = np.array(self.signature_seconds) if self.signature_seconds else np.zeros(1)
        return {
            "groups": [list(r) for r in self.routing.group_ranks],
            "requests_per_group": self.router.counts.tolist(),
            "requests_per_dp_rank": self.served.tolist(),
            "in_flight_per_dp_rank": self.inflight.tolist(),
            "fallbacks": dict(self.fallbacks),
            "signature_ms_median": float(np.median(s) * 1e3),
            "signature_source": self.signature.source,
            "signature_prefix_tokens": self.signature.prefix_tokens,
        }


def build_app(state: RouterState, timeout: float = 600.0) -> Any:
    """The FastAPI app (vLLM's own server stack: FastAPI + uvicorn + httpx come with vLLM).
    `state.signature` must have passed `check()` (the CLI does it before serving)."""
    import contextlib

    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.background import BackgroundTask

    client = httpx.AsyncClient(timeout=timeout)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any):
        # The HTTP client and the signature lock belong to the serving loop.
        state.signature.bind(client)
        yield
        await client.aclose()

    app = FastAPI(title="moeplace router", lifespan=lifespan)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/moeplace/router")
    async def stats() -> JSONResponse:
        return JSONResponse(state.stats())

    @app.get("/v1/models")
    async def models() -> Response:
        r = await client.get(state.backends[0].url + "/v1/models")
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    async def proxy(request: Request) -> Response:
        path = request.url.path
        raw = await request.body()
        try:
            import json

            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            return JSONResponse({"error": {"message": f"moeplace router: request body is not a JSON object ({e})",
                                           "type": "BadRequestError", "code": 400}}, status_code=400)
        g, rank, how = await state.choose(path, body)
        b = state.backends[rank]
        headers = {"content-type": "application/json"}
        for k in ("authorization", "x-request-id"):
            if k in request.headers:
                headers[k] = request.headers[k]
        if b.header_rank is not None:
            headers[DP_RANK_HEADER] = str(b.header_rank)
        state.inflight[rank] += 1
        state.served[rank] += 1
        try:
            upstream = await client.send(client.build_request("POST", b.url + path, content=raw, headers=headers),
                                         stream=True)
        except Exception as e:  # noqa: BLE001 - the client gets one clear 502
            state.inflight[rank] -= 1
            return JSONResponse({"error": {"message": f"moeplace router: DP rank {rank} ({b.url}) failed: "
                                           f"{type(e).__name__}: {e}", "type": "BadGateway", "code": 502}},
                                status_code=502)

        async def done() -> None:
            state.inflight[rank] -= 1
            await upstream.aclose()

        out_headers = {"x-moeplace-group": str(g), "x-moeplace-dp-rank": str(rank), "x-moeplace-route": how[:200].encode("ascii", "replace").decode()}
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=out_headers,
                                 media_type=upstream.headers.get("content-type"), background=BackgroundTask(done))

    for p in PROXIED:
        app.add_api_route(p, proxy, methods=["POST"])
    return app
