import json

import pytest

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
