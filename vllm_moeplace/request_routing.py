"""Request-aware placement: which group of DP ranks a request runs on (issue 12).

A request's *signature* is known before its decode starts: the expert histogram of its prefill
tokens at a few MoE layers (kind `prefill_expert_histogram`). For each listed layer, the share of
the request's prefill (token, expert) pairs that chose each expert (sums to 1 per layer); the
layers are concatenated and the whole vector scaled to unit L2 norm, so `centroid . signature` is
a cosine similarity (each layer's block is scaled to the same norm first, so every layer weighs
the same). (The seed paper, arXiv 2604.23150, reports that prefill routing predicts
decode routing and that grouping requests by activation pattern cuts all-to-all traffic.)

The routing function, as served and as scored (`evaluate`), is the same object (`Router`):

1. a request without a signature (no prefill tokens, or a layer missing) goes to the group with
   the fewest requests so far (the default even spreading), and the reason is logged;
2. otherwise the groups are tried by decreasing similarity to their centroid, and the first one
   whose request count stays within `allowed(n)` takes it, n = requests routed so far including
   this one: allowed(n) = max(ceil(n / G), floor(max_share * n / G)). So at every moment no group
   holds more than max_share of its fair share (up to rounding at small n), whatever arrives.

Groups are contiguous parts of nodes (`group_ranks`): with G = nodes a group is a node's ranks,
with G = ranks one rank; a request's tokens start on one of its group's ranks.

Training (`fit_groups`): balanced spherical k-means on the train requests' signatures, every group
holding floor or ceil(n / G) requests (assignment by regret: the requests that lose most by not
getting their favourite group choose first).

Pure numpy + pydantic; the plan's `request_routing` section is `RequestRoutingModel`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.trace import Trace

log = logging.getLogger(__name__)

ROUTING_VERSION = 1
SIGNATURE_KINDS = ("prefill_expert_histogram",)
DEFAULT_MAX_SHARE = 1.10


class RoutingError(MoeplaceError):
    """A request_routing section or request-group option is invalid; names field and value."""


# ---- on-disk section ----------------------------------------------------------------------------


class SignatureModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str
    """How a request's signature is computed; only `prefill_expert_histogram` (v1)."""
    layers: list[Annotated[int, Field(strict=True, ge=0)]]
    """Decoder-layer indices (MoE layers of the model) whose prefill routing forms the signature."""


class GroupModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ranks: list[Annotated[int, Field(strict=True, ge=0)]]
    """DP ranks (= EP ranks) the group's requests run on."""
    centroid: list[float]
    """Unit-norm signature centroid, len(signature.layers) x num_experts values."""


class RequestRoutingModel(BaseModel):
    """The plan's optional `request_routing` section (its own version, independent of the plan's)."""

    model_config = ConfigDict(extra="forbid")

    version: Annotated[int, Field(strict=True)]
    signature: SignatureModel
    groups: list[GroupModel]
    max_share: float = Field(default=DEFAULT_MAX_SHARE, ge=1.0)
    """No group takes more than max_share x its fair share of the requests routed so far."""
    fallback: Literal["fewest_requests"] = "fewest_requests"
    """Where a request without a signature goes: the group with the fewest requests so far."""


@dataclass(frozen=True)
class RequestRouting:
    """The validated section: signature layers, centroids [G, D] (unit rows), group ranks."""

    layers: tuple[int, ...]
    centroids: np.ndarray  # float64 [G, len(layers) * E]
    group_ranks: tuple[tuple[int, ...], ...]
    max_share: float = DEFAULT_MAX_SHARE
    kind: str = "prefill_expert_histogram"

    @property
    def num_groups(self) -> int:
        return len(self.group_ranks)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": ROUTING_VERSION,
            "signature": {"kind": self.kind, "layers": list(self.layers)},
            "groups": [{"ranks": list(r), "centroid": [round(float(x), 7) for x in c]}
                       for r, c in zip(self.group_ranks, self.centroids)],
            "max_share": self.max_share,
            "fallback": "fewest_requests",
        }


