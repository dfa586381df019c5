"""The request router (`moeplace route`, issue 12 item 4) against real vLLM processes over HTTP.

Two TP1 `vllm serve` processes stand for two DP ranks (vLLM's external load-balancing shape; DP
with an MoE model does not run on CPU, docs/router.md). Rank 0 also computes signatures (the
routing capture). The plan's two centroids are the real signatures of two prompts, so each prompt
has a known home; the test checks where requests land (router headers and each server's own
request counters), that replies equal direct calls, the share cap, and the logged fallback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest

from vllm_moeplace.bench.server import VllmServer
from vllm_moeplace.request_routing import normalize_counts
from vllm_moeplace.router.signature import SignatureClient

pytestmark = pytest.mark.vllm

A = "The quick brown fox jumps over the lazy dog near the river bank at dawn."
# B is long enough (> 256 tokens, the CPU KV block) for the shared-storage KV connector to hand its
# prefill over from the signature server to the decode rank.
B = " ".join(f"{a} + {b} = {a + b};" for a, b in zip(range(12, 60), range(35, 83)))
SIG_LAYERS = [1, 2, 3]
ENGINE = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "1024"]


def _kv(path) -> list[str]:
    """vLLM's shared-storage KV connector (ExampleConnector, runs on CPU): every prefill's full KV
    blocks are stored under `path`, and a server whose prompt prefix is stored loads it instead of
    recomputing it: the disaggregated shape, prefill at the signature server, decode at the rank."""
    cfg = {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
           "kv_connector_extra_config": {"shared_storage_path": str(path)}}
    return ["--kv-transfer-config", json.dumps(cfg)]


def _metric(url: str, name: str) -> int:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")))


def _served(url: str) -> int:
    """Requests this server finished (vLLM's own counter)."""
    return _metric(url, "vllm:request_success_total")


def _deltas(s0, s1, n0: int, n1: int, want: tuple[int, int]) -> tuple[int, int]:
    """Finished-request counts since (n0, n1); waits briefly for vLLM's counters to settle on want."""
    for _ in range(20):
        got = (_served(s0.base_url) - n0, _served(s1.base_url) - n1)
        if got == want:
            break
        time.sleep(0.25)
    return got


def _post(url: str, path: str, body: dict) -> tuple[dict, dict]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}


def _completion(model: str, prompt, **kw) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "return_token_ids": True,
            "ignore_eos": True, **kw}


