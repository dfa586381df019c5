"""Property tests: any trace written out in a published layout imports back to the same trace."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_moeplace.profiling.importers import ImportOptions, import_trace


@st.composite
def routed(draw, max_k: int = 3):
    """(per-request [tokens, L, K] distinct-id arrays, prefill counts, E, layer ids)."""
    E = draw(st.integers(4, 12))
    K = draw(st.integers(1, max_k))
    L = draw(st.integers(1, 3))
    layer_ids = sorted(draw(st.sets(st.integers(0, 6), min_size=L, max_size=L)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    reqs, n_pre = [], []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 5))
        reqs.append(np.argsort(rng.random((n, L, E)), axis=2)[:, :, :K])
        n_pre.append(draw(st.integers(1, n)))
    return reqs, n_pre, E, layer_ids


@given(routed())
@settings(max_examples=25, deadline=None)
def test_vllm_layout_round_trip(case) -> None:
    reqs, n_pre, E, layer_ids = case
    width = max(layer_ids) + 1
    arrays = {}
    for r, a in enumerate(reqs):
        full = np.zeros((len(a), width, a.shape[2]), dtype=np.uint8)
        full[:, layer_ids] = a
        arrays[f"r{r}"] = full
    with tempfile.TemporaryDirectory() as d:
        np.savez(Path(d) / "v.npz", **arrays, prompt_lens=np.array(n_pre))
        t = import_trace("vllm-routed-experts", Path(d) / "v.npz", ImportOptions(num_experts=E, layer_ids=tuple(layer_ids)))
    assert np.array_equal(t.topk_ids, np.concatenate(reqs))
    assert t.layer_ids.tolist() == layer_ids
    assert t.request_ids.tolist() == [r for r, a in enumerate(reqs) for _ in range(len(a))]
    assert t.is_prefill.tolist() == [i < p for a, p in zip(reqs, n_pre) for i in range(len(a))]


@given(routed())
@settings(max_examples=25, deadline=None)
def test_orders_in_chaos_round_trip(case) -> None:
    reqs, n_pre, E, layer_ids = case
    n_decoder = max(layer_ids) + 1
    with tempfile.TemporaryDirectory() as d:
        for r, (a, p) in enumerate(zip(reqs, n_pre)):
            steps = [range(p)] + [[i] for i in range(p, len(a))]  # step 0 = prefill, then 1 token each
            doc = [
                {str(li): ([a[i, layer_ids.index(li)].tolist() for i in s] if li in layer_ids else None) for li in range(n_decoder)}
                for s in steps
            ]
            (Path(d) / f"{r}.json").write_text(json.dumps(doc))
        t = import_trace("orders-in-chaos", Path(d), ImportOptions(num_experts=E))
    assert np.array_equal(t.topk_ids, np.concatenate(reqs))
    assert t.layer_ids.tolist() == layer_ids
    assert t.is_prefill.tolist() == [i < p for a, p in zip(reqs, n_pre) for i in range(len(a))]