def parse_request_routing(data: Any, *, num_experts: int, moe_layers: list[int], ep_size: int,
                          node_of_rank: np.ndarray | None = None, where: str = "request_routing") -> RequestRouting:
    """The section, checked against the plan it sits in. Raises RoutingError naming the field."""
    from pydantic import ValidationError

    if isinstance(data, dict) and data.get("version") != ROUTING_VERSION:
        raise RoutingError(f"{where}.version: unsupported version {data.get('version')!r}; this vllm-moeplace reads "
                           f"{ROUTING_VERSION}")
    try:
        m = RequestRoutingModel.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise RoutingError(f"{where}.{loc}: {err['msg']} (value {str(err.get('input'))[:80]})") from None
    if m.signature.kind not in SIGNATURE_KINDS:
        raise RoutingError(f"{where}.signature.kind: unknown signature {m.signature.kind!r}; known: {list(SIGNATURE_KINDS)}")
    layers = m.signature.layers
    if not layers or len(set(layers)) != len(layers):
        raise RoutingError(f"{where}.signature.layers: expected distinct MoE layers, got {layers}")
    bad = [x for x in layers if x not in set(moe_layers)]
    if bad:
        raise RoutingError(f"{where}.signature.layers: {bad} are not MoE layers of the model {moe_layers}")
    if len(m.groups) < 1:
        raise RoutingError(f"{where}.groups: empty")
    seen: dict[int, int] = {}
    for g, grp in enumerate(m.groups):
        if not grp.ranks:
            raise RoutingError(f"{where}.groups[{g}].ranks: empty")
        for r in grp.ranks:
            if r >= ep_size:
                raise RoutingError(f"{where}.groups[{g}].ranks: rank {r} out of range 0..{ep_size - 1}")
            if r in seen:
                raise RoutingError(f"{where}.groups[{g}].ranks: rank {r} already in group {seen[r]}")
            seen[r] = g
        if node_of_rank is not None and len({int(node_of_rank[r]) for r in grp.ranks}) > 1:
            raise RoutingError(f"{where}.groups[{g}].ranks: {grp.ranks} span several nodes "
                               f"{sorted({int(node_of_rank[r]) for r in grp.ranks})}; a group's ranks sit on one node")
    if len(seen) != ep_size:
        missing = sorted(set(range(ep_size)) - set(seen))
        raise RoutingError(f"{where}.groups: {len(m.groups)} group(s) cover {len(seen)} of the {ep_size} DP ranks "
                           f"(ranks {missing[:8]} in no group); the groups must partition the DP ranks")
    D = len(layers) * num_experts
    cents = np.zeros((len(m.groups), D))
    for g, grp in enumerate(m.groups):
        c = np.asarray(grp.centroid, dtype=np.float64)
        if c.shape != (D,):
            raise RoutingError(f"{where}.groups[{g}].centroid: {c.size} values, expected {D} "
                               f"({len(layers)} layers x {num_experts} experts)")
        if not np.all(np.isfinite(c)):
            i = int(np.flatnonzero(~np.isfinite(c))[0])
            raise RoutingError(f"{where}.groups[{g}].centroid[{i}]: value {c[i]} is not finite")
        n = float(np.linalg.norm(c))
        if n <= 0:
            raise RoutingError(f"{where}.groups[{g}].centroid: all zeros (no direction to compare signatures with)")
        cents[g] = c / n
    return RequestRouting(tuple(layers), cents, tuple(tuple(g.ranks) for g in m.groups), float(m.max_share),
                          m.signature.kind)


# ---- groups of ranks ----------------------------------------------------------------------------


def group_ranks(nodes: list[list[int]], num_groups: int) -> tuple[tuple[int, ...], ...]:
    """Each node's ranks split into num_groups / nodes equal contiguous parts, node by node."""
    N = len(nodes)
    if num_groups < N or num_groups % N:
        raise RoutingError(f"--request-groups {num_groups}: must be a multiple of the {N} node(s) (a group's requests "
                           "start on one node)")
    per = num_groups // N
    out = []
    for i, ranks in enumerate(nodes):
        if len(ranks) % per:
            raise RoutingError(f"--request-groups {num_groups}: node {i} has {len(ranks)} rank(s), not divisible into "
                               f"{per} group(s)")
        s = len(ranks) // per
        out += [tuple(ranks[j * s:(j + 1) * s]) for j in range(per)]
    return tuple(out)


# ---- signatures ---------------------------------------------------------------------------------


