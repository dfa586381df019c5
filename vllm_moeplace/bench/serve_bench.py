"""Serving benchmark: the real `vllm serve` (CPU, TP2 + expert parallel) with vLLM's default layout
and with one or more placement plans, driven by the same workload.

For every layout it reports throughput, TTFT and TPOT (p50/p99) and the dispatch traffic the
layout actually needed, counted from the routed top-k ids of every token inside the serving
engine (`bench/traffic.py`), under a stated virtual topology. It checks, in the same run, that
every layout generated identical token ids, and that the traffic counted in the serving path
agrees with `moeplace evaluate` (`vllm_moeplace.metrics`) on the trace captured from the same run.

On the CPU path every rank computes every token (no all-to-all exists here), so timings measure
the plugin's overhead, not network savings; the traffic columns are what the layout would send
on a cluster, and `benchmarks/simulate.py` turns such counts into time.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vllm_moeplace.bench.load import LoadResult, run_load
from vllm_moeplace.bench.server import VllmServer
from vllm_moeplace.bench.traffic import Traffic, count_traffic
from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.plan import Plan, Topology, linear_layout, load_plan
from vllm_moeplace.trace import Trace, save_trace

EXTENSION = "vllm_moeplace.bench.extension.BenchCaptureExtension"
ENGINE_ARGS = [
    "--tensor-parallel-size", "2", "--enable-expert-parallel",
    # float32: a different placement changes each rank's partial sums; in bf16 a greedy token can
    # flip on a one-ulp tie of a random-weight model (see docs/serving.md).
    "--dtype", "float32",
    "--max-model-len", "1024",
]
AGREEMENT_TOLERANCE = 0.01  # serving-path counts vs `moeplace evaluate`, relative


@dataclass(frozen=True)
class LayoutSpec:
    name: str
    plan: Path | None  # None: vLLM's default (linear) layout, with only the CPU EP kernel fix


@dataclass
class LayoutRun:
    spec: LayoutSpec
    load: LoadResult
    startup_s: float
    physical_ids: np.ndarray  # int16 [T, L, K] as the router emitted them
    prompt_index: np.ndarray  # int32 [T]
    positions: np.ndarray  # int32 [T]
    is_prefill: np.ndarray  # bool [T]
    layer_ids: np.ndarray  # int32 [L]
    num_experts: int
    batch_rows: np.ndarray | None = None  # int32 [T]: row of the token in its step's batch
    mapped_ids: np.ndarray | None = None  # int16 [T, L, K]: physical ids the plugin's table chose (map mechanism)


def _rpc(server: VllmServer, method: str, *args: str) -> list:
    out = server.post("/collective_rpc", {"method": method, "args": list(args)}, timeout=600)
    return out.get("results", [])


def run_layout(
    model: str,
    spec: LayoutSpec,
    prompts: list[str],
    *,
    max_tokens: int,
    concurrency: int,
    out_dir: Path,
    engine_args: list[str] | None = None,
) -> LayoutRun:
    out_dir.mkdir(parents=True, exist_ok=True)
    args = list(engine_args or ENGINE_ARGS)
    args += ["--additional-config", json.dumps({"moeplace_capture": {"weights": False}})]
    args += ["--worker-extension-cls", EXTENSION]
    args += ["--moe-placement-plan", str(spec.plan)] if spec.plan else ["--moe-cpu-ep-fix"]
    env = {"VLLM_MOEPLACE_CAPTURE": "1", "VLLM_SERVER_DEV_MODE": "1"}
    server = VllmServer(model, args, env=env, log_path=out_dir / f"server-{spec.name}.log")
    t0 = time.perf_counter()
    with server:
        startup = time.perf_counter() - t0
        server.complete_ids(prompts[0], 4)  # warm-up (compile, caches): not measured, not captured
        _rpc(server, "moeplace_capture_start")
        load = run_load(server.base_url, server.model_name(), prompts, max_tokens=max_tokens, concurrency=concurrency)
        dump = out_dir / f"routed-{spec.name}.npz"
        results = [r for r in _rpc(server, "moeplace_bench_dump", str(dump)) if r]
        if not results:
            raise MoeplaceError(f"layout {spec.name}: no worker captured routing (is the capture plugin installed?)")
    z = np.load(dump)
    names = [str(n) for n in z["req_names"]]
    idx = []
    for n in names:
        m = re.search(r"moeplace-(\d+)", n)
        if not m:
            raise MoeplaceError(f"layout {spec.name}: captured request {n!r} is not one of the benchmark's")
        idx.append(int(m.group(1)))
    prompt_index = np.array(idx, dtype=np.int32)[z["req_index"]]
    return LayoutRun(
        spec=spec, load=load, startup_s=startup, physical_ids=z["ids"], prompt_index=prompt_index,
        positions=z["positions"], is_prefill=z["is_prefill"], layer_ids=z["layer_ids"],
        num_experts=int(z["num_experts"]), batch_rows=z["batch_rows"] if "batch_rows" in z else None,
        mapped_ids=z["physical"] if "physical" in z else None,
    )


def layout_plan(run: LayoutRun, topology: Topology, model_name: str) -> Plan:
    """The plan a run served with (the default layout as an explicit linear plan)."""
    if run.spec.plan is not None:
        return load_plan(run.spec.plan)
    lin = linear_layout(run.num_experts, topology.ep_size)
    return Plan(model_name=model_name, num_experts=run.num_experts, moe_layers=run.layer_ids.tolist(),
                ep_size=topology.ep_size, topology=topology, layers={int(l): lin for l in run.layer_ids},
                solver={"method": "vllm-default-linear"})


def logical_trace(run: LayoutRun, plan: Plan, labels: list[str] | None, model_name: str) -> Trace:
    """The run's routing as a native trace of LOGICAL ids, tokens ordered by (prompt, position)."""
    ids = run.physical_ids.astype(np.int64)
    if run.mapped_ids is None:  # permutation mechanism: the router emitted physical ids
        for li, layer in enumerate(run.layer_ids):
            perm = plan.layers.get(int(layer))
            if perm is not None:
                ids[:, li] = perm.reshape(-1)[ids[:, li]]
    order = token_order(run)
    return Trace(
        topk_ids=ids[order].astype(np.int16),
        layer_ids=run.layer_ids.astype(np.int32),
        request_ids=run.prompt_index[order].astype(np.int32),
        is_prefill=run.is_prefill[order],
        num_experts=run.num_experts,
        meta={"model": model_name, "source": f"moeplace bench ({run.spec.name})", "top_k": int(ids.shape[2])},
        labels=None if labels is None else np.array(labels, dtype=str),
    )


