"""Objectives as parts: the registry matches the options, and each objective's terms are what
its docstring says on a hand-made instance."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest

from vllm_moeplace.plan import Topology
from vllm_moeplace.solver.balance import BALANCE_STRATEGIES
from vllm_moeplace.solver.instance import LayerInstance
from vllm_moeplace.solver.objectives import OBJECTIVES, BoundInputs, get_objective
from vllm_moeplace.solver.objectives.step_time import StepTimeError
from vllm_moeplace.solver.options import BalanceTarget, ObjectiveName, SolveOptions

# Two nodes of 2 ranks, 8 experts (2 per rank); two patterns, each inside one node of the linear layout.
TOPO = Topology.uniform(4, 2)
INST = LayerInstance(np.array([[0, 1], [4, 5]]), np.array([3.0, 1.0]), 8)
LINEAR_NODES = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def test_registries_match_the_options_literals():
    assert set(OBJECTIVES) == set(get_args(ObjectiveName))
    assert set(BALANCE_STRATEGIES) == set(get_args(BalanceTarget))
    for name in OBJECTIVES:
        assert OBJECTIVES[name].name == name
        if name == "step_time":  # built from the solve's step model (hardware, model shape): none, a clear error
            with pytest.raises(StepTimeError, match="step model"):
                get_objective(name)
        SolveOptions(objective=name)  # every registered name is accepted by the options
    # objectives that need no solve context are built by name alone
    for name in ("node_sends", "rank_sends", "hop_cost"):
        assert get_objective(name).name == name


def test_node_sends_terms_and_bound():
    obj = get_objective("node_sends")
    terms = obj.node_terms(TOPO, INST.expert_load())
    assert terms.unit_weight.tolist() == [2.0, 2.0]  # R - g_n: a token touching node n pays 2/4 (x R)
    assert terms.linear is None and obj.rank_weight(TOPO) is None
    # Both patterns fit one node: the bound is the optimum, 4 tokens x 2.
    b = obj.lower_bound(terms, BoundInputs(INST, np.array([4, 4]), LINEAR_NODES, True, 1.0))
    assert b == pytest.approx(INST.cost(LINEAR_NODES, terms.unit_weight)) == pytest.approx(8.0)


def test_rank_sends_prices_ranks_and_keeps_node_terms():
    obj = get_objective("rank_sends")
    terms = obj.node_terms(TOPO, INST.expert_load())
    assert terms.unit_weight.tolist() == get_objective("node_sends").node_terms(TOPO, INST.expert_load()).unit_weight.tolist()
    assert obj.rank_weight(TOPO).tolist() == [3.0] * 4
    assert obj.lower_bound(terms, BoundInputs(INST, np.array([4, 4]), LINEAR_NODES, True, 1.0)) == pytest.approx(8.0)


def test_hop_cost_is_linear_with_a_node_sends_tie_break():
    topo = Topology(4, [[0, 1], [2, 3]], np.array([[0, 1], [3, 0]]))
    obj = get_objective("hop_cost")
    load = INST.expert_load()
    terms = obj.node_terms(topo, load)
    # Σ_o link_cost[node(o)][n] over the 4 origins: node 0 is reached at cost 2 x 3, node 1 at 2 x 1.
    assert terms.linear[0].tolist() == pytest.approx([load[0] * 6, load[0] * 2])
    assert terms.unit_weight.tolist() == pytest.approx([2e-3, 2e-3]) and terms.pattern_scale == 1e-3
    assert obj.lower_bound(terms, BoundInputs(INST, np.array([4, 4]), LINEAR_NODES, True, 1.0)) == 0.0
