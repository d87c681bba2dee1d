"""Bad input gets one clear message, exit code 2, and leaves nothing behind."""

import json

from transformers import LlamaConfig, LlamaForCausalLM

from tests.helpers import run_cli, tiny_checkpoint


def _no_leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name]


def test_dense_model_is_refused(tmp_path, capsys):
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    code, _, err = run_cli(["prune", tmp_path / "dense", "--out", tmp_path / "o", "--ratio", "0.5"], capsys)
    assert code == 2
    assert "not a supported Mixture-of-Experts family" in err and "qwen3_moe" in err
    assert not (tmp_path / "o").exists()


def test_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["inspect", tmp_path / "empty"], capsys)
    assert code == 2 and "no config.json" in err


def test_missing_folder(tmp_path, capsys):
    code, _, err = run_cli(["prune", tmp_path / "nope", "--out", tmp_path / "o", "--ratio", "0.5"], capsys)
    assert code == 2 and "does not exist" in err


def test_corrupt_safetensors(tmp_path, capsys):
    src = tiny_checkpoint(tmp_path / "m")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, _, err = run_cli(["inspect", src], capsys)
    assert code == 2 and "corrupt" in err
    code, _, err = run_cli(["prune", src, "--out", tmp_path / "o", "--ratio", "0.5", "--criterion", "random"], capsys)
    assert code == 2 and ("corrupt" in err or "could not load" in err)
    assert not (tmp_path / "o").exists() and not _no_leftovers(tmp_path)


def test_existing_output_refused_and_untouched(tmp_path, capsys):
    src = tiny_checkpoint(tmp_path / "m")
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(["prune", src, "--out", out, "--ratio", "0.5", "--criterion", "random"], capsys)
    assert code == 2 and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_ratio_below_top_k_refused_before_loading(tmp_path, capsys, monkeypatch):
    src = tiny_checkpoint(tmp_path / "m")  # 4 experts, top-2

    def boom(*a, **k):
        raise AssertionError("weights were loaded before validation")

    monkeypatch.setattr("moecompress.runner.load_model", boom)
    code, _, err = run_cli(["prune", src, "--out", tmp_path / "o", "--ratio", "0.75"], capsys)
    assert code == 2
    assert "fewer than the 2" in err and "ratio ≤ 0.5" in err
    assert not (tmp_path / "o").exists()


def test_input_checkpoint_never_modified(tmp_path, capsys):
    src = tiny_checkpoint(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    code, _, _ = run_cli(["prune", src, "--out", tmp_path / "o", "--ratio", "0.5", "--criterion", "random"], capsys)
    assert code == 0
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert json.loads((tmp_path / "o" / "moecompress.json").read_text())["passes"][-1]["pass"] == "prune_experts"
