"""Worker extension the router's signature server runs (`--worker-extension-cls`).

It reuses the profiler's in-graph routing capture (`profiling/capture.py`, logical expert ids
even under a placement plan) and answers one dev-mode `/collective_rpc` call with JSON only: per
captured request whose vLLM request id starts with the router's prefix, the expert counts of its
prompt tokens at the asked layers. Everything captured since the previous call is consumed, so a
server that is also a DP rank does not accumulate its own traffic.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vllm_moeplace.profiling.capture import CaptureWorkerExtension, unpack_array


class RouterSignatureExtension(CaptureWorkerExtension):
    def moeplace_router_histograms(self, prefix: str, layers: list[int]) -> dict[str, Any] | None:
        state = getattr(self, "_moeplace_capture", None)
        if state is None:
            return None  # a rank without capture (TP rank != 0)
        if not state.armed:
            state.reset()
            state.armed = True
        missing = [x for x in layers if x not in state.layer_ids]
        if missing:
            return {"error": f"layers {missing} are not captured MoE layers {list(state.layer_ids)}"}
        packed = state.drain()
        ids = unpack_array(packed["ids"])
        req = unpack_array(packed["req_index"])
        pre = unpack_array(packed["is_prefill"])
        cols = [state.layer_ids.index(x) for x in layers]
        E = int(state.num_experts)
        out: dict[str, Any] = {}
        for i, name in enumerate(packed["req_names"]):
            if not name.startswith(prefix):
                continue
            m = (req == i) & pre
            counts = [np.bincount(ids[m, c, :].astype(np.int64).ravel(), minlength=E).tolist() for c in cols]
            out[name] = {"prefill_tokens": int(m.sum()), "counts": counts}
        return {"requests": out, "layer_ids": list(state.layer_ids), "num_experts": E}
