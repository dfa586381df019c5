"""Routing statistics that tell whether a trace has structure a placement can exploit.

The statistics are pure numpy functions over small arrays (unit-tested on hand-made traces in
tests/test_analyze_stats.py); `analyze(trace)` runs them all and `render_report` writes markdown.
Counting (per-layer and per-label load, co-activation and transition counts, pair counts, Gini)
is `vllm_moeplace.trace_stats`, shared with the solver.

Vocabulary: a *layer index* l is a position 0..L-1 in `trace.layer_ids`; the *decoder layer* is
`trace.layer_ids[l]`. Reports name decoder layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vllm_moeplace.plan import linear_layout
from vllm_moeplace.trace_stats import coactivation, expert_load, gini, pair_counts, transitions
from vllm_moeplace.trace import Trace

TOP_PAIRS = 10
TRANSITION_TOP_FRACTION = 0.2


# ---- pure statistics -------------------------------------------------------------------------
def max_over_mean(x: np.ndarray) -> np.ndarray:
    """max / mean along the last axis (1 = perfectly balanced); an all-zero row gives 1."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, x.max(axis=-1) / mean, 1.0)


def rank_imbalance(load: np.ndarray, ep_size: int) -> np.ndarray:
    """max/mean rank load per layer under vLLM's default contiguous (`linear`) layout. load: [L, E]."""
    layout = linear_layout(load.shape[-1], ep_size)  # [R, E/R] expert ids per rank
    return max_over_mean(load[:, layout].sum(axis=-1))  # [L, R] -> [L]


