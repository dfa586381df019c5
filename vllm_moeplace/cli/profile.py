"""`moeplace profile MODEL --prompts FILE --out trace.npz`: record router top-k per token in vLLM."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vllm_moeplace.errors import MoeplaceError


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string, e.g. --engine-arg kv_cache_dtype=auto


def _engine_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (VALUE as JSON), got {text!r}")
    return key.strip().replace("-", "_"), _json_value(value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder or name (as for vllm serve)")
    p.add_argument("--prompts", required=True, help="JSON lines {prompt, label?} or plain text, one prompt per line")
    p.add_argument("--out", required=True, help="native trace to write (.npz, written atomically)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens generated per prompt (greedy)")
    p.add_argument("--topk-weights", action="store_true", help="also record the router weights (float16)")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("vLLM engine options (passed to vllm.LLM)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int)
    g.add_argument("--enable-expert-parallel", action="store_true", default=None)
    g.add_argument("--dtype")
    g.add_argument("--enforce-eager", action="store_true", default=None)
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--max-num-seqs", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--additional-config", type=json.loads, help="JSON object for vLLM's additional_config")
    g.add_argument("--moe-placement-plan", help="serve with this placement plan (ids are still recorded as logical)")
    g.add_argument("--moe-cpu-ep-fix", action="store_true", default=None, help="CPU expert-parallel kernel fix (TP2 + EP on CPU)")
    g.add_argument("--engine-arg", type=_engine_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="any other vllm.LLM keyword (VALUE parsed as JSON), repeatable")


_DIRECT = ("tensor_parallel_size", "enable_expert_parallel", "dtype", "enforce_eager", "max_model_len",
           "max_num_seqs", "max_num_batched_tokens", "seed")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    ek: dict[str, Any] = {k: getattr(args, k) for k in _DIRECT if getattr(args, k) is not None}
    if not isinstance(args.additional_config or {}, dict):
        raise MoeplaceError(f"--additional-config: expected a JSON object, got {args.additional_config!r}")
    extra = dict(args.additional_config or {})
    if args.moe_placement_plan:
        extra["moe_placement_plan"] = args.moe_placement_plan
    if args.moe_cpu_ep_fix or ek.get("enable_expert_parallel"):
        # vLLM's CPU MoE kernel ignores expert_map under EP and crashes or computes the wrong
        # experts (docs/cpu-ep-kernel-bug.md): our own job always asks for the fix with EP. It is
        # installed only on the CPU platform, so this changes nothing on GPUs.
        extra["moe_cpu_ep_fix"] = True
    for k, v in args.engine_arg:
        ek[k] = v
    if extra:
        ek["additional_config"] = {**(ek.get("additional_config") or {}), **extra}
    return ek


def run(args: argparse.Namespace) -> int:
    from vllm_moeplace.profiling.prompts import read_prompts
    from vllm_moeplace.profiling.runner import ProfileOptions, run_profile
    from vllm_moeplace.trace import save_trace

    prompts = read_prompts(args.prompts)
    opts = ProfileOptions(
        model=args.model,
        max_tokens=args.max_tokens,
        topk_weights=args.topk_weights,
        ignore_eos=args.ignore_eos,
        engine_kwargs=engine_kwargs(args),
    )
    opts.check()
    res = run_profile(opts, prompts, progress=not args.no_progress)
    t = res.trace
    assert t is not None
    t.meta["prompts_file"] = str(args.prompts)
    save_trace(args.out, t)
    print(
        f"wrote {args.out}: {t.num_tokens} tokens ({int(t.is_prefill.sum())} prefill), {t.num_requests} requests, "
        f"{t.num_layers} MoE layers, top_k {t.top_k}, {t.num_experts} experts; "
        f"{res.tokens_per_second:.1f} tok/s over {res.seconds:.1f} s",
        file=sys.stderr,
    )
    return 0