@pytest.fixture(scope="module")
def servers(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory(arch="qwen3_moe", num_layers=4, num_experts=16, top_k=4)
    logs = tmp_path_factory.mktemp("router_servers")
    kv = _kv(logs / "kv")
    sig_env = {"VLLM_MOEPLACE_CAPTURE": "1", "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    s0 = VllmServer(str(model), ENGINE + kv + ["--worker-extension-cls",
                                          "vllm_moeplace.router.extension.RouterSignatureExtension",
                                          "--additional-config", json.dumps({"moeplace_capture": {"weights": False}})],
                    env=sig_env, log_path=logs / "rank0.log")
    s1 = VllmServer(str(model), ENGINE + kv, env={"VLLM_CPU_OMP_THREADS_BIND": "1"}, log_path=logs / "rank1.log")
    errors: list[BaseException] = []

    def start(s: VllmServer) -> None:
        try:
            s.start()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in (s0, s1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    try:
        if errors:
            raise errors[0]
        yield model, s0, s1
    finally:
        s0.stop()
        s1.stop()


def _signature(url: str, model: str, prompt: str) -> np.ndarray:
    async def go() -> np.ndarray:
        async with httpx.AsyncClient(timeout=120) as c:
            sc = SignatureClient(c, url, layers=SIG_LAYERS, num_experts=16)
            await sc.check()
            return await sc.counts("/v1/completions", {"model": model, "prompt": prompt})

    return normalize_counts(asyncio.run(go())).ravel()


@pytest.fixture(scope="module")
def router(servers, tmp_path_factory):
    model, s0, s1 = servers
    d = tmp_path_factory.mktemp("router")
    base = d / "base.json"
    subprocess.run([sys.executable, "-m", "vllm_moeplace", "random-plan", "--model", str(model), "--ep-size", "2",
                    "--ranks-per-node", "1", "--out", str(base)], check=True, capture_output=True)
    sa, sb = _signature(s0.base_url, str(model), A), _signature(s0.base_url, str(model), B)
    # The two homes must be told apart, or the routing checks below would prove nothing.
    assert float(sa @ sb) < 0.95, float(sa @ sb)
    plan = json.loads(base.read_text())
    plan["request_routing"] = {"version": 1, "signature": {"kind": "prefill_expert_histogram", "layers": SIG_LAYERS},
                               "groups": [{"ranks": [0], "centroid": sa.tolist()}, {"ranks": [1], "centroid": sb.tolist()}],
                               "max_share": 1.1, "fallback": "fewest_requests"}
    path = d / "plan.json"
    path.write_text(json.dumps(plan))
    log = open(d / "router.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "vllm_moeplace", "route", "--plan", str(path), "--backend",
                             s0.base_url, "--backend", s1.base_url, "--port", "0"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = None
    deadline = time.monotonic() + 120
    while url is None and time.monotonic() < deadline:
        assert proc.poll() is None, (d / "router.log").read_text()
        m = re.search(r"listening on (http://\S+)", (d / "router.log").read_text())
        url = m.group(1) if m else time.sleep(0.5)
    assert url, (d / "router.log").read_text()
    # The printed port accepts at once (the router listens before printing it).
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        assert r.status == 200
    try:
        yield url, str(model), s0, s1, d / "router.log"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        log.close()


def test_router_pins_requests_by_signature_and_replies_like_a_direct_call(router):
    url, model, s0, s1, log = router
    n0, n1 = _served(s0.base_url), _served(s1.base_url)
    # A's home is rank 0: the signature call and the request itself both land there, nothing on rank 1.
    out_a, h = _post(url, "/v1/completions", _completion(model, A))
    assert (h["x-moeplace-group"], h["x-moeplace-dp-rank"], h["x-moeplace-route"]) == ("0", "0", "signature")
    assert _deltas(s0, s1, n0, n1, (2, 0)) == (2, 0)
    # B's home is rank 1: only its signature call runs on rank 0, whose prefill rank 1 loads
    # through the KV connector instead of recomputing it (whole 256-token blocks).
    hits = _metric(s1.base_url, "vllm:external_prefix_cache_hits_total")
    out_b, h = _post(url, "/v1/completions", _completion(model, B))
    assert (h["x-moeplace-group"], h["x-moeplace-dp-rank"], h["x-moeplace-route"]) == ("1", "1", "signature")
    assert _deltas(s0, s1, n0, n1, (3, 1)) == (3, 1)
    assert out_b["usage"]["prompt_tokens"] > 256
    assert _metric(s1.base_url, "vllm:external_prefix_cache_hits_total") - hits >= 256
    # Replies equal a direct call to either rank (same weights, greedy).
    for out, prompt in ((out_a, A), (out_b, B)):
        for s in (s0, s1):
            direct, _ = _post(s.base_url, "/v1/completions", _completion(model, prompt))
            assert out["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]
            assert out["choices"][0]["text"] == direct["choices"][0]["text"]
    # The share cap: after A, B the counts are [1, 1]; a second A fits group 0 (2 of 3 allowed),
    # a third would make 3 of 4 (cap max(ceil(4/2), floor(1.1 * 4 / 2)) = 2) and goes to group 1.
    _, h = _post(url, "/v1/completions", _completion(model, A))
    assert h["x-moeplace-dp-rank"] == "0"
    _, h = _post(url, "/v1/completions", _completion(model, A))
    assert (h["x-moeplace-group"], h["x-moeplace-route"]) == ("1", "signature")


def test_router_chat_and_streaming_pass_through(router):
    url, model, s0, s1, _ = router
    chat = {"model": model, "messages": [{"role": "user", "content": A}], "max_tokens": 6, "temperature": 0.0}
    out, h = _post(url, "/v1/chat/completions", chat)
    assert h["x-moeplace-route"] == "signature"
    direct, _ = _post(s1.base_url, "/v1/chat/completions", chat)
    assert out["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    body = _completion(model, B, stream=True)
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    direct, _ = _post(s0.base_url, "/v1/completions", _completion(model, B))
    assert text == direct["choices"][0]["text"]


def test_request_without_signature_falls_back_with_a_logged_reason(router):
    url, model, s0, s1, log = router
    stats0 = json.loads(urllib.request.urlopen(url + "/moeplace/router", timeout=10).read())
    out, h = _post(url, "/v1/completions", _completion(model, [A, B]))
    assert h["x-moeplace-route"] == "fallback: the request holds 2 prompts (one signature per request)"
    # The fallback is the even spreading: the group with the fewest requests so far.
    assert int(h["x-moeplace-group"]) == int(np.argmin(stats0["requests_per_group"]))
    direct, _ = _post(s1.base_url, "/v1/completions", _completion(model, [A, B]))
    assert [c["token_ids"] for c in out["choices"]] == [c["token_ids"] for c in direct["choices"]]
    time.sleep(0.5)
    assert "request routed by the fallback (fewest requests, group" in log.read_text()
    assert "the request holds 2 prompts" in log.read_text()
    stats = json.loads(urllib.request.urlopen(url + "/moeplace/router", timeout=10).read())
    assert stats["fallbacks"] == {"the request holds 2 prompts (one signature per request)": 1}
