"""How low can held-out rank imbalance go for request-aware placement on the Llama-4 trace?

    nice -n 5 python benchmarks/ra_drift_floor.py [--seeds 0,1,2] [--time-limit 10]

Issue 12's line asks, at EP8 over 2 nodes on the shared Llama-4 MMLU trace (random request halves
as `request_aware.py` splits them), for held-out decode node_sends <= 0.70 x the plain plan AND
held-out rank imbalance <= 1.15 (mean over layers of max / mean rank load, all tokens). This
measures the imbalance part's floor, as `heldout_drift_floor.py` did for DeepSeek (issue 10):

(a) Spread origins, no locality. With every rank exactly at the mean TRAIN load (an idealisation
    no discrete layout reaches), a rank's held-out load is the mean plus the drift of the copies it
    serves, d_e / n_e with d_e = (held-out share - train share) x R and n_e copies of e (the replica
    rule splits an expert's pairs evenly over its copies when origins are uniform). Held-out
    imbalance = 1 + max_r sum of its copies' drifts. Copy counts: `redundancy.copy_counts` on the
    train loads (each extra copy to the expert with the largest per-copy load). Groupings: random
    (copies of one expert on distinct ranks), and one chosen from the train requests only to
    minimise the largest predicted drift variance (swap descent on `trace_stats.load_risk`).
(b) Routed origins. The request-aware plan (`solve --request-groups 2`, the benchmark's settings)
    is scored with the held-out requests routed by its router; per-copy loads are the replica
    rule's expectations for those origins (`request_copies.CopyModel`, exact for groups of whole
    nodes: a node's tokens on e split evenly over the node's copies). Reported: train / held-out
    rank imbalance of the plan, held-out NODE imbalance (a lower bound for any arrangement of each
    node's copies over its ranks), an oracle in-node arrangement that knows the held-out loads (LPT
    then swaps, no two copies of an expert on a rank), and the (a)-style idealisation on the plan's
    node structure: each rank at the mean train load, the node's copies dealt at random over its
    ranks. The plain plan (spread origins) gets the same decomposition.

Plans are cached in --cache (keyed by setting and seed) so `ra_attempts.py` reuses the plain ones.
Writes benchmarks/results/ra_drift_floor.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from _common import command, commit, loadavg, machine  # noqa: E402  (benchmarks/ is sys.path[0])
from request_aware import L4, random_split

from vllm_moeplace import trace_stats as stats
from vllm_moeplace.plan import Plan, Topology, load_plan
from vllm_moeplace.request_routing import route_trace
from vllm_moeplace.routed_metrics import origin_weights
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.pipeline import solve
from vllm_moeplace.solver.redundancy import copy_counts
from vllm_moeplace.solver.request_copies import CopyModel
from vllm_moeplace.solver.request_groups import RequestGroupOptions
from vllm_moeplace.trace import Trace, load_trace

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "ra_drift_floor.md"
R, G = 8, 4  # EP8, 4 ranks per node
TOPO = Topology.uniform(R, G)


def llama4(tmp: Path) -> Trace:
    path = tmp / "ra_l4.npz"
    if not path.exists():
        subprocess.run([sys.executable, "-m", "vllm_moeplace", "import", "--format", "orders-in-chaos", str(L4),
                        "--num-experts", "128", "--out", str(path)], check=True, capture_output=True)
    return load_trace(path)


def cached_plan(cache: Path, key: str, train: Trace, opts: SolveOptions, groups: RequestGroupOptions | None) -> tuple[Plan, float]:
    """(plan, solve seconds; 0 when read from the cache)."""
    path = cache / f"{key}.json"
    if path.exists():
        return load_plan(path), 0.0
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # node-level cap warnings: the imbalance columns say it
        plan = solve(train, TOPO, opts, request_groups=groups)
    secs = time.monotonic() - t0
    cache.mkdir(parents=True, exist_ok=True)
    plan.save(path)
    return plan, secs


# ---- (a) spread origins, no locality -------------------------------------------------------------


def random_deal(counts: np.ndarray, slots: int, rng: np.random.Generator) -> list[list[int]]:
    """Experts per rank, R x slots, copies of one expert on distinct random ranks."""
    free = np.full(R, slots)
    out: list[list[int]] = [[] for _ in range(R)]
    multi = [int(e) for e in np.flatnonzero(counts > 1)]
    singles = [int(e) for e in np.flatnonzero(counts == 1)]
    for e in sorted(multi, key=lambda e: -counts[e]):  # the most copied first: they need most distinct ranks
        ranks = rng.choice(R, size=int(counts[e]), replace=False, p=free / free.sum())
        for r in ranks:
            out[r].append(e)
            free[r] -= 1
    rest = rng.permutation(np.repeat(np.arange(R), free))
    for r, e in zip(rest, rng.permutation(singles)):
        out[int(r)].append(e)
    return out


def swap_descent(M: np.ndarray, labels: np.ndarray, P: np.ndarray, iters: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """(rows, variances): rows P [n, slots] of item indices after swaps between the row of largest
    predicted variance w'Mw and any other row while they lower it (no two items of one label, i.e.
    copies of one expert, in a row)."""
    P = P.copy()
    var = np.array([M[np.ix_(p, p)].sum() for p in P])
    for _ in range(iters):
        a = int(np.argmax(var))
        A = P[a].copy()
        rsA = M[:, A].sum(axis=1)
        done = False
        for b in np.argsort(var):
            if b == a:
                continue
            B = P[b].copy()
            rsB = M[:, B].sum(axis=1)
            dA = (-2 * rsA[A] + M[A, A])[:, None] + (2 * (rsA[B][None, :] - M[np.ix_(B, A)].T) + M[B, B][None, :])
            dB = (-2 * rsB[B] + M[B, B])[None, :] + (2 * (rsB[A][:, None] - M[np.ix_(A, B)]) + M[A, A][:, None])
            newA, newB = var[a] + dA, var[b] + dB
            ok = np.maximum(newA, newB) < var[a] - 1e-12
            ok &= ~np.isin(labels[B], labels[A])[None, :] & ~np.isin(labels[A], labels[B])[:, None]
            if ok.any():
                i, j = np.unravel_index(int(np.argmin(np.where(ok, np.maximum(newA, newB), np.inf))), ok.shape)
                var[a], var[b] = newA[i, j], newB[i, j]
                P[a, i], P[b, j] = B[j], A[i]
                done = True
                break
        if not done:
            break
    return P, var


def min_variance_deal(counts: np.ndarray, Q: np.ndarray, slots: int, rng: np.random.Generator, starts: int = 3) -> list[list[int]]:
    """A deal of the copies (weight 1 / n_e each) lowering the largest predicted drift variance,
    best of `starts` random deals each descended by `swap_descent`."""
    items = np.repeat(np.arange(len(counts)), counts)
    w = 1.0 / counts[items]
    M = Q[np.ix_(items, items)] * w[:, None] * w[None, :]
    best = None
    for _ in range(starts):
        deal = random_deal(counts, slots, rng)
        # item indices per rank (copies of e are interchangeable: take them in order)
        nxt = {int(e): int(np.flatnonzero(items == e)[0]) for e in np.unique(items)}
        rows = []
        for r in range(R):
            row = []
            for e in deal[r]:
                row.append(nxt[e])
                nxt[e] += 1
            rows.append(row)
        P, var = swap_descent(M, items, np.array(rows))
        if best is None or var.max() < best[0]:
            best = (var.max(), P)
    assert best is not None
    return [[int(items[i]) for i in row] for row in best[1]]


def section_a(trace: Trace, seeds: list[int], draws: int) -> list[str]:
    E = trace.num_experts
    rows = []
    for c in (0, 2, 4):
        cells_r, cells_m = [], []
        for seed in seeds:
            train, held = random_split(trace, seed)
            lt, lh = stats.expert_load(train).astype(float), stats.expert_load(held).astype(float)
            req = stats.request_index(train)
            rng = np.random.default_rng(seed)
            rnd, mv = [], []
            for l in range(trace.num_layers):
                d = lh[l] / lh[l].sum() * R - lt[l] / lt[l].sum() * R
                n = copy_counts(lt[l], R * c, R)
                per = d / n
                slots = E // R + c
                rnd.append(np.mean([max(per[row].sum() for row in random_deal(n, slots, rng)) for _ in range(draws)]))
                Q = stats.load_risk(train, l, req)
                mv.append(max(per[row].sum() for row in min_variance_deal(n, Q, slots, rng)))
            cells_r.append(1 + float(np.mean(rnd)))
            cells_m.append(1 + float(np.mean(mv)))
            print(f"(a) copies {c} seed {seed}: random {cells_r[-1]:.3f} min-variance {cells_m[-1]:.3f}", flush=True)
        rows.append(f"| {c} | " + ", ".join(f"{x:.3f}" for x in cells_r) + " | " + ", ".join(f"{x:.3f}" for x in cells_m) + " |")
    return [
        "### (a) Spread origins, every rank exactly at the mean train load, no locality",
        "",
        f"Mean over the {trace.num_layers} MoE layers of 1 + max_r (drift of rank r); per seed 0, 1, 2.",
        "",
        f"| copies per rank | random grouping ({draws} draws per layer) | grouping minimising the predicted drift variance (train requests only) |",
        "|---|---|---|",
        *rows,
        "",
    ]


# ---- (b) routed origins: decomposition of a plan -------------------------------------------------


def holds_of(layout: np.ndarray, E: int) -> np.ndarray:
    h = np.zeros((R, E), dtype=bool)
    h[np.repeat(np.arange(R), layout.shape[1]), layout.ravel()] = True
    return h


def oracle_node(items: list[tuple[int, float]], slots: int) -> float:
    """Largest rank load when one node's copies are re-dealt over its G ranks knowing their loads:
    LPT (experts with several copies first; no two copies of an expert on a rank), then swaps
    that lower the largest rank."""
    bins: list[list[tuple[int, float]]] = [[] for _ in range(G)]
    tot = np.zeros(G)
    many = {e: sum(1 for f, _ in items if f == e) for e, _ in items}
    # experts with several copies on the node first (they need distinct ranks), then by load (LPT)
    for e, x in sorted(items, key=lambda t: (-(many[t[0]] > 1), -t[1])):
        ok = [k for k in range(G) if len(bins[k]) < slots and all(f != e for f, _ in bins[k])]
        k = min(ok, key=lambda k: tot[k])
        bins[k].append((e, x))
        tot[k] += x
    improved = True
    while improved:
        improved = False
        a = int(np.argmax(tot))
        for b in np.argsort(tot):
            if b == a:
                continue
            for i, (e, x) in enumerate(bins[a]):
                for j, (f, y) in enumerate(bins[b]):
                    if x <= y or max(tot[a] - x + y, tot[b] + x - y) >= tot[a] - 1e-12:
                        continue
                    if any(g == f for g, _ in bins[a] if g != e) or any(g == e for g, _ in bins[b] if g != f):
                        continue
                    bins[a][i], bins[b][j] = (f, y), (e, x)
                    tot[a] += y - x
                    tot[b] += x - y
                    improved = True
                    break
                if improved:
                    break
            if improved:
                break
    return float(tot.max())


def item_risk(train: Trace, l: int, h: np.ndarray, tok_group: np.ndarray, gr: tuple, req: np.ndarray) -> np.ndarray:
    """float [R, E, R, E]-flattened [R*E, R*E]: `load_risk` for copies (rank r's copy of e) when
    each train request's pairs on e reach the copies its group's origins use (the replica rule's
    shares for that group; spread requests: the uniform shares), in train pairs squared."""
    E = train.num_experts
    ids = train.topk_ids[:, l, :].astype(np.int64)
    m = int(req.max()) + 1
    cnt = np.bincount((req[:, None] * E + ids).ravel(), minlength=m * E).reshape(m, E).astype(np.float64)
    rg = np.full(m, -1)
    rg[req] = tok_group  # a request's tokens share its group
    Z = np.zeros((m, R * E))
    for g in np.unique(rg):
        one = CopyModel(train, l, origin_weights(np.full(train.num_tokens, g), gr, R), TOPO, 1.0)
        C = one.columns(h)[0]  # [R, E] per-copy loads if every token came from group g
        F = C / np.maximum(C.sum(axis=0, keepdims=True), 1e-12)  # share of e's pairs on each copy
        sel = rg == g
        Z[sel] = (cnt[sel][:, None, :] * F[None]).reshape(int(sel.sum()), -1)
    n = cnt.sum(axis=1)
    Z -= n[:, None] * (Z.sum(axis=0) / n.sum())[None, :]
    return 2.0 * (Z.T @ Z)


def decompose(plan: Plan, train: Trace, held: Trace, routed: bool, window: int, draws: int, rng: np.random.Generator) -> dict:
    """Means over layers of the imbalance figures in section (b)'s table."""
    E = train.num_experts
    if routed:
        tg_t, _ = route_trace(plan.request_routing, train, window)
        tg_h, rg_h = route_trace(plan.request_routing, held, window)
        gr = plan.request_routing.group_ranks
    else:
        tg_t, tg_h, gr, rg_h = np.full(train.num_tokens, -1), np.full(held.num_tokens, -1), (), None
    Wt, Wh = origin_weights(tg_t, gr, R), origin_weights(tg_h, gr, R)
    req = stats.request_index(train)
    out = {k: [] for k in ("train", "held", "node", "oracle", "ideal", "ideal_plan", "ideal_minvar")}
    for l, lid in enumerate(train.layer_ids.tolist()):
        lay = np.asarray(plan.layers[int(lid)])
        h = holds_of(lay, E)
        Ct = CopyModel(train, l, Wt, TOPO, 1.0).columns(h)[0]
        Ch = CopyModel(held, l, Wh, TOPO, 1.0).columns(h)[0]
        mt, mh = Ct.sum() / R, Ch.sum() / R
        rt, rh = Ct.sum(axis=1), Ch.sum(axis=1)
        out["train"].append(rt.max() / mt)
        out["held"].append(rh.max() / mh)
        out["node"].append(rh.reshape(-1, G).sum(axis=1).max() / G / mh)
        orc = max(oracle_node([(e, Ch[r, e]) for r in range(n * G, n * G + G) for e in lay[r]], lay.shape[1])
                  for n in range(TOPO.num_nodes))
        out["oracle"].append(orc / mh)
        # idealised: every rank at the mean train load, the node's copies dealt at random over its ranks
        drift = Ch / mh - Ct / mt  # [R, E] per copy (zero where not held)
        best = []
        for _ in range(draws):
            tot = []
            for n in range(TOPO.num_nodes):
                its = np.concatenate([drift[r, lay[r]] for r in range(n * G, n * G + G)])
                tot.append(rng.permutation(its).reshape(G, -1).sum(axis=1).max())
            best.append(max(tot))
        out["ideal"].append(1 + float(np.mean(best)))
        # idealised, the plan's own in-node arrangement / one minimising the predicted drift
        # variance of each node's ranks (train requests only; `swap_descent` from the plan's)
        flat = drift.ravel()
        out["ideal_plan"].append(1 + max(flat[r * E + lay[r]].sum() for r in range(R)))
        Q = item_risk(train, l, h, tg_t, gr, req) / mt**2
        worst = -np.inf
        for n in range(TOPO.num_nodes):
            rows = np.array([r * E + lay[r] for r in range(n * G, n * G + G)])
            P, _ = swap_descent(Q, np.arange(R * E) % E, rows)
            worst = max(worst, float(flat[P].sum(axis=1).max()))
        out["ideal_minvar"].append(1 + worst)
    res = {k: float(np.mean(v)) for k, v in out.items()}
    res["share"] = float(np.bincount(rg_h, minlength=2).max() * 2 / len(rg_h)) if rg_h is not None else 1.0
    res["tok_share"] = float(np.bincount(tg_h[tg_h >= 0], minlength=2).max() * 2 / len(tg_h)) if routed else 1.0
    return res


# (copies per rank, cap, aware plan with `everywhere_copies`): the benchmark's two copy settings and
# the attempt closest to the line's node_sends with the plain plan's copy structure (ra_attempts.md).
SETTINGS = [(2, 1.05, False), (4, 1.10, False), (6, 1.05, True)]


def section_b(trace: Trace, seeds: list[int], time_limit: float, cache: Path, draws: int) -> list[str]:
    rows = []
    for c, cap, ev in SETTINGS:
        for seed in seeds:
            train, held = random_split(trace, seed)
            opts = SolveOptions(time_limit=time_limit, deterministic=True, seed=seed, redundant_per_rank=c, max_imbalance=cap,
                                keep_plan=True)
            plain, tp = cached_plan(cache, f"plain_c{c}_cap{cap:g}_s{seed}_t{time_limit:g}", train, opts, None)
            aware, ta = cached_plan(cache, f"aware_c{c}_cap{cap:g}_s{seed}_t{time_limit:g}" + ("_ev" if ev else ""), train,
                                    opts, RequestGroupOptions(2, 0, everywhere_copies=ev))
            rng = np.random.default_rng(seed)
            for name, plan, routed, window in (("plain (spread)", plain, False, 1), ("aware (routed)", aware, True, 1),
                                               ("aware (routed, window 10)", aware, True, 10)):
                d = decompose(plan, train, held, routed, window, draws, rng)
                rows.append(f"| {c}, {cap:g}{', hottest on every node' if ev and 'aware' in name else ''} | {seed} | {name} | {d['train']:.3f} | {d['held']:.3f} | {d['node']:.3f} | "
                            f"{d['oracle']:.3f} | {d['ideal']:.3f} / {d['ideal_plan']:.3f} / {d['ideal_minvar']:.3f} | "
                            f"{d['share']:.2f} / {d['tok_share']:.3f} |")
                print(rows[-1], f"(solve s {tp:.0f} / {ta:.0f})", flush=True)
    return [
        "### (b) A plan's held-out imbalance, decomposed (spread origins for the plain plan, routed for the aware plan)",
        "",
        f"Solves as in `request_aware.py` (`--deterministic --time-limit {time_limit:g}`, one group per node, router "
        "share cap 1.10, `keep_plan`; 6 copies: the aware plan with `RequestGroupOptions.everywhere_copies`). Loads: the replica rule's expected per-copy loads for the origins (`CopyModel`); means over "
        "layers of max / mean. *ideal*: every rank at the mean train load and the node's copies (the plan's partition "
        f"and copy set) dealt at random over its ranks ({draws} draws per layer), as the plan deals them, or dealt to "
        "minimise the largest predicted drift variance of a rank (`load_risk` of the copies under the origins, train "
        "requests only; swaps from the plan's deal). *oracle*: the node's copies re-dealt "
        "knowing the held-out loads. *node*: held-out node imbalance, a lower bound for any in-node arrangement of "
        "the plan's partition and copy set. Share: the larger group's held-out requests / tokens over fair share.",
        "",
        "| copies, cap | seed | plan | train rank imb. | held-out rank imb. | held-out node imb. (lower bound) | "
        "oracle in-node arrangement | ideal (train-balanced): random in-node / plan's arrangement / min predicted "
        "variance in-node | share requests / tokens |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--cache", default="/tmp/ra_plans")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    trace = llama4(Path("/tmp"))
    lines = [
        "# Request-aware placement on Llama-4 (issue 12): the held-out rank-imbalance floor",
        "",
        "```sh", command(), "```", "",
        f"Commit {commit()}; machine: {machine()}; load average at start {loadavg()}.",
        "",
        f"Trace `raw/orders-in-chaos-llama4-mmlu-abstract_algebra` ({trace.num_requests} requests, {trace.num_tokens} "
        f"tokens, {trace.num_layers} MoE layers, 128 experts, top-1), EP8 over 2 nodes, requests split at random into "
        "halves (`request_aware.random_split`, seeds 0, 1, 2). Imbalance as in request_aware.md: mean over layers of "
        "max / mean rank load, all held-out tokens. See the script's docstring for the definitions.",
        "",
    ]
    if not args.skip_a:
        lines += section_a(trace, seeds, args.draws)
        Path(args.out).write_text("\n".join(lines) + "\n")
    if not args.skip_b:
        lines += section_b(trace, seeds, args.time_limit, Path(args.cache), args.draws)
    lines.append(f"Load at end: {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
