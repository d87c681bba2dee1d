"""Quantized sources: FP8 block-scaled and MXFP4 checkpoints in their exact on-disk layouts are read as the known
originals, pruned, written as bf16 and reloaded by vanilla transformers; broken ones fail in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moecompress.errors import UserError
from moecompress.io.checkpoint import load_model, source_format
from moecompress.io.source_formats import detect_source_format
from tests.helpers import calib_file, run_cli, tiny_checkpoint
from tests.source_checkpoints import fp8_checkpoint, mxfp4_checkpoint

BF16_REL = 2**-8  # one bf16 rounding of the known value


def read_all(path: Path):
    fmt = source_format(path)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return fmt, {k: fmt.read(k, f.get_tensor) for k in fmt.logical_keys()}


@pytest.mark.parametrize("family,block", [("qwen3_moe", (48, 48)), ("deepseek_v3", (128, 128)), ("mixtral", (32, 16))])
def test_fp8_reads_the_known_weights(family, block, tmp_path):
    known = fp8_checkpoint(tmp_path / "m", family, block=block)
    fmt, got = read_all(tmp_path / "m")
    assert fmt.name == "fp8" and not any(k.endswith("_scale_inv") for k in fmt.logical_keys())
    assert known and set(known) <= set(got)
    for key, want in known.items():
        assert got[key].dtype == torch.bfloat16
        err = float((got[key].float() - want).abs().max())
        assert err <= BF16_REL * float(want.abs().max()), key
    stored = load_file(tmp_path / "m" / "model.safetensors")
    assert torch.equal(got["model.embed_tokens.weight"], stored["model.embed_tokens.weight"])  # not converted


def test_mxfp4_reads_the_known_weights(tmp_path):
    known = mxfp4_checkpoint(tmp_path / "m")
    fmt, got = read_all(tmp_path / "m")
    assert fmt.name == "mxfp4" and not any(k.endswith(("_blocks", "_scales")) for k in fmt.logical_keys())
    for key, want in known.items():
        assert got[key].shape == want.shape
        assert torch.equal(got[key].float(), want)  # the FP4 grid × powers of two is exact in bf16


def test_in_memory_load_matches_the_reader(tmp_path):
    """load_model dequantizes through the reader (transformers' CPU path misreads FP8 edge blocks)."""
    known = fp8_checkpoint(tmp_path / "m", "qwen3_moe", block=(48, 48))
    loaded = load_model(tmp_path / "m")
    sd = loaded.model.state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert float((sd[q].float() - known[q]).abs().max()) <= BF16_REL * float(known[q].abs().max())
    fused = sd["model.layers.1.mlp.experts.gate_up_proj"]
    width = fused.shape[1] // 2
    for e in range(fused.shape[0]):
        want = known[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"]
        assert float((fused[e, :width].float() - want).abs().max()) <= BF16_REL * float(want.abs().max())
    assert getattr(loaded.model.config, "quantization_config", None) is None


@pytest.mark.parametrize("kind", ["fp8", "mxfp4"])
def test_round_trip_prune_write_vanilla_reload(kind, tmp_path, cache_dir, capsys):
    src = tmp_path / "src"
    known = fp8_checkpoint(src, "deepseek_v3", block=(32, 32)) if kind == "fp8" else mxfp4_checkpoint(src)
    out = tmp_path / "out"
    n_keep = 4 if kind == "fp8" else 2  # deepseek tiny: 8 experts in 2 routing groups
    code, _, err = run_cli(["prune", src, "--out", out, "--keep", str(n_keep), "--criterion", "frequency", "--no-heal",
                            "--calib", calib_file(tmp_path / "c.jsonl"), "--calib-samples", "8",
                            "--calib-seqlen", "32"], capsys)
    assert code == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    report = json.loads((out / "report.json").read_text())
    assert all(v == 0 for v in report["verify"]["loading_info"].values())  # vanilla reload: no missing keys
    assert report["engine"]["mode"] == "streamed"  # dequantized tensor by tensor by the engine's reader
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    kept = report["details"]["kept"]
    layer, experts = next(iter(kept.items()))
    if kind == "mxfp4":
        want = known[f"model.layers.{layer}.mlp.experts.down_proj"][experts]
        got = model.model.layers[int(layer)].mlp.experts.down_proj.detach().float()
        assert torch.equal(got, want)
    else:
        got = model.model.layers[int(layer)].mlp.experts.down_proj.detach().float()
        for i, e in enumerate(experts):
            want = known[f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"]
            assert float((got[i] - want).abs().max()) <= BF16_REL * float(want.abs().max())


def _rewrite(path: Path, fn) -> None:
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_broken_sources_fail_in_one_line(tmp_path, cache_dir, capsys):
    calib = calib_file(tmp_path / "c.jsonl")
    scale = "model.layers.1.mlp.experts.0.up_proj.weight_scale_inv"
    cases = {
        "missing-scale": lambda t: t.pop(scale),
        "wrong-shape": lambda t: t.__setitem__(scale, torch.ones(3, 5)),
    }
    for name, breaker in cases.items():
        src = tmp_path / name
        fp8_checkpoint(src, "qwen3_moe", block=(48, 48))
        _rewrite(src, breaker)
        code, _, err = run_cli(["prune", src, "--out", tmp_path / f"out-{name}", "--keep", "2", "--calib", calib],
                               capsys)
        assert code == 2 and ("missing" in err if name == "missing-scale" else "has shape [3, 5]" in err), err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / f"out-{name}").exists()
    truncated = tmp_path / "truncated"
    fp8_checkpoint(truncated, "qwen3_moe")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 1000])
    code, _, err = run_cli(["prune", truncated, "--out", tmp_path / "out-t", "--keep", "2", "--calib", calib], capsys)
    assert code == 2 and "truncated" in err and not (tmp_path / "out-t").exists()


