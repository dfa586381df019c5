"""Per-architecture facts the placement needs: where the MoE block of a decoder layer lives in
the checkpoint (every `{block}.experts.{e}.*` tensor is per expert), which are router rows, which must stay untouched,
and which decoder layers are MoE layers.

Exact names, not patterns: a tensor under a planned MoE block that this table does not name makes
the load fail (see remap.py), so an unknown checkpoint layout (e.g. experts stored as one fused
3-D tensor) is refused instead of silently misrouted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


def _qwen_moe_layers(cfg: Any) -> list[int]:
    # vLLM qwen2_moe.py / qwen3_moe.py decoder layer: MoE unless listed in mlp_only_layers,
    # and only every decoder_sparse_step-th layer.
    only_mlp = set(getattr(cfg, "mlp_only_layers", None) or [])
    step = getattr(cfg, "decoder_sparse_step", None) or 1
    if not (getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)):
        return []
    return [i for i in range(cfg.num_hidden_layers) if i not in only_mlp and (i + 1) % step == 0]


def _mixtral_moe_layers(cfg: Any) -> list[int]:
    return list(range(cfg.num_hidden_layers))


def _all_layers_if_experts(*attrs: str) -> Callable[[Any], list[int]]:
    def layers(cfg: Any) -> list[int]:
        if not any(getattr(cfg, a, None) for a in attrs):
            return []
        return list(range(cfg.num_hidden_layers))

    return layers


def _ernie_moe_layers(cfg: Any) -> list[int]:
    # vLLM ernie45_moe.py Ernie4_5_MoeDecoderLayer: every moe_layer_interval-th layer between
    # moe_layer_start_index and moe_layer_end_index (inclusive), when use_moe.
    n = getattr(cfg, "moe_num_experts", 0) or 0
    if isinstance(n, (list, tuple)):  # the VL variant lists text/vision experts
        n = n[0]
    if not getattr(cfg, "use_moe", n > 0):
        return []
    start = getattr(cfg, "moe_layer_start_index", 0) or 0
    end = getattr(cfg, "moe_layer_end_index", None)
    end = cfg.num_hidden_layers - 1 if end is None or end < 0 else end
    step = getattr(cfg, "moe_layer_interval", 1) or 1
    return [i for i in range(cfg.num_hidden_layers) if (i + 1) % step == 0 and start <= i <= end]


def _llama4_moe_layers(cfg: Any) -> list[int]:
    # vLLM llama4.py Llama4DecoderLayer: MoE iff interleave_moe_layer_step > 0 and
    # (layer + 1) % interleave_moe_layer_step == 0 (HF's `moe_layers` list is not read by vLLM).
    step = getattr(cfg, "interleave_moe_layer_step", 1)
    if not getattr(cfg, "num_local_experts", None) or not step or step <= 0:
        return []
    return [i for i in range(cfg.num_hidden_layers) if (i + 1) % step == 0]


def _deepseek_moe_layers(cfg: Any) -> list[int]:
    # vLLM deepseek_v2.py DeepseekV2DecoderLayer: first_k_dense_replace dense layers, then MoE
    # every moe_layer_freq layers. MTP layers (index >= num_hidden_layers) are not main-model layers.
    if getattr(cfg, "n_routed_experts", None) is None:
        return []
    k = getattr(cfg, "first_k_dense_replace", None) or 0
    freq = getattr(cfg, "moe_layer_freq", None) or 1
    return [i for i in range(cfg.num_hidden_layers) if i >= k and i % freq == 0]


@dataclass(frozen=True)
class MoeArch:
    """How one architecture's MoE block is laid out in an HF checkpoint."""

    name: str
    block: str
    """Attribute of the decoder layer holding the MoE block (`layers.{l}.{block}.`)."""
    num_experts_attrs: tuple[str, ...]
    """HF config fields with the number of routed experts, first present wins (transformers 5
    writes Qwen's `num_experts` as `num_local_experts` in config.json)."""
    router_rows: tuple[str, ...]
    """Tensors after `{block}.` whose dim 0 is indexed by expert id (permuted with the experts)."""
    untouched_prefixes: tuple[str, ...]
    """Tensors after `{block}.` that are not per routed expert (shared experts and their gate)."""
    moe_layers: Callable[[Any], list[int]]
    fused_experts: tuple[str, ...] = ()
    """Tensors after `{block}.` that hold ALL experts of a layer stacked on dim 0 (Llama-4's
    `experts.gate_up_proj` [E, H, 2I] and `experts.down_proj` [E, I, H]). vLLM's loader for them
    takes the rows of this rank's physical ids from its expert map (llama4.py
    `load_moe_expert_weights`), so the plan is applied by gathering their rows into physical
    order in the checkpoint stream (remap.py), for both mechanisms."""
    map_ok: bool = True
    """The mapping mechanism can serve this architecture. False where vLLM's loader cuts the
    checkpoint by its LOGICAL per-rank block (GPT-OSS: `num_local_experts // ep_size` rows from
    ep_rank on, gpt_oss.py `load_weights`): R*S physical slots would be loaded from the wrong rows,
    so plans with copies (or cross-group moves) are refused for it."""
    permute: bool = True
    """The permutation mechanism is audited for this architecture (block, router rows, untouched
    tensors exact). False: plans are always served by the mapping mechanism (serving/mapping.py),
    which renames nothing and leaves the router untouched, so it needs only the MoE layers and
    that vLLM loads the experts through `RoutedExperts`' weight loader (checked end to end)."""

    def num_experts(self, hf_config: Any) -> int:
        for attr in self.num_experts_attrs:
            value = getattr(hf_config, attr, None)
            if value is not None:
                return int(value)
        raise AttributeError(f"{self.name} config has none of {self.num_experts_attrs}")

    def expert_groups(self, hf_config: Any) -> int:
        """Number of contiguous expert-id groups of grouped top-k routing (1 = not grouped), read
        from the config whatever the architecture: DeepSeek/GLM/Kimi write `n_group`, others
        `num_expert_group`."""
        for attr in ("n_group", "num_expert_group"):
            value = getattr(hf_config, attr, None)
            if value is not None and int(value) > 1:
                return int(value)
        return 1


