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
    prefix_cache_hit_rate: float | None = None  # of the measured load's prompt tokens (vLLM /metrics)


def _rpc(server: VllmServer, method: str, *args: str) -> list:
    out = server.post("/collective_rpc", {"method": method, "args": list(args)}, timeout=600)
    return out.get("results", [])


def warmup_prompts(prompts: list[str], n: int) -> list[str]:
    """`n` warm-up prompts about as long as the measured ones but with a different first block, so
    the warm-up leaves nothing in vLLM's prefix cache that a measured request could hit."""
    return [f"Warm-up request {i}. " + prompts[i % len(prompts)] for i in range(n)]


def _prefix_cache_counts(server: VllmServer) -> tuple[float, float] | None:
    """(queried, hit) prompt tokens of vLLM's prefix cache so far, from /metrics; None if absent."""
    import urllib.request

    try:
        with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return None
    got: dict[str, float] = {}
    for line in text.splitlines():
        for key in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
            if line.startswith(key):
                got[key] = got.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    if len(got) != 2:
        return None
    return got["vllm:prefix_cache_queries_total"], got["vllm:prefix_cache_hits_total"]


def run_layout(
    model: str,
    spec: LayoutSpec,
    prompts: list[str],
    *,
    max_tokens: int,
    concurrency: int,
    out_dir: Path,
    engine_args: list[str] | None = None,
    warmup: int = 1,
    tag: str = "",
) -> LayoutRun:
    """Start a fresh `vllm serve` for one layout, send `warmup` requests (not timed, not captured:
    the first requests of a server pay one-off costs), then the measured load with routing capture.
    `tag` suffixes the server log and routing dump (one file per round)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    args = list(engine_args or ENGINE_ARGS)
    args += ["--additional-config", json.dumps({"moeplace_capture": {"weights": False}})]
    args += ["--worker-extension-cls", EXTENSION]
    args += ["--moe-placement-plan", str(spec.plan)] if spec.plan else ["--moe-cpu-ep-fix"]
    env = {"VLLM_MOEPLACE_CAPTURE": "1", "VLLM_SERVER_DEV_MODE": "1"}
    server = VllmServer(model, args, env=env, log_path=out_dir / f"server-{spec.name}{tag}.log")
    t0 = time.perf_counter()
    with server:
        startup = time.perf_counter() - t0
        name = server.model_name()
        if warmup:
            run_load(server.base_url, name, warmup_prompts(prompts, warmup), max_tokens=max_tokens,
                     concurrency=concurrency)
        cache0 = _prefix_cache_counts(server)
        _rpc(server, "moeplace_capture_start")
        load = run_load(server.base_url, name, prompts, max_tokens=max_tokens, concurrency=concurrency)
        cache1 = _prefix_cache_counts(server)
        dump = out_dir / f"routed-{spec.name}{tag}.npz"
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
    hit = None
    if cache0 is not None and cache1 is not None and cache1[0] > cache0[0]:
        hit = (cache1[1] - cache0[1]) / (cache1[0] - cache0[0])
    return LayoutRun(
        spec=spec, load=load, startup_s=startup, physical_ids=z["ids"], prompt_index=prompt_index,
        positions=z["positions"], is_prefill=z["is_prefill"], layer_ids=z["layer_ids"],
        num_experts=int(z["num_experts"]), batch_rows=z["batch_rows"] if "batch_rows" in z else None,
        mapped_ids=z["physical"] if "physical" in z else None, prefix_cache_hit_rate=hit,
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


def round_order(n_layouts: int, rounds: int) -> list[tuple[int, int]]:
    """(round, layout index) in serving order. Every round serves each layout once; odd rounds go
    in reverse (A B | B A | A B ...), so no layout always runs first or last in a round, and a slow
    drift of the shared machine's load lands on every layout alike."""
    if n_layouts < 1 or rounds < 1:
        raise MoeplaceError(f"need at least one layout and one round, got {n_layouts} layouts, {rounds} rounds")
    order = []
    for r in range(rounds):
        idx = range(n_layouts) if r % 2 == 0 else range(n_layouts - 1, -1, -1)
        order += [(r, i) for i in idx]
    return order


SPREAD_KEYS = ("throughput_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms")


