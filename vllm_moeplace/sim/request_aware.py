"""Request-aware rows of the simulator suite (issue 12, item 5): `benchmarks/simulate.py --only request-aware`.

Every other suite row deals tokens to ranks uniformly. Here the request-aware plan (`solve(...,
request_groups=...)`, one group of DP ranks per node) is timed with batches whose origins come from
the plan's own router on the held-out requests: `route_trace` sends each held-out request to a group
from its own prefill signature (never its decode routing), and `sample_routed_batches` draws each
rank's batch from the tokens of the requests routed to its group. Beside it, on the same held-out
half, hardware profile and batch specs:

- `linear` and the plain solver plan (same solve options, no request groups) with uniform batches
  (the suite's batches: `sample_batches`, so `linear` equals the suite's `linear` row);
- controls: the plain plan with the routed batches (what routing alone does to a layout not made
  for it) and the request-aware plan with uniform batches (what the layout does without its router).

So each row says its origin model (`origins`: uniform / routed) next to its plan (`plan`).
The page section is written from the saved rows (`section`), like the rest of simulation.md.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from vllm_moeplace.plan import Topology
from vllm_moeplace.request_routing import route_trace, share_imbalance
from vllm_moeplace.routed_metrics import evaluate_routed
from vllm_moeplace.sim.network import BatchSpec, Hardware, ModelShape, SimParams
from vllm_moeplace.sim.run import sample_batches, simulate
from vllm_moeplace.trace import Trace

KEY = "request-aware"  # the suite's `--only` value and the results JSON's section name ("request_aware")
# (plan, origins) rows per topology and batch, in table order.
ROWS = (("linear", "uniform"), ("plain", "uniform"), ("plain", "routed"), ("aware", "uniform"), ("aware", "routed"))


@dataclass(frozen=True)
class Case:
    trace: str  # the suite's trace key
    model: str  # key into params.models
    topologies: tuple[tuple[int, int], ...]  # (ep_size, num_nodes); one request group per node
    batches: tuple[str, ...]  # keys into params.batches
    redundant_per_rank: int
    max_imbalance: float
    signature_layers: int  # the router's signature reads the first this-many MoE layers (0: all)

    @property
    def setting(self) -> str:
        sig = "all MoE layers" if self.signature_layers == 0 else f"first {self.signature_layers} MoE layer(s)"
        copies = f"{self.redundant_per_rank} copies/rank" if self.redundant_per_rank else "no copies"
        return f"{copies}, cap {self.max_imbalance:g}, signature {sig}"


def cases(quick: bool) -> list[Case]:
    """Llama-4 (prefill and decode) and DeepSeek-V2-Lite (prefill only in the shared trace).
    Llama-4 gets 2 copies per rank: without copies no load cap is reachable (one expert takes up to
    8x a rank's share), as in benchmarks/results/request_aware.md."""
    return [
        Case("llama4_mmlu_algebra", "llama-4-maverick", ((8, 2),) if quick else ((8, 2), (16, 4)),
             ("prefill-phase", "decode-phase"), 2, 1.05, 0),
        Case("dsv2lite_puffin_a", "deepseek-v2-lite", ((8, 2),), ("prefill",), 0, 1.10, 1),
    ]


@dataclass(frozen=True)
class RaRow:
    trace: str
    model: str
    ep_size: int
    num_nodes: int
    setting: str
    batch: str
    tokens_per_rank: int
    plan: str  # linear | plain | aware
    origins: str  # uniform (tokens dealt to any rank) | routed (the aware plan's router on the held-out requests)
    total_ms: float
    dispatch_ms: float
    compute_ms: float
    combine_ms: float
    rdma_gb: float
    nvlink_gb: float
    pair_imbalance: float  # sampled max/mean rank load, mean over layers
    node_sends_prefill: float  # held-out, with these origins (routed_metrics.evaluate_routed); nan: no such tokens
    node_sends_decode: float
    imbalance: float  # expected max/mean rank load with these origins, mean over layers
    share_imbalance: float  # held-out requests of the largest group / fair share (the router's; 1 for uniform)
    fit_seconds: float
    hardware: str

    def as_dict(self) -> dict:
        # JSON without NaN literals: a phase the held-out half lacks is null.
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(self).items()}


