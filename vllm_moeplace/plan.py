"""The placement plan file (`plan.json`): the contract between solver and server.

Vocabulary (as vLLM's EPLB uses it):
- *logical expert*: a routed expert of the checkpoint, id 0..num_experts-1 in each MoE layer.
- *EP rank*: one of `ep_size` expert-parallel workers; each holds the same number of *slots*.
- *slot*: a position in a rank's local expert tensor; `layers[l][r][s]` is the logical expert
  in slot s of rank r at decoder layer l.
- *redundant copy*: an expert held by more than one rank (slots > num_experts / ep_size).

Worked example: 8 experts over 2 ranks, layer 1 placed `[[0, 5, 2, 7], [4, 1, 6, 3]]` means rank 0
holds experts 0, 5, 2, 7 in local slots 0..3 and rank 1 holds 4, 1, 6, 3. vLLM's default
(`linear`) layout would be `[[0, 1, 2, 3], [4, 5, 6, 7]]`.

The file format (other tools read it): version 1 places each expert once per layer; version 2
adds redundant copies and names the replica-selection rule that serves them (`replica.py`).
Both are read; a plan is written as version 1 when it has no copies, so older readers keep
working, and as version 2 when it has copies (older readers refuse it, as they could not serve it):

    {"format": "vllm-moeplace/plan", "version": 1,
     "model": {"name": "...", "num_experts": 64, "moe_layers": [1, 2, 3]},
     "ep_size": 16,
     "topology": {"ranks_per_node": 4}   # or {"nodes": [[0,1],[2,3]], "link_cost": [[0,1],[1,0]]}
     "layers": {"1": [[3, 17, 40, 61], ...one list per EP rank...]},
     "replica_rule": "origin-node-spread/v1",   # version 2 only, optional: the one rule there is
     "solver": {...free-form provenance...}}

This module is pure Python + numpy + pydantic: the solver, the evaluator and the vLLM plugin all
validate through `validate_plan`, which is the specification of a valid plan.
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Union

import numpy as np

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.jsonio import read_json, write_text_atomic
from vllm_moeplace.limits import MAX_EP_SIZE, MAX_EXPERTS, MAX_LAYERS
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PLAN_FORMAT = "vllm-moeplace/plan"
PLAN_VERSION = 1  # written when no layer has copies
PLAN_VERSION_COPIES = 2  # written when some layer has redundant copies
READ_VERSIONS = (PLAN_VERSION, PLAN_VERSION_COPIES)


class PlanError(MoeplaceError):
    """A plan is malformed or does not fit the model / server. The message names file, field, value."""


# Strict: JSON `"3"`, `true` or `3.0` is not an expert id (lax parsing would read them as 3 and 1),
# and every size is bounded before anything is allocated from it (limits.py).
Int = Annotated[int, Field(strict=True)]
ExpertId = Annotated[int, Field(strict=True, ge=0, lt=MAX_EXPERTS)]
LayerIndex = Annotated[int, Field(strict=True, ge=0, lt=MAX_LAYERS)]
RankId = Annotated[int, Field(strict=True, ge=0, lt=MAX_EP_SIZE)]
Cost = Annotated[float, Field(strict=True, ge=0.0)]  # strict float still takes JSON integers


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(strict=True)]
    """Model name or path the plan was computed for (informational; not matched against the server)."""
    num_experts: Int = Field(gt=0, le=MAX_EXPERTS)
    """Logical routed experts per MoE layer (trace ids are int16: at most 32768)."""
    moe_layers: list[LayerIndex]
    """Decoder-layer indices that are MoE layers in the model."""


class RanksPerNode(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ranks_per_node: Int = Field(gt=0, le=MAX_EP_SIZE)
    """Consecutive EP ranks form a node: ranks 0..G-1 on node 0, and so on."""


class NodeGroups(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nodes: list[list[RankId]]
    """Rank ids of each node; together a partition of 0..ep_size-1."""
    link_cost: list[list[Cost]] | None = None
    """Node-to-node cost matrix [num_nodes, num_nodes] (e.g. hop counts); default 0 on the
    diagonal and 1 elsewhere."""


TopologySpec = Union[RanksPerNode, NodeGroups]


class PlanModel(BaseModel):
    """The on-disk schema. Cross-field rules live in `validate_plan` so errors can name values."""

    model_config = ConfigDict(extra="forbid")

    format: str
    version: Int
    model: ModelInfo
    ep_size: Int = Field(gt=0, le=MAX_EP_SIZE)
    topology: TopologySpec
    layers: dict[str, list[list[ExpertId]]]
    replica_rule: str | None = None
    """Version 2: how a token picks among an expert's copies (`replica.REPLICA_RULE`)."""
    request_routing: dict[str, Any] | None = None
    """Optional: which DP ranks each request runs on (`request_routing.RequestRoutingModel`,
    versioned on its own); checked against the plan in `parse_plan`."""
    solver: dict[str, Any] = Field(default_factory=dict)

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v != PLAN_FORMAT:
            raise ValueError(f"unknown format {v!r}; expected {PLAN_FORMAT!r}")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v not in READ_VERSIONS:
            raise ValueError(f"unsupported version {v!r}; this vllm-moeplace reads versions {READ_VERSIONS}")
        return v