def spread(values: list[float]) -> dict[str, float]:
    """Median and min-max of one metric over rounds (median: robust to one disturbed round)."""
    if not values:
        raise MoeplaceError("no rounds to aggregate")
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def overlaps(a: dict[str, float], b: dict[str, float]) -> bool:
    """Two min-max ranges share a value: the difference is inside the measured spread."""
    return a["min"] <= b["max"] and b["min"] <= a["max"]


def aggregate_rounds(per_round: list[dict]) -> dict:
    """One layout's rounds -> its entry in `layouts`: the metrics as medians over rounds (the keys a
    single run had), `spread` (median/min/max per timing metric), `rounds` (every round's values),
    and every check as its worst round (tokens identical in all rounds, lowest agreement, ...)."""
    first = per_round[0]
    out = {k: v for k, v in first.items() if k not in SPREAD_KEYS}
    out["spread"] = {k: spread([r[k] for r in per_round]) for k in SPREAD_KEYS}
    out.update({k: out["spread"][k]["median"] for k in SPREAD_KEYS})
    for k in ("wall_s", "startup_s"):
        out[k] = float(np.median([r[k] for r in per_round]))
    flags = [r["tokens_identical_to_default"] for r in per_round]
    out["tokens_identical_to_default"] = None if all(f is None for f in flags) else all(f is True for f in flags)
    fr = [r["routing_identical_fraction"] for r in per_round if r["routing_identical_fraction"] is not None]
    out["routing_identical_fraction"] = min(fr) if fr else None
    out["agreement_rel_err"] = {k: max(r["agreement_rel_err"][k] for r in per_round) for k in first["agreement_rel_err"]}
    out["agrees_within_1pct"] = all(r["agrees_within_1pct"] for r in per_round)
    rule = [r["replica_rule_honoured"] for r in per_round if r["replica_rule_honoured"] is not None]
    out["replica_rule_honoured"] = min(rule) if rule else None
    # traffic is a function of the routing, identical in every round when the routing is
    out["traffic_identical_across_rounds"] = all(r["traffic"] == first["traffic"] for r in per_round)
    out["rounds"] = per_round
    return out


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
    rounds: int = 3,
    warmup: int | None = None,
) -> dict:
    """Serve every layout `rounds` times, interleaved (`round_order`), each time on a fresh server
    that first gets `warmup` requests (default: `concurrency`) excluded from every statistic.
    Checks per run, against the default layout's run of the SAME round: identical tokens, routing
    agreement; per run on its own: counted traffic == `moeplace evaluate`, replica rule honoured.
    Default runs of later rounds are also compared with the first round's default run.
    Writes `out_dir/serving_report.md` + `serving_results.json` (+ per-request timings in
    `serving_requests.json`); returns the results."""
    out_dir = Path(out_dir)
    if rounds < 1:
        raise MoeplaceError(f"--rounds must be >= 1, got {rounds}")
    warmup = concurrency if warmup is None else warmup
    if warmup < 0:
        raise MoeplaceError(f"--warmup must be >= 0, got {warmup}")
    specs = [LayoutSpec("default", None)] + [LayoutSpec(f"plan{i}:{p.stem}", p) for i, p in enumerate(plans)]
    for p in plans:
        load_plan(p)  # fail before starting any server
    ep_size = 2 if engine_args is None else _ep_size(engine_args)
    topology = Topology.uniform(ep_size, ranks_per_node)
    runs: dict[tuple[int, int], LayoutRun] = {}
    serve_order = round_order(len(specs), rounds)
    for r, i in serve_order:
        runs[(r, i)] = run_layout(model, specs[i], prompts, max_tokens=max_tokens, concurrency=concurrency,
                                  out_dir=out_dir, engine_args=engine_args, warmup=warmup,
                                  tag="" if r == 0 else f"-r{r}")
    results: dict = {"model": model, "prompts": len(prompts), "max_tokens": max_tokens, "concurrency": concurrency,
                     "virtual_topology": topology.nodes, "rounds": rounds, "warmup_requests": warmup,
                     "order": [specs[i].name for _, i in serve_order],
                     "reference": "the default layout's run of the same round", "layouts": {}}
    per_request: dict = {}
    per_round: dict[str, list[dict]] = {s.name: [] for s in specs}
    default_stable = []
    for r in range(rounds):
        base_trace = None
        base = runs[(r, 0)]
        for i, spec in enumerate(specs):
            run = runs[(r, i)]
            entry, trace = analyse_run(run, topology, ep_size, labels, model)
            if r == 0:
                save_trace(out_dir / f"trace-{spec.name.replace(':', '_')}.npz", trace)
            if base_trace is None:
                base_trace = trace
            same_tokens, same_routing = compare_to_reference(run, trace, base if i else None, base_trace)
            entry.update(round=r, position=serve_order.index((r, i)), tokens_identical_to_default=same_tokens,
                         routing_identical_fraction=same_routing)
            per_round[spec.name].append(entry)
            per_request.setdefault(spec.name, []).append(run.load.per_request())
        if r:
            default_stable.append(compare_to_reference(base, base_trace, runs[(0, 0)], first_default_trace))
        else:
            first_default_trace = base_trace
    for spec in specs:
        results["layouts"][spec.name] = aggregate_rounds(per_round[spec.name])
    results["default_rounds_identical"] = all(t is True and f == 1.0 for t, f in default_stable) if default_stable else None
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serving_results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "serving_requests.json").write_text(json.dumps(per_request) + "\n")
    (out_dir / "serving_report.md").write_text(render_report(results))
    return results