ARCHITECTURES: dict[str, MoeArch] = {
    a.name: a
    for a in [
        MoeArch(
            name="Qwen3MoeForCausalLM",
            block="mlp",
            num_experts_attrs=("num_experts", "num_local_experts"),
            router_rows=("gate.weight",),
            # Qwen3-MoE variants with a shared expert (vLLM qwen3_moe.py builds one when
            # shared_expert_intermediate_size > 0); shared_expert_gate has ONE output row.
            untouched_prefixes=("shared_expert.", "shared_expert_gate."),
            moe_layers=_qwen_moe_layers,
        ),
        MoeArch(
            name="Qwen2MoeForCausalLM",
            block="mlp",
            num_experts_attrs=("num_experts", "num_local_experts"),
            router_rows=("gate.weight",),
            untouched_prefixes=("shared_expert.", "shared_expert_gate."),
            moe_layers=_qwen_moe_layers,
        ),
        MoeArch(
            name="MixtralForCausalLM",
            block="block_sparse_moe",
            num_experts_attrs=("num_local_experts",),
            router_rows=("gate.weight",),
            untouched_prefixes=(),
            moe_layers=_mixtral_moe_layers,
        ),
        MoeArch(
            name="DeepseekV2ForCausalLM",
            block="mlp",
            num_experts_attrs=("n_routed_experts",),
            router_rows=("gate.weight", "gate.e_score_correction_bias"),
            untouched_prefixes=("shared_experts.",),
            moe_layers=_deepseek_moe_layers,
        ),
        # Mapping mechanism only (see MoeArch.permute): loaded by vLLM's AutoWeightsLoader through
        # RoutedExperts, per-expert checkpoint tensors, routers left as upstream builds them.
        MoeArch(
            name="OlmoeForCausalLM",
            block="mlp",
            num_experts_attrs=("num_experts",),
            router_rows=("gate.weight",),
            untouched_prefixes=(),
            moe_layers=_all_layers_if_experts("num_experts"),
            permute=False,
        ),
        MoeArch(
            name="Glm4MoeForCausalLM",
            block="mlp",
            num_experts_attrs=("n_routed_experts",),
            router_rows=("gate.weight", "gate.e_score_correction_bias"),
            untouched_prefixes=("shared_experts.",),
            moe_layers=_deepseek_moe_layers,  # first_k_dense_replace, as vLLM glm4_moe.py
            permute=False,
        ),
        MoeArch(
            name="Ernie4_5_MoeForCausalLM",
            block="mlp",
            num_experts_attrs=("moe_num_experts",),
            router_rows=("gate.weight", "moe_statics.e_score_correction_bias"),
            untouched_prefixes=("shared_experts.",),
            moe_layers=_ernie_moe_layers,
            permute=False,
        ),
        MoeArch(
            name="MiniMaxM2ForCausalLM",
            block="block_sparse_moe",
            num_experts_attrs=("num_local_experts",),
            router_rows=("gate.weight", "e_score_correction_bias"),
            untouched_prefixes=(),
            moe_layers=_all_layers_if_experts("num_local_experts"),
            permute=False,
        ),
        # Llama-4 text checkpoints (Llama4ForCausalLM): fused 3-D experts, top-1 sigmoid router
        # whose weight is applied to the input (vLLM llama4.py); a shared expert beside them.
        MoeArch(
            name="Llama4ForCausalLM",
            block="feed_forward",
            num_experts_attrs=("num_local_experts",),
            router_rows=("router.weight",),
            untouched_prefixes=("shared_expert.",),
            moe_layers=_llama4_moe_layers,
            fused_experts=("experts.gate_up_proj", "experts.down_proj"),
        ),
        # GPT-OSS (bf16/fp32 checkpoints): fused 3-D experts with per-expert biases, router with a
        # bias; vLLM's loader narrows each fused tensor to rows ep_rank*E/R .. +E/R itself.
        MoeArch(
            name="GptOssForCausalLM",
            block="mlp",
            num_experts_attrs=("num_local_experts",),
            router_rows=("router.weight", "router.bias"),
            untouched_prefixes=(),
            moe_layers=_all_layers_if_experts("num_local_experts"),
            fused_experts=("experts.gate_up_proj", "experts.gate_up_proj_bias", "experts.down_proj",
                           "experts.down_proj_bias"),
            map_ok=False,
        ),
        MoeArch(
            name="DeepseekV3ForCausalLM",
            block="mlp",
            num_experts_attrs=("n_routed_experts",),
            router_rows=("gate.weight", "gate.e_score_correction_bias"),
            untouched_prefixes=("shared_experts.",),
            moe_layers=_deepseek_moe_layers,
        ),
    ]
}


def arch_for(architectures: list[str] | None) -> MoeArch | None:
    """The table entry for an HF `architectures` list, or None if unsupported."""
    for name in architectures or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    return None
