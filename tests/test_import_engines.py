"""Importing the engines' own expert statistics: SGLang's recorder dumps and TensorRT-LLM's
EXPERT_STATISTIC_PATH folder. Files are built with the structure those engines' writers produce
(torch.save of the same dicts; safetensors written by the safetensors library, as TensorRT-LLM
does), since neither engine is installed here; the sources are cited in the importer modules."""

import json

import numpy as np
import pytest

from vllm_moeplace.cli.main import main
from vllm_moeplace.load_trace import LoadTrace, is_load_trace, load_load_trace
from vllm_moeplace.plan import load_plan
from vllm_moeplace.profiling.formats.common import TraceImportError
from vllm_moeplace.profiling.formats.safetensors_np import read_safetensors, write_safetensors
from vllm_moeplace.profiling.importers import ImportOptions, import_trace
from vllm_moeplace.trace import load_trace

torch = pytest.importorskip("torch")

E, LAYERS, MOE = 8, 4, [1, 2, 3]  # decoder layer 0 dense, as in DeepSeek models


# ------------------------------------------------------------------------------ TensorRT-LLM
def _trtllm_folder(tmp_path, ranks=2, iters=(50, 51, 52), lib=True):
    """What ExpertStatistic._set_iter writes at iteration `stop`: meta_info.json + rank{r}.safetensors
    with one bincount per '{iter}_{layer}'; plus a _raw file their reader skips."""
    rng = np.random.default_rng(0)
    d = tmp_path / "expert_statistic"
    d.mkdir()
    (d / "meta_info.json").write_text(json.dumps({"num_experts": E, "num_experts_per_token": 2}))
    want = np.zeros((len(iters), len(MOE), E), dtype=np.int64)
    for r in range(ranks):
        rec = {}
        for i, it in enumerate(iters):
            for j, l in enumerate(MOE):
                ids = rng.integers(0, E, size=(16, 2))
                counts = np.bincount(ids.ravel(), minlength=E)
                want[i, j] += counts
                rec[f"{it}_{l}"] = counts
        if lib:  # the library TensorRT-LLM itself writes with
            from safetensors.torch import save_file

            save_file({k: torch.from_numpy(v) for k, v in rec.items()}, str(d / f"rank{r}.safetensors"))
        else:
            write_safetensors(d / f"rank{r}.safetensors", rec)
        write_safetensors(d / f"rank{r}_raw.safetensors", {"50_1": np.zeros((3, 2), dtype=np.int32)})
    return d, want


@pytest.mark.parametrize("lib", [True, False])
def test_trtllm_statistic_roundtrip(tmp_path, lib):
    if lib:
        pytest.importorskip("safetensors")
    d, want = _trtllm_folder(tmp_path, lib=lib)
    out = tmp_path / "load.npz"
    assert main(["import", "--format", "trtllm-expert-statistic", str(d), "--out", str(out)]) == 0
    assert is_load_trace(out)
    t = load_load_trace(out)
    assert t.layer_ids.tolist() == MOE and t.num_experts == E
    assert np.array_equal(t.expert_load, want)  # summed over ranks, one window per iteration
    assert t.meta["iterations"] == [50, 51, 52] and t.meta["top_k"] == 2


def test_safetensors_reader_matches_the_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    a = {"3_7": np.arange(5, dtype=np.int64), "x": np.ones((2, 3), dtype=np.int32)}
    st.save_file(a, str(tmp_path / "a.safetensors"))
    got = read_safetensors(tmp_path / "a.safetensors")
    assert set(got) == set(a) and all(np.array_equal(got[k], a[k]) and got[k].dtype == a[k].dtype for k in a)
    write_safetensors(tmp_path / "b.safetensors", a)
    back = st.load_file(str(tmp_path / "b.safetensors"))
    assert all(np.array_equal(back[k], a[k]) for k in a)


