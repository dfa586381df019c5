"""Does a request's prefill routing predict where its later tokens go? (issue 12, item 1)

Request-aware placement routes a request to a group of ranks from a signature known before its
decode (`request_routing`: the expert histogram of its prefill at some MoE layers). Whether that
can pay is a property of the workload, measured here on requests split by id into train and
held-out halves:

- target: the request's decode routing at every MoE layer; for a trace without decode tokens
  (prefill only), the prefill routing at the MoE layers *after* the signature's (so the signature
  never contains its own target);
- self cosine: cosine between a held-out request's signature-layer prefill histogram and its own
  target histogram at the same layers, against its mean cosine with the other held-out requests'
  targets (how much more a request resembles itself than the crowd);
- group hit rate: the train requests are grouped by signature (balanced spherical k-means,
  `request_routing.fit_groups`); in each layer the experts are split into G equal *home* sets,
  each expert to the group whose train targets use it most (relative to the group's total). A
  held-out request is sent to its nearest centroid; the hit rate is the share of its target
  (token, expert) pairs on its group's home set. Spreading requests evenly gets 1/G on average
  (on average over requests, the home sets split the load about evenly); the oracle sends each request to
  the home set holding most of its target (it reads the target, so no router can do better with
  these home sets). With G = nodes and no copies, 1 - hit is the decode node_sends such a
  placement gives the request;
- label shift: per label, the total-variation distance of its expert popularity from the whole
  trace's (0 = same popularity, 1 = disjoint), mean over layers; and the same for single requests.

Pure numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vllm_moeplace.request_routing import balanced_assign, fit_groups, signatures
from vllm_moeplace.trace import Trace

SIGNATURE_DEPTHS = (1, 2, 4, 0)  # first-N MoE layers; 0 = all
GROUP_COUNTS = (2, 4)


@dataclass(frozen=True)
class SignatureRow:
    depth: int  # signature layers (first N MoE layers; the count actually used)
    groups: int
    self_cosine: float
    other_cosine: float
    hit: float  # share of a held-out request's target pairs on its routed group's home experts
    oracle_hit: float  # the same with the best group for its target (routing that reads the target)


@dataclass(frozen=True)
class RequestAnalysis:
    target: str  # "decode, all MoE layers" | "prefill, MoE layers after the signature"
    num_train: int
    num_heldout: int
    rows: list[SignatureRow]
    label_tv: dict[str, float]  # label -> TV distance of its popularity from the whole trace's
    request_tv: float  # mean over requests of the same, per request (its target tokens)
    notes: list[str]


def histograms(trace: Trace, mask: np.ndarray, layers: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(request ids [n], float [n, len(layers), E] counts of the masked tokens' experts)."""
    E = trace.num_experts
    reqs = np.unique(trace.request_ids)
    cols = [trace.layer_index(x) for x in layers]
    row = np.searchsorted(reqs, trace.request_ids[mask])
    H = np.zeros((len(reqs), len(cols), E))
    for j, li in enumerate(cols):
        ids = trace.topk_ids[mask, li, :].astype(np.int64)
        np.add.at(H, (np.repeat(row, ids.shape[1]), j, ids.ravel()), 1.0)
    return reqs, H


def _unit(H: np.ndarray) -> np.ndarray:
    """Rows of H [n, L, E] flattened, each layer block and then the whole to unit norm."""
    n = np.linalg.norm(H, axis=2, keepdims=True)
    X = H / np.where(n > 0, n, 1.0) / np.sqrt(H.shape[1])
    return X.reshape(H.shape[0], -1)


def tv_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance between two count vectors' shares (0 same, 1 disjoint)."""
    sp, sq = p.sum(), q.sum()
    if sp <= 0 or sq <= 0:
        return float("nan")
    return float(0.5 * np.abs(p / sp - q / sq).sum())


