"""End to end: `moeplace profile` on the real vLLM engine, checked against an independent oracle.

The oracle runs the same tiny checkpoint through Hugging Face transformers (float32) with a
forward hook on every MoE gate (`layers.<i>.mlp.gate`), and computes the router's decision the
way the architecture defines it: softmax over the gate logits, then top-k (Qwen3-MoE renormalises
the chosen probabilities). Prefill tokens must choose the same expert SET at every MoE layer.

Tolerance (documented in docs/profiling.md): vLLM and transformers compute the hidden states with
different kernels, so logits differ by ~1e-6. A token may differ only where the oracle's k-th and
(k+1)-th logits are within 1e-5 (a near-tie either side may break); any other difference fails.
Weights are stored as float16, compared with atol 2e-3.

Two engine starts per module (the budget): TP1 with torch.compile ON (no --enforce-eager: the
callbacks must survive compilation), and TP2 + expert parallel serving a random placement plan
(router ids are PHYSICAL there; the trace must still hold LOGICAL ids).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vllm_moeplace.profiling.prompts import read_prompts, write_prompts_jsonl
from vllm_moeplace.tiny_model import default_prompts
from vllm_moeplace.trace import load_trace

pytestmark = pytest.mark.vllm

SPEC = dict(arch="qwen3_moe", num_layers=3, first_dense_layers=1, num_experts=8, top_k=2)
MAX_TOKENS = 4
TIE = 1e-5


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", **extra)
    return env


def _profile(model: Path, prompts: Path, out: Path, *extra: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "vllm_moeplace", "profile", str(model), "--prompts", str(prompts), "--out", str(out),
        "--max-tokens", str(MAX_TOKENS), "--ignore-eos", "--dtype", "float32", "--max-model-len", "256",
        "--topk-weights", "--no-progress", *extra,
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"moeplace profile failed ({res.returncode}):\n{res.stderr[-4000:]}"
    return res


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory):
    model = tiny_model_factory(**SPEC)
    d = tmp_path_factory.mktemp("profile")
    # A subset keeps the run short but still batches several labelled prompts in one step.
    records = [r for i, r in enumerate(default_prompts()) if i % 3 == 0]
    prompts = d / "prompts.jsonl"
    write_prompts_jsonl(prompts, records)
    return model, prompts, d


@pytest.fixture(scope="module")
def oracle(setup):
    """Per prompt: (token ids, gate logits float32 [T, L, E]) from transformers with gate hooks."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, prompts, _ = setup
    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for name, mod in hf.named_modules():
        m = re.fullmatch(r".*layers\.(\d+)\.mlp\.gate", name)
        if m:
            layer = int(m.group(1))

            def hook(_mod, _inp, out, layer=layer):
                logits = out[0] if isinstance(out, tuple) else out  # transformers 5 routers return (logits, ...)
                captured[layer] = logits.detach().reshape(-1, logits.shape[-1]).float()

            hooks.append(mod.register_forward_hook(hook))
    layers = sorted(int(re.fullmatch(r".*layers\.(\d+)\.mlp\.gate", n).group(1)) for n, _ in hf.named_modules()
                    if re.fullmatch(r".*layers\.(\d+)\.mlp\.gate", n))
    out = []
    with torch.no_grad():
        for rec in read_prompts(prompts):
            ids = tok(rec.prompt, return_tensors="pt").input_ids
            captured.clear()
            hf(ids)
            out.append((ids[0].tolist(), torch.stack([captured[l] for l in layers], dim=1).numpy()))
    for h in hooks:
        h.remove()
    return layers, out


@pytest.fixture(scope="module")
def trace_tp1(setup):
    model, prompts, d = setup
    out = d / "tp1.npz"
    _profile(model, prompts, out, env=_env())  # torch.compile ON (vLLM's CPU default)
    return load_trace(out)


@pytest.fixture(scope="module")
def trace_tp2_plan(setup):
    from vllm_moeplace.cli.random_plan import random_plan

    model, prompts, d = setup
    plan = random_plan(model, ep_size=2, seed=3)
    assert any(not np.array_equal(a.reshape(-1), np.arange(a.size)) for a in plan.layers.values())
    plan_path = d / "plan.json"
    plan.save(plan_path)
    out = d / "tp2.npz"
    _profile(
        model, prompts, out, "--tensor-parallel-size", "2", "--enable-expert-parallel", "--enforce-eager",
        "--moe-placement-plan", str(plan_path), env=_env(VLLM_CPU_OMP_THREADS_BIND="0|1"),
    )
    return load_trace(out), plan


