"""The request router's pieces without servers (issue 12 item 4): refusals before it listens, what
counts as a request's one prompt, vLLM's `routed_experts` reply decoded, and the served signature
equal to the one the solver and `evaluate` compute from a trace. The router against real vLLM
processes: tests/test_router_e2e.py."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from vllm_moeplace.cli.main import main
from vllm_moeplace.request_routing import normalize_counts, signatures
from vllm_moeplace.router.app import backends_for
from vllm_moeplace.router.signature import (RouterSetupError, SignatureError, counts_from_routed_experts,
                                            prompt_request)
from vllm_moeplace.solver.synth import SynthConfig, synth_trace

PLAN = {
    "format": "vllm-moeplace/plan", "version": 1,
    "model": {"name": "m", "num_experts": 8, "moe_layers": [1, 2]},
    "ep_size": 2, "topology": {"ranks_per_node": 1},
    "layers": {"1": [[0, 1, 2, 3], [4, 5, 6, 7]], "2": [[7, 1, 2, 3], [4, 5, 6, 0]]},
    "solver": {"method": "test"},
}
ROUTING = {"version": 1, "signature": {"kind": "prefill_expert_histogram", "layers": [1]},
           "groups": [{"ranks": [0], "centroid": [1.0] + [0.0] * 7}, {"ranks": [1], "centroid": [0.0] * 7 + [1.0]}]}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _route(tmp_path: Path, plan: dict, *flags: str) -> tuple[int, str]:
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(plan))
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        code = main(["route", "--plan", str(p), *flags])
    return code, err.getvalue()


@pytest.mark.parametrize("case", ["no_section", "backend_count", "unreachable", "negative_prefix", "bad_section",
                                  "port", "timeout"])
def test_router_refuses_to_start(tmp_path: Path, case: str) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}"
    plan, flags, want = {**PLAN, "request_routing": ROUTING}, ["--backend", dead], ""
    if case == "no_section":
        plan, want = PLAN, "no request_routing section; a request router needs a plan solved with --request-groups"
    elif case == "backend_count":
        flags, want = ["--backend", dead] * 3, "--backend: 3 URL(s) given; the plan's request_routing has 2 DP ranks"
    elif case == "unreachable":
        want = f"--backend {dead}: not healthy"
    elif case == "negative_prefix":
        flags, want = flags + ["--signature-prefix-tokens", "-1"], "--signature-prefix-tokens -1: must be >= 0"
    elif case == "port":
        flags, want = flags + ["--port", "99999"], "--port 99999: must be in 0..65535"
    elif case == "timeout":
        flags, want = flags + ["--timeout", "0"], "--timeout 0.0: must be positive"
    elif case == "bad_section":
        bad = json.loads(json.dumps(ROUTING))
        bad["groups"][1]["ranks"] = [0]
        plan, want = {**PLAN, "request_routing": bad}, "field 'request_routing.groups[1].ranks': rank 0 already in group 0"
    code, err = _route(tmp_path, plan, *flags)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and want in err, err
    assert "Traceback" not in err


def test_router_refusal_reaches_a_real_stderr_as_one_line(tmp_path: Path) -> None:
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(PLAN))
    r = subprocess.run([sys.executable, "-m", "vllm_moeplace", "route", "--plan", str(p), "--backend",
                        "http://127.0.0.1:9"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no request_routing section" in r.stderr


def test_backends_one_per_rank_or_one_pinned_by_header() -> None:
    per = backends_for(["http://a/", "http://b"], 2)
    assert [(b.url, b.header_rank) for b in per] == [("http://a", None), ("http://b", None)]
    one = backends_for(["http://a"], 3)
    assert [(b.url, b.header_rank) for b in one] == [("http://a", 0), ("http://a", 1), ("http://a", 2)]
    hybrid = backends_for(["http://n0", "http://n0", "http://n1", "http://n1"], 4)  # one API server per node
    assert [(b.url, b.header_rank) for b in hybrid] == [("http://n0", 0), ("http://n0", 1), ("http://n1", 0),
                                                          ("http://n1", 1)]
    with pytest.raises(RouterSetupError, match="2 URL"):
        backends_for(["http://a", "http://b"], 3)


@pytest.mark.parametrize("path,body,want", [
    ("/v1/completions", {"prompt": "hi"}, {"prompt": "hi"}),
    ("/v1/completions", {"prompt": ["hi"]}, {"prompt": "hi"}),
    ("/v1/completions", {"prompt": [5, 6, 7]}, {"tokens": [5, 6, 7]}),
    ("/v1/completions", {"prompt": [[5, 6]]}, {"tokens": [5, 6]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]},
     {"messages": [{"role": "user", "content": "x"}]}),
])
def test_one_prompt_per_request(path: str, body: dict, want: dict) -> None:
    assert prompt_request(path, body) == want


@pytest.mark.parametrize("path,body,reason", [
    ("/v1/completions", {"prompt": ["a", "b"]}, "the request holds 2 prompts"),
    ("/v1/completions", {"prompt_embeds": "AAAA"}, "embeddings"),
    ("/v1/completions", {}, "no prompt"),
    ("/v1/chat/completions", {"messages": []}, "no messages"),
])
def test_requests_without_one_prompt_have_no_signature(path: str, body: dict, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        prompt_request(path, body)


def test_routed_experts_reply_decoded_with_vllms_own_encoder() -> None:
    from vllm.utils.serial_utils import numpy2base64  # what vLLM's OpenAI server puts in the reply

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 8, size=(11, 4, 2)).astype(np.int32)  # 11 prompt tokens, 4 decoder layers, top-2
    got = counts_from_routed_experts(numpy2base64(arr), [1, 3], 8)
    want = np.stack([np.bincount(arr[:, layer].ravel(), minlength=8) for layer in (1, 3)])
    np.testing.assert_array_equal(got, want)
    assert got.sum() == 2 * 11 * 2
    with pytest.raises(SignatureError, match="outside 0..7"):
        counts_from_routed_experts(numpy2base64(arr + 4), [1], 8)
    with pytest.raises(SignatureError, match="covers 4 layers"):
        counts_from_routed_experts(numpy2base64(arr), [4], 8)


@pytest.mark.parametrize("prefix", [0, 3])
def test_served_signature_equals_the_trace_signature(prefix: int) -> None:
    """The router normalises a request's prompt counts exactly as the solver and `evaluate` do from
    a trace, so the plan's centroids mean the same thing served and scored."""
    tr = synth_trace(SynthConfig(num_layers=3, num_experts=8, top_k=2, num_tokens=600, num_requests=6, seed=3))
    layers = [int(tr.layer_ids[0]), int(tr.layer_ids[2])]
    reqs, X, ok = signatures(tr, layers, prefix_tokens=prefix)
    assert ok.all()
    for i, rid in enumerate(reqs):
        rows = np.flatnonzero((tr.request_ids == rid) & tr.is_prefill)
        if prefix:
            rows = rows[:prefix]
        counts = np.stack([np.bincount(tr.topk_ids[rows, tr.layer_index(x)].astype(np.int64).ravel(), minlength=8)
                           for x in layers])
        np.testing.assert_allclose(normalize_counts(counts).ravel(), X[i], atol=1e-12)
    if prefix:  # the prefix signature is a different vector for some request
        assert not np.allclose(X, signatures(tr, layers)[1])