def signature_row(train: Trace, held: Trace, sig_layers: list[int], target_layers: list[int], target_decode: bool,
                  groups: int, seed: int = 0) -> SignatureRow | None:
    """One (signature depth, group count) row; None when too few requests have both parts."""
    E = train.num_experts
    rows = {}
    for name, t in (("train", train), ("held", held)):
        reqs, X, ok = signatures(t, sig_layers)
        tmask = ~t.is_prefill if target_decode else t.is_prefill
        treqs, Y = histograms(t, tmask, target_layers)
        assert np.array_equal(reqs, treqs)
        keep = ok & (Y.sum(axis=(1, 2)) > 0)
        rows[name] = (X[keep], Y[keep])
    (Xt, Yt), (Xh, Yh) = rows["train"], rows["held"]
    if len(Xt) < groups or len(Xh) < 2:
        return None
    # Self vs crowd, at the signature layers that are also target layers (decode target).
    common = [j for j, x in enumerate(target_layers) if x in sig_layers]
    if common:
        _, Ph = histograms(held, held.is_prefill, [target_layers[j] for j in common])
        reqs_h, Xs, ok = signatures(held, sig_layers)
        tmask = ~held.is_prefill if target_decode else held.is_prefill
        _, Yall = histograms(held, tmask, target_layers)
        keep = ok & (Yall.sum(axis=(1, 2)) > 0)
        A = _unit(Ph[keep])
        B = _unit(Yall[keep][:, common, :])
        C = A @ B.T  # [n, n] cosine of request i's prefill with request j's target
        n = len(C)
        self_cos = float(np.diag(C).mean())
        other_cos = float((C.sum() - np.trace(C)) / (n * (n - 1)))
    else:
        self_cos = other_cos = float("nan")
    labels, C = fit_groups(Xt, groups, seed=seed)
    # Home experts: per layer, the experts split into G equal parts, each expert to the group whose
    # train targets use it most relative to the group's size (balanced by regret).
    demand = np.zeros((groups,) + Yt.shape[1:])
    np.add.at(demand, labels, Yt)
    share = demand / np.maximum(demand.sum(axis=2, keepdims=True), 1.0)  # [G, L, E]
    home = np.zeros_like(demand, dtype=bool)
    cap = np.full(groups, E // groups)
    cap[: E % groups] += 1
    for li in range(demand.shape[1]):
        home[balanced_assign(share[:, li, :].T, cap), li, np.arange(E)] = True
    g = np.argmax(Xh @ C.T, axis=1)
    on = np.einsum("nle,gle->ng", Yh, home.astype(np.float64)) / Yh.sum(axis=(1, 2))[:, None]  # [n, G]
    hit = float(on[np.arange(len(g)), g].mean())
    return SignatureRow(len(sig_layers), groups, self_cos, other_cos, hit, float(on.max(axis=1).mean()))


def analyze_requests(trace: Trace, seed: int = 0) -> RequestAnalysis | None:
    """The request-level statistics above; None with fewer than 4 requests."""
    reqs = np.unique(trace.request_ids)
    notes: list[str] = []
    if len(reqs) < 4:
        return None
    train, held = trace.split_by_request(0.5)
    layers = sorted(int(x) for x in trace.layer_ids)
    target_decode = bool((~trace.is_prefill).any())
    out: list[SignatureRow] = []
    for depth in SIGNATURE_DEPTHS:
        sig = layers if depth == 0 else layers[:depth]
        if depth and depth >= len(layers):
            continue
        tgt = layers if target_decode else [x for x in layers if x not in sig]
        if not tgt:
            notes.append("all-layer signature skipped: a prefill-only trace has no later layers to predict")
            continue
        for G in GROUP_COUNTS:
            r = signature_row(train, held, sig, tgt, target_decode, G, seed)
            if r is not None:
                out.append(r)
    # Popularity shift: labels vs the whole trace, single requests vs the whole trace.
    tmask = ~trace.is_prefill if target_decode else np.ones(trace.num_tokens, dtype=bool)
    _, H = histograms(trace, tmask, layers)  # [n, L, E]
    total = H.sum(axis=0)
    label_tv: dict[str, float] = {}
    if trace.labels is not None:
        lab = trace.labels[reqs]
        for name in dict.fromkeys(lab.tolist()):
            sub = H[lab == name].sum(axis=0)
            label_tv[str(name)] = float(np.nanmean([tv_distance(sub[l], total[l]) for l in range(len(layers))]))
    if len(label_tv) < 2:
        notes.append(f"{len(label_tv)} label(s) in the trace: no popularity shift between domains to measure")
    req_tv = [np.nanmean([tv_distance(H[i, l], total[l]) for l in range(len(layers))]) for i in range(len(reqs))
              if H[i].sum() > 0]
    return RequestAnalysis(
        target="decode, all MoE layers" if target_decode else "prefill, MoE layers after the signature's",
        num_train=len(np.unique(train.request_ids)),
        num_heldout=len(np.unique(held.request_ids)),
        rows=out,
        label_tv=label_tv,
        request_tv=float(np.mean(req_tv)) if req_tv else float("nan"),
        notes=notes,
    )


def render(r: RequestAnalysis, figure: str | None) -> list[str]:
    """The report's section (markdown lines)."""
    lines = [
        "## Request-level routing (request-aware placement)",
        "",
        f"Requests split by id: the first {r.num_train} train, the other {r.num_heldout} held out. Signature = the "
        f"prefill expert histogram of the first N MoE layers (`all` = every layer); target = {r.target}. "
        "Self / crowd cosine: a held-out request's signature-layer prefill histogram against its own target at those "
        "layers / against the other held-out requests' targets. Each layer's experts are split into G equal home "
        "sets, each expert to the train group using it most. Hit: share of a held-out request's target pairs on the "
        "home set of its group (nearest train centroid); spreading requests evenly gets about 1/G; oracle: the best "
        "home set for the request (reads the target). With G = nodes and no copies, 1 - hit is the request's "
        "node_sends under such a placement. Cosines are n/a for a prefill-only trace (signature and target are "
        "different layers, whose expert ids are unrelated).",
        "",
    ]
    if figure:
        lines += [f"![request groups]({figure})", ""]
    lines += ["| signature layers | G | self cosine | crowd cosine | hit | spread (1/G) | oracle |", "|---|---|---|---|---|---|---|"]
    for x in r.rows:
        cos = ("n/a", "n/a") if math.isnan(x.self_cosine) else (f"{x.self_cosine:.3f}", f"{x.other_cosine:.3f}")
        lines.append(f"| {x.depth} | {x.groups} | {cos[0]} | {cos[1]} | {x.hit:.3f} | "
                     f"{1 / x.groups:.3f} | {x.oracle_hit:.3f} |")
    lines += ["", f"Popularity shift (total-variation distance of expert shares from the whole trace's, mean over "
              f"layers): single requests {r.request_tv:.3f}."]
    if r.label_tv:
        lines += ["", "| label | TV distance from the whole trace |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in r.label_tv.items()]
    lines += [*(f"- Note: {n}" for n in r.notes), ""]
    return lines


def plot(r: RequestAnalysis, out) -> str | None:
    """Hit vs other per signature depth and group count (PNG next to the report)."""
    if not r.rows:
        return None
    from vllm_moeplace.profiling.plots import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [f"{x.depth}L G{x.groups}" for x in r.rows]
    xs = np.arange(len(r.rows))
    ax.bar(xs - 0.27, [x.hit for x in r.rows], 0.27, label="routed by signature")
    ax.bar(xs, [1 / x.groups for x in r.rows], 0.27, label="spread evenly (1/G)")
    ax.bar(xs + 0.27, [x.oracle_hit for x in r.rows], 0.27, label="oracle (reads the target)")
    ax.set_xticks(xs, names, rotation=30, fontsize=8)
    ax.set_ylabel("target pairs on own home set")
    ax.set_title("held-out requests: target routing on their group's experts")
    ax.set_ylim(0, 1.0)  # room above the bars for the legend
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    return _save(fig, out, "request_groups.png")
