"""Turning worker capture drains into a trace, the plugin entry point's manners, CLI input errors.

No vLLM engine here: drains are built by hand in the worker's packed layout, with
identity-encoded expert ids (id = (request * 7 + position + layer) % E) so that any row landing
at the wrong (request, position, layer) is visible.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from vllm_moeplace.profiling import capture
from vllm_moeplace.profiling.runner import ProfileError, assemble_trace, request_index

E, L, K = 8, 2, 2


def _ids(req: int, pos: int) -> list[list[int]]:
    base = (req * 7 + pos) % E
    return [[(base + l) % E, (base + l + 1) % E] for l in range(L)]


def _drain(rows: list[tuple[str, int, bool]], weights: bool = False) -> dict:
    """rows: (vLLM request name, position, is_prefill) in worker row order."""
    names: list[str] = []
    idx = []
    for name, _, _ in rows:
        if name not in names:
            names.append(name)
        idx.append(names.index(name))
    ids = np.array([_ids(request_index(n), p) for n, p, _ in rows], np.int16).reshape(-1, L, K)
    d = {
        "ids": capture.pack_array(ids),
        "req_index": capture.pack_array(np.array(idx, np.int32)),
        "positions": capture.pack_array(np.array([p for _, p, _ in rows], np.int32)),
        "is_prefill": capture.pack_array(np.array([f for _, _, f in rows], bool)),
        "req_names": names,
        "steps": 1,
    }
    if weights:
        d["weights"] = capture.pack_array((ids.astype(np.float16) / 16).astype(np.float16))
    return d


def _assemble(drains, n=2, labels=None, weights=False):
    return assemble_trace(drains, num_requests=n, layer_ids=[3, 5], num_experts=E, labels=labels,
                          meta={"source": "vllm-profile"}, with_weights=weights)


def test_rows_sorted_by_request_then_position_across_drains():
    # Step 1: request 1's prompt (3 tokens) and request 0's first 2 prompt tokens (chunked).
    # Step 2: request 0's last prompt token + request 1's first decode token. Step 3: decodes.
    a = "moeplace-0-1a2b3c4d"
    b = "moeplace-1-ffff0000"
    d1 = _drain([(b, 0, True), (b, 1, True), (b, 2, True), (a, 0, True), (a, 1, True)], weights=True)
    d2 = _drain([(a, 2, True), (b, 3, False)], weights=True)
    d3 = _drain([(b, 4, False), (a, 3, False)], weights=True)
    t = _assemble([d1, d2, d3], labels=["x", "y"], weights=True)
    assert t.request_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert t.is_prefill.tolist() == [True, True, True, False, True, True, True, False, False]
    want = [_ids(0, p) for p in range(4)] + [_ids(1, p) for p in range(5)]
    assert t.topk_ids.tolist() == want
    assert np.array_equal(t.topk_weights, (np.array(want, np.int16).astype(np.float16) / 16).astype(np.float16))
    assert t.layer_ids.tolist() == [3, 5] and t.labels.tolist() == ["x", "y"]


def test_recomputed_tokens_keep_the_last_recording():
    a = "moeplace-0-aaaaaaaa"
    first = _drain([(a, 0, True), (a, 1, True)])
    # Preempted, then recomputed from position 0 with a (pretend) different routing for token 1.
    again = _drain([(a, 0, True), (a, 1, True), (a, 2, False)])
    again_ids = capture.unpack_array(again["ids"])
    again_ids[1] = [[7, 6], [5, 4]]
    again["ids"] = capture.pack_array(again_ids)
    t = _assemble([first, again], n=1)
    assert t.num_tokens == 3
    assert t.topk_ids[1].tolist() == [[7, 6], [5, 4]]


def test_gap_in_positions_is_refused():
    a = "moeplace-0-aaaaaaaa"
    with pytest.raises(ProfileError, match="request 0: token position 2 captured where 1 was expected"):
        _assemble([_drain([(a, 0, True), (a, 2, True)])], n=1)


def test_request_without_tokens_and_foreign_requests_are_refused():
    with pytest.raises(ProfileError, match=r"requests \[1\] produced no captured tokens"):
        _assemble([_drain([("moeplace-0-aaaaaaaa", 0, True)])])
    foreign = _drain([("moeplace-0-a", 0, True)])
    foreign["req_names"] = ["cmpl-9"]  # a request some other client sent to the same engine
    with pytest.raises(ProfileError, match="did not submit"):
        _assemble([foreign], n=1)
    with pytest.raises(ProfileError, match="no tokens were captured"):
        _assemble([], n=1)


def test_request_index_parses_vllm_internal_ids():
    assert request_index("moeplace-17-1a2b3c4d") == 17
    assert request_index("moeplace-3") == 3  # VLLM_DISABLE_REQUEST_ID_RANDOMIZATION
    with pytest.raises(ProfileError):
        request_index("moeplace-x-1")


def test_register_is_inert_without_request_and_imports_no_vllm():
    code = (
        "import os, sys; os.environ.pop('VLLM_MOEPLACE_CAPTURE', None);"
        "from vllm_moeplace.profiling import capture; capture.register(); capture.register();"
        "print('vllm' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_register_wraps_worker_load_model_once(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.v1.worker import gpu_worker

    original = gpu_worker.Worker.load_model
    monkeypatch.setenv(capture.ENV_FLAG, "1")
    try:
        capture.register()
        wrapped = gpu_worker.Worker.load_model
        capture.register()  # re-entrant: no second layer of wrapping
        assert gpu_worker.Worker.load_model is wrapped
        assert getattr(wrapped, capture._PATCH_MARK) is True
        inner = wrapped.__wrapped__
        assert not getattr(inner, capture._PATCH_MARK, False)
    finally:
        gpu_worker.Worker.load_model = original


def test_cli_bad_prompt_file_is_one_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 1}\n')
    out = tmp_path / "t.npz"
    res = subprocess.run(
        [sys.executable, "-m", "vllm_moeplace", "profile", "some-model", "--prompts", str(bad), "--out", str(out)],
        capture_output=True, text=True,
    )
    assert res.returncode == 2
    assert res.stderr.strip() == f"moeplace profile: error: {bad}:2: field 'prompt': Input should be a valid string, got 1"
    assert not out.exists()


def test_cli_refuses_prefix_caching(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("hello\n")
    res = subprocess.run(
        [sys.executable, "-m", "vllm_moeplace", "profile", "m", "--prompts", str(p), "--out", str(tmp_path / "t.npz"),
         "--engine-arg", "enable_prefix_caching=true"],
        capture_output=True, text=True,
    )
    assert res.returncode == 2 and "prefix" in res.stderr


def test_cli_engine_options_reach_vllm_kwargs():
    import argparse

    from vllm_moeplace.cli import profile as cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args([
        "m", "--prompts", "p", "--out", "o", "-tp", "2", "--enable-expert-parallel", "--dtype", "float32",
        "--additional-config", '{"x": 1}', "--moe-placement-plan", "plan.json", "--moe-cpu-ep-fix",
        "--engine-arg", "kv_cache_dtype=auto", "--engine-arg", "max-num-seqs=8",
    ])
    assert cli.engine_kwargs(args) == {
        "tensor_parallel_size": 2, "enable_expert_parallel": True, "dtype": "float32", "kv_cache_dtype": "auto",
        "max_num_seqs": 8,
        "additional_config": {"x": 1, "moe_placement_plan": "plan.json", "moe_cpu_ep_fix": True},
    }
    bare = cli.engine_kwargs(p.parse_args(["m", "--prompts", "p", "--out", "o"]))
    assert bare == {}  # nothing forced on vLLM that the user did not ask for
    # the README's command (TP2 + EP, no fix flag): the job asks for the CPU EP kernel fix by itself
    ep = cli.engine_kwargs(p.parse_args(["m", "--prompts", "p", "--out", "o", "-tp", "2", "--enable-expert-parallel"]))
    assert ep["additional_config"] == {"moe_cpu_ep_fix": True}
    with pytest.raises(Exception, match="JSON object"):
        cli.engine_kwargs(p.parse_args(["m", "--prompts", "p", "--out", "o", "--additional-config", "[1]"]))
