"""The placement mechanism: permute which logical expert sits in each physical slot, at load time.

vLLM keeps its `linear` physical layout: with E experts over R EP ranks (S = E/R slots each),
physical expert p lives on rank p // S, slot p % S. A plan says rank r, slot s must hold logical
expert `plan.layers[l][r][s]`, i.e. physical p = r*S + s holds logical `perm[p]`,
`perm = plan.layers[l].ravel()` (the physical->logical map). While the checkpoint streams into
`model.load_weights` we therefore

  1. rename `...layers.{l}.{block}.experts.{e}.*` to `experts.{inv[e]}.*` (inv = perm^-1), so
     vLLM's own weight loader puts logical e's weights into physical slot inv[e], and
  2. permute the router's output rows (gate weight, per-expert score bias) the same way,
     `new[p] = old[perm[p]]`, so the router scores physical ids directly.

The router then emits physical ids, every dispatch path sees vLLM's usual contiguous blocks, and
the model computes exactly what it computed before (softmax/sigmoid top-k and renormalisation are
permutation-equivariant). Zero runtime cost: nothing changes after loading.

Architectures that store a layer's experts as fused 3-D tensors (Llama-4: `experts.gate_up_proj`
[E, H, 2I], `experts.down_proj` [E, I, H]) have no per-expert names to rename: vLLM's loader takes
the rows of this rank's physical ids from such a tensor itself. Their rows are gathered instead,
`new[p] = old[perm[p]]`, the same gather as the router rows. `FusedGather` does the same for the
mapping mechanism, with one row per physical slot (R*S rows, copies included) and the router left
as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np

from vllm_moeplace.plan import Plan, PlanError
from vllm_moeplace.serving.arch import MoeArch

if TYPE_CHECKING:
    import torch


def physical_to_logical(plan: Plan) -> dict[int, np.ndarray]:
    """Per planned layer, int64 [num_experts]: the logical expert held by physical expert p.

    With a plan active, router top-k ids inside vLLM are these PHYSICAL ids; map them through
    this array to get checkpoint (logical) expert ids. Layers not in the plan are identity.
    """
    return {layer: a.reshape(-1).copy() for layer, a in sorted(plan.layers.items())}


@dataclass(frozen=True)
class LayerRemap:
    perm: np.ndarray  # [E] physical -> logical
    inv: np.ndarray  # [E] logical -> physical


def build_remaps(plan: Plan) -> dict[int, LayerRemap]:
    """One permutation per planned layer; refuses plans that are not permutations."""
    out: dict[int, LayerRemap] = {}
    for layer, perm in physical_to_logical(plan).items():
        if perm.size != plan.num_experts or np.unique(perm).size != perm.size:
            raise PlanError(
                f"{plan.source}: field 'layers.{layer}': {perm.size} slots for {plan.num_experts} experts; "
                "redundant expert copies are not supported yet (each expert exactly once per layer)"
            )
        inv = np.empty_like(perm)
        inv[perm] = np.arange(perm.size)
        out[layer] = LayerRemap(perm=perm, inv=inv)
    return out


class WeightRemapper:
    """Rewrites a stream of (checkpoint name, tensor) pairs for a plan. `check_complete()` (called
    after loading) verifies every planned layer's router was seen: permuted experts behind an
    unpermuted router would silently misroute, so that fails the load instead."""

    def __init__(self, plan: Plan, arch: MoeArch):
        self.plan = plan
        self.arch = arch
        self.remaps = build_remaps(plan)
        block = re.escape(arch.block)
        # group 1: everything up to and including "{block}."; 2: layer index; 3: the rest.
        # Anchored at the checkpoint's main-model prefix: an MTP / draft layer
        # (`mtp.layers.0.mlp...`, `model.mtp.layers...`) is never taken for main layer 0.
        self._re = re.compile(rf"^((?:model\.)?layers\.(\d+)\.{block}\.)(.*)$")
        self._expert_re = re.compile(r"^experts\.(\d+)\.(.+)$")
        self.seen_router: set[tuple[int, str]] = set()
        self.seen_fused: set[tuple[int, str]] = set()
        self.renamed = 0

    def _fail(self, name: str, why: str) -> PlanError:
        return PlanError(
            f"{self.plan.source}: cannot apply the plan to checkpoint tensor '{name}' "
            f"({self.arch.name}): {why}; refusing rather than misrouting"
        )

    def rename(self, name: str, tensor: "torch.Tensor") -> tuple[str, "torch.Tensor"]:
        m = self._re.match(name)
        if m is None:
            return name, tensor
        layer = int(m.group(2))
        remap = self.remaps.get(layer)
        if remap is None:
            return name, tensor
        head, rest = m.group(1), m.group(3)
        em = self._expert_re.match(rest)
        if em is not None and self.arch.fused_experts:
            # vLLM's loader of a fused-expert architecture places per-expert tensors without
            # its expert map (llama4.py: no EP support for non-fused weights): refuse.
            raise self._fail(name, "per-expert tensor in a checkpoint of a fused-expert architecture")
        if em is not None:
            e = int(em.group(1))
            if e >= remap.inv.size:
                raise self._fail(name, f"expert id {e} >= num_experts {remap.inv.size}")
            self.renamed += 1
            return f"{head}experts.{int(remap.inv[e])}.{em.group(2)}", tensor
        if rest in self.arch.fused_experts:
            self.seen_fused.add((layer, rest))
            self.renamed += 1
            return name, gather_rows(self._fail, name, tensor, remap.perm, remap.perm.size)
        if rest in self.arch.router_rows:
            if tensor.shape[0] != remap.perm.size:
                raise self._fail(name, f"router tensor has {tensor.shape[0]} rows, expected {remap.perm.size}")
            import torch

            self.seen_router.add((layer, rest))
            # new[p] = old[perm[p]]: the row for physical expert p scores its logical expert.
            return name, tensor.index_select(0, torch.as_tensor(remap.perm, device=tensor.device))
        if rest.startswith(self.arch.untouched_prefixes):
            return name, tensor
        raise self._fail(name, "tensor not in the placement table of this architecture")

    def __call__(self, weights: Iterable[tuple[str, "torch.Tensor"]]) -> Iterator[tuple[str, "torch.Tensor"]]:
        for name, tensor in weights:
            yield self.rename(name, tensor)

    def check_complete(self) -> None:
        router = self.arch.router_rows[0]  # the router's weight; later rows (score bias) are optional
        missing = [l for l in self.remaps if (l, router) not in self.seen_router]
        if missing:
            raise PlanError(
                f"{self.plan.source}: field 'layers': the checkpoint has no router weight "
                f"'{self.arch.block}.{router}' for planned layers {missing}; refusing to load"
            )
        check_fused_complete(self.plan, self.arch, self.remaps, self.seen_fused)
        # Every router-row tensor seen for one planned layer (e.g. DeepSeek-V3's score bias) must
        # have arrived, permuted, for all of them: an unpermuted bias would misroute silently.
        for row in {r for _, r in self.seen_router}:
            lacking = [l for l in self.remaps if (l, row) not in self.seen_router]
            if lacking:
                raise PlanError(
                    f"{self.plan.source}: field 'layers': router tensor '{self.arch.block}.{row}' arrived for some "
                    f"planned layers but not for layers {lacking}; refusing to load"
                )


def gather_rows(fail: Any, name: str, tensor: "torch.Tensor", rows: np.ndarray, experts: int) -> "torch.Tensor":
    """`tensor[rows]` for a tensor whose dim 0 is the expert id (checked to be `experts` long)."""
    import torch

    if tensor.dim() < 1 or tensor.shape[0] != experts:
        raise fail(name, f"fused expert tensor has shape {tuple(tensor.shape)}, expected {experts} experts on dim 0")
    return tensor.index_select(0, torch.as_tensor(rows, device=tensor.device))


def check_fused_complete(plan: Plan, arch: MoeArch, layers: Iterable[int], seen: set[tuple[int, str]]) -> None:
    """Every fused expert tensor of every planned layer went through the gather: one that did not
    would hold the default layout's experts behind a planned router."""
    for name in arch.fused_experts:
        lacking = [l for l in layers if (l, name) not in seen]
        if lacking:
            raise PlanError(
                f"{plan.source}: field 'layers': fused expert tensor '{arch.block}.{name}' did not arrive for "
                f"planned layers {lacking}; refusing to load"
            )


