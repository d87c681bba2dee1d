"""The quantize pass end to end: compressed-tensors checkpoints that reload exactly, and clear refusals."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.calib.data import CalibSpec
from moecompress.inspect import inspect_checkpoint
from moecompress.passes.quantize import QuantizeConfig
from moecompress.runner import run_pass
from tests.helpers import calib_file, run_cli, tiny_checkpoint


@pytest.mark.parametrize("family,opts", [
    ("qwen3_moe", {"method": "gptq", "bits": 4}),
    ("mixtral", {"method": "gptq", "bits": 3, "affinity": True}),
    ("deepseek_v3", {"method": "gptq", "bits": 4, "balance": True, "affinity": True, "attention": True}),
    ("qwen3_moe", {"method": "gptq", "bits": 4, "bits_budget": 3.5}),
])
def test_quantized_checkpoint_reloads_and_matches(family, opts, tmp_path, cache_dir):
    src = tiny_checkpoint(tmp_path / "m", family)
    spec = CalibSpec(source=str(calib_file(tmp_path / "c.jsonl")), samples=8, seqlen=32)
    report = run_pass(QuantizeConfig(group_size=32, **opts), src, tmp_path / "q", calibration=spec)
    assert report["verify"]["max_abs_logit_diff"] < 1e-4  # reload == in-memory dequantized model
    assert all(v == 0 for v in report["verify"]["loading_info"].values())
    assert report["bytes_after"] < 0.8 * report["bytes_before"]
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    ins = inspect_checkpoint(tmp_path / "q")
    packed = [t for t in ins.tensors if t.name.endswith("weight_packed")]
    assert packed and all(t.group == "routed_experts" or opts.get("attention") for t in packed)
    assert ins.groups["router"].bytes == 4 * ins.groups["router"].params  # router stays float32
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
    tokens = report["details"]["expert_tokens"]
    assert all(sum(v) > 0 for v in tokens.values())
    if "bits_budget" in opts:
        bits = [b for v in report["details"]["expert_bits"].values() for b in v]
        assert sum(bits) / len(bits) <= 3.5 + 1e-9 and len(set(bits)) > 1


def test_gptq_beats_rtn_on_layer_outputs(tmp_path, cache_dir):
    src = tiny_checkpoint(tmp_path / "m", "qwen3_moe")
    spec = CalibSpec(source=str(calib_file(tmp_path / "c.jsonl")), samples=8, seqlen=32)
    gptq = run_pass(QuantizeConfig(bits=3, group_size=32), src, tmp_path / "g", calibration=spec)
    rtn = run_pass(QuantizeConfig(bits=3, group_size=32, method="rtn"), src, tmp_path / "r", calibration=spec)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert gptq["details"]["mean_output_error"][proj] <= rtn["details"]["mean_output_error"][proj]


@pytest.mark.parametrize("args,expected", [
    (["--bits", "9"], "bits must be one of"),
    (["--bits", "1"], "bits must be one of"),
    (["--group-size", "0"], "group_size"),
    (["--group-size", "48"], "does not divide"),
    (["--method", "awq"], "method"),
])
def test_bad_quantize_options_refused_before_loading(args, expected, tmp_path, capsys, monkeypatch):
    src = tiny_checkpoint(tmp_path / "m")

    def boom(*a, **k):
        raise AssertionError("weights loaded before validation")

    monkeypatch.setattr("moecompress.runner.load_model", boom)
    code, _, err = run_cli(["quantize", src, "--out", tmp_path / "q", *args], capsys)
    assert code == 2 and expected in err, err
    assert not (tmp_path / "q").exists()


def test_fused_on_disk_family_refused(tmp_path, capsys):
    src = tiny_checkpoint(tmp_path / "m", "gpt_oss")
    code, _, err = run_cli(["quantize", src, "--out", tmp_path / "q"], capsys)
    assert code == 2 and "fused" in err


@pytest.mark.parametrize("opts", [{"method": "gptq", "bits": 4, "affinity": True},
                                  {"method": "gptq", "bits": 4, "bits_budget": 3.5}])
def test_experts_quantized_in_groups_equal_one_stack(opts, tmp_path, cache_dir, monkeypatch):
    """GPTQ runs a layer's experts in groups (bounded Hessian memory); one expert per group gives the same
    checkpoint as the whole layer in one stack: every expert's arithmetic is its own (allclose: batched linear
    algebra may pick other kernels for another batch size; tolerance 1e-6 on dequantized weights)."""
    import moecompress.passes.quantize as quantize_mod

    src = tiny_checkpoint(tmp_path / "m", "qwen3_moe")
    spec = CalibSpec(source=str(calib_file(tmp_path / "c.jsonl")), samples=8, seqlen=32)
    whole = run_pass(QuantizeConfig(group_size=32, **opts), src, tmp_path / "whole", calibration=spec)
    monkeypatch.setattr(quantize_mod, "HESSIAN_GROUP_BYTES", 1)
    grouped = run_pass(QuantizeConfig(group_size=32, **opts), src, tmp_path / "grouped", calibration=spec)
    assert grouped["details"]["expert_bits"] == whole["details"]["expert_bits"]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "grouped").state_dict()
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=k)
