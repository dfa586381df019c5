"""Worker extension (`worker_extension_cls`) that reports what each EP rank really holds.

    llm = LLM(..., worker_extension_cls="vllm_moeplace.serving.worker_ext.MoePlaceWorkerExtension")
    per_rank = llm.collective_rpc("moeplace_inspect")

For every MoE layer: the rank's EP index, its expert map, and a fingerprint of each local expert
slot's weights. The fingerprint is the k smallest and k largest values of the slot's w13 / w2
tensor: a multiset statistic, so it survives the CPU kernel's weight repacking exactly, and it
identifies the checkpoint expert whose weights landed in the slot (`checkpoint_fingerprints`).
"""

from __future__ import annotations

import re
from typing import Any

K = 4


def fingerprint(values: Any, k: int = K) -> list[float]:
    """k smallest then k largest values of a tensor (any layout of the same numbers)."""
    import torch

    flat = values.detach().reshape(-1).float().cpu()
    s = torch.sort(flat).values
    return [float(x) for x in torch.cat([s[:k], s[-k:]])]


class MoePlaceWorkerExtension:
    def moeplace_inspect(self) -> dict[str, Any]:
        from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
        from vllm.model_executor.model_loader.base_loader import BaseModelLoader

        from vllm_moeplace.serving import cpu_ep_fix

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        layers: dict[int, Any] = {}
        ep_rank = 0
        for mod in model.modules():
            if not isinstance(mod, RoutedExperts):
                continue
            m = re.search(r"\blayers\.(\d+)\.", mod.layer_name)
            if m is None:
                continue
            ep_rank = mod.moe_config.moe_parallel_config.ep_rank
            n = mod.local_num_experts
            w13 = mod.w13_weight.reshape(n, -1)
            w2 = mod.w2_weight.reshape(n, -1)
            emap = mod.expert_map_manager.expert_map
            layers[int(m.group(1))] = {
                "local_num_experts": n,
                "expert_map": None if emap is None else emap.tolist(),
                "w13": [fingerprint(w13[s]) for s in range(n)],
                "w2": [fingerprint(w2[s]) for s in range(n)],
            }
        return {
            "ep_rank": ep_rank,
            "runtime_hooks": bool(getattr(BaseModelLoader.load_model, "_moeplace", False)),
            "plan_requested": bool((self.vllm_config.additional_config or {}).get("moe_placement_plan")),  # type: ignore[attr-defined]
            "cpu_ep_fix": cpu_ep_fix.is_installed(),
            "layers": layers,
        }


def checkpoint_fingerprints(
    model_dir: str, block: str, gate_up: tuple[str, ...], down: str
) -> dict[tuple[int, int], dict[str, list[float]]]:
    """{(layer, expert): {"w13": fp, "w2": fp}} computed from a safetensors checkpoint folder.

    Per-expert checkpoints: `gate_up` = (gate name, up name), `down` = down name, after
    `experts.{e}.`. Fused 3-D checkpoints (Llama-4): `gate_up` = ("experts.gate_up_proj",),
    `down` = "experts.down_proj", full names after `{block}.`, expert e = row e (the fingerprint
    is layout-free, so the transposed storage does not matter)."""
    from pathlib import Path

    import torch
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    if len(gate_up) == 1:
        fused = re.compile(rf"\blayers\.(\d+)\.{re.escape(block)}\.{re.escape(gate_up[0])}$")
        out = {}
        for k, t in tensors.items():
            if (m := fused.search(k)) is None:
                continue
            w2 = tensors[k[: -len(gate_up[0])] + down]
            for e in range(t.shape[0]):
                out[(int(m.group(1)), e)] = {"w13": fingerprint(t[e]), "w2": fingerprint(w2[e])}
        return out
    pat = re.compile(rf"\blayers\.(\d+)\.{re.escape(block)}\.experts\.(\d+)\.")
    keys = {(int(m.group(1)), int(m.group(2))) for k in tensors if (m := pat.search(k))}
    out = {}
    for layer, e in sorted(keys):
        pre = next(k for k in tensors if pat.search(k) and pat.search(k).groups() == (str(layer), str(e)))
        head = pre[: pat.search(pre).end()]
        w13 = torch.cat([tensors[head + gate_up[0]].reshape(-1), tensors[head + gate_up[1]].reshape(-1)])
        out[(layer, e)] = {"w13": fingerprint(w13), "w2": fingerprint(tensors[head + down])}
    return out