class Topology:
    """Ranks grouped into nodes, with a node-to-node link cost. Frozen after construction."""

    __slots__ = ("ep_size", "nodes", "link_cost", "node_of_rank")

    def __init__(self, ep_size: int, nodes: list[list[int]], link_cost: np.ndarray | None = None):
        self.ep_size = int(ep_size)
        self.nodes = [list(map(int, n)) for n in nodes]
        n = len(self.nodes)
        if link_cost is None:
            link_cost = np.ones((n, n)) - np.eye(n)
        self.link_cost = np.asarray(link_cost, dtype=np.float64)
        node_of_rank = np.full(self.ep_size, -1, dtype=np.int64)
        for i, ranks in enumerate(self.nodes):
            node_of_rank[ranks] = i
        self.node_of_rank = node_of_rank

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def ranks_per_node(self) -> np.ndarray:
        """g_n: number of ranks on each node."""
        return np.array([len(n) for n in self.nodes], dtype=np.int64)

    @classmethod
    def uniform(cls, ep_size: int, ranks_per_node: int) -> "Topology":
        if not 0 < ep_size <= MAX_EP_SIZE:  # before the node lists and the node x node cost matrix
            raise PlanError(f"topology: ep_size {ep_size} out of range 1..{MAX_EP_SIZE}")
        if ranks_per_node <= 0 or ep_size % ranks_per_node:
            raise PlanError(f"topology: ranks_per_node={ranks_per_node} does not divide ep_size={ep_size}")
        nodes = [list(range(i, i + ranks_per_node)) for i in range(0, ep_size, ranks_per_node)]
        return cls(ep_size, nodes)

    def to_json(self) -> dict[str, Any]:
        sizes = {len(n) for n in self.nodes}
        uniform_cost = np.array_equal(self.link_cost, np.ones_like(self.link_cost) - np.eye(self.num_nodes))
        contiguous = [r for n in self.nodes for r in n] == list(range(self.ep_size))
        if len(sizes) == 1 and uniform_cost and contiguous:
            return {"ranks_per_node": len(self.nodes[0])}
        return {"nodes": self.nodes, "link_cost": self.link_cost.tolist()}

    @classmethod
    def from_spec(cls, spec: TopologySpec, ep_size: int, where: str = "topology") -> "Topology":
        if isinstance(spec, RanksPerNode):
            g = spec.ranks_per_node
            if ep_size % g:
                raise PlanError(f"{where}.ranks_per_node: {g} does not divide ep_size {ep_size}")
            return cls.uniform(ep_size, g)
        seen: dict[int, int] = {}
        for i, ranks in enumerate(spec.nodes):
            if not ranks:
                raise PlanError(f"{where}.nodes[{i}]: empty node")
            for r in ranks:
                if not 0 <= r < ep_size:
                    raise PlanError(f"{where}.nodes[{i}]: rank {r} out of range 0..{ep_size - 1}")
                if r in seen:
                    raise PlanError(f"{where}.nodes[{i}]: rank {r} already in node {seen[r]}")
                seen[r] = i
        missing = sorted(set(range(ep_size)) - set(seen))
        if missing:
            raise PlanError(f"{where}.nodes: ranks {missing} belong to no node (ep_size {ep_size})")
        n = len(spec.nodes)
        cost = None
        if spec.link_cost is not None:
            rows = [len(row) for row in spec.link_cost]
            if len(set(rows)) > 1:  # ragged: numpy would refuse with a traceback
                raise PlanError(f"{where}.link_cost: ragged rows of lengths {rows[:8]}, expected [{n}, {n}] (one row per node)")
            if (len(rows), rows[0] if rows else 0) != (n, n):
                raise PlanError(f"{where}.link_cost: shape [{len(rows)}, {rows[0] if rows else 0}], expected [{n}, {n}] (one row per node)")
            cost = np.asarray(spec.link_cost, dtype=np.float64)
            if not np.all(np.isfinite(cost)) or (cost < 0).any():
                raise PlanError(f"{where}.link_cost: costs must be finite and >= 0")
        return cls(ep_size, spec.nodes, cost)


