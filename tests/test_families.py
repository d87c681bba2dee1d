"""Coverage that cannot fall behind: every model type transformers ships with routed experts is either
compressed (adapter + surgery → write → vanilla reload round trip, below) or listed as unsupported with a reason."""

import json

import pytest
import torch

from moecompress import surgery
from moecompress.arch import adapter_for, moe_layers
from moecompress.arch.families import (
    derived_adapter,
    reference_config,
    routed_expert_model_types,
    unsupported_reason,
)
from moecompress.io.checkpoint import auto_class, write_checkpoint
from moecompress.zoo.miniature import build_miniature

ALL_TYPES = routed_expert_model_types()
SUPPORTED = [t for t in ALL_TYPES if unsupported_reason(t) is None]


def test_enumeration_finds_the_known_families():
    # a sanity floor: the scan reads modeling code, so it must see the long-standing families and the
    # encoder-decoder ones that the table excludes
    for t in ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4", "switch_transformers", "nllb_moe",
              "qwen3_5_moe", "gemma4", "nemotron_h"):
        assert t in ALL_TYPES
    assert len(ALL_TYPES) >= 70


@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_every_routed_expert_type_is_supported_or_explained(model_type):
    reason = unsupported_reason(model_type)
    if reason is not None:
        assert reason.strip() and "\n" not in reason
        return
    adapter = derived_adapter(model_type)
    assert adapter is not None, f"{model_type}: routed experts in its modeling code but no adapter could be derived"


def _default_config(model_type: str) -> dict:
    return reference_config(model_type)


def half_keep(adapter, config, n: int) -> list[int]:
    """Every second expert, the same count in every routing group."""
    groups = adapter.num_groups(config)
    size = n // groups
    return [g * size + i for g in range(groups) for i in range(0, size, 2)]


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_roundtrip_prune_reload(model_type, tmp_path):
    model = build_miniature(_default_config(model_type))
    adapter = adapter_for(model)
    layers = moe_layers(model)
    n = layers[0].num_experts
    keep = half_keep(adapter, model.config, n)
    surgery.keep_experts_everywhere(model, {ly.index: keep for ly in layers})
    write_checkpoint(model, None, tmp_path / "out", source=None)  # verifies reload: no missing keys, same logits
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert adapter.num_experts(saved) == len(keep)
    again = auto_class(saved).from_pretrained(tmp_path / "out")
    assert all(ly.num_experts == len(keep) for ly in moe_layers(again))


def test_calibration_statistics_of_declared_families_unchanged():
    """The observer at the experts call gives the statistics the 14 declared families had before adapters were
    derived (golden file made by tests/data/make_calib_golden.py from the previous code)."""
    import sys
    from pathlib import Path

    here = Path(__file__).parent / "data"
    sys.path.insert(0, str(here))
    try:
        from make_calib_golden import golden
    finally:
        sys.path.remove(str(here))
    want = json.loads((here / "calib_golden.json").read_text())
    got = golden()
    assert set(got) == set(want) and len(want) == 14
    for family, layers in want.items():
        assert set(got[family]) == set(layers), family
        for idx, sums in layers.items():
            for key, value in sums.items():
                if value is None:
                    assert got[family][idx][key] is None
                    continue
                if key in ("n_tokens", "freq"):  # integer counts: the same routing decisions, exactly
                    assert got[family][idx][key] == value, f"{family} layer {idx} {key}"
                    continue
                # fp32 sums over tokens whose kernels may run in another order since: compare at 1e-5 of the
                # row's scale (rounding is ~1e-7; a routing or formula change moves these by far more)
                want_t = torch.tensor(value, dtype=torch.float64)
                atol = 1e-5 * float(want_t.abs().max().clamp_min(1.0 if key == "sample_sum" else 0.0))
                if key == "easy_ep":  # g·||y||·(1 − cos) with 1 − cos of nearly parallel fp32 vectors: its error is
                    # a few fp32 eps per token weighted by g·||y||, i.e. bounded by eps · reap_sum
                    atol = float(torch.tensor(sums["reap_sum"]).max()) * 8 * torch.finfo(torch.float32).eps
                err = (torch.tensor(got[family][idx][key], dtype=torch.float64) - want_t).abs()
                assert bool((err <= atol).all()), f"{family} layer {idx} {key}: {err} > {atol}"


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_calibration_runs_through_the_whole_stack(model_type):
    """Statistics come from the experts call, so every supported family (hybrid stacks included) calibrates on
    CPU with no per-family routing code: each real token is routed to top-k experts in every MoE layer."""
    from moecompress.calib.collect import collect_stats

    model = build_miniature(_default_config(model_type))
    adapter = adapter_for(model)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    stats = collect_stats(model, [(ids, mask)], total_tokens=int(mask.sum()), sample_tokens=4)
    k = adapter.top_k(model.config)
    assert set(stats.layers) == {ly.index for ly in moe_layers(model)}
    for idx, ls in stats.layers.items():
        visits = int(mask.sum()) * _passes(adapter.text_config(model.config), idx)
        assert ls.n_tokens == visits
        assert float(ls.sums["freq"].sum()) == visits * k


def _passes(text_config, index: int) -> int:
    """How often a layer sees each token: looped stacks (Inkling-2-Loop) run layers start..end-1 several times."""
    start, end = (getattr(text_config, k, None) for k in ("loop_layer_index_start", "loop_layer_index_end"))
    if start is not None and end is not None and start <= index < end:
        return int(text_config.loop_num_passes)
    return 1
