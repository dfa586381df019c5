"""Topology files and generators for non-uniform clusters.

A topology file is JSON with the same shape as a plan's `topology` section:

    {"nodes": [[0, 1, 2, 3], [4, 5, 6, 7]], "link_cost": [[0, 2], [2, 0]]}

`nodes` lists the EP ranks of each node (a partition of 0..ep_size-1); `link_cost[a][b]` is the
cost of one message from node a to node b (e.g. switch hops), default 0 on the diagonal and 1
elsewhere. `{"ranks_per_node": G}` is accepted as well.

Generators give hop-count matrices for two common fabrics. When every node has the same mean
cost to all nodes (a fat-tree with full leaves, the balanced dragonfly below) `hop_cost` is
placement-invariant under uniform token origins (see docs/metrics.md); a sparse fat-tree (last
leaf partly empty) is asymmetric, the case where hop-aware placement matters (arXiv 2508.09229).
"""

from __future__ import annotations

import json
import os

import numpy as np
from pydantic import TypeAdapter, ValidationError

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.jsonio import read_json
from vllm_moeplace.plan import NodeGroups, RanksPerNode, Topology, TopologySpec, topology_error, write_json_atomic


class TopologyError(MoeplaceError):
    """A topology file or generator argument is invalid. The message names file, field and value."""


_SPEC = TypeAdapter(TopologySpec)


def parse_topology(data: object, ep_size: int | None = None, source: str = "<topology>") -> Topology:
    """Topology from parsed JSON. ep_size defaults to the number of ranks the nodes list."""
    if not isinstance(data, dict):
        raise TopologyError(f"{source}: expected a JSON object with 'nodes' (and optional 'link_cost'), got {type(data).__name__}")
    try:
        spec = _SPEC.validate_python(data)
    except ValidationError as e:
        err = topology_error(e, data)
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("RanksPerNode", "NodeGroups")))
        raise TopologyError(f"{source}: field '{loc}': {err['msg']} (value {json.dumps(err.get('input'))[:120]})") from None
    if ep_size is None:
        if isinstance(spec, RanksPerNode):
            raise TopologyError(f"{source}: 'ranks_per_node' alone does not say how many ranks; pass --ep-size")
        ep_size = sum(len(n) for n in spec.nodes)
    elif isinstance(spec, NodeGroups) and sum(len(n) for n in spec.nodes) != ep_size:
        raise TopologyError(f"{source}: field 'nodes': lists {sum(len(n) for n in spec.nodes)} ranks, but ep_size is {ep_size}")
    try:
        return Topology.from_spec(spec, ep_size, where=f"{source}: field 'topology'")
    except MoeplaceError as e:
        raise TopologyError(str(e)) from None


def load_topology(path: str | os.PathLike, ep_size: int | None = None) -> Topology:
    """Read a topology file; every failure is a TopologyError naming the file."""
    return parse_topology(read_json(path, "topology file", TopologyError), ep_size, str(path))


def save_topology(path: str | os.PathLike, topology: Topology) -> None:
    write_json_atomic(path, {"nodes": topology.nodes, "link_cost": topology.link_cost.tolist()})


def _nodes(num_nodes: int, ranks_per_node: int) -> list[list[int]]:
    return [list(range(n * ranks_per_node, (n + 1) * ranks_per_node)) for n in range(num_nodes)]


def fat_tree(num_nodes: int, ranks_per_node: int, nodes_per_leaf: int) -> Topology:
    """Two-level fat-tree: nodes under the same leaf switch are 2 hops apart (up, down), nodes
    under different leaves 4 (leaf, spine, leaf). When nodes_per_leaf does not divide num_nodes
    the last leaf is partly empty, which makes the topology asymmetric (a "sparse" fat-tree)."""
    if min(num_nodes, ranks_per_node, nodes_per_leaf) <= 0:
        raise TopologyError(f"fat_tree: sizes must be positive, got num_nodes={num_nodes}, "
                            f"ranks_per_node={ranks_per_node}, nodes_per_leaf={nodes_per_leaf}")
    leaf = np.arange(num_nodes) // nodes_per_leaf
    cost = np.where(leaf[:, None] == leaf[None, :], 2.0, 4.0)
    np.fill_diagonal(cost, 0.0)
    return Topology(num_nodes * ranks_per_node, _nodes(num_nodes, ranks_per_node), cost)


def dragonfly(num_groups: int, nodes_per_group: int, ranks_per_node: int) -> Topology:
    """Dragonfly with one router per node, routers of a group fully connected (1 local hop), and
    one global link between every pair of groups. The link from group g to group h sits on router
    ((h - g) mod G - 1) mod a of g (a = nodes_per_group); minimal routing costs
    [source router != link router] + 1 global hop + [link router of h != destination]."""
    G, a = num_groups, nodes_per_group
    if min(G, a, ranks_per_node) <= 0:
        raise TopologyError(f"dragonfly: sizes must be positive, got num_groups={G}, nodes_per_group={a}, ranks_per_node={ranks_per_node}")
    n = G * a
    grp, rtr = np.arange(n) // a, np.arange(n) % a
    cost = np.zeros((n, n))
    for s in range(n):
        for d in range(n):
            g, h = grp[s], grp[d]
            if s == d:
                continue
            if g == h:
                cost[s, d] = 1.0
                continue
            out_router = ((h - g) % G - 1) % a
            in_router = ((g - h) % G - 1) % a
            cost[s, d] = float(rtr[s] != out_router) + 1.0 + float(rtr[d] != in_router)
    return Topology(n * ranks_per_node, _nodes(n, ranks_per_node), cost)


def resolve_topology(ep_size: int, ranks_per_node: int | None = None, path: str | os.PathLike | None = None) -> Topology:
    """The topology of the CLI's `(--ranks-per-node G | --topology F)` pair."""
    if (ranks_per_node is None) == (path is None):
        raise TopologyError("give exactly one of --ranks-per-node G or --topology FILE")
    if ep_size <= 0:
        raise TopologyError(f"--ep-size must be positive, got {ep_size}")
    if path is not None:
        return load_topology(path, ep_size)
    assert ranks_per_node is not None
    if ranks_per_node <= 0 or ep_size % ranks_per_node:
        raise TopologyError(f"--ranks-per-node {ranks_per_node} does not divide --ep-size {ep_size}")
    return Topology.uniform(ep_size, ranks_per_node)


def describe(topology: Topology) -> str:
    """One line, e.g. 'EP16: 4 nodes x 4 ranks' or 'EP10: 5 nodes (2,2,2,2,2 ranks), link cost 0..4'."""
    sizes = [len(n) for n in topology.nodes]
    shape = f"{len(sizes)} nodes x {sizes[0]} ranks" if len(set(sizes)) == 1 else f"{len(sizes)} nodes ({','.join(map(str, sizes))} ranks)"
    spec = topology.to_json()
    cost = "" if "ranks_per_node" in spec else f", link cost {topology.link_cost.min():g}..{topology.link_cost.max():g}"
    return f"EP{topology.ep_size}: {shape}{cost}"