def lift_matrix(coact: np.ndarray, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(expected, lift) [E, E] for one layer's co-activation counts under independent marginals.

    coact[i, j] (i != j) counts tokens choosing both i and j; coact[e, e] is e's load, so
    p_e = coact[e, e] / T is the share of tokens choosing e. Were choices independent,
    expected[i, j] = T * p_i * p_j, and lift = observed / expected (1 = no affinity). Top-k picks
    distinct experts, so independence is only a reference, not an exact null. Diagonal and
    pairs with expected 0 get lift NaN.
    """
    T = float(num_tokens)
    p = np.diagonal(coact).astype(np.float64) / T if T else np.zeros(coact.shape[0])
    expected = T * np.outer(p, p)
    with np.errstate(invalid="ignore", divide="ignore"):
        lift = np.where(expected > 0, coact / expected, np.nan)
    np.fill_diagonal(lift, np.nan)
    np.fill_diagonal(expected, 0.0)
    return expected, lift


def top_share(rows: np.ndarray, fraction: float = TRANSITION_TOP_FRACTION) -> np.ndarray:
    """Per row: the share of its mass in its top ceil(fraction * n) entries (NaN for empty rows)."""
    rows = np.asarray(rows, dtype=np.float64)
    m = max(1, math.ceil(fraction * rows.shape[-1]))
    top = -np.sort(-rows, axis=-1)[..., :m].sum(axis=-1)
    total = rows.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, top / total, np.nan)


def transition_concentration(trans: np.ndarray, fraction: float = TRANSITION_TOP_FRACTION) -> float:
    """Mean over source experts (that have any mass) of `top_share` of their next-layer row."""
    s = top_share(trans, fraction)
    return float(np.nanmean(s)) if np.isfinite(s).any() else float("nan")


def weighted_top_share(trans: np.ndarray, fraction: float = TRANSITION_TOP_FRACTION) -> float:
    """Like `transition_concentration` but each source expert weighs by its transition mass."""
    trans = np.asarray(trans, dtype=np.float64)
    m = max(1, math.ceil(fraction * trans.shape[-1]))
    total = trans.sum()
    return float(-np.sort(-trans, axis=-1)[:, :m].sum() / total) if total > 0 else float("nan")


def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array; ties get the average of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    n = x.size
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays; NaN when either is constant."""
    a = np.asarray(a, dtype=np.float64) - np.mean(a)
    b = np.asarray(b, dtype=np.float64) - np.mean(b)
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation = Pearson correlation of the (tie-averaged) ranks."""
    return pearson(rankdata(a), rankdata(b))


def hot_set(load: np.ndarray, k: int) -> np.ndarray:
    """The k most loaded experts (ties broken by the lower id), sorted by id."""
    order = np.lexsort((np.arange(load.size), -np.asarray(load)))  # by -load, then by id
    return np.sort(order[:k])


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = set(np.asarray(a).tolist()), set(np.asarray(b).tolist())
    union = sa | sb
    return len(sa & sb) / len(union) if union else 1.0


def l1_distance(a: np.ndarray, b: np.ndarray) -> float:
    """L1 distance of the two load vectors normalised to distributions: 0 (same) .. 2 (disjoint)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.sum() <= 0 or b.sum() <= 0:
        return float("nan")
    return float(np.abs(a / a.sum() - b / b.sum()).sum())


# ---- whole-trace analysis --------------------------------------------------------------------
@dataclass(frozen=True)
class PairStat:
    layer: int  # decoder layer
    i: int
    j: int
    observed: int
    expected: float
    lift: float


@dataclass(frozen=True)
class Analysis:
    layer_ids: np.ndarray  # [L] decoder layers
    num_tokens: int
    num_requests: int
    num_prefill: int
    top_k: int
    num_experts: int
    load: np.ndarray  # int64 [L, E]
    max_over_mean: np.ndarray  # [L]
    gini: np.ndarray  # [L]
    rank_imbalance: dict[int, np.ndarray]  # ep_size -> [L]
    top_pairs: list[PairStat]  # by observed count over all layers (empty when top_k == 1)
    top_pair_lift: np.ndarray  # [L] mean lift of each layer's TOP_PAIRS most frequent pairs (NaN if top_k == 1)
    transition_share: np.ndarray  # [L-1] mean top-20% share of next-layer mass per source expert
    transition_share_weighted: np.ndarray  # [L-1] same, source experts weighted by their mass
    transition_share_independent: np.ndarray  # [L-1] unweighted share with layer l+1 shuffled across tokens
    transition_share_weighted_independent: np.ndarray  # [L-1] mass-weighted share, layer l+1 shuffled
    prefill_decode_spearman: np.ndarray | None  # [L], None without both prefill and decode tokens
    labels: list[str]  # distinct labels, in first-request order
    label_hot: dict[str, np.ndarray]  # label -> [L, hot_k] hot experts per layer
    label_jaccard: np.ndarray | None  # [n_labels, n_labels] mean over layers (None with < 2 labels)
    hot_k: int
    stability_corr: np.ndarray  # [L] Pearson of load, first vs second half of requests
    stability_l1: np.ndarray  # [L]
    notes: list[str] = field(default_factory=list)


def analyze(trace: Trace, ranks: tuple[int, ...] = (), hot_k: int | None = None) -> Analysis:
    """All statistics of the report. `ranks`: EP sizes for the contiguous-layout rank imbalance."""
    T, L, K = trace.topk_ids.shape
    E = trace.num_experts
    notes: list[str] = []
    load = expert_load(trace)  # [L, E]

    rank_imb: dict[int, np.ndarray] = {}
    for r in ranks:
        if E % r:
            notes.append(f"EP{r}: {E} experts do not divide over {r} ranks; skipped")
            continue
        rank_imb[r] = rank_imbalance(load, r)

    # co-activation: one [E, E] count matrix per layer, lift against independence
    pairs: list[PairStat] = []
    pair_lift = np.full(L, np.nan)
    if K >= 2 and T:
        iu = np.triu_indices(E, 1)
        for l in range(L):
            c = coactivation(trace, l)
            expected, lift = lift_matrix(c, T)
            obs = c[iu]
            top = np.argsort(-obs, kind="stable")[:TOP_PAIRS]
            top = top[obs[top] > 0]
            if top.size:
                pair_lift[l] = float(np.mean(lift[iu][top]))
            for t_ in top:
                i, j = int(iu[0][t_]), int(iu[1][t_])
                pairs.append(PairStat(int(trace.layer_ids[l]), i, j, int(obs[t_]), float(expected[i, j]), float(lift[i, j])))
        pairs.sort(key=lambda p: (-p.observed, p.layer, p.i, p.j))
        pairs = pairs[:TOP_PAIRS]
    else:
        notes.append("top_k = 1: a token chooses one expert per layer, so there is no same-layer co-activation")

    # layer-to-layer transitions, against a shuffled null: pairing layer l's choices with another
    # token's layer-l+1 choices keeps both marginals and every expert's row mass but breaks the
    # dependency, so experts with few tokens (whose top-20% share is high by chance) are fair.
    share = np.full(max(L - 1, 0), np.nan)
    share_w = np.full(max(L - 1, 0), np.nan)
    share_ind = np.full(max(L - 1, 0), np.nan)
    share_ind_w = np.full(max(L - 1, 0), np.nan)
    perm = np.random.default_rng(0).permutation(T)
    for l in range(L - 1):
        m = transitions(trace, l)
        share[l] = transition_concentration(m)
        share_w[l] = weighted_top_share(m)
        null = pair_counts(trace.topk_ids[:, l], trace.topk_ids[perm, l + 1], E)
        share_ind[l], share_ind_w[l] = transition_concentration(null), weighted_top_share(null)

    # prefill vs decode
    pd = None
    n_pre = int(trace.is_prefill.sum())
    if 0 < n_pre < T:
        lp = expert_load(trace, trace.is_prefill)
        ld = expert_load(trace, ~trace.is_prefill)
        pd = np.array([spearman(lp[l], ld[l]) for l in range(L)])

    # per-label hot experts
    hk = hot_k or max(1, math.ceil(E / 10))
    labels: list[str] = []
    label_hot: dict[str, np.ndarray] = {}
    jac = None
    if trace.labels is not None and T:
        req_labels = trace.labels[trace.request_ids]  # [T]
        first_seen = np.unique(trace.request_ids, return_index=True)
        labels = list(dict.fromkeys(trace.labels[first_seen[0]].tolist()))
        for lab in labels:
            ll = expert_load(trace, req_labels == lab)
            label_hot[lab] = np.stack([hot_set(ll[l], hk) for l in range(L)])
        if len(labels) >= 2:
            n = len(labels)
            jac = np.ones((n, n))
            for a in range(n):
                for b in range(a + 1, n):
                    ha, hb = label_hot[labels[a]], label_hot[labels[b]]
                    jac[a, b] = jac[b, a] = float(np.mean([jaccard(ha[l], hb[l]) for l in range(L)]))

    # stability: first vs second half of the requests, in request-id order
    reqs = np.unique(trace.request_ids)
    corr = np.full(L, np.nan)
    l1 = np.full(L, np.nan)
    if reqs.size >= 2:
        cut = reqs[(reqs.size + 1) // 2 - 1]
        first = trace.request_ids <= cut
        a, b = expert_load(trace, first), expert_load(trace, ~first)
        corr = np.array([pearson(a[l], b[l]) for l in range(L)])
        l1 = np.array([l1_distance(a[l], b[l]) for l in range(L)])
    else:
        notes.append("one request only: no stability over time")

    return Analysis(
        layer_ids=trace.layer_ids, num_tokens=T, num_requests=int(reqs.size), num_prefill=n_pre, top_k=K,
        num_experts=E, load=load, max_over_mean=max_over_mean(load), gini=gini(load), rank_imbalance=rank_imb,
        top_pairs=pairs, top_pair_lift=pair_lift, transition_share=share, transition_share_weighted=share_w,
        transition_share_independent=share_ind, transition_share_weighted_independent=share_ind_w,
        prefill_decode_spearman=pd, labels=labels, label_hot=label_hot, label_jaccard=jac, hot_k=hk,
        stability_corr=corr, stability_l1=l1, notes=notes,
    )


# ---- report ----------------------------------------------------------------------------------
def _f(x: float, nd: int = 2) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def _range(x: np.ndarray, nd: int = 2) -> str:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return "n/a"
    return f"{x.min():.{nd}f}–{x.max():.{nd}f} (mean {x.mean():.{nd}f})"


def findings(a: Analysis) -> list[str]:
    """A few sentences summarising the numbers (the report's opening bullets)."""
    out = []
    hot = int(np.argmax(a.max_over_mean))
    out.append(
        f"Expert load skew: the hottest expert of a layer carries {_range(a.max_over_mean, 1)}× the layer's mean "
        f"load (worst: decoder layer {int(a.layer_ids[hot])}, {a.max_over_mean[hot]:.1f}×); Gini {_range(a.gini)}."
    )
    for r, imb in a.rank_imbalance.items():
        out.append(f"With vLLM's contiguous layout at EP{r}, the busiest rank gets {_range(imb)}× the mean rank load.")
    if a.top_pairs:
        out.append(
            f"Co-activation: the most frequent same-layer pairs co-occur {_range(a.top_pair_lift, 1)}× more often than "
            f"independent choices would (mean lift of each layer's {TOP_PAIRS} most frequent pairs)."
        )
    if a.transition_share.size:
        out.append(
            f"Layer-to-layer transitions: from a given expert, the top 20% next-layer experts take {_range(a.transition_share)} "
            f"of the transition mass (mass-weighted {_range(a.transition_share_weighted)}), vs {_range(a.transition_share_independent)} "
            f"(mass-weighted {_range(a.transition_share_weighted_independent)}) when the next layer's choices are shuffled "
            "across tokens (no dependency)."
        )
    if a.prefill_decode_spearman is not None:
        out.append(f"Prefill load predicts decode load: Spearman {_range(a.prefill_decode_spearman)} across layers.")
    if a.label_jaccard is not None:
        n = len(a.labels)
        off = a.label_jaccard[~np.eye(n, dtype=bool)]
        out.append(f"Hot experts depend on the label: mean Jaccard of top-{a.hot_k} sets across {n} labels is {_f(float(off.mean()))}.")
    if np.isfinite(a.stability_corr).any():
        out.append(
            f"Stability: load of the first vs second half of requests correlates at r = {_range(a.stability_corr, 3)}, "
            f"L1 distance of load shares {_range(a.stability_l1, 3)} (0 = identical, 2 = disjoint)."
        )
    return out


def render_report(a: Analysis, meta: dict, commands: list[str], figures: dict[str, str], trace_path: str) -> str:
    """The markdown report; `figures` maps a section key to a PNG file name next to the report."""
    L = len(a.layer_ids)
    lines = [f"# Routing analysis: {meta.get('model', 'unknown model')}", "", "Made by:", "", "```sh", *commands, "```", ""]
    lines += [
        "| trace | tokens | prefill | requests | MoE layers | top_k | experts |",
        "|---|---|---|---|---|---|---|",
        f"| `{trace_path}` | {a.num_tokens} | {a.num_prefill} | {a.num_requests} | {L} (decoder {int(a.layer_ids[0])}..{int(a.layer_ids[-1])}) | {a.top_k} | {a.num_experts} |",
        "",
        f"Source: {meta.get('source', 'n/a')}; label: {meta.get('label', '') or 'n/a'}.",
        "",
        "## Findings",
        "",
        *[f"- {s}" for s in findings(a)],
        *[f"- Note: {n}" for n in a.notes],
        "",
        "## 1. Expert load skew",
        "",
        "max/mean = the hottest expert's load over the layer mean (1 = balanced); Gini over the layer's experts "
        "(0 = equal, 1 = one expert takes all). Rank columns: max/mean rank load when rank r holds the contiguous "
        "experts r·E/R..(r+1)·E/R−1 (vLLM's default layout).",
        "",
        f"![load skew]({figures['skew']})",
        "",
        f"![load heatmap]({figures['heatmap']})",
        "",
    ]
    ranks = list(a.rank_imbalance)
    lines.append("| decoder layer | max/mean | Gini | hottest expert (share) |" + "".join(f" EP{r} rank max/mean |" for r in ranks))
    lines.append("|---|---|---|---|" + "---|" * len(ranks))
    for l in range(L):
        e = int(np.argmax(a.load[l]))
        share = a.load[l, e] / max(a.load[l].sum(), 1)
        lines.append(
            f"| {int(a.layer_ids[l])} | {a.max_over_mean[l]:.2f} | {a.gini[l]:.3f} | {e} ({share:.1%}) |"
            + "".join(f" {a.rank_imbalance[r][l]:.2f} |" for r in ranks)
        )
    lines += ["", "## 2. Co-activation vs independence", ""]
    if a.top_pairs:
        lines += [
            "Observed = tokens choosing both experts at that layer; expected = T·p_i·p_j with p_e the share of tokens "
            "choosing e (independent choices); lift = observed / expected. Top pairs by observed count over all layers:",
            "",
            f"![co-activation lift]({figures['lift']})",
            "",
            "| decoder layer | pair | observed | expected | lift |",
            "|---|---|---|---|---|",
            *[f"| {p.layer} | ({p.i}, {p.j}) | {p.observed} | {p.expected:.0f} | {p.lift:.2f} |" for p in a.top_pairs],
        ]
    else:
        lines.append("Not applicable: top_k = 1, each token chooses a single expert per layer.")
    lines += ["", "## 3. Layer-to-layer transitions", ""]
    if a.transition_share.size:
        lines += [
            "For each expert i of layer l, the share of its tokens' next-layer choices that land in the 20% of layer "
            "l+1's experts it sends most to, averaged over the experts of layer l (and weighted by each expert's mass). "
            "The reference shuffles layer l+1's choices across tokens (seed 0): same loads, no dependency on layer l, "
            "and the same small-sample effect for rarely used experts.",
            "",
            f"![transitions]({figures['transitions']})",
            "",
            "| layers | top-20% share | shuffled | mass-weighted | mass-weighted, shuffled |",
            "|---|---|---|---|---|",
            *[
                f"| {int(a.layer_ids[l])}→{int(a.layer_ids[l + 1])} | {a.transition_share[l]:.3f} | {a.transition_share_independent[l]:.3f} | {a.transition_share_weighted[l]:.3f} | {a.transition_share_weighted_independent[l]:.3f} |"
                for l in range(L - 1)
            ],
        ]
    else:
        lines.append("Not applicable: one MoE layer.")
    lines += ["", "## 4. Prefill vs decode", ""]
    if a.prefill_decode_spearman is not None:
        lines += [
            "Spearman rank correlation between each layer's expert load over prefill tokens and over decode tokens.",
            "",
            f"![prefill vs decode]({figures['prefill_decode']})",
            "",
            "| decoder layer | Spearman |",
            "|---|---|",
            *[f"| {int(a.layer_ids[l])} | {_f(a.prefill_decode_spearman[l], 3)} |" for l in range(L)],
        ]
    else:
        lines.append("Not applicable: the trace has no decode tokens (or no prefill tokens).")
    lines += ["", "## 5. Per-label hot experts", ""]
    if a.labels:
        lines.append(f"Hot set = the {a.hot_k} most loaded experts of a layer (ties: lower id). First layers shown:")
        lines.append("")
        show = min(L, 4)
        lines.append("| label |" + "".join(f" layer {int(a.layer_ids[l])} |" for l in range(show)))
        lines.append("|---|" + "---|" * show)
        for lab in a.labels:
            lines.append(f"| {lab} |" + "".join(f" {', '.join(map(str, a.label_hot[lab][l].tolist()))} |" for l in range(show)))
        if a.label_jaccard is not None:
            lines += ["", "Mean over layers of the Jaccard index of the labels' hot sets:", "", f"![label overlap]({figures['labels']})"]
        else:
            lines += ["", "Overlap across labels needs at least 2 labels; this trace has 1."]
    else:
        lines.append("Not applicable: the trace has no labels.")
    lines += ["", "## 6. Stability over time", ""]
    if np.isfinite(a.stability_corr).any():
        lines += [
            "Expert load of the first half of the requests (by request id) vs the second half: Pearson r of the load "
            "vectors and L1 distance of the load shares (0 = identical, 2 = disjoint).",
            "",
            f"![stability]({figures['stability']})",
            "",
            "| decoder layer | r | L1 |",
            "|---|---|---|",
            *[f"| {int(a.layer_ids[l])} | {_f(a.stability_corr[l], 3)} | {_f(a.stability_l1[l], 3)} |" for l in range(L)],
        ]
    else:
        lines.append("Not applicable: fewer than 2 requests.")
    return "\n".join(lines) + "\n"


def write_report(trace: Trace, out_dir, commands: list[str], trace_path: str, ranks: tuple[int, ...] = ()) -> Analysis:
    """Analyse `trace`, write `out_dir/report.md` and its PNG figures; return the analysis."""
    from pathlib import Path

    from vllm_moeplace.profiling import plots  # matplotlib only when a report is written

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    a = analyze(trace, ranks)
    figs = {"skew": plots.plot_skew(a, out), "heatmap": plots.plot_load_heatmap(a, out)}
    if a.top_pairs:
        figs["lift"] = plots.plot_lift(a, out)
    if a.transition_share.size:
        figs["transitions"] = plots.plot_transitions(a, out)
    if a.prefill_decode_spearman is not None:
        figs["prefill_decode"] = plots.plot_prefill_decode(a, out)
    if a.label_jaccard is not None:
        figs["labels"] = plots.plot_label_jaccard(a, out)
    if np.isfinite(a.stability_corr).any():
        figs["stability"] = plots.plot_stability(a, out)
    text = render_report(a, trace.meta, commands, figs, trace_path)
    # Request-level routing (request-aware placement, `requests`): its own section at the end.
    from vllm_moeplace.profiling import requests

    ra = requests.analyze_requests(trace)
    if ra is not None:
        text += "\n" + "\n".join(requests.render(ra, requests.plot(ra, out)))
    (out / "report.md").write_text(text, encoding="utf-8")
    return a
