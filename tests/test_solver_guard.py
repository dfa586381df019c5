"""The never-slower-than-default guard (`solver/guard.py`): every solve predicts its plan's MoE step
time against vLLM's linear layout and EPLB, and a plan predicted slower than linear for the phase
mix is not written silently."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _builders import trace_from_ids

from vllm_moeplace.cli.main import main
from vllm_moeplace.plan import Topology, linear_layout, load_plan
from vllm_moeplace.sim.network import SimParamsError
from vllm_moeplace.solver.options import SolveOptions
from vllm_moeplace.solver.pipeline import solve
from vllm_moeplace.trace import save_trace

E, R = 16, 8

# Tiny experts, links so fast that communication costs nothing and no latency: the step time is
# the slowest rank's expert FLOPs (prefill with 4096 tokens per rank is FLOP-bound here).
SHAPE = {"hidden_size": 64, "moe_intermediate_size": 64, "num_experts": E, "top_k": 2, "dispatch_bytes_per_element": 1,
         "combine_bytes_per_element": 2, "weight_bytes_per_element": 2}
FAST_LINKS = {"nvlink_bandwidth_gbs": 1e9, "nvlink_latency_us": 0, "rdma_bandwidth_gbs": 1e9, "rdma_latency_us": 0,
              "gpu_tflops": 500, "hbm_bandwidth_tbs": 2}


def pair_trace(tokens: int = 4000, seed: int = 0):
    """Every token picks a pair (e, e + 8). Pairs of even e are hot (10x the odd ones), so vLLM's
    linear layout (rank r holds experts 2r, 2r+1) puts one hot and one cold expert on every rank:
    perfectly balanced. The node_sends optimum on 8 single-rank nodes co-locates each pair, which
    puts two hot experts on four ranks: 1.8x the mean load, allowed by --max-imbalance 2, and
    ~1.8x the slowest rank's FLOPs of linear."""
    rng = np.random.default_rng(seed)
    w = np.where(np.arange(8) % 2 == 0, 10.0, 1.0)
    e = rng.choice(8, size=tokens, p=w / w.sum())
    ids = np.stack([e, e + 8], axis=1)
    return trace_from_ids(ids, E, request_ids=np.arange(tokens) // 20)


@pytest.fixture()
def files(tmp_path):
    t = pair_trace()
    save_trace(tmp_path / "t.npz", t)
    (tmp_path / "shape.json").write_text(json.dumps(SHAPE))
    (tmp_path / "hw.json").write_text(json.dumps(FAST_LINKS))
    return tmp_path


def _solve(d, *extra):
    return main(["solve", "--trace", str(d / "t.npz"), "--ep-size", str(R), "--ranks-per-node", "1", "--out", str(d / "p.json"),
                 "--max-imbalance", "2", "--time-limit", "2", "--train-fraction", "0.5", "--deterministic", "--phase-mix", "1",
                 "--hardware", str(d / "hw.json"), "--model-shape", str(d / "shape.json"), *extra])


def test_slower_plan_is_replaced_loudly(files, capsys):
    # --keep-plan: the solver's own plan, whose predicted step time is slower than linear's.
    assert _solve(files, "--keep-plan") == 0
    kept = load_plan(files / "p.json")
    st = kept.solver["step_time"]
    assert st["checked"] and st["slower_than_linear"] and st["written"] == "plan"
    assert st["predicted_ms"]["plan"]["mix"] > 1.5 * st["predicted_ms"]["linear"]["mix"]  # the premise: pairs co-located
    assert "kept anyway" in st["warning"] and "WARNING" in capsys.readouterr().err
    for a in kept.layers.values():  # each rank holds one (e, e + 8) pair
        assert all(abs(int(r[0]) - int(r[1])) == 8 for r in a)

    # Default: the faster baseline is written instead, and the run says so on stderr.
    assert _solve(files) == 0
    err = capsys.readouterr().err
    assert "SLOWER than vLLM's linear layout" in err and "wrote the" in err
    plan = load_plan(files / "p.json")
    st = plan.solver["step_time"]
    assert st["written"] in ("linear", "eplb") and st["slower_than_linear"]
    t = st["predicted_ms"]
    assert t[st["written"]]["mix"] <= t["linear"]["mix"] < t["plan"]["mix"]
    if st["written"] == "linear":
        for a in plan.layers.values():
            np.testing.assert_array_equal(a, linear_layout(E, R))


def test_faster_plan_is_written_with_its_prediction(tmp_path):
    # The same routing with the pairs' loads equal: co-location costs no balance, and with real
    # links (slow RDMA) the co-located plan saves messages: faster than linear, written as solved.
    rng = np.random.default_rng(1)
    e = rng.integers(0, 8, size=4000)
    t = trace_from_ids(np.stack([e, e + 8], axis=1), E, request_ids=np.arange(4000) // 20)
    (tmp_path / "shape.json").write_text(json.dumps(SHAPE))
    plan = solve(t, Topology.uniform(R, 1), SolveOptions(time_limit=2, train_fraction=0.5, deterministic=True,
                                                       model_shape=str(tmp_path / "shape.json"), phase_mix=0.5))
    st = plan.solver["step_time"]
    assert st["checked"] and st["written"] == "plan" and not st["slower_than_linear"]
    assert st["evaluated_on"] == "held-out requests" and st["phase_mix_source"] == "given"
    t = st["predicted_ms"]
    assert set(t) == {"plan", "linear", "eplb"}
    for v in t.values():
        assert v["mix"] == pytest.approx(0.5 * v["prefill"] + 0.5 * v["decode"])
    assert t["plan"]["mix"] < t["linear"]["mix"]


def test_unknown_model_shape_is_recorded_not_guessed():
    t = pair_trace(400)
    plan = solve(t, Topology.uniform(R, 1), SolveOptions(time_limit=1, deterministic=True, max_imbalance=2))
    st = plan.solver["step_time"]
    assert st["checked"] is False and "--model-shape" in st["reason"]


def test_bad_hardware_or_shape_fails_before_the_search(files, tmp_path):
    t = pair_trace(400)
    with pytest.raises(SimParamsError, match="--hardware 'no-such'"):
        solve(t, Topology.uniform(R, 1), SolveOptions(hardware="no-such", model_shape=str(files / "shape.json")))
    bad = dict(SHAPE, top_k=3)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(SimParamsError, match="top_k=3"):
        solve(t, Topology.uniform(R, 1), SolveOptions(model_shape=str(tmp_path / "bad.json")))
    (tmp_path / "hw_bad.json").write_text(json.dumps(dict(FAST_LINKS, gpu_tflops=-1)))
    with pytest.raises(SimParamsError, match="gpu_tflops"):
        solve(t, Topology.uniform(R, 1), SolveOptions(hardware=str(tmp_path / "hw_bad.json"), model_shape=str(files / "shape.json")))


def test_evaluate_prints_step_time_per_phase(files, capsys):
    assert _solve(files, "--keep-plan") == 0
    capsys.readouterr()
    common = ["evaluate", "--plan", str(files / "p.json"), "--trace", str(files / "t.npz"), "--baselines", "linear,eplb",
              "--hardware", str(files / "hw.json"), "--model-shape", str(files / "shape.json"), "--phase-mix", "1"]
    assert main(common + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan_t, lin_t = out[str(files / "p.json")]["step_time_ms"], out["linear"]["step_time_ms"]
    # The same prediction as the solve's guard (same held-out split, batches and model).
    rec = load_plan(files / "p.json").solver["step_time"]["predicted_ms"]
    for name, t in (("plan", plan_t), ("linear", lin_t)):
        for k in ("prefill", "decode", "mix"):
            assert t[k] == pytest.approx(rec[name][k], rel=1e-5)
    assert main(common) == 0
    text = capsys.readouterr().out
    assert "predicted MoE step time, held-out requests" in text
    table = text.split("predicted MoE step time, held-out requests")[1].splitlines()
    lin_line = next(line for line in table if line.startswith("linear"))
    assert lin_line.split()[-3:] == ["1.000", "1.000", "1.000"]
    plan_line = next(line for line in table if line.startswith(str(files / "p.json")))
    assert float(plan_line.split()[-1]) == pytest.approx(plan_t["mix"] / lin_t["mix"], abs=1e-3) and float(plan_line.split()[-1]) > 1.5


def test_evaluate_without_a_model_shape_notes_it(tmp_path, capsys):
    save_trace(tmp_path / "t.npz", pair_trace(400))
    assert main(["evaluate", "--trace", str(tmp_path / "t.npz"), "--ep-size", "8", "--ranks-per-node", "1",
                 "--baselines", "linear"]) == 0
    cap = capsys.readouterr()
    assert "step time not predicted" in cap.err and "predicted MoE step time" not in cap.out


@pytest.mark.parametrize("flags, words", [
    (["--hardware", "no-such"], ["--hardware", "no-such"]),
    (["--model-shape", "no-such"], ["--model-shape", "no-such"]),
    (["--phase-mix", "1.5"], ["--phase-mix", "1.5"]),
    (["--objective", "step-time"], ["--model-shape"]),  # a synthetic trace's model has no known shape
])
def test_cli_refuses_bad_step_time_input(tmp_path, capsys, flags, words):
    save_trace(tmp_path / "t.npz", pair_trace(400))
    out = tmp_path / "p.json"
    rc = main(["solve", "--trace", str(tmp_path / "t.npz"), "--ep-size", "8", "--ranks-per-node", "1", "--out", str(out),
               "--time-limit", "1", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists() and len(err.splitlines()) == 1
    assert all(w in err for w in words)


def test_request_aware_plan_is_timed_with_its_routed_requests(tmp_path):
    """A request-aware plan is judged as it is served: each test request routed by the plan's
    router, its tokens starting on its group's node; linear and EPLB with requests spread evenly.
    Timed with uniform origins instead, the same layout would lose most of what it was built for."""
    from vllm_moeplace.sim.predict import phase_batches, predict
    from vllm_moeplace.solver.guard import resolve
    from vllm_moeplace.solver.request_groups import RequestGroupOptions

    rng = np.random.default_rng(2)
    ids, req, pre = [], [], []
    for r in range(80):  # even requests use experts 0..7, odd ones 8..15, in prefill and decode
        base = (r % 2) * 8
        for t in range(20):
            ids.append(rng.choice(8, 2, replace=False) + base)
            req.append(r)
            pre.append(t < 4)
    trace = trace_from_ids(np.array(ids), E, request_ids=req, is_prefill=pre)
    (tmp_path / "shape.json").write_text(json.dumps(SHAPE))
    topo = Topology.uniform(R, 4)  # 2 nodes: one group per node
    opts = SolveOptions(time_limit=2, train_fraction=0.5, deterministic=True, max_imbalance=1.3,
                        model_shape=str(tmp_path / "shape.json"), phase_mix=0.5)
    plan = solve(trace, topo, opts, request_groups=RequestGroupOptions(2))
    st = plan.solver["step_time"]
    assert st["checked"] and st["written"] == "plan" and plan.request_routing is not None
    assert st["plan_origins"].startswith("requests routed by the plan's request_routing")
    t = st["predicted_ms"]
    assert t["plan"]["mix"] < 0.9 * t["linear"]["mix"]
    # The same layout timed with requests spread evenly: what the verdict would have been.
    test = trace.split_by_request(0.5)[1]
    model = resolve(trace.split_by_request(0.5)[0], topo, opts, required=True).model
    uniform = predict(plan.layers, topo, test, model, phase_batches(test, model, R))["mix"]
    assert t["plan"]["mix"] < 0.9 * uniform