class FusedGather:
    """The mapping mechanism's checkpoint stream for fused-expert architectures: each planned
    layer's fused expert tensors become [R*S, ...] in physical order (row p = the checkpoint row
    of the logical expert physical slot p holds, copies included), which is what vLLM's fused
    loader slices by its linear expert map over R*S physical experts. Router rows pass untouched
    (the router scores logical experts; the table after top-k maps them). Per-expert tensor names
    under a planned block are refused: vLLM's fused loader does not place them by expert map."""

    def __init__(self, plan: Plan, arch: MoeArch):
        self.plan, self.arch = plan, arch
        self.rows = physical_to_logical(plan)  # R*S rows each
        self._re = re.compile(rf"^((?:model\.)?layers\.(\d+)\.{re.escape(arch.block)}\.)(.*)$")
        self.seen: set[tuple[int, str]] = set()

    def _fail(self, name: str, why: str) -> PlanError:
        return PlanError(
            f"{self.plan.source}: cannot apply the plan to checkpoint tensor '{name}' "
            f"({self.arch.name}): {why}; refusing rather than misrouting"
        )

    def rewrite(self, name: str, tensor: "torch.Tensor") -> tuple[str, "torch.Tensor"]:
        m = self._re.match(name)
        if m is None or int(m.group(2)) not in self.rows:
            return name, tensor
        layer, rest = int(m.group(2)), m.group(3)
        if rest in self.arch.fused_experts:
            self.seen.add((layer, rest))
            return name, gather_rows(self._fail, name, tensor, self.rows[layer], self.plan.num_experts)
        if rest in self.arch.router_rows or rest.startswith(self.arch.untouched_prefixes):
            return name, tensor
        raise self._fail(name, "tensor not in the placement table of this architecture")

    def __call__(self, weights: Iterable[tuple[str, "torch.Tensor"]]) -> Iterator[tuple[str, "torch.Tensor"]]:
        for name, tensor in weights:
            yield self.rewrite(name, tensor)

    def check_complete(self) -> None:
        check_fused_complete(self.plan, self.arch, self.rows, self.seen)