class Plan:
    """A validated plan: per MoE layer, an int array [ep_size, slots_per_rank] of logical experts."""

    def __init__(
        self,
        *,
        model_name: str,
        num_experts: int,
        moe_layers: list[int],
        ep_size: int,
        topology: Topology,
        layers: dict[int, np.ndarray],
        solver: dict[str, Any] | None = None,
        source: str = "<plan>",
        request_routing: Any = None,
    ):
        self.model_name = model_name
        self.num_experts = int(num_experts)
        self.moe_layers = [int(x) for x in moe_layers]
        self.ep_size = int(ep_size)
        self.topology = topology
        self.layers = {int(k): np.asarray(v, dtype=np.int64) for k, v in layers.items()}
        self.solver = dict(solver or {})
        self.source = source
        self.request_routing = request_routing  # request_routing.RequestRouting or None

    # ---- derived views -------------------------------------------------------------------
    def slots_per_rank(self) -> int:
        any_layer = next(iter(self.layers.values()), None)
        return int(any_layer.shape[1]) if any_layer is not None else self.num_experts // self.ep_size

    def has_redundancy(self) -> bool:
        return any(a.size > self.num_experts for a in self.layers.values())

    def expert_map(self, layer: int, rank: int) -> np.ndarray:
        """vLLM's per-rank expert map: int32 [num_experts], global id -> local slot or -1."""
        m = np.full(self.num_experts, -1, dtype=np.int32)
        placed = self.layers[layer][rank]
        m[placed] = np.arange(placed.size, dtype=np.int32)
        return m

    # ---- I/O ----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        from vllm_moeplace.replica import REPLICA_RULE

        out: dict[str, Any] = {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION_COPIES if self.has_redundancy() else PLAN_VERSION,
            "model": {"name": self.model_name, "num_experts": self.num_experts, "moe_layers": self.moe_layers},
            "ep_size": self.ep_size,
            "topology": self.topology.to_json(),
            "layers": {str(k): v.tolist() for k, v in sorted(self.layers.items())},
        }
        if self.has_redundancy():
            out["replica_rule"] = REPLICA_RULE
        if self.request_routing is not None:
            out["request_routing"] = self.request_routing.to_json()
        out["solver"] = self.solver
        return out

    def save(self, path: str | os.PathLike) -> None:
        validate_plan(self)
        write_json_atomic(path, self.to_json())


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON so a crash never leaves a half-written file at `path`."""
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def topology_error(e: ValidationError, topology: Any) -> dict[str, Any]:
    """The error to report for a topology that failed the RanksPerNode | NodeGroups union: the
    one of the member the input is shaped like (has `nodes` -> NodeGroups), not pydantic's first
    ("ranks_per_node: Field required" for a node list with one bad cost)."""
    other = "RanksPerNode" if isinstance(topology, dict) and "nodes" in topology else "NodeGroups"
    errors = e.errors()
    return next((err for err in errors if other not in map(str, err["loc"])), errors[0])


def _first_pydantic_error(src: str, e: ValidationError, data: Any = None) -> PlanError:
    topo = data.get("topology") if isinstance(data, dict) else None
    err = topology_error(e, topo)
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("RanksPerNode", "NodeGroups")))
    value = err.get("input")
    shown = json.dumps(value)[:120] if not isinstance(value, dict) else "{...}"
    return PlanError(f"{src}: field '{loc}': {err['msg']} (value {shown})")


def parse_plan(data: Any, source: str = "<plan>") -> Plan:
    """Schema + structural validation of parsed JSON. Raises PlanError naming source, field, value."""
    if isinstance(data, dict):
        # Check the format/version first: a file of another kind should be reported as such,
        # not as a dozen missing fields.
        fmt = data.get("format")
        if fmt != PLAN_FORMAT:
            raise PlanError(f"{source}: field 'format': unknown format {fmt!r}; expected {PLAN_FORMAT!r}")
        ver = data.get("version")
        if type(ver) is not int or ver not in READ_VERSIONS:
            raise PlanError(
                f"{source}: field 'version': unsupported version {ver!r}; this vllm-moeplace reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}"
            )
    try:
        m = PlanModel.model_validate(data)
    except ValidationError as e:
        raise _first_pydantic_error(source, e, data) from None
    _check_replica_rule(m, source)
    topo = Topology.from_spec(m.topology, m.ep_size, where=f"{source}: field 'topology'")
    layers: dict[int, np.ndarray] = {}
    for key, ranks in m.layers.items():
        try:
            layer = int(key)
        except ValueError:
            raise PlanError(f"{source}: field 'layers': key {key!r} is not a decoder-layer index") from None
        if str(layer) != key:
            raise PlanError(f"{source}: field 'layers': key {key!r} is not a canonical integer")
        lens = {len(r) for r in ranks}
        if len(lens) > 1:
            raise PlanError(
                f"{source}: field 'layers.{key}': unequal slot counts per rank {[len(r) for r in ranks]}"
            )
        layers[layer] = np.array(ranks, dtype=np.int64).reshape(len(ranks), lens.pop() if lens else 0)
    routing = None
    if m.request_routing is not None:
        from vllm_moeplace.request_routing import RoutingError, parse_request_routing

        try:
            routing = parse_request_routing(m.request_routing, num_experts=m.model.num_experts,
                                            moe_layers=m.model.moe_layers, ep_size=m.ep_size,
                                            node_of_rank=topo.node_of_rank, where="request_routing")
        except RoutingError as e:
            loc, _, msg = str(e).partition(": ")
            raise PlanError(f"{source}: field '{loc}': {msg}") from None
    plan = Plan(
        model_name=m.model.name,
        num_experts=m.model.num_experts,
        moe_layers=m.model.moe_layers,
        ep_size=m.ep_size,
        topology=topo,
        layers=layers,
        solver=m.solver,
        source=source,
        request_routing=routing,
    )
    validate_plan(plan)
    return plan


def _check_replica_rule(m: PlanModel, source: str) -> None:
    from vllm_moeplace.replica import REPLICA_RULE

    if m.replica_rule is None:
        return
    if m.version == PLAN_VERSION:
        raise PlanError(
            f"{source}: field 'replica_rule': value {m.replica_rule!r}: version 1 plans have no replica rule "
            f"(write version {PLAN_VERSION_COPIES})"
        )
    if m.replica_rule != REPLICA_RULE:
        raise PlanError(
            f"{source}: field 'replica_rule': unknown rule {m.replica_rule!r}; this vllm-moeplace serves {REPLICA_RULE!r}"
        )


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and validate a plan file. Every failure is a PlanError naming the file."""
    return parse_plan(read_json(path, "plan file", PlanError), source=str(path))