def test_compressed_tensors_input_is_refused_not_misread(tmp_path, cache_dir, capsys):
    src = tiny_checkpoint(tmp_path / "m", "qwen3_moe")
    calib = calib_file(tmp_path / "c.jsonl")
    code, _, err = run_cli(["quantize", src, "--out", tmp_path / "q", "--bits", "4", "--group-size", "32",
                            "--method", "rtn", "--calib", calib, "--calib-samples", "4", "--calib-seqlen", "16"], capsys)
    assert code == 0, err
    for cmd in (["prune", tmp_path / "q", "--out", tmp_path / "p", "--keep", "2", "--calib", calib],
                ["plan", "prune", tmp_path / "q", "--keep", "2"]):
        code, _, err = run_cli(cmd, capsys)
        assert code == 2 and "compressed-tensors" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p").exists()


def test_detection_from_keys_and_config():
    fp8 = {"a.weight": ("F8_E4M3", [256, 256]), "a.weight_scale_inv": ("F32", [2, 2]), "n.weight": ("BF16", [256])}
    fmt = detect_source_format({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, fp8)
    fmt.validate()
    assert fmt.logical_keys() == ["a.weight", "n.weight"] and fmt.stored_keys("a.weight") == ["a.weight",
                                                                                               "a.weight_scale_inv"]
    with pytest.raises(UserError, match="no quantization_config"):
        detect_source_format({}, {"a.weight": ("F8_E4M3", [4, 4])})
    with pytest.raises(UserError, match="not a source format"):
        detect_source_format({"quantization_config": {"quant_method": "bitsandbytes"}}, [])
    assert detect_source_format({}, {"x": ("BF16", [2])}).name == "float"


@pytest.mark.parametrize("kind", ["fp8", "mxfp4"])
def test_inspect_counts_quantized_sources_like_their_config(kind, tmp_path):
    """From the headers (scales are not parameters, MXFP4 bytes hold two values) and from config.json alone."""
    import shutil

    from moecompress.inspect import inspect_checkpoint

    src = tmp_path / "m"
    fp8_checkpoint(src, "qwen3_moe", block=(32, 32)) if kind == "fp8" else mxfp4_checkpoint(src)
    headers = inspect_checkpoint(src)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(src / "config.json", alone / "config.json")
    config_only = inspect_checkpoint(alone)
    assert headers.bytes_source == "safetensors headers" and config_only.bytes_source.startswith("config.json")
    assert headers.groups["routed_experts"].params == config_only.groups["routed_experts"].params
    assert headers.groups["routed_experts"].bytes == pytest.approx(config_only.groups["routed_experts"].bytes,
                                                                   rel=0.02)


def test_fp8_source_to_our_w4_format(tmp_path, cache_dir, capsys):
    """Output as the user asks: quantize an FP8 source straight into compressed-tensors W4 (read as bf16 first)."""
    src = tmp_path / "m"
    fp8_checkpoint(src, "qwen3_moe", block=(32, 32))
    code, _, err = run_cli(["quantize", src, "--out", tmp_path / "q", "--bits", "4", "--group-size", "32",
                            "--method", "rtn", "--calib", calib_file(tmp_path / "c.jsonl"), "--calib-samples", "4",
                            "--calib-seqlen", "16", "--target", "vllm"], capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert all(v == 0 for v in report["verify"]["loading_info"].values())
