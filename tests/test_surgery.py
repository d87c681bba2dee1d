"""Foundation contract: for every family, surgery → write → vanilla reload is clean and exact."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress import surgery
from moecompress.arch import ExpertView, adapter_for, moe_layers
from moecompress.errors import UserError
from moecompress.io.checkpoint import write_checkpoint
from moecompress.zoo.tiny import FAMILIES, tiny

IDS = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def _keep_for(family: str, n: int) -> list[int]:
    adapter = adapter_for_family(family)
    if adapter.group_key and family in ("deepseek_v3", "glm4_moe", "dots1"):
        return [0, 2, 4, 7]  # 2 per group of 4
    return [0, 2] if n == 4 else list(range(0, n, 2))


def adapter_for_family(family):
    from moecompress.arch.adapter import ADAPTERS

    return ADAPTERS[family]


def _reload_equal(model, tok, path):
    with torch.no_grad():
        want = model(IDS).logits
    write_checkpoint(model, tok, path, source=None)
    again, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert all(not v for v in info.values()), info
    with torch.no_grad():
        got = again.eval()(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    return again


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_experts_reloads_exactly(family, tmp_path):
    model, tok = tiny(family)
    layers = moe_layers(model)
    keep = _keep_for(family, layers[0].num_experts)
    surgery.keep_experts_everywhere(model, {ly.index: keep for ly in layers})
    again = _reload_equal(model, tok, tmp_path / "out")
    adapter = adapter_for(again)
    assert adapter.num_experts(again.config) == len(keep)
    assert all(ly.num_experts == len(keep) for ly in moe_layers(again))


@pytest.mark.parametrize("family", FAMILIES)
def test_shrink_neurons_reloads_exactly(family, tmp_path):
    model, tok = tiny(family)
    layers = moe_layers(model)
    width = ExpertView(layers[0]).get_all().width
    gen = torch.Generator().manual_seed(1)
    for ly in layers:
        keep = torch.stack([torch.randperm(width, generator=gen)[: width // 2].sort().values
                            for _ in range(ly.num_experts)])
        surgery.shrink_neurons(ly, keep)
    surgery.sync_config(model)
    again = _reload_equal(model, tok, tmp_path / "out")
    assert adapter_for(again).expert_width(again.config) == width // 2


_NO_RENORM = pytest.mark.xfail(strict=True, reason="DeepSeek-V2 weights are softmax over all experts, never "
                               "renormalised: removing any expert rescales the rest (routing rule, not surgery)")


@pytest.mark.parametrize("family", [pytest.param(f, marks=_NO_RENORM) if f == "deepseek_v2" else f for f in FAMILIES])
def test_removing_unrouted_experts_changes_nothing(family):
    """A single token uses only top-k experts per layer; dropping unused ones must leave logits identical.

    Softmax routers that do not renormalise the top-k weights (qwen2_moe, olmoe, deepseek_v2 by default)
    divide by the mass of *all* experts, so removing even an unused expert rescales the others; that is the
    family's routing rule, not a surgery error, so those run with renormalisation on.
    """
    from moecompress.calib.collect import collect_stats

    extra = {"norm_topk_prob": True} if family in ("qwen2_moe", "olmoe", "deepseek_v2") else {}
    model, _ = tiny(family, **extra)
    ids = IDS[:1, :1]
    with torch.no_grad():
        before = model(ids).logits
    stats = collect_stats(model, [(ids, torch.ones_like(ids))], total_tokens=1)
    adapter = adapter_for(model)
    groups = adapter.num_groups(model.config)
    for ly in moe_layers(model):
        freq = stats.layers[ly.index].sums["freq"]
        e = ly.num_experts
        size = e // groups
        drop = []
        for g in range(groups):  # one unused expert per routing group keeps groups equal (trap b)
            unused = [i for i in range(g * size, (g + 1) * size) if freq[i] == 0]
            drop.append(unused[0])
        surgery.keep_experts(ly, [i for i in range(e) if i not in drop])
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "dots1"])
def test_group_limited_routers_keep_per_group_counts(family):
    model, _ = tiny(family)
    adapter = adapter_for(model)
    with pytest.raises(UserError, match="unevenly"):
        surgery.check_group_balance(adapter, model.config, 8, [0, 1, 2, 4])
    with pytest.raises(UserError, match="multiple of 2"):
        surgery.check_expert_count(adapter, model.config, 5)
    with pytest.raises(UserError, match="≥ 2 experts per group"):
        surgery.check_expert_count(adapter, model.config, 2)
    surgery.check_expert_count(adapter, model.config, 4)


def test_too_few_experts_refused_with_fix():
    model, _ = tiny("qwen3_moe")
    with pytest.raises(UserError, match=r"ratio ≤ 0\.5"):
        surgery.check_expert_count(adapter_for(model), model.config, 1)


def test_expert_view_roundtrip_every_layout():
    for family in ("qwen3_moe", "gpt_oss", "llama4_text"):
        model, _ = tiny(family)
        ly = moe_layers(model)[0]
        view = ExpertView(ly)
        before = {n: p.clone() for n, p in ly.experts.named_parameters()}
        w = view.get_all()
        w.gate[1] += 1.0
        view.set_all(w)
        assert torch.equal(view.get(1).gate, w.gate[1])
        w.gate[1] -= 1.0
        view.set_all(w)
        for n, p in ly.experts.named_parameters():
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)


def test_written_config_carries_every_expert_count_alias(tmp_path):
    """Qwen3-MoE is read as `num_experts` by older readers and `num_local_experts` by transformers 5."""
    import json

    model, tok = tiny("qwen3_moe")
    layers = moe_layers(model)
    surgery.keep_experts_everywhere(model, {ly.index: [0, 2, 3] for ly in layers})
    write_checkpoint(model, tok, tmp_path / "out", source=None)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_experts"] == cfg["num_local_experts"] == 3
