import json
import shutil
from pathlib import Path

import pytest
import torch

from moecompress.arch import moe_layers
from moecompress.inspect import inspect_checkpoint
from moecompress.zoo.tiny import tiny
from tests.helpers import run_cli, tiny_checkpoint


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_inspect_counts_match_the_model(family, tmp_path):
    path = tiny_checkpoint(tmp_path / "m", family)
    model, _ = tiny(family)
    ins = inspect_checkpoint(path)
    assert ins.total_params == sum(t.numel() for t in model.state_dict().values())  # params + saved buffers
    routed = sum(p.numel() for ly in moe_layers(model) for p in ly.experts.parameters())
    assert ins.groups["routed_experts"].params == routed
    assert ins.experts_per_layer == moe_layers(model)[0].num_experts
    assert ins.moe_layers == [ly.index for ly in moe_layers(model)]
    assert ins.total_bytes == 4 * ins.total_params  # float32
    assert ins.expert_fraction == pytest.approx(routed / ins.total_params)


def test_inspect_cli_json(tmp_path, capsys):
    path = tiny_checkpoint(tmp_path / "m")
    code, out, _ = run_cli(["inspect", path, "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["family"] == "qwen3_moe" and data["experts_per_layer"] == 4 and data["top_k"] == 2
    code, out, _ = run_cli(["inspect", path], capsys)
    assert code == 0 and "routed_experts" in out and "qwen3_moe" in out


# ---- config.json alone -------------------------------------------------------------------------------
REAL = Path(__file__).parent / "data" / "real-configs"
PUBLISHED = json.loads((REAL / "published.json").read_text())
REAL_CONFIGS = sorted(p.name for p in REAL.glob("*.json") if p.name != "published.json")


def config_only(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name.removesuffix(".json")
    d.mkdir()
    shutil.copy(REAL / name, d / "config.json")
    return d


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_inspect_real_config_alone(name, tmp_path, capsys):
    """Every real config: totals equal transformers' own meta count (built independently here) and the published
    size; active parameters within 5% of the card under one of the documented conventions."""
    folder = config_only(tmp_path, name)
    code, out, err = run_cli(["inspect", folder, "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    config = json.loads((REAL / name).read_text())
    import transformers

    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "auto_map"})
    auto = (transformers.AutoModelForImageTextToText if "text_config" in config else transformers.AutoModelForCausalLM)
    with torch.device("meta"):
        reference = auto.from_config(cfg)
    meta_count = sum(p.numel() for p in reference.parameters())
    assert abs(data["total_params"] - meta_count) <= 0.01 * meta_count
    assert sum(g["params"] for g in data["groups"].values()) == data["total_params"]
    assert sum(data["parts"].values()) == data["total_params"]
    assert data["experts_per_layer"] > data["top_k"] > 0 and data["moe_layers"]
    assert data["bytes_source"].startswith("config.json")
    pub = PUBLISHED.get(name)
    if pub:
        assert abs(data["total_params"] / 1e9 - pub["total"]) <= 0.01 * pub["total"]
        conventions = [data[k] / 1e9 for k in ("active_params", "active_params_no_embedding",
                                               "active_params_no_embedding_no_head")]
        assert min(abs(a - pub["active"]) for a in conventions) <= 0.05 * pub["active"], conventions
    assert data["total_params"] > data["active_params"] > data["active_params_no_embedding"]


def test_config_alone_matches_the_headers(tmp_path):
    """The same tiny checkpoint inspected from its headers and from its config alone agree group by group."""
    path = tiny_checkpoint(tmp_path / "m", "deepseek_v3")
    headers = inspect_checkpoint(path)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(path / "config.json", alone / "config.json")
    ins = inspect_checkpoint(alone)
    assert ins.bytes_source.startswith("config.json") and headers.bytes_source == "safetensors headers"
    for g in ("routed_experts", "shared_experts", "attention"):
        assert ins.groups[g].params == headers.groups[g].params, g
    assert ins.experts_per_layer == headers.experts_per_layer and ins.top_k == headers.top_k
    assert ins.moe_layers == headers.moe_layers and ins.routing_groups == headers.routing_groups == 2
    assert ins.active_params == pytest.approx(headers.active_params, rel=0.01)
    assert ins.total_bytes == pytest.approx(headers.total_bytes, rel=0.01)


def test_inspect_fp8_and_mxfp4_bytes(tmp_path):
    """Stored bytes follow the format: FP8 block ≈ 1 byte per expert weight (+ float32 scale per 128x128 block),
    MXFP4 = 4.25 bits per expert weight, bf16 elsewhere."""
    fp8 = inspect_checkpoint(config_only(tmp_path, "Qwen3-30B-A3B-FP8.json")).groups
    bf16 = inspect_checkpoint(config_only(tmp_path, "Qwen3-30B-A3B.json")).groups
    routed = bf16["routed_experts"].params
    assert bf16["routed_experts"].bytes == 2 * routed
    scales = 48 * 128 * (12 * 16 + 16 * 6) * 4  # per layer and expert: gate_up [1536/128, 2048/128] + down [16, 6]
    assert fp8["routed_experts"].bytes == routed + scales
    assert fp8["router"].bytes == bf16["router"].bytes  # listed in modules_to_not_convert
    gpt = inspect_checkpoint(config_only(tmp_path, "gpt-oss-120b.json")).groups["routed_experts"]
    biases = 36 * 128 * (5760 + 2880)
    assert gpt.bytes == (gpt.params - biases) * 17 // 32 + 2 * biases


def test_unsupported_family_is_inspected_with_a_note(tmp_path, capsys):
    folder = config_only(tmp_path, "Qwen3.5-35B-A3B.json")
    code, out, _ = run_cli(["inspect", folder], capsys)
    assert code == 0
    ins = inspect_checkpoint(folder)
    if ins.adapter:  # an adapter landed: nothing to degrade
        return
    assert "no moecompress adapter" in out and ins.parts["language_model"] < ins.total_params
    assert ins.groups["non_text"].params == ins.total_params - ins.parts["language_model"]
