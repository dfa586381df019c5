"""`moeplace solve --objective balance`: a plan from expert load alone (a load-only trace, or the
counts of a native one).

A small adapter over the EPLB placement the baselines already use (`solver/eplb.py`, global policy:
copies to the experts with the highest load per copy, then balanced packing of all copies over all
ranks, never two copies of an expert on one rank), so it touches no solver module. Balance is the
only objective that needs no per-token routing: node_sends, rank_sends, hop_cost and the
inter-layer term count which experts a token needs together, and the held-out balance targets need
request ids; `PER_TOKEN_OPTIONS` lists what is refused for load-only input and why.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vllm_moeplace.errors import MoeplaceError
from vllm_moeplace.load_trace import LoadTrace
from vllm_moeplace.plan import Plan, Topology, validate_plan
from vllm_moeplace.solver import eplb
from vllm_moeplace.solver.baselines import slots_per_rank

# option -> why it needs per-token routing (or request ids), for the one refusal message
PER_TOKEN_OBJECTIVES = ("node_sends", "rank_sends", "hop_cost", "step_time")
PER_TOKEN_OPTIONS = {
    "--inter-layer-weight": "counts nodes a token newly needs at the next layer",
    "--balance-target expected": "models request-sampling noise from per-request loads",
    "--balance-risk": "measures load noise over requests",
    "--balance-folds": "cuts the trace into request folds",
    "--train-fraction": "splits the trace by request",
    "--preserve-groups": "is implemented in the per-token solver only",
    "--copy-placement locality": "scores copies by the node_sends they save",
}


def refusal(source: str, what: str) -> MoeplaceError:
    return MoeplaceError(
        f"{source}: {what} needs per-token routing, and this is a load-only trace (expert counts per layer, e.g. "
        f"SGLang stat or TensorRT-LLM statistics). With load only, use --objective balance (balance and redundant "
        f"copies); objectives {', '.join(PER_TOKEN_OBJECTIVES)} need a per-token trace (moeplace profile, or "
        f"SGLang's per_token recorder via moeplace import)."
    )


def rank_imbalance(layout: np.ndarray, load: np.ndarray) -> float:
    """max/mean rank load, each copy of an expert taking an equal share of its load (the split EPLB
    assumes; our replica rule splits by origin, which is close to even when copies sit on distinct nodes)."""
    copies = np.bincount(layout.ravel(), minlength=load.size)
    per_rank = (load[layout] / copies[layout]).sum(axis=1)
    mean = per_rank.mean()
    return float(per_rank.max() / mean) if mean > 0 else 1.0


def balance_plan(
    load: LoadTrace,
    topology: Topology,
    redundant_per_rank: int = 0,
    *,
    model_name: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Plan:
    """A validated plan balancing every layer's load over the ranks (with copies, if asked)."""
    E, R = load.num_experts, topology.ep_size
    try:
        S = slots_per_rank(E, R, redundant_per_rank)
        total = load.total().astype(np.float64)
        layers = {int(l): eplb.eplb_layer(total[i], topology.nodes, S, None) for i, l in enumerate(load.layer_ids)}
    except MoeplaceError as e:
        raise MoeplaceError(f"--objective balance: {e}") from None
    imb = [rank_imbalance(layers[int(l)], total[i]) for i, l in enumerate(load.layer_ids)]
    plan = Plan(
        model_name=model_name or str(load.meta.get("model", "unknown")),
        num_experts=E,
        moe_layers=[int(x) for x in load.layer_ids],
        ep_size=R,
        topology=topology,
        layers=layers,
        solver={
            "method": "balance from expert load only: EPLB global policy (copies by load per copy, balanced packing "
            "over all ranks, no expert twice on a rank)",
            "objective_name": "balance",
            "redundant_per_rank": redundant_per_rank,
            "load_windows": load.num_windows,
            "load_source": load.meta.get("format", "native trace counts"),
            "rank_imbalance_even_split": float(np.mean(imb)),
            "rank_imbalance_even_split_max": float(np.max(imb)),
            **(extra or {}),
        },
        source="<balance plan>",
    )
    validate_plan(plan)
    return plan