def load_plan_hashed(path: str | os.PathLike) -> tuple[Plan, str]:
    """(plan, SHA-256 of exactly the bytes that were parsed): the file is read once, so a file
    replaced between hashing and parsing can never pass as the validated one."""
    import hashlib

    from vllm_moeplace.jsonio import parse_json_bytes, read_bytes

    src = str(path)
    data = read_bytes(path, "plan file", PlanError)
    obj = parse_json_bytes(data, src, "plan file", PlanError)
    return parse_plan(obj, source=src), hashlib.sha256(data).hexdigest()


def validate_plan(plan: Plan) -> None:
    """The specification of a valid plan (independent of any solver or server).

    Holds iff: every listed layer is one of the model's MoE layers; each layer has ep_size ranks
    with the same slot count, at least num_experts/ep_size slots each; every id is in
    0..num_experts-1; no expert twice on one rank; every expert somewhere in the layer;
    all layers use the same slot count.
    """
    src, E, R = plan.source, plan.num_experts, plan.ep_size
    if plan.topology.ep_size != R:
        raise PlanError(f"{src}: field 'topology': describes {plan.topology.ep_size} ranks, ep_size is {R}")
    moe = set(plan.moe_layers)
    if len(moe) != len(plan.moe_layers):
        raise PlanError(f"{src}: field 'model.moe_layers': duplicate layer indices {plan.moe_layers}")
    slot_counts = set()
    for layer, a in sorted(plan.layers.items()):
        f = f"{src}: field 'layers.{layer}"
        if layer not in moe:
            raise PlanError(f"{f}': layer {layer} is not a MoE layer of the model (moe_layers {sorted(moe)})")
        if a.ndim != 2 or a.shape[0] != R:
            raise PlanError(f"{f}': {a.shape[0] if a.ndim else 0} rank lists, expected ep_size={R}")
        slots = a.shape[1]
        if slots * R < E:
            raise PlanError(f"{f}': {slots} slots per rank x {R} ranks cannot hold {E} experts")
        slot_counts.add(slots)
        bad = a[(a < 0) | (a >= E)]
        if bad.size:
            r = int(np.argwhere((a < 0) | (a >= E))[0][0])
            raise PlanError(f"{f}[{r}]': expert id {int(bad[0])} out of range 0..{E - 1}")
        for r in range(R):
            vals, counts = np.unique(a[r], return_counts=True)
            if (counts > 1).any():
                raise PlanError(f"{f}[{r}]': expert {int(vals[counts > 1][0])} appears twice on rank {r}")
        missing = np.setdiff1d(np.arange(E), a.ravel())
        if missing.size:
            raise PlanError(f"{f}': experts {missing.tolist()[:8]} are on no rank")
    if len(slot_counts) > 1:
        raise PlanError(f"{src}: field 'layers': layers use different slot counts {sorted(slot_counts)}")


def check_redundant_per_rank(redundant: int, num_experts: int, ep_size: int, flag: str = "--redundant-per-rank") -> None:
    """A rank holds num_experts / ep_size experts plus `redundant` copies, at most one copy of each
    expert: more is unplaceable (and, before this check, made the solver search for a long time)."""
    per_rank = num_experts // max(ep_size, 1)
    if not 0 <= redundant <= num_experts - per_rank:
        raise PlanError(
            f"{flag}: value {redundant} must be in 0..{num_experts - per_rank} (a rank holds {per_rank} of the "
            f"{num_experts} experts and at most one copy of each)"
        )


def linear_layout(num_experts: int, ep_size: int) -> np.ndarray:
    """vLLM's default `linear` layout: rank r holds the contiguous block r*E/R .. (r+1)*E/R-1."""
    if num_experts % ep_size:
        raise PlanError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}")
    return np.arange(num_experts, dtype=np.int64).reshape(ep_size, num_experts // ep_size)