def solve_pair(train: Trace, topo: Topology, case: Case, seconds: float):
    """(plain plan, request-aware plan, seconds each): the same deterministic options, the searches'
    plans as found (keep_plan), as the suite's `cpsat` rows."""
    from vllm_moeplace.solver.options import SolveOptions
    from vllm_moeplace.solver.pipeline import solve
    from vllm_moeplace.solver.request_groups import RequestGroupOptions

    opts = SolveOptions(time_limit=seconds, deterministic=True, keep_plan=True,
                        redundant_per_rank=case.redundant_per_rank, max_imbalance=case.max_imbalance)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # guard / node-level cap warnings: the rows' imbalance columns say it
        t0 = time.perf_counter()
        plain = solve(train, topo, opts)
        t1 = time.perf_counter()
        aware = solve(train, topo, opts, request_groups=RequestGroupOptions(topo.num_nodes, case.signature_layers))
        t2 = time.perf_counter()
    return plain, aware, t1 - t0, t2 - t1


def topology_rows(case: Case, train: Trace, test: Trace, topo: Topology, shape: ModelShape, hw: Hardware, hw_name: str,
                  specs: dict[str, BatchSpec], seconds: float, plans=None) -> list[RaRow]:
    """The ROWS of one case at one topology (`plans`: a precomputed `solve_pair` result)."""
    from vllm_moeplace.solver.baselines import baseline_layers

    plain, aware, t_plain, t_aware = plans or solve_pair(train, topo, case, seconds)
    routing = aware.request_routing
    tok_group, req_group = route_trace(routing, test)
    share = share_imbalance(req_group, routing.num_groups)
    layouts = {"linear": (baseline_layers("linear", train, topo), 0.0), "plain": (plain.layers, t_plain),
               "aware": (aware.layers, t_aware)}
    origin = {"uniform": None, "routed": (tok_group, routing.group_ranks)}  # `sample_batches(routed=)`
    spread = (np.full(test.num_tokens, -1), ())  # evaluate_routed's "no group": any rank
    R = topo.ep_size
    # Common random numbers: every plan is timed on the same batches of its origin model.
    batches = {(b, o): sample_batches(test, specs[b], R, routed) for b in case.batches for o, routed in origin.items()}
    out = []
    for plan, o in ROWS:
        layers, fit_s = layouts[plan]
        m = evaluate_routed(layers, topo, test, *(origin[o] or spread))
        for b in case.batches:
            res = simulate(layers, topo, test, hw, shape, batches[(b, o)])
            out.append(RaRow(
                trace=case.trace, model=case.model, ep_size=R, num_nodes=topo.num_nodes, setting=case.setting, batch=b,
                tokens_per_rank=specs[b].tokens_per_rank, plan=plan, origins=o, total_ms=res.total * 1e3,
                dispatch_ms=float(res.dispatch.sum() * 1e3), compute_ms=float(res.compute.sum() * 1e3),
                combine_ms=float(res.combine.sum() * 1e3), rdma_gb=res.rdma_bytes / 1e9, nvlink_gb=res.nvlink_bytes / 1e9,
                pair_imbalance=res.pair_imbalance, node_sends_prefill=m.node_sends_prefill,
                node_sends_decode=m.node_sends_decode, imbalance=m.imbalance,
                share_imbalance=share if o == "routed" else 1.0, fit_seconds=fit_s, hardware=hw_name))
    return out


