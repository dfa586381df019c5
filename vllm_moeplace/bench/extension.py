"""Worker extension used by the serving benchmark (`--worker-extension-cls`), reached over vLLM's
dev-mode `/collective_rpc` endpoint (loopback only).

It reuses the profiler's in-graph capture (`profiling/capture.py`) and adds one call that writes
what was captured to a file in the worker: the HTTP RPC path only carries JSON, not arrays.
The ids are written as the router's top-k step emitted them (PHYSICAL ids under the permutation
mechanism), and, under the mapping mechanism, also the physical ids the plugin's table chose
(`physical`), with each token's row in its step's batch (`batch_rows`, which fixes the rule's
virtual origin): the benchmark counts traffic from what the serving path really dispatched.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vllm_moeplace.profiling.capture import CaptureWorkerExtension, unpack_array


class BenchCaptureExtension(CaptureWorkerExtension):
    def moeplace_bench_dump(self, path: str) -> dict[str, Any] | None:
        state = getattr(self, "_moeplace_capture", None)
        if state is None:
            return None
        saved, state.phys_to_log = state.phys_to_log, None  # keep physical ids
        try:
            packed = state.drain()
        finally:
            state.phys_to_log = saved
        keys = ("ids", "req_index", "positions", "is_prefill", "batch_rows") + (("physical",) if "physical" in packed else ())
        arrays = {k: unpack_array(packed[k]) for k in keys}
        np.savez(
            path,
            **arrays,
            req_names=np.array(packed["req_names"], dtype=str),
            layer_ids=np.array(state.layer_ids, dtype=np.int32),
            num_experts=np.array(state.num_experts),
        )
        return {"tokens": int(arrays["ids"].shape[0]), "steps": int(packed["steps"]), "path": path}