def token_order(run: LayoutRun) -> np.ndarray:
    return np.lexsort((run.positions, run.prompt_index))


def mapped_traffic(run: LayoutRun, plan: Plan, topology: Topology, trace: Trace) -> tuple[Traffic, dict, float]:
    """A run served by the mapping mechanism (copies / cross-group): the traffic counted from the
    physical ids the engine's table chose, each token from the rule's virtual origin (its batch
    row mod R); `evaluate`'s view of the same tokens and origins; and the fraction of choices equal
    to the replica rule applied to the logical ids offline (1.0 = the engine applied exactly the rule)."""
    from vllm_moeplace.replica import candidate_table, select
    from vllm_moeplace.metrics import evaluate_layers_at_origins

    if run.batch_rows is None or run.mapped_ids is None:
        raise MoeplaceError(f"layout {run.spec.name}: the capture recorded no mapped physical ids / batch rows")
    R, S = plan.ep_size, plan.slots_per_rank()
    origin, spread = run.batch_rows.astype(np.int64) % R, run.batch_rows.astype(np.int64) // R
    counted = count_traffic(run.mapped_ids, R * S, topology.nodes, origin=origin)
    order = token_order(run)
    scored = evaluate_layers_at_origins(plan.layers, topology, trace, origin[order], spread[order])
    same = []
    for li, layer in enumerate(run.layer_ids):
        table = candidate_table(plan.layers[int(layer)], plan.num_experts, topology.node_of_rank)
        want = select(table, run.physical_ids[:, li].astype(np.int64), origin, spread)
        same.append(want == run.mapped_ids[:, li])
    return counted, scored, float(np.mean(same))