def analyse_run(run: LayoutRun, topology: Topology, ep_size: int, labels: list[str] | None,
                model: str) -> tuple[dict, Trace]:
    """One run's timings, counted traffic and its agreement with `moeplace evaluate`; its trace."""
    from vllm_moeplace.metrics import evaluate_plan

    plan = layout_plan(run, topology, model)
    if plan.ep_size != ep_size:
        raise MoeplaceError(f"{run.spec.plan}: plan ep_size {plan.ep_size} != served EP size {ep_size}")
    trace = logical_trace(run, plan, labels, model)
    rule_honoured = None
    if run.mapped_ids is not None:
        counted, scored, rule_honoured = mapped_traffic(run, plan, topology, trace)
    else:
        counted = count_traffic(run.physical_ids, run.num_experts, topology.nodes)
        scored = evaluate_plan(Plan(model_name=plan.model_name, num_experts=plan.num_experts,
                                    moe_layers=plan.moe_layers, ep_size=plan.ep_size, topology=topology,
                                    layers=plan.layers), trace).as_dict()
    agree = {k: _pct(getattr(counted, k), scored[k]) for k in ("node_sends", "rank_sends", "imbalance")}
    entry = {
        "plan": None if run.spec.plan is None else str(run.spec.plan),
        "startup_s": run.startup_s,
        **run.load.summary(),
        "prefix_cache_hit_rate": run.prefix_cache_hit_rate,
        "traffic": counted.as_dict(),
        "evaluate": scored,
        "agreement_rel_err": agree,
        "agrees_within_1pct": all(v <= AGREEMENT_TOLERANCE for v in agree.values()),
        "mechanism": "map" if run.mapped_ids is not None else "permute",
        "replica_rule_honoured": rule_honoured,
    }
    return entry, trace


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


def _range(sp: dict, fmt: str) -> str:
    if sp["n"] == 1:
        return format(sp["median"], fmt)
    return f"{sp['median']:{fmt}} [{sp['min']:{fmt}}-{sp['max']:{fmt}}]"


def protocol_text(r: dict) -> str:
    rounds, warm = r.get("rounds", 1), r.get("warmup_requests", 1)
    order = " ".join(r.get("order", []))
    return (
        f"Protocol: {rounds} round(s); each round serves every layout once on a freshly started `vllm serve`, "
        f"odd rounds in reverse order (served order: {order}). Each server first gets {warm} warm-up request(s) "
        "(the measured prompts behind a different first sentence, so nothing they cache is hit later) at the same "
        "concurrency; they are excluded from every number and from the routing capture. Timings are the median "
        "over rounds with [min-max]; the checks hold in every round: tokens and routing are compared with the "
        "default layout's run of the same round, and each later default run with the first one."
    )


