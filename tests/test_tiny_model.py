"""The embedded default model builder: real HF checkpoints that transformers loads offline."""

import json

import pytest

from vllm_moeplace.cli.main import main
from vllm_moeplace.tiny_model import ARCHS, TinyModelSpec


@pytest.mark.parametrize("arch", ARCHS)
def test_builds_loadable_moe_checkpoint(tiny_model_factory, arch):
    import torch
    import transformers

    dense = 0 if arch in ("mixtral", "olmoe", "minimax_m2", "llama4", "gpt_oss") else 1
    path = tiny_model_factory(arch=arch, num_layers=3, first_dense_layers=dense, num_experts=8, top_k=1 if arch == "llama4" else 2)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == {"ernie45_moe": "ernie4_5_moe", "llama4": "llama4_text"}.get(arch, arch)
    meta = json.loads((path / "moeplace_tiny_model.json").read_text())
    assert meta["moe_layers"] == list(range(dense, 3))
    # the serving plugin's architecture table reads the same MoE layers and expert count
    from vllm_moeplace.cli.random_plan import model_moe_info

    assert model_moe_info(path)[1:] == (8, meta["moe_layers"])
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("def f(x): return x", return_tensors="pt").input_ids
    assert ids.shape[1] > 1
    out = model(ids).logits
    assert out.shape == (1, ids.shape[1], cfg["vocab_size"])
    assert torch.isfinite(out).all()


def test_deterministic_for_a_seed(tmp_path):
    from safetensors.numpy import load_file

    from vllm_moeplace.tiny_model import build_tiny_model

    a = load_file(build_tiny_model(tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(build_tiny_model(tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(build_tiny_model(tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a)


def test_cli_rejects_sizes_the_cpu_kernel_cannot_run(tmp_path, capsys):
    assert main(["tiny-model", "--out", str(tmp_path / "m"), "--hidden-size", "100"]) == 2
    assert "hidden_size=100 must be divisible by 32" in capsys.readouterr().err


def test_spec_rejects_all_dense():
    with pytest.raises(ValueError, match="first_dense_layers"):
        TinyModelSpec(num_layers=2, first_dense_layers=2).check()
