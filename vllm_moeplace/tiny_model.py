"""The embedded default model: a tiny random-weight MoE checkpoint + a locally trained tokenizer.

No model hub is reachable on our machines (and CI must not depend on one), so tests, the demo and
the benchmarks build their model here: a real Hugging Face checkpoint folder (config.json,
safetensors, tokenizer) that vLLM loads exactly like a downloaded one. Weights are random, so
outputs are meaningless but deterministic for a seed; routing is what we care about.

The vLLM CPU MoE kernel wants hidden and expert sizes divisible by 32 (see
../shared/notes/vllm-cpu.md); DeepSeek-V2's CPU MLA backend only supports a 576-wide latent
(kv_lora_rank 512 + qk_rope_head_dim 64), so that arch is bigger than the others.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_moeplace.errors import MoeplaceError

ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3", "olmoe", "glm4_moe", "ernie45_moe",
         "minimax_m2", "llama4", "gpt_oss")

# A small, varied corpus for the tokenizer and the default prompt set: code, science, chat, maths,
# so that a profiled trace has domain labels with different routing.
CORPUS: dict[str, list[str]] = {
    "code": [
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
        "for i in range(10):\n    print(i * i)",
        "import numpy as np\nx = np.arange(16).reshape(4, 4)\nprint(x.T @ x)",
        "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)",
        "SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC;",
        "fn main() { let v: Vec<u32> = (0..5).collect(); println!(\"{:?}\", v); }",
    ],
    "science": [
        "Photosynthesis converts light energy into chemical energy stored in glucose.",
        "The mitochondria is the organelle that produces most of the cell's ATP.",
        "Newton's second law states that force equals mass times acceleration.",
        "Water boils at one hundred degrees Celsius at sea level pressure.",
        "DNA is a double helix made of nucleotides: adenine, thymine, guanine and cytosine.",
        "Electrons occupy orbitals around the nucleus according to quantum numbers.",
    ],
    "chat": [
        "Hello! How are you doing today? I hope the weather is nice where you are.",
        "Can you recommend a good book to read on a rainy weekend?",
        "Thanks for your help yesterday, the recipe turned out great.",
        "What is your favourite movie, and why do you like it so much?",
        "Please write a short poem about the sea and the stars at night.",
        "I am planning a trip to the mountains next month. Any advice?",
    ],
    "math": [
        "Solve for x: 3x + 7 = 22. Subtract seven, then divide by three: x = 5.",
        "The derivative of x squared is two x, and the integral of two x is x squared plus C.",
        "A prime number has exactly two divisors: one and itself. 2, 3, 5, 7, 11, 13.",
        "The sum of the angles of a triangle is one hundred eighty degrees.",
        "Let G be a group and H a subgroup; the index of H divides the order of G.",
        "Compute 17 * 23 = 391 and 391 mod 7 = 6.",
    ],
}


@dataclass(frozen=True)
class TinyModelSpec:
    arch: str = "qwen3_moe"
    num_layers: int = 2
    num_experts: int = 8
    top_k: int = 2
    hidden_size: int = 128
    moe_intermediate_size: int = 64
    vocab_size: int = 512
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    first_dense_layers: int = 0
    """Leading dense (non-MoE) decoder layers (DeepSeek-V2 `first_k_dense_replace`, Qwen `mlp_only_layers`)."""
    num_groups: int = 1
    """deepseek_v3: expert groups of grouped top-k (`n_group`); topk_group is half of them."""
    seed: int = 0

    def check(self) -> None:
        if self.arch not in ARCHS:
            raise MoeplaceError(f"tiny-model: --arch {self.arch!r} unknown; choose one of {', '.join(ARCHS)}")
        for name in ("hidden_size", "moe_intermediate_size"):
            if getattr(self, name) % 32:
                raise MoeplaceError(f"tiny-model: {name}={getattr(self, name)} must be divisible by 32 (vLLM CPU MoE kernel)")
        if not 1 <= self.top_k <= self.num_experts:
            raise MoeplaceError(f"tiny-model: top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        if not 0 <= self.first_dense_layers < self.num_layers:
            raise MoeplaceError(
                f"tiny-model: first_dense_layers={self.first_dense_layers} must leave a MoE layer among {self.num_layers}"
            )
        if self.arch == "llama4" and self.top_k != 1:
            # vLLM applies Llama-4's router weight on the input, implemented for top-1 only
            # (prepare_finalize/no_dp_ep.py), as the released models route
            raise MoeplaceError(f"tiny-model: llama4 routes top-1 (top_k={self.top_k} given)")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise MoeplaceError(f"tiny-model: num_groups={self.num_groups} must divide num_experts={self.num_experts}")
        if self.num_groups > 1 and self.arch not in ("deepseek_v3", "glm4_moe"):
            raise MoeplaceError("tiny-model: expert groups (grouped top-k) are built only for --arch deepseek_v3, glm4_moe")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise MoeplaceError("tiny-model: heads must divide hidden_size and kv heads must divide heads")


def moe_layer_indices(spec: TinyModelSpec) -> list[int]:
    return list(range(spec.first_dense_layers, spec.num_layers))


def _hf_config(spec: TinyModelSpec):
    import transformers

    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    dense = list(range(spec.first_dense_layers))
    if spec.arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=spec.moe_intermediate_size * 2,
            moe_intermediate_size=spec.moe_intermediate_size,
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=dense,
            head_dim=spec.hidden_size // spec.num_attention_heads,
        )
    if spec.arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common,
            intermediate_size=spec.moe_intermediate_size * 2,
            moe_intermediate_size=spec.moe_intermediate_size,
            shared_expert_intermediate_size=spec.moe_intermediate_size * 2,
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=dense,
        )
    if spec.arch == "mixtral":
        if spec.first_dense_layers:
            raise MoeplaceError("tiny-model: mixtral has no dense layers (first_dense_layers must be 0)")
        common.pop("pad_token_id")
        return transformers.MixtralConfig(
            **common,
            intermediate_size=spec.moe_intermediate_size,
            num_local_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k,
            head_dim=spec.hidden_size // spec.num_attention_heads,
        )
    head_dim = spec.hidden_size // spec.num_attention_heads
    if spec.arch == "olmoe":
        if spec.first_dense_layers:
            raise MoeplaceError("tiny-model: olmoe has no dense layers (first_dense_layers must be 0)")
        return transformers.OlmoeConfig(**common, intermediate_size=spec.moe_intermediate_size,
                                        num_experts=spec.num_experts, num_experts_per_tok=spec.top_k, norm_topk_prob=False)
    if spec.arch == "glm4_moe":
        # GLM-4.5/4.6: sigmoid scores + e_score_correction_bias, (optionally grouped) top-k, shared expert
        return transformers.Glm4MoeConfig(
            **common, intermediate_size=spec.moe_intermediate_size * 2, moe_intermediate_size=spec.moe_intermediate_size,
            n_routed_experts=spec.num_experts, n_shared_experts=1, num_experts_per_tok=spec.top_k,
            first_k_dense_replace=spec.first_dense_layers, n_group=spec.num_groups,
            topk_group=max(1, spec.num_groups // 2), norm_topk_prob=True, routed_scaling_factor=1.0,
            head_dim=head_dim, partial_rotary_factor=0.5, use_qk_norm=False,
        )
    if spec.arch == "ernie45_moe":
        return transformers.Ernie4_5_MoeConfig(
            **common, intermediate_size=spec.moe_intermediate_size * 2, moe_intermediate_size=spec.moe_intermediate_size,
            moe_num_experts=spec.num_experts, moe_k=spec.top_k, moe_layer_start_index=spec.first_dense_layers,
            moe_layer_interval=1, moe_num_shared_experts=0, head_dim=head_dim,
        )
    if spec.arch == "llama4":
        # Llama-4 text model (Scout-style: every layer MoE): fused 3-D experts, top-1 sigmoid router
        # applied on the input, a shared expert. vLLM reads interleave_moe_layer_step, not moe_layers.
        if spec.first_dense_layers:
            raise MoeplaceError("tiny-model: llama4 is built with every layer MoE (first_dense_layers must be 0)")
        common.pop("pad_token_id")
        cfg = transformers.Llama4TextConfig(
            **common, intermediate_size=spec.moe_intermediate_size, intermediate_size_mlp=spec.moe_intermediate_size * 2,
            num_local_experts=spec.num_experts, num_experts_per_tok=spec.top_k, interleave_moe_layer_step=1,
            head_dim=head_dim, attention_chunk_size=8192, use_qk_norm=False,
        )
        cfg.architectures = ["Llama4ForCausalLM"]
        return cfg
    if spec.arch == "gpt_oss":
        # GPT-OSS: fused experts with biases, router bias, attention sinks, sliding window on
        # alternate layers (unquantized here; the released checkpoints are MXFP4).
        if spec.first_dense_layers:
            raise MoeplaceError("tiny-model: gpt_oss has no dense layers (first_dense_layers must be 0)")
        common.pop("pad_token_id")
        cfg = transformers.GptOssConfig(
            **common, intermediate_size=spec.moe_intermediate_size, num_local_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k, head_dim=head_dim, sliding_window=128,
        )
        cfg.architectures = ["GptOssForCausalLM"]
        return cfg
    if spec.arch == "minimax_m2":
        if spec.first_dense_layers:
            raise MoeplaceError("tiny-model: minimax_m2 has no dense layers (first_dense_layers must be 0)")
        common.pop("pad_token_id")
        return transformers.MiniMaxM2Config(
            **common, intermediate_size=spec.moe_intermediate_size, num_local_experts=spec.num_experts,
            num_experts_per_tok=spec.top_k, head_dim=head_dim, rotary_dim=head_dim, use_qk_norm=True,
            # fields of MiniMax-M2's released config.json that transformers' class does not declare
            scoring_func="sigmoid", use_routing_bias=True,
        )
    # deepseek_v2/v3: MLA attention with the only latent width the CPU backend supports; MLA has
    # one KV head per query head.
    common["num_key_value_heads"] = spec.num_attention_heads
    deepseek = dict(
        **common,
        intermediate_size=spec.moe_intermediate_size * 2,
        moe_intermediate_size=spec.moe_intermediate_size,
        n_routed_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        n_shared_experts=1,
        first_k_dense_replace=spec.first_dense_layers,
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        routed_scaling_factor=1.0,
    )
    if spec.arch == "deepseek_v3":
        # DeepSeek-V3/R1 routing: sigmoid scores + e_score_correction_bias, grouped top-k
        # (n_group groups, the best topk_group of them by their top-2 score sum), renormalised.
        # vLLM needs topk_method and scoring_func written explicitly (../shared notes).
        return transformers.DeepseekV3Config(
            **deepseek, n_group=spec.num_groups, topk_group=max(1, spec.num_groups // 2),
            topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
        )
    return transformers.DeepseekV2Config(**deepseek, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False)


def skewed_routing_trace(model_dir: str | Path, tokens: int, top_k: int, seed: int = 0, alpha: float = 1.2):
    """A synthetic routing trace for a model folder's MoE layers: each layer draws top-k experts
    from a Zipf(alpha) popularity over a random expert order (what `moeplace solve` needs to make a
    plan for a tiny model without profiling it). 20 tokens per request."""
    import numpy as np

    from vllm_moeplace.cli.random_plan import model_moe_info
    from vllm_moeplace.trace import Trace

    _, E, layers = model_moe_info(model_dir)
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, E + 1) ** alpha
    ids = np.stack([[rng.choice(E, top_k, replace=False, p=rng.permutation(pop) / pop.sum()) for _ in layers]
                    for _ in range(tokens)])
    return Trace(topk_ids=ids.astype(np.int16), layer_ids=np.array(layers, np.int32),
                 request_ids=(np.arange(tokens) // 20).astype(np.int32), is_prefill=np.ones(tokens, bool),
                 num_experts=E, meta={"model": str(model_dir), "source": "skewed_routing_trace"})


def _train_tokenizer(vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [t for items in CORPUS.values() for t in items] * 4
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    # A minimal chat template so /v1/chat/completions works too.
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(out)


def build_tiny_model(out_dir: str | Path, spec: TinyModelSpec | None = None, **overrides) -> Path:
    """Write a tiny random-weight MoE checkpoint folder that vLLM and transformers load offline.

    Deterministic for a given spec (weights from `torch.manual_seed(spec.seed)`).
    """
    import torch
    import transformers

    spec = TinyModelSpec(**{**asdict(spec or TinyModelSpec()), **overrides})
    spec.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = _hf_config(spec)
    torch.manual_seed(spec.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-default init so that routing is not near-uniform noise: distinct experts get
    # distinct, input-dependent scores, as in a trained model.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "feed_forward.router.weight")) or ".mlp.gate." in name and name.endswith("weight") and p.dim() == 2 and p.shape[0] == spec.num_experts:
                p.normal_(0.0, 0.5)
            if spec.arch in ("llama4", "gpt_oss") and (".experts." in name or name == "lm_head.weight"):
                # their experts are initialised near zero (and GPT-OSS's greedy output then repeats
                # one token): experts that differ and decisive logits make token identity a test
                p.normal_(0.0, 0.5 if name == "lm_head.weight" else 0.05)
            if spec.arch.startswith("deepseek") and name == "lm_head.weight":
                # vLLM's CPU MLA attention is not bit-reproducible run to run (../shared notes), so
                # near-flat random logits would flip greedy tokens on ties: make them decisive.
                p.normal_(0.0, 1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # A bias that changes which experts win, so serving must carry it exactly.
                b.normal_(0.0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    _train_tokenizer(spec.vocab_size, out)
    (out / "moeplace_tiny_model.json").write_text(
        json.dumps({"spec": asdict(spec), "moe_layers": moe_layer_indices(spec)}, indent=1) + "\n"
    )
    return out


def default_prompts() -> list[dict[str, str]]:
    """The embedded warm-up prompt set: JSON-lines records with `prompt` and `label`."""
    return [{"prompt": t, "label": label} for label, items in CORPUS.items() for t in items]