def _check_against_oracle(trace, oracle) -> int:
    """Assert prefill top-k sets equal the oracle's; return the number of tolerated near-ties."""
    layers, per_prompt = oracle
    assert trace.layer_ids.tolist() == layers
    K = trace.top_k
    ties = 0
    for r, (token_ids, logits) in enumerate(per_prompt):
        mask = (trace.request_ids == r) & trace.is_prefill
        got = np.sort(trace.topk_ids[mask].astype(np.int64), axis=-1)  # [T, L, K]
        assert got.shape[0] == len(token_ids), f"request {r}: {got.shape[0]} prefill tokens, oracle tokenised {len(token_ids)}"
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-probs, axis=-1, kind="stable")
        want = np.sort(order[..., :K], axis=-1)
        bad = np.argwhere((got != want).any(-1))
        for t, li in bad:
            srt = np.sort(logits[t, li])[::-1]
            gap = srt[K - 1] - srt[K]
            assert gap < TIE, (
                f"request {r} token {t} layer {layers[li]}: vLLM chose {got[t, li].tolist()}, "
                f"transformers {want[t, li].tolist()} (k-th/k+1-th logit gap {gap:.2e} is no tie)"
            )
            ties += 1
        # Weights: the renormalised softmax of the chosen experts, per expert id.
        w_got = trace.topk_weights[mask].astype(np.float64)
        idx = np.argsort(trace.topk_ids[mask], axis=-1)
        w_got = np.take_along_axis(w_got, idx, -1)
        w_want = np.take_along_axis(probs, want, -1)
        w_want /= w_want.sum(-1, keepdims=True)
        ok = (got == want).all(-1)
        np.testing.assert_allclose(w_got[ok], w_want[ok], atol=2e-3)
    return ties


def _check_shape(trace, n_prompts: int) -> None:
    # Every request: its prompt (prefill) then MAX_TOKENS - 1 decode tokens (the last generated
    # token is sampled but never fed back through the model).
    counts = np.bincount(trace.request_ids[~trace.is_prefill], minlength=n_prompts)
    assert counts.tolist() == [MAX_TOKENS - 1] * n_prompts
    for r in range(n_prompts):
        pre = trace.is_prefill[trace.request_ids == r]
        assert not pre.all() and pre[: pre.sum()].all()  # prefill first, then decode
    assert trace.request_ids.tolist() == sorted(trace.request_ids.tolist())


def test_profile_tp1_compiled_matches_transformers(setup, trace_tp1, oracle):
    _, prompts, _ = setup
    recs = read_prompts(prompts)
    t = trace_tp1
    ties = _check_against_oracle(t, oracle)
    assert ties <= 2, f"{ties} near-ties: suspicious"
    _check_shape(t, len(recs))
    assert t.labels.tolist() == [r.label for r in recs]
    assert t.meta["source"] == "vllm-profile" and t.meta["top_k"] == SPEC["top_k"]
    assert t.meta["engine_options"]["dtype"] == "float32"
    assert "enforce_eager" not in t.meta["engine_options"]
    assert t.num_experts == SPEC["num_experts"]
    # Decode tokens route too, and differently from a constant: a dead capture buffer is zeros.
    assert np.unique(t.topk_ids[~t.is_prefill]).size > 2


def test_profile_tp2_ep_with_plan_records_logical_ids(setup, trace_tp2_plan, trace_tp1, oracle):
    t, plan = trace_tp2_plan
    assert t.meta["placement_plan"] and t.meta["ids_remapped_by_plan_layers"] == sorted(plan.layers)
    assert t.meta["engine_options"]["tensor_parallel_size"] == 2
    _check_against_oracle(t, oracle)
    _check_shape(t, len(read_prompts(setup[1])))
    # Same requests, same prefill tokens as the single-rank run: the expert sets agree exactly.
    pre1, pre2 = trace_tp1.is_prefill, t.is_prefill
    assert np.array_equal(trace_tp1.request_ids[pre1], t.request_ids[pre2])
    a = np.sort(trace_tp1.topk_ids[pre1], -1)
    b = np.sort(t.topk_ids[pre2], -1)
    assert (a != b).any(-1).mean() < 0.01