def _same(flag: bool | None) -> str:
    return "reference" if flag is None else ("yes" if flag else "NO")


def _pct(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def run_benchmark(
    model: str,
    plans: list[Path],
    prompts: list[str],
    *,
    out_dir: Path,
    labels: list[str] | None = None,
    max_tokens: int = 32,
    concurrency: int = 4,
    ranks_per_node: int = 1,
    engine_args: list[str] | None = None,
) -> dict:
    """Run every layout, write `out_dir/serving_report.md` + `serving_results.json`; return the results."""
    from vllm_moeplace.metrics import evaluate_plan

    out_dir = Path(out_dir)
    specs = [LayoutSpec("default", None)] + [LayoutSpec(f"plan{i}:{p.stem}", p) for i, p in enumerate(plans)]
    for p in plans:
        load_plan(p)  # fail before starting any server
    runs = [
        run_layout(model, s, prompts, max_tokens=max_tokens, concurrency=concurrency, out_dir=out_dir,
                   engine_args=engine_args)
        for s in specs
    ]
    ep_size = 2 if engine_args is None else _ep_size(engine_args)
    topology = Topology.uniform(ep_size, ranks_per_node)
    base = runs[0]
    results: dict = {"model": model, "prompts": len(prompts), "max_tokens": max_tokens, "concurrency": concurrency,
                     "virtual_topology": topology.nodes, "layouts": {}}
    base_trace = None
    for run in runs:
        plan = layout_plan(run, topology, model)
        if plan.ep_size != ep_size:
            raise MoeplaceError(f"{run.spec.plan}: plan ep_size {plan.ep_size} != served EP size {ep_size}")
        trace = logical_trace(run, plan, labels, model)
        save_trace(out_dir / f"trace-{run.spec.name.replace(':', '_')}.npz", trace)
        rule_honoured = None
        if run.mapped_ids is not None:
            counted, scored, rule_honoured = mapped_traffic(run, plan, topology, trace)
        else:
            counted = count_traffic(run.physical_ids, run.num_experts, topology.nodes)
            scored = evaluate_plan(Plan(model_name=plan.model_name, num_experts=plan.num_experts,
                                        moe_layers=plan.moe_layers, ep_size=plan.ep_size, topology=topology,
                                        layers=plan.layers), trace).as_dict()
        agree = {k: _pct(getattr(counted, k), scored[k]) for k in ("node_sends", "rank_sends", "imbalance")}
        if base_trace is None:
            base_trace = trace
        same_tokens, same_routing = compare_to_reference(run, trace, base if run is not base else None, base_trace)
        results["layouts"][run.spec.name] = {
            "plan": None if run.spec.plan is None else str(run.spec.plan),
            "startup_s": run.startup_s,
            **run.load.summary(),
            "traffic": counted.as_dict(),
            "evaluate": scored,
            "agreement_rel_err": agree,
            "agrees_within_1pct": all(v <= AGREEMENT_TOLERANCE for v in agree.values()),
            "tokens_identical_to_default": same_tokens,
            "routing_identical_fraction": same_routing,
            "mechanism": "map" if run.mapped_ids is not None else "permute",
            "replica_rule_honoured": rule_honoured,
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving_results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "serving_report.md").write_text(render_report(results))
    return results


def _ep_size(engine_args: list[str]) -> int:
    tp = dp = 1
    for flag, val in zip(engine_args, engine_args[1:]):
        if flag in ("--tensor-parallel-size", "-tp"):
            tp = int(val)
        if flag in ("--data-parallel-size", "-dp"):
            dp = int(val)
    return tp * dp


def compare_to_reference(
    run: LayoutRun, trace: Trace, reference: LayoutRun | None, reference_trace: Trace
) -> tuple[bool | None, float | None]:
    """(greedy token ids identical, fraction of (token, layer) with the same logical expert set) of
    one layout against the reference run (vLLM's default layout). The reference itself gets
    (None, None): comparing it with itself would say nothing, so no vacuous yes / 1.0."""
    if reference is None:
        return None, None
    same_tokens = [r.token_ids for r in run.load.requests] == [r.token_ids for r in reference.load.requests]
    return same_tokens, _routing_agreement(reference_trace, trace)


def _routing_agreement(a: Trace, b: Trace) -> float:
    """Fraction of (token, layer) whose logical expert SET is the same in both runs."""
    if a.num_tokens != b.num_tokens or not np.array_equal(a.request_ids, b.request_ids):
        return 0.0
    return float((np.sort(a.topk_ids, axis=2) == np.sort(b.topk_ids, axis=2)).all(axis=2).mean())


def render_report(r: dict) -> str:
    lines = [
        "# Serving benchmark: vLLM default layout vs placement plans",
        "",
        f"Model `{r['model']}`, {r['prompts']} prompts, {r['max_tokens']} output tokens each (greedy, ignore_eos), "
        f"concurrency {r['concurrency']}. vLLM on CPU, TP2 + expert parallel, float32. Traffic counted in the serving "
        f"path from every token's routed ids, token origin uniform over ranks, virtual topology nodes "
        f"{r['virtual_topology']}. Layouts served by the mapping mechanism (redundant copies, cross-group moves) "
        "choose among an expert's copies by the replica rule origin-node-spread/v1 (the token's own rank, else a "
        "copy on its node, else spread by token index; docs/serving.md): on this TP+EP path each token's origin is "
        "virtual, its batch row mod the EP size, and their traffic is counted and evaluated from that origin.",
        "",
        "| layout | tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | node_sends | rank_sends | imbalance | "
        "tokens = default | routing = default | counted vs evaluate | mechanism | rule honoured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, x in r["layouts"].items():
        t = x["traffic"]
        err = max(x["agreement_rel_err"].values())
        lines.append(
            f"| {name} | {x['throughput_tok_s']:.1f} | {x['ttft_p50_ms']:.0f} / {x['ttft_p99_ms']:.0f} | "
            f"{x['tpot_p50_ms']:.0f} / {x['tpot_p99_ms']:.0f} | {t['node_sends']:.4f} | {t['rank_sends']:.4f} | "
            f"{t['imbalance']:.4f} | {_same(x['tokens_identical_to_default'])} | "
            f"{'reference' if x['routing_identical_fraction'] is None else format(x['routing_identical_fraction'], '.4f')} | max rel. err {err:.2e} | {x.get('mechanism', 'permute')} | "
            f"{'-' if x.get('replica_rule_honoured') is None else format(x['replica_rule_honoured'], '.4f')} |"
        )
    lines += [
        "",
        "Per-rank load ((token, expert) pairs, all layers): "
        + "; ".join(f"{n}: {x['traffic']['rank_load']}" for n, x in r["layouts"].items()),
        "",
        "On this CPU path there is no all-to-all (every rank sees every token and computes its local experts), so "
        "the timings reflect compute on a small shared machine, not network savings, and short runs vary by several "
        "percent between runs of the same layout; the plugin itself does no per-token work after loading. The "
        "traffic columns are what each layout would dispatch on a cluster (benchmarks/results/simulation.md turns "
        "such counts into time).",
        "",
    ]
    return "\n".join(lines)