def render_report(r: dict) -> str:
    lay = r["layouts"]
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
        protocol_text(r),
        "",
        "| layout | tok/s | TTFT p50 ms | TPOT p50 ms | TTFT p99 / TPOT p99 ms | node_sends | rank_sends | "
        "imbalance | tokens = default | routing = default | counted vs evaluate | mechanism | rule honoured |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, x in lay.items():
        t, sp = x["traffic"], x.get("spread")
        err = max(x["agreement_rel_err"].values())
        if sp is None:  # a results file from before rounds existed
            sp = {k: {"median": x[k], "min": x[k], "max": x[k], "n": 1} for k in SPREAD_KEYS}
        lines.append(
            f"| {name} | {_range(sp['throughput_tok_s'], '.1f')} | {_range(sp['ttft_p50_ms'], '.1f')} | "
            f"{_range(sp['tpot_p50_ms'], '.2f')} | {x['ttft_p99_ms']:.0f} / {x['tpot_p99_ms']:.1f} | "
            f"{t['node_sends']:.4f} | {t['rank_sends']:.4f} | "
            f"{t['imbalance']:.4f} | {_same(x['tokens_identical_to_default'])} | "
            f"{'reference' if x['routing_identical_fraction'] is None else format(x['routing_identical_fraction'], '.4f')} | max rel. err {err:.2e} | {x.get('mechanism', 'permute')} | "
            f"{'-' if x.get('replica_rule_honoured') is None else format(x['replica_rule_honoured'], '.4f')} |"
        )
    moved = [n for n, x in lay.items() if x.get("traffic_identical_across_rounds") is False]
    if moved:
        ranges = "; ".join(
            f"{n}: node_sends {min(x['traffic']['node_sends'] for x in lay[n]['rounds']):.4f}-"
            f"{max(x['traffic']['node_sends'] for x in lay[n]['rounds']):.4f}" for n in moved)
        lines += ["", "Traffic columns are round 0's. Layouts served by the mapping mechanism count each token from "
                  "its virtual origin (its batch row), which depends on how that run batched the requests, so "
                  f"their counts move between rounds ({ranges}); in every round the count equals `moeplace "
                  "evaluate` at the same origins."]
    if r.get("rounds", 1) > 1:
        lines += ["", "Every run, in served order:", "",
                  "| # | round | layout | tok/s | TTFT p50 ms | TPOT p50 ms | TTFT p99 ms | startup s | prefix-cache hits |",
                  "|---|---|---|---|---|---|---|---|---|"]
        runs = sorted((x["position"], name, x) for name, e in lay.items() for x in e["rounds"])
        for pos, name, x in runs:
            hit = x.get("prefix_cache_hit_rate")
            lines.append(f"| {pos + 1} | {x['round']} | {name} | {x['throughput_tok_s']:.1f} | {x['ttft_p50_ms']:.1f} | "
                         f"{x['tpot_p50_ms']:.2f} | {x['ttft_p99_ms']:.0f} | {x['startup_s']:.0f} | "
                         f"{'-' if hit is None else format(hit, '.1%')} |")
        lines += ["", verdict_text(r)]
    lines += [
        "",
        "Per-rank load ((token, expert) pairs, all layers): "
        + "; ".join(f"{n}: {x['traffic']['rank_load']}" for n, x in lay.items()),
        "",
        "On this CPU path there is no all-to-all (every rank sees every token and computes its local experts), so "
        "the timings reflect compute on a small shared machine, not network savings, and runs of the same layout "
        "vary by several percent; the plugin itself does no per-token work after loading. The "
        "traffic columns are what each layout would dispatch on a cluster (benchmarks/results/simulation.md turns "
        "such counts into time).",
        "",
    ]
    return "\n".join(lines)


def verdict_text(r: dict) -> str:
    """Per plan and metric: is the difference from the default inside the measured spread?"""
    base = r["layouts"]["default"]["spread"]
    parts = []
    for name, x in r["layouts"].items():
        if name == "default":
            continue
        for key, label in (("throughput_tok_s", "throughput"), ("ttft_p50_ms", "TTFT p50"), ("tpot_p50_ms", "TPOT p50")):
            same = overlaps(x["spread"][key], base[key])
            parts.append(f"{name} {label}: {'inside the spread (no difference measured)' if same else 'OUTSIDE the spread'}")
    stable = r.get("default_rounds_identical")
    tail = "" if stable is None else (" Default runs of all rounds generated identical tokens and routing: "
                                      + ("yes." if stable else "NO."))
    return "Min-max ranges of each plan vs the default: " + "; ".join(parts) + "." + tail
