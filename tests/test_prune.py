"""Statistics are exact on known routing, criteria keep what matters, caches hit, pruned checkpoints reload."""

import pytest
import torch

from moecompress.arch import ExpertView, moe_layers
from moecompress.arch.experts import apply_expert
from moecompress.calib.collect import _ACTIVE, LayerTap, collect_stats, tap_experts_forward
from moecompress.calib.data import CalibSpec
from moecompress.calib.stats import LayerStats, Stats
from moecompress.passes import criteria
from moecompress.passes.prune_experts import PruneExpertsConfig
from moecompress.runner import run_pass
from moecompress.zoo.tiny import tiny
from tests.helpers import calib_file, run_cli, tiny_checkpoint


def test_statistics_exact_on_known_routing():
    model, _ = tiny("qwen3_moe")
    layer = moe_layers(model)[0]
    experts = layer.experts
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=gen)
    index = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [2, 1]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.5, 0.5], [0.8, 0.2]])
    tap = LayerTap(layer, sample_every=1, sample_cap=0)
    tap.mask = torch.tensor([True, True, True, True, False])  # last token is padding
    _ACTIVE[id(experts)] = tap
    try:
        with torch.no_grad():
            out = tap_experts_forward(experts, x, index, weights)
    finally:
        _ACTIVE.pop(id(experts))
    s = tap.stats.sums
    assert s["freq"].tolist() == [4, 2, 1, 1]
    torch.testing.assert_close(s["soft_freq"], torch.tensor([0.7 + 0.6 + 0.9 + 0.5, 0.3 + 0.1, 0.4, 0.5],
                                                            dtype=torch.float64))
    view = ExpertView(layer)
    want_reap = torch.zeros(4, dtype=torch.float64)
    want_out = torch.zeros(5, 64)
    for t in range(5):
        for j in range(2):
            e = int(index[t, j])
            y = apply_expert(experts, view.layout, view.get(e), x[t : t + 1])[0][0]
            want_out[t] += weights[t, j] * y
            if t < 4:
                want_reap[e] += float(weights[t, j]) * float(y.norm())
    torch.testing.assert_close(out, want_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(s["reap_sum"], want_reap, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(s["ean"], want_reap, atol=1e-6, rtol=1e-6)  # positive gates: same sum
    torch.testing.assert_close(tap.stats.reap, want_reap / torch.tensor([4.0, 2, 1, 1], dtype=torch.float64))


def test_padding_is_masked_in_a_full_forward():
    model, _ = tiny("mixtral")
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    stats = collect_stats(model, [(ids, mask)], total_tokens=int(mask.sum()))
    for ls in stats.layers.values():
        assert ls.sums["freq"].sum() == 2 * int(mask.sum())
        assert ls.n_tokens == int(mask.sum())
        assert ls.sample.shape[0] == int(mask.sum())


def test_sampled_block_inputs_keep_the_activations_dtype():
    """A bf16 model's sampled block inputs stay bf16 (exact, half the bytes held per layer until the sweep ends)."""
    model, _ = tiny("qwen3_moe")
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(4))
    stats = collect_stats(model, [(ids, torch.ones_like(ids))], total_tokens=ids.numel())
    for ls in stats.layers.values():
        assert ls.sample.dtype == torch.bfloat16 and ls.sample.shape[0] == ids.numel()


def _stats_with_dominant(e: int = 8, dominant: int = 5) -> LayerStats:
    ls = LayerStats(num_experts=e, hidden=4, width=4)
    ls.sums["freq"][dominant] = 1000
    ls.sums["soft_freq"][dominant] = 900
    ls.sums["reap_sum"][dominant] = 1800
    ls.sums["ean"][dominant] = 1800
    ls.sums["easy_ep"][dominant] = 50
    for i in range(e):
        if i != dominant:
            ls.sums["freq"][i] = 1
            ls.sums["soft_freq"][i] = 0.1 * (i + 1)
            ls.sums["reap_sum"][i] = 0.01 * (i + 1)
            ls.sums["ean"][i] = 0.01 * (i + 1)
            ls.sums["easy_ep"][i] = 0.001 * (i + 1)
    return ls


@pytest.mark.parametrize("criterion", criteria.SCORE_CRITERIA)
def test_scored_criteria_never_drop_the_expert_carrying_all_traffic(criterion):
    ls = _stats_with_dominant()
    for n_keep in (2, 4, 7):
        assert 5 in criteria.select_by_score(criteria.expert_scores(ls, criterion), n_keep)


def test_naee_keeps_the_expert_that_dominates_the_output(tmp_path):
    model, _ = tiny("qwen3_moe")
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    for ly in moe_layers(model):
        view = ExpertView(ly)
        w = view.get_all()
        w.down[3] *= 50.0  # expert 3's output dwarfs the others
        view.set_all(w)
    stats = collect_stats(model, [(ids, torch.ones_like(ids))], total_tokens=ids.numel())
    for ly in moe_layers(model):
        keep, info = criteria.naee_keep(ly, stats.layers[ly.index], 2)
        assert 3 in keep and info["search"] == "exhaustive"


def test_group_aware_selection_keeps_equal_counts_per_group():
    scores = torch.tensor([9.0, 8, 7, 6, 0.1, 0.2, 0.3, 0.4])
    assert criteria.select_by_score(scores, 4, groups=2) == [0, 1, 6, 7]


def test_super_experts_are_protected():
    ls = _stats_with_dominant()
    ls.sums["max_act"][:] = 1.0
    ls.sums["max_act"][2] = 500.0
    assert criteria.super_experts(ls, 10.0) == [2]
    kept = criteria.select_by_score(criteria.expert_scores(ls, "frequency"), 2, protect=[2])
    assert 2 in kept and 5 in kept


def test_stats_roundtrip_on_disk(tmp_path):
    model, _ = tiny("deepseek_v3")
    ids = torch.randint(0, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    stats = collect_stats(model, [(ids, torch.ones_like(ids))], total_tokens=16, meta={"x": 1})
    stats.save(tmp_path / "s")
    again = Stats.load(tmp_path / "s")
    assert again.meta["x"] == 1 and set(again.layers) == set(stats.layers)
    for i, ls in stats.layers.items():
        for k, v in ls.sums.items():
            assert torch.equal(again.layers[i].sums[k], v)
        assert torch.equal(again.layers[i].sample, ls.sample)


def test_same_spec_hits_the_cache_and_pruned_checkpoint_reloads(tmp_path, cache_dir, monkeypatch):
    src = tiny_checkpoint(tmp_path / "m")
    spec = CalibSpec(source=str(calib_file(tmp_path / "c.jsonl")), samples=8, seqlen=32)
    first = run_pass(PruneExpertsConfig(ratio=0.5, criterion="reap"), src, tmp_path / "a", calibration=spec)
    assert first["statistics"]["cache"] == "miss"
    assert first["verify"]["loading_info"] == {"missing_keys": 0, "unexpected_keys": 0, "mismatched_keys": 0,
                                               "error_msgs": 0}
    assert first["params_after"] < first["params_before"]

    def no_collect(*a, **k):
        raise AssertionError("statistics were recollected despite an identical spec")

    monkeypatch.setattr("moecompress.calib.collect.collect_stats", no_collect)
    second = run_pass(PruneExpertsConfig(ratio=0.25, criterion="ean"), src, tmp_path / "b", calibration=spec)
    assert second["statistics"]["cache"] == "hit"
    assert len(second["details"]["kept"]["0"]) == 3


@pytest.mark.parametrize("criterion", ["frequency", "soft_frequency", "reap", "ean", "easy_ep", "naee", "random"])
def test_every_criterion_from_the_cli(criterion, tmp_path, cache_dir, capsys):
    src = tiny_checkpoint(tmp_path / "m", "deepseek_v3")  # 8 experts in 2 routing groups, top-2
    data = calib_file(tmp_path / "c.jsonl")
    code, out, err = run_cli(["prune", src, "--out", tmp_path / "o", "--keep", "4", "--criterion", criterion,
                              "--calib", data, "--calib-samples", "8", "--calib-seqlen", "32"], capsys)
    assert code == 0, err
    import json

    report = json.loads((tmp_path / "o" / "report.json").read_text())
    for keep in report["details"]["kept"].values():
        assert len(keep) == 4 and sum(k < 4 for k in keep) == 2  # two per routing group
