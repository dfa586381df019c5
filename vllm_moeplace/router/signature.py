"""A request's signature as the served router computes it: the expert counts of its prompt's
prefill at the plan's signature layers, read from a vLLM server (the *signature server*).

Two sources, both vLLM's own serving path:
- `capture` (runs on CPU here): the signature server runs the profiler's routing capture with
  `RouterSignatureExtension`; the router sends the prompt with `max_tokens=1` under its own
  `X-Request-Id`, then asks the workers (dev-mode `/collective_rpc`) for that request's counts.
  Ids are logical (checkpoint) experts even when the signature server serves a placement plan.
- `routed-experts`: the signature server runs vLLM's `--enable-return-routed-experts` (Model
  Runner V2; GPU builds) without a placement plan — typically the prefill instance of a
  disaggregated deployment — and the counts come from the response's `routed_experts` array.

`prefix_tokens > 0` computes the signature from the prompt's first tokens only: a short prefill
at arrival, for colocated deployments that must choose the DP rank before the real prefill.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
import uuid
from typing import Any

import numpy as np

from vllm_moeplace.errors import MoeplaceError

RID_PREFIX = "moeplace-sig-"
CAPTURE_FLAGS = ("VLLM_MOEPLACE_CAPTURE=1 VLLM_SERVER_DEV_MODE=1 vllm serve ... --worker-extension-cls "
                 "vllm_moeplace.router.extension.RouterSignatureExtension "
                 "--additional-config '{\"moeplace_capture\": {\"weights\": false}}'")


class SignatureError(Exception):
    """This request's signature cannot be computed; the message is the fallback's logged reason."""


class RouterSetupError(MoeplaceError):
    """The router cannot start (plan, backends or signature server); names what and why."""


def prompt_request(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """What to tokenize for the request's one prompt ({"prompt": ...} or {"messages": ...}), or
    {"tokens": [...]} when the client already sent token ids. SignatureError if the request has
    no single prompt (a batch of prompts, prompt embeddings)."""
    if body.get("prompt_embeds") is not None:
        raise SignatureError("the prompt is given as embeddings")
    if path.endswith("/chat/completions"):
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise SignatureError("no messages")
        return {"messages": msgs}
    p = body.get("prompt")
    if isinstance(p, str):
        return {"prompt": p}
    if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
        return {"tokens": p}
    if isinstance(p, list) and len(p) == 1:
        return prompt_request(path, {"prompt": p[0]})
    if isinstance(p, list) and len(p) > 1:
        raise SignatureError(f"the request holds {len(p)} prompts (one signature per request)")
    raise SignatureError("no prompt")


def counts_from_routed_experts(b64: str, layers: list[int], num_experts: int) -> np.ndarray:
    """[len(layers), E] expert counts from vLLM's `routed_experts` field (base64 `.npy`, shape
    [tokens - 1, decoder layers, top_k]: with max_tokens=1 the rows are the prompt tokens)."""
    arr = np.load(io.BytesIO(base64.b64decode(b64)), allow_pickle=False)
    if arr.ndim != 3:
        raise SignatureError(f"routed_experts has shape {arr.shape}, expected [tokens, layers, top_k]")
    if max(layers) >= arr.shape[1]:
        raise SignatureError(f"routed_experts covers {arr.shape[1]} layers; signature layer {max(layers)} is not in it")
    ids = arr[:, layers, :].astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= num_experts):
        raise SignatureError(f"routed_experts holds expert ids outside 0..{num_experts - 1}")
    return np.stack([np.bincount(ids[:, j, :].ravel(), minlength=num_experts) for j in range(len(layers))])


class SignatureClient:
    """Computes [len(layers), E] prompt expert counts for one request through the signature server."""

    def __init__(self, client: Any, url: str, *, layers: list[int], num_experts: int, source: str = "capture",
                 prefix_tokens: int = 0, timeout: float = 60.0):
        if source not in ("capture", "routed-experts"):
            raise RouterSetupError(f"--signature-source {source!r}: expected capture or routed-experts")
        self.url = url.rstrip("/")
        self.layers, self.num_experts = list(layers), int(num_experts)
        self.source, self.prefix_tokens, self.timeout = source, int(prefix_tokens), timeout
        self.model: str | None = None
        self.bind(client)
        self._pending: dict[str, tuple[float, np.ndarray]] = {}

    def bind(self, client: Any) -> None:
        """Use `client` (an httpx.AsyncClient) from now on, in the event loop it belongs to."""
        self.client = client
        self._lock = asyncio.Lock()

    async def check(self) -> None:
        """Refuse to start unless the signature server can answer for the plan's layers."""
        try:
            r = await self.client.get(self.url + "/v1/models", timeout=self.timeout)
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]
        except Exception as e:  # noqa: BLE001 - any failure here means the server is not usable
            raise RouterSetupError(f"--signature-server {self.url}: not reachable ({type(e).__name__}: {e})") from None
        if self.source != "capture":
            return
        try:
            r = await self.client.post(self.url + "/collective_rpc", json={"method": "moeplace_capture_info"},
                                       timeout=self.timeout)
            infos = [x for x in (r.json().get("results") or []) if x] if r.status_code == 200 else []
        except Exception:  # noqa: BLE001
            infos = []
        if not infos:
            raise RouterSetupError(f"--signature-server {self.url}: no routing capture answers on /collective_rpc; "
                                   f"start it as: {CAPTURE_FLAGS}")
        info = infos[0]
        if int(info["num_experts"]) != self.num_experts:
            raise RouterSetupError(f"--signature-server {self.url}: the served model has {info['num_experts']} experts, "
                                   f"the plan {self.num_experts}")
        missing = [x for x in self.layers if x not in info["layer_ids"]]
        if missing:
            raise RouterSetupError(f"--signature-server {self.url}: signature layers {missing} of the plan are not MoE "
                                   f"layers of the served model {info['layer_ids']}")
        await self._rpc_histograms()  # arms the capture and drops whatever it held

    async def _post(self, path: str, body: dict, headers: dict | None = None) -> dict:
        try:
            r = await self.client.post(self.url + path, json=body, headers=headers or {}, timeout=self.timeout)
        except Exception as e:  # noqa: BLE001 - network errors become the fallback's reason
            raise SignatureError(f"signature server {path}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise SignatureError(f"signature server {path}: HTTP {r.status_code}: {r.text[:200]}")
        return r.json()

    async def tokens(self, path: str, body: dict[str, Any]) -> list[int]:
        spec = prompt_request(path, body)
        if "tokens" in spec:
            toks = list(spec["tokens"])
        else:
            toks = list((await self._post("/tokenize", {"model": self.model, **spec})).get("tokens") or [])
        if self.prefix_tokens > 0:
            toks = toks[: self.prefix_tokens]
        if not toks:
            raise SignatureError("empty prompt")
        return toks

    async def counts(self, path: str, body: dict[str, Any]) -> np.ndarray:
        toks = await self.tokens(path, body)
        rid = RID_PREFIX + uuid.uuid4().hex
        req = {"model": self.model, "prompt": toks, "max_tokens": 1, "temperature": 0.0}
        if self.source == "routed-experts":
            out = await self._post("/v1/completions", req)
            b64 = (out.get("choices") or [{}])[0].get("routed_experts")
            if not b64:
                raise SignatureError("the signature server returned no routed_experts "
                                     "(start it with --enable-return-routed-experts)")
            return counts_from_routed_experts(b64, self.layers, self.num_experts)
        await self._post("/v1/completions", req, headers={"X-Request-Id": rid})
        got = await self._take(rid)
        if got is None:
            raise SignatureError("the signature server captured no prompt tokens for the request")
        return got

    async def _rpc_histograms(self) -> None:
        out = await self._post("/collective_rpc", {"method": "moeplace_router_histograms",
                                                   "args": ["cmpl-" + RID_PREFIX, self.layers]})
        now = time.monotonic()
        for res in out.get("results") or []:
            if not res:
                continue
            if "error" in res:
                raise SignatureError(f"signature server: {res['error']}")
            for name, v in res["requests"].items():
                c = np.asarray(v["counts"], dtype=np.int64)
                old = self._pending.get(name)
                self._pending[name] = (now, c if old is None else old[1] + c)
        # Answers nobody collected (a caller that gave up) must not pile up.
        for name in [n for n, (t, _) in self._pending.items() if now - t > 300]:
            del self._pending[name]

    async def _take(self, rid: str) -> np.ndarray | None:
        # One drain at a time: each drain hands every router request's counts to `_pending`, where
        # the concurrent callers find their own by request id.
        async with self._lock:
            key = "cmpl-" + rid
            if not any(n.startswith(key) for n in self._pending):
                await self._rpc_histograms()
            mine = [n for n in self._pending if n.startswith(key)]
            if not mine:
                return None
            total = sum(self._pending.pop(n)[1] for n in mine)
            return np.asarray(total)