def run(case_list: list[Case], load: Callable[[str], Trace], params: SimParams, hw_name: str, seconds: float,
        log: Callable[[str], None]) -> list[RaRow]:
    """All cases on the suite's split (first half of the requests trains, the second is held out)."""
    rows: list[RaRow] = []
    for case in case_list:
        train, test = load(case.trace).split_by_request(0.5)
        specs = {b: params.batches[b] for b in case.batches}
        for ep, nodes in case.topologies:
            topo = Topology.uniform(ep, ep // nodes)
            new = topology_rows(case, train, test, topo, params.models[case.model], params.hardware[hw_name], hw_name,
                                specs, seconds)
            rows += new
            fit = {r.plan: r.fit_seconds for r in new}
            log(f"{case.trace} EP{ep}/{nodes}n request-aware: fit plain {fit['plain']:.0f}s aware {fit['aware']:.0f}s; " + ", ".join(f"{r.plan}/{r.origins} {r.batch} {r.total_ms:.2f} ms" for r in new))
    return rows


# ---- the page section --------------------------------------------------------------------------


def _pct(new: float, old: float) -> str:
    return "–" if not old else ("±0.0%" if abs(new / old - 1) < 5e-4 else f"{(new / old - 1) * 100:+.1f}%")


def _f(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x:.3f}"  # the held-out half has no tokens of that phase


def section(block: dict) -> str:
    """Markdown for the saved request-aware block of simulation.json (rows + its own provenance)."""
    rows = [RaRow(**r) for r in block["rows"]]
    m = block["machine"]
    out = [
        "## Request-aware placement: origins from the router (issue 12)",
        "",
        f"Produced by `{block['command']}` (under `flock /tmp/moeplace-heavy.lock`) on {block['date']}, commit {m['commit']}; "
        f"{m['nproc']} CPUs ({m['cpu']}); load average before {block['load_before']}, after {block['load_after']}; wall "
        f"time {block['wall_seconds']:.0f} s; `solve` deterministic, {block['cpsat_seconds']:g} s per plan; hardware "
        f"`{block['hardware']}`. The other rows of this page are unchanged by it (own solves, own batches).",
        "",
        "Plans fitted on the first half of the requests, timed on the held-out half. *plain* = `solve` with the options "
        "of the setting line; *aware* = the same with `request_groups` (one group of DP ranks per node, the router's "
        "share cap 1.10); *linear* = vLLM's default. Origins: *uniform* = tokens dealt to any rank (the suite's batches); "
        "*routed* = each held-out request sent by the aware plan's router from its own prefill signature, each rank's "
        "batch drawn from its group's requests (`sim.run.sample_routed_batches`). node_sends and imbalance are the "
        "held-out placement metrics with the same origins (`routed_metrics.evaluate_routed`); share = the largest "
        "group's held-out requests / fair share. `linear` has no copies even where the solver's plans have them.",
        "",
    ]
    groups: dict[tuple, list[RaRow]] = {}
    for r in rows:
        groups.setdefault((r.trace, r.ep_size, r.num_nodes, r.batch, r.hardware), []).append(r)
    for (trace, ep, nodes, batch, hw), rs in groups.items():
        by = {(r.plan, r.origins): r for r in rs}
        lin = by.get(("linear", "uniform"))
        share = by[("aware", "routed")].share_imbalance if ("aware", "routed") in by else float("nan")
        out += [f"#### {rs[0].model} ({trace}), EP{ep} over {nodes} nodes, {batch} batch: {rs[0].tokens_per_rank} tokens/rank, "
                f"hardware `{hw}`; {rs[0].setting}; held-out share {share:.3f}", "",
                "| plan | origins | MoE step (ms) | vs linear | dispatch | MoE compute | combine | RDMA GB/step | vs linear "
                "| NVLink GB/step | sampled max/mean load | node_sends prefill | node_sends decode | imbalance | fit (s) |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rs:
            out.append(
                f"| {r.plan} | {r.origins} | {r.total_ms:.2f} | {_pct(r.total_ms, lin.total_ms) if lin else '–'} | "
                f"{r.dispatch_ms:.2f} | {r.compute_ms:.2f} | {r.combine_ms:.2f} | {r.rdma_gb:.3f} | "
                f"{_pct(r.rdma_gb, lin.rdma_gb) if lin else '–'} | {r.nvlink_gb:.3f} | {r.pair_imbalance:.3f} | "
                f"{_f(r.node_sends_prefill)} | {_f(r.node_sends_decode)} | {r.imbalance:.3f} | {r.fit_seconds:.0f} |")
        out.append("")
    out += ["### Request-aware (routed) against the plain plan (uniform), from the rows", ""]
    for (trace, ep, nodes, batch, hw), rs in groups.items():
        by = {(r.plan, r.origins): r for r in rs}
        a, p, au = by.get(("aware", "routed")), by.get(("plain", "uniform")), by.get(("aware", "uniform"))
        if a and p and au:
            out.append(f"- {rs[0].model} EP{ep}/{nodes} {batch}: step {_pct(a.total_ms, p.total_ms)}, RDMA bytes "
                       f"{_pct(a.rdma_gb, p.rdma_gb)}, MoE compute {_pct(a.compute_ms, p.compute_ms)}, sampled max/mean load "
                       f"{a.pair_imbalance:.3f} vs {p.pair_imbalance:.3f}; the same aware layout with uniform origins: RDMA "
                       f"{_pct(a.rdma_gb, au.rdma_gb)} from routing alone.")
    if block.get("reading"):
        out += ["", "### Reading (written by hand after the run; dropped when the section is re-run)", "", block["reading"].strip()]
    out.append("")
    return "\n".join(out)