def signatures(trace: Trace, layers: tuple[int, ...] | list[int],
               prefix_tokens: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(request ids [n] ascending, signatures float64 [n, len(layers) * E], ok bool [n]).

    Rows of requests with no prefill token are zero and ok is False (their signature cannot be
    computed). Only prefill tokens are read: never a request's decode routing. prefix_tokens > 0
    keeps each request's first prefill tokens only (in trace order), the cheaper signature a router
    can compute at arrival from a short prefill of the prompt's start."""
    E = trace.num_experts
    reqs = np.unique(trace.request_ids)
    cols = [trace.layer_index(x) for x in layers]
    pre = trace.is_prefill.copy()
    if prefix_tokens > 0:
        idx = np.flatnonzero(pre)
        rid = trace.request_ids[idx]
        order = np.argsort(rid, kind="stable")  # trace order within each request
        first = np.r_[0, np.flatnonzero(np.diff(rid[order])) + 1]
        rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
        keep = np.zeros(len(idx), dtype=bool)
        keep[order] = rank < prefix_tokens
        pre[idx[~keep]] = False
    row = np.searchsorted(reqs, trace.request_ids[pre])
    X = np.zeros((len(reqs), len(cols) * E))
    for j, li in enumerate(cols):
        ids = trace.topk_ids[pre, li, :].astype(np.int64)  # [Tp, K]
        flat = np.repeat(row, ids.shape[1]) * (len(cols) * E) + j * E + ids.ravel()
        X += np.bincount(flat, minlength=X.size).reshape(X.shape)
    ok = X.sum(axis=1) > 0
    return reqs, normalize_counts(X.reshape(len(reqs), len(cols), E)).reshape(len(reqs), -1), ok


def normalize_counts(counts: np.ndarray) -> np.ndarray:
    """Signatures [..., L, E] from per-layer expert counts [..., L, E] (float64).

    Each layer's block to unit norm, then the whole to unit norm: every layer weighs the same in
    the cosine whether its routing is concentrated or spread. All-zero rows stay zero. The trace
    path (`signatures`) and the served router (`router.signature`) both use this one function."""
    blocks = np.array(counts, dtype=np.float64)
    L = blocks.shape[-2]
    norms = np.linalg.norm(blocks, axis=-1, keepdims=True)
    blocks /= np.where(norms > 0, norms, 1.0) * math.sqrt(L)
    return blocks


def first_layers(trace: Trace, count: int) -> tuple[int, ...]:
    """The decoder-layer ids of the first `count` MoE layers (0: all)."""
    ids = sorted(int(x) for x in trace.layer_ids)
    if count < 0 or count > len(ids):
        raise RoutingError(f"--signature-layers {count}: the trace has {len(ids)} MoE layers (0 = all)")
    return tuple(ids if count == 0 else ids[:count])


# ---- balanced grouping --------------------------------------------------------------------------


def balanced_assign(sim: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """int [n]: a group per row of sim [n, G] with at most capacity[g] rows in group g.

    Greedy by regret: rows whose best group beats their second best by most choose first; a row
    whose best is full takes its best group with room."""
    n, G = sim.shape
    order_pref = np.argsort(-sim, axis=1, kind="stable")
    top = np.take_along_axis(sim, order_pref[:, :2], axis=1) if G > 1 else np.c_[sim, sim]
    regret = top[:, 0] - top[:, 1]
    left = capacity.astype(np.int64).copy()
    out = np.full(n, -1, dtype=np.int64)
    for i in np.argsort(-regret, kind="stable"):
        for g in order_pref[i]:
            if left[g] > 0:
                out[i] = g
                left[g] -= 1
                break
    return out


def fit_groups(X: np.ndarray, num_groups: int, seed: int = 0, iters: int = 25, restarts: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(labels [n], centroids [G, D] unit rows): balanced spherical k-means, best of `restarts`.

    Balanced: group sizes are floor / ceil(n / G) on train, so the served router's share cap
    starts from centroids that split the train requests evenly."""
    n = X.shape[0]
    G = num_groups
    if n < G:
        raise RoutingError(f"--request-groups {G}: only {n} train request(s) with a signature")
    cap = np.full(G, n // G)
    cap[: n % G] += 1
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(restarts):
        # k-means++ seeding on cosine distance.
        c = [X[rng.integers(n)]]
        for _ in range(1, G):
            d = np.maximum(1.0 - (X @ np.array(c).T).max(axis=1), 0.0)
            p = d / d.sum() if d.sum() > 0 else None
            c.append(X[rng.choice(n, p=p)])
        C = np.array(c)
        labels = balanced_assign(X @ C.T, cap)
        for _ in range(iters):
            C = _centroids(X, labels, G, C)
            new = balanced_assign(X @ C.T, cap)
            if np.array_equal(new, labels):
                break
            labels = new
        C = _centroids(X, labels, G, C)
        score = float((X * C[labels]).sum())
        if best is None or score > best[0] + 1e-12:
            best = (score, labels, C)
    assert best is not None
    return best[1], best[2]


def _centroids(X: np.ndarray, labels: np.ndarray, G: int, prev: np.ndarray) -> np.ndarray:
    C = np.zeros((G, X.shape[1]))
    np.add.at(C, labels, X)
    norm = np.linalg.norm(C, axis=1)
    C[norm > 0] /= norm[norm > 0, None]
    C[norm == 0] = prev[norm == 0]  # an empty group keeps its direction
    return C


# ---- the router ---------------------------------------------------------------------------------


def allowed(n: int, G: int, max_share: float) -> int:
    """Most requests one group may hold after n have been routed."""
    return max(math.ceil(n / G), math.floor(max_share * n / G + 1e-9))


class Router:
    """The plan's routing function with its running counts (one per serving process)."""

    def __init__(self, routing: RequestRouting):
        self.routing = routing
        self.counts = np.zeros(routing.num_groups, dtype=np.int64)

    def route(self, signature: np.ndarray | None, why_missing: str = "no signature") -> int:
        """The group of the next request, from its own signature (None: fallback, logged)."""
        G = self.routing.num_groups
        n = int(self.counts.sum()) + 1
        if signature is None:
            g = int(np.argmin(self.counts))
            log.info("request routed by the fallback (fewest requests, group %d): %s", g, why_missing)
        else:
            limit = allowed(n, G, self.routing.max_share)
            sim = self.routing.centroids @ signature
            g = next(int(x) for x in np.argsort(-sim, kind="stable") if self.counts[x] < limit)
        self.counts[g] += 1
        return g

    def route_window(self, sigs: list[np.ndarray | None]) -> list[int]:
        """Groups of a window of requests routed together (a router that batches arrivals): the
        window's requests with a signature are assigned by regret (`balanced_assign`) under the
        share cap at the window's end, so the least decided ones take the second choice; requests
        without a signature take the fallback first. One request: exactly `route`."""
        if len(sigs) == 1:
            return [self.route(sigs[0])]
        G = self.routing.num_groups
        out: list[int] = [-1] * len(sigs)
        for i, sig in enumerate(sigs):
            if sig is None:
                out[i] = self.route(None, "no signature (window)")
        idx = [i for i, sig in enumerate(sigs) if sig is not None]
        if idx:
            n_end = int(self.counts.sum()) + len(idx)
            room = np.maximum(allowed(n_end, G, self.routing.max_share) - self.counts, 0)
            sim = np.stack([self.routing.centroids @ sigs[i] for i in idx])
            for i, g in zip(idx, balanced_assign(sim, room)):
                out[i] = int(g)
                self.counts[g] += 1
        return out


def route_trace(routing: RequestRouting, trace: Trace, window: int = 1,
                prefix_tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(group of each token [T], group of each request [n] in arrival order = ascending id).

    Each request is routed from its own prefill signature only (requests without one by the
    fallback), one at a time (window 1) or in windows of consecutive arrivals (`route_window`);
    prefix_tokens > 0: from its first prefill tokens only (`moeplace route --signature-prefix-tokens`)."""
    if window < 1:
        raise RoutingError(f"router window {window}: must be >= 1")
    reqs, X, ok = signatures(trace, routing.layers, prefix_tokens)
    router = Router(routing)
    req_group = np.empty(len(reqs), dtype=np.int64)
    for s in range(0, len(reqs), window):
        part = range(s, min(s + window, len(reqs)))
        if window == 1:
            i = s
            req_group[i] = router.route(X[i] if ok[i] else None, f"request {int(reqs[i])} has no prefill tokens")
            continue
        req_group[list(part)] = router.route_window([X[i] if ok[i] else None for i in part])
    return req_group[np.searchsorted(reqs, trace.request_ids)], req_group


def share_imbalance(req_group: np.ndarray, G: int) -> float:
    """max over groups of requests / fair share (n / G)."""
    n = len(req_group)
    return float(np.bincount(req_group, minlength=G).max() * G / n) if n else 1.0


def token_origin_nodes(routing: RequestRouting, node_of_rank: np.ndarray, token_group: np.ndarray) -> np.ndarray:
    """int [T]: the node each token starts on (a group's ranks sit on one node)."""
    home = np.array([node_of_rank[r[0]] for r in routing.group_ranks], dtype=np.int64)
    return home[token_group]