def test_trtllm_errors(tmp_path, capsys):
    d, _ = _trtllm_folder(tmp_path, lib=False)
    (d / "meta_info.json").write_text(json.dumps({"num_experts": "8"}))
    out = tmp_path / "o.npz"
    assert main(["import", "--format", "trtllm-expert-statistic", str(d), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "meta_info.json: field 'num_experts'" in err and "'8'" in err
    (d / "meta_info.json").write_text(json.dumps({"num_experts": E, "num_experts_per_token": 2}))
    with pytest.raises(TraceImportError, match="counts slots, not experts"):
        import_trace("trtllm-expert-statistic", d, ImportOptions(num_experts=6))
    write_safetensors(d / "rank1.safetensors", {"53_1": np.zeros(E, dtype=np.int64)})  # iteration 53 lacks layers 2, 3
    with pytest.raises(TraceImportError, match="no counts for iteration"):
        import_trace("trtllm-expert-statistic", d)
    assert not out.exists()


# ------------------------------------------------------------------------------ SGLang
def _p2l(extra=2):
    """[decoder layers, physical] map with `extra` redundant slots: physical p -> logical."""
    rows = []
    for l in range(LAYERS):
        perm = np.random.default_rng(l).permutation(E)
        rows.append(np.concatenate([perm, perm[:extra]]))
    return torch.tensor(np.array(rows), dtype=torch.int64)


def test_sglang_stat_roundtrip(tmp_path):
    """_StatAccumulator.dump: {rank, logical_count [steps, layers, logical], average_utilization_rate_over_window}."""
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 50, size=(5, LAYERS, E))
    counts[:, 0] = 0  # the dense layer is never recorded
    torch.save({"rank": 0, "logical_count": torch.tensor(counts, dtype=torch.int32),
                "average_utilization_rate_over_window": None}, tmp_path / "expert_distribution_recorder_1.5.pt")
    out = tmp_path / "load.npz"
    assert main(["import", "--format", "sglang-expert-distribution", str(tmp_path), "--out", str(out)]) == 0
    t = load_load_trace(out)
    assert t.layer_ids.tolist() == MOE and np.array_equal(t.expert_load, counts[:, 1:])
    assert any("taken as dense" in n for n in t.meta["import_notes"])


def _per_token_dump(tmp_path, rank, p2l, passes):
    """_DetailAccumulator.dump with _DetailSinglePassGatherer records (physical ids, -1 padding to 8)."""
    records = []
    for fid, (logical, mode) in enumerate(passes):  # logical: [tokens, MoE layers, K]
        T, L, K = logical.shape
        ids = torch.full((LAYERS, T, 8), -1, dtype=torch.int32)
        for j, l in enumerate(MOE):
            inv = {int(e): p for p, e in enumerate(p2l[l].tolist()) if p < E}  # primary physical copy
            inv_extra = {int(e): p for p, e in enumerate(p2l[l].tolist()) if p >= E}
            for t in range(T):
                for k in range(K):
                    e = int(logical[t, j, k])
                    ids[l, t, k] = inv_extra.get(e, inv[e]) if t % 2 else inv[e]  # use copies too
        records.append({"forward_pass_id": fid, "rank": rank, "gatherer_key": "primary",
                        "input_ids": list(range(fid * 100, fid * 100 + T)), "positions": list(range(T)),
                        "extend_seq_lens": [T] if mode == 1 else None, "forward_mode": mode,
                        "topk_ids_of_layer": ids, "misc_objects": [],
                        "global_physical_count": torch.zeros((LAYERS, p2l.shape[1]), dtype=torch.int32)})
    torch.save({"records": records, "last_physical_to_logical_map": p2l},
               tmp_path / f"expert_distribution_recorder_1.5_{rank}.pt")


def test_sglang_per_token_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    p2l = _p2l()
    passes = [(np.stack([rng.permutation(E)[:2] for _ in range(6 * 3)]).reshape(6, 3, 2), 1),
              (np.stack([rng.permutation(E)[:2] for _ in range(2 * 3)]).reshape(2, 3, 2), 2)]
    _per_token_dump(tmp_path, 0, p2l, passes)
    _per_token_dump(tmp_path, 1, p2l, passes)  # TP: rank 1 saw the same batch
    out = tmp_path / "t.npz"
    assert main(["import", "--format", "sglang-expert-distribution", str(tmp_path), "--out", str(out)]) == 0
    t = load_trace(out)
    assert t.layer_ids.tolist() == MOE and t.num_experts == E and t.top_k == 2
    assert np.array_equal(t.topk_ids, np.concatenate([p[0] for p in passes]))  # logical ids restored
    assert t.is_prefill.tolist() == [True] * 6 + [False] * 2
    assert t.request_ids.tolist() == [0] * 6 + [1] * 2
    assert any("kept once" in n for n in t.meta["import_notes"])


def test_sglang_bad_dump(tmp_path, capsys):
    torch.save({"something": 1}, tmp_path / "x.pt")
    out = tmp_path / "o.npz"
    assert main(["import", "--format", "sglang-expert-distribution", str(tmp_path / "x.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "x.pt: not an SGLang expert distribution dump" in err and "Traceback" not in err and not out.exists()


# ------------------------------------------------------------------------------ solve on load only
def test_load_only_trace_solves_with_balance_and_refuses_locality(tmp_path, capsys):
    d, want = _trtllm_folder(tmp_path, lib=False)
    load = tmp_path / "load.npz"
    assert main(["import", "--format", "trtllm-expert-statistic", str(d), "--out", str(load)]) == 0
    plan_path = tmp_path / "plan.json"
    base = ["solve", "--trace", str(load), "--ep-size", "4", "--ranks-per-node", "2", "--out", str(plan_path)]
    assert main(base + ["--redundant-per-rank", "1"]) == 0
    plan = load_plan(plan_path)
    assert plan.has_redundancy() and sorted(plan.layers) == MOE and plan.solver["objective_name"] == "balance"
    # balance: no rank carries more than the heaviest expert's share above the mean
    total = want.sum(axis=0)
    for j, l in enumerate(MOE):
        copies = np.bincount(plan.layers[l].ravel(), minlength=E)
        per_rank = (total[j][plan.layers[l]] / copies[plan.layers[l]]).sum(axis=1)
        assert per_rank.max() - per_rank.mean() <= (total[j] / copies).max()
    capsys.readouterr()
    plan_path.unlink()
    for extra, needle in ((["--objective", "node_sends"], "--objective node_sends needs per-token routing"),
                          (["--train-fraction", "0.5"], "--train-fraction (splits the trace by request) needs per-token"),
                          (["--copy-placement", "locality"], "--copy-placement locality")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert needle in err and "--objective balance" in err and "Traceback" not in err
        assert not plan_path.exists()


def test_balance_objective_on_a_native_trace(tmp_path, capsys):
    from vllm_moeplace.solver.synth import SynthConfig, synth_trace
    from vllm_moeplace.trace import save_trace

    tr = tmp_path / "t.npz"
    save_trace(tr, synth_trace(SynthConfig(num_layers=2, num_experts=16, top_k=2, num_tokens=500, seed=3)))
    out = tmp_path / "p.json"
    assert main(["solve", "--trace", str(tr), "--ep-size", "4", "--ranks-per-node", "2", "--objective", "balance",
                 "--out", str(out)]) == 0
    assert load_plan(out).solver["objective_name"] == "balance"
    assert main(["solve", "--trace", str(tr), "--ep-size", "4", "--ranks-per-node", "2", "--objective", "balance",
                 "--balance-risk", "1", "--out", str(tmp_path / "q.json")]) == 2
    assert "does not apply" in capsys.readouterr().err


def test_load_trace_validation(tmp_path):
    from vllm_moeplace.trace import TraceError

    with pytest.raises(TraceError, match="negative count"):
        LoadTrace(expert_load=-np.ones((1, 1, 2), dtype=np.int64), layer_ids=np.array([1], dtype=np.int32), num_experts=2)
