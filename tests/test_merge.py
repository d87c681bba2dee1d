"""merge_experts: merging math is exact where it must be, and merged checkpoints shrink and reload cleanly."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.arch import ExpertView, adapter_for, moe_layers
from moecompress.arch.experts import ExpertWeights
from moecompress.calib.collect import collect_stats
from moecompress.calib.data import CalibSpec
from moecompress.errors import UserError
from moecompress.io.checkpoint import check_model_dir
from moecompress.passes import merging as M
from moecompress.passes.base import PassContext
from moecompress.passes.merge_experts import MergeExpertsConfig, merge_experts
from moecompress.runner import RunOptions, run_pass
from moecompress.zoo.tiny import tiny
from tests.helpers import calib_file, run_cli, tiny_checkpoint

FAMILIES = ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss")
METHODS = ("msmoe", "hc", "kmeans", "ream")
IDS = torch.randint(0, 300, (8, 24), generator=torch.Generator().manual_seed(0))


def _stats(model):
    return collect_stats(model, [(IDS, torch.ones_like(IDS))], total_tokens=IDS.numel(), sample_tokens=192)


def _merge(model, tok, cfg, stats=None):
    stats = stats or _stats(model)
    ctx = PassContext(model=model, tokenizer=tok, adapter=adapter_for(model), config=cfg,
                      get_stats=lambda: stats, get_calibration=lambda: None)
    return merge_experts(ctx)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _keep(family: str) -> int:
    return 4 if family == "deepseek_v3" else 2  # deepseek_v3 tiny: 8 experts in 2 routing groups


# ---- exactness --------------------------------------------------------------------------------------------
def _with_duplicates(family: str):
    """Top-1 tiny model where, per routing block, a busy expert is copied over its neighbour (router row too).

    Top-1 with renormalised (or scaled-constant) weights makes the copy and its original interchangeable, so
    merging them must not change a single logit. DeepSeek-V3 picks every group (topk_group = n_group) because
    its group score sums the two best experts of a group, which a merge legitimately changes.
    """
    extra = {"topk_group": 2} if family == "deepseek_v3" else {}
    model, tok = tiny(family, num_experts_per_tok=1, **extra)
    stats = _stats(model)
    n_blocks = adapter_for(model).num_groups(model.config)
    pairs: dict[int, list[tuple[int, int]]] = {}
    for layer in moe_layers(model):
        freq = stats.layers[layer.index].sums["freq"]
        layer_pairs = []
        for block in M.routing_blocks(layer.num_experts, n_blocks):
            src = max(block, key=lambda i: float(freq[i]))
            layer_pairs.append((src, block[0] if src != block[0] else block[1]))
        pairs[layer.index] = layer_pairs
        view = ExpertView(layer)
        w = view.get_all().clone()
        weight = layer.router.weight.detach().clone()
        for src, dst in layer_pairs:
            for t in w.__dict__.values():
                if t is not None:
                    t[dst] = t[src]
            weight[dst] = weight[src]
            for vec in layer.adapter.router_vectors:
                owner = layer.router
                for part in vec.path.split("."):
                    owner = getattr(owner, part)
                owner.data.select(vec.axis, dst).copy_(owner.data.select(vec.axis, src))
        view.set_all(w)
        layer.router.weight.data.copy_(weight)
    return model, tok, pairs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rule", ["freq", "saliency", "subspace"])
def test_merging_identical_experts_keeps_outputs_exactly(family, rule):
    base, tok, pairs = _with_duplicates(family)
    want = _logits(base)
    stats = _stats(base)
    e = moe_layers(base)[0].num_experts
    n_pairs = len(next(iter(pairs.values())))
    for router in ("dominant", "average"):
        model = copy.deepcopy(base)
        details = _merge(model, tok, MergeExpertsConfig(keep=e - n_pairs, method="hc", merge=rule, router=router), stats)
        for idx, layer_pairs in pairs.items():
            groups = [sorted(g["members"]) for g in details["layers"][str(idx)]["groups"]]
            assert all(sorted(p) in groups for p in layer_pairs), (groups, layer_pairs)
        assert moe_layers(model)[0].num_experts == e - n_pairs
        torch.testing.assert_close(_logits(model), want, atol=2e-5, rtol=0)


def test_subspace_at_full_rank_equals_frequency_average():
    gen = torch.Generator().manual_seed(3)
    ws = ExpertWeights(gate=torch.randn(3, 8, 12, generator=gen), up=torch.randn(3, 8, 12, generator=gen),
                       down=torch.randn(3, 12, 8, generator=gen), gate_bias=torch.randn(3, 8, generator=gen),
                       up_bias=torch.randn(3, 8, generator=gen), down_bias=torch.randn(3, 12, generator=gen))
    coef = M.normalise(torch.tensor([5.0, 2.0, 1.0]))
    avg = M.merge_average(ws, coef)
    for kwargs in ({}, {"rank": 100}, {"energy": 1.0}):
        sub, _ = M.merge_subspace(ws, coef, **kwargs)
        for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
            torch.testing.assert_close(getattr(sub, name), getattr(avg, name), atol=1e-5, rtol=0)


def test_subspace_full_rank_pass_equals_freq_pass():
    base, tok = tiny("qwen3_moe")
    stats = _stats(base)
    out = {}
    for rule in ("freq", "subspace"):
        model = copy.deepcopy(base)
        _merge(model, tok, MergeExpertsConfig(keep=2, method="msmoe", merge=rule, router="average"), stats)
        out[rule] = _logits(model)
    torch.testing.assert_close(out["subspace"], out["freq"], atol=1e-5, rtol=0)


def test_lower_rank_gives_larger_reconstruction_error():
    gen = torch.Generator().manual_seed(4)
    mats = torch.randn(3, 16, 24, generator=gen)
    coef = M.normalise(torch.tensor([3.0, 2.0, 1.0]))
    exact = (mats.double() * coef.double()[:, None, None]).sum(0)
    errors = []
    for r in range(1, 17):
        rebuilt, used = M.subspace_merge_matrix(mats, coef, rank=r)
        assert used == r
        errors.append(float((rebuilt - exact).norm()))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-9
    by_energy = [M.subspace_merge_matrix(mats, coef, energy=e)[1] for e in (0.5, 0.8, 0.95, 0.999)]
    assert by_energy == sorted(by_energy) and by_energy[-1] <= 16


# ---- pieces ------------------------------------------------------------------------------------------------
def test_alignment_undoes_a_neuron_permutation():
    model, _ = tiny("gpt_oss")
    layer = moe_layers(model)[0]
    w = ExpertView(layer).get(0)
    perm = torch.randperm(w.width, generator=torch.Generator().manual_seed(1))
    shuffled = M.permute_neurons(w, perm)
    x = torch.randn(64, w.gate.shape[1])
    acts = [M.expert_outputs(layer.experts, layer.adapter.layout, M.stack([v]), x)[1][0] for v in (w, shuffled)]
    for mode in ("activation", "weight", "both"):
        p = M.align_permutation(w, shuffled, acts[0], acts[1], mode)
        back = M.permute_neurons(shuffled, p)
        torch.testing.assert_close(back.gate, w.gate)
        torch.testing.assert_close(back.down, w.down)
        torch.testing.assert_close(back.gate_bias, w.gate_bias)


def test_kmeans_groups_are_never_empty():
    feats = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 2)  # 2 distinct points, 3 clusters asked
    groups = M.group_kmeans(feats, torch.ones(6), n_keep=3)
    assert len(groups) == 3 and all(g.members for g in groups)
    assert sorted(m for g in groups for m in g.members) == list(range(6))


def test_groups_stay_inside_routing_blocks():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(8, 5, generator=gen)
    freq = torch.rand(8, generator=gen)
    sim = M.cosine_matrix(feats)
    for groups in (M.group_msmoe(freq, sim, 4, 2), M.group_hc(feats, freq, 4, 2), M.group_kmeans(feats, freq, 4, 2),
                   M.group_ream(freq, sim, 4, 2)):
        assert sorted(m for g in groups for m in g.members) == list(range(8))
        assert all(len({m // 4 for m in g.members}) == 1 for g in groups)
        assert sorted(g.anchor // 4 for g in groups) == [0, 0, 1, 1]
    ream = M.group_ream(freq, sim, 2, 1, group_size=4)
    assert all(len(g.members) <= 4 for g in ream)


# ---- every method on every family ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_and_router_on_family(family):
    base, tok = tiny(family)
    stats = _stats(base)
    keep = _keep(family)
    groups_n = adapter_for(base).num_groups(base.config)
    for i, method in enumerate(METHODS):
        router = ("dominant", "average", "refit")[i % 3]
        rule = ("freq", "saliency", "subspace")[i % 3]
        model = copy.deepcopy(base)
        cfg = MergeExpertsConfig(keep=keep, method=method, merge=rule, router=router,
                                 rank=8 if rule == "subspace" else None)
        details = _merge(model, tok, cfg, stats)
        assert adapter_for(model).num_experts(model.config) == keep
        for layer in moe_layers(model):
            assert layer.num_experts == keep == ExpertView(layer).get_all().gate.shape[0]
            groups = [g["members"] for g in details["layers"][str(layer.index)]["groups"]]
            e = moe_layers(base)[0].num_experts
            assert sorted(m for g in groups for m in g) == list(range(e))
            if groups_n > 1:
                size = e // groups_n
                assert all(len({m // size for m in g}) == 1 for g in groups)
        assert torch.isfinite(_logits(model)).all()
    # refit never fits the members' summed probabilities worse than the averaged rows it starts from
    model = copy.deepcopy(base)
    details = _merge(model, tok, MergeExpertsConfig(keep=keep, method="hc", router="refit"), stats)
    for info in details["layers"].values():
        assert info["refit_rel_error"] <= info["average_rel_error"] + 1e-9


@pytest.mark.parametrize("family,method,rule,router", [
    ("qwen3_moe", "hc", "freq", "refit"),
    ("mixtral", "msmoe", "saliency", "average"),
    ("deepseek_v3", "ream", "subspace", "refit"),
    ("gpt_oss", "kmeans", "freq", "refit"),
])
def test_run_pass_writes_clean_smaller_checkpoint(family, method, rule, router, tmp_path):
    src = tiny_checkpoint(tmp_path / "src", family)
    calib = CalibSpec(source=str(calib_file(tmp_path / "calib.jsonl", n=60)), samples=8, seqlen=32)
    hf_config, adapter = check_model_dir(src)
    e = adapter.num_experts(hf_config)
    cfg = MergeExpertsConfig(ratio=0.5, method=method, merge=rule, router=router,
                             energy=0.9 if rule == "subspace" else None)
    report = run_pass(cfg, src, tmp_path / "out", calibration=calib,
                      opts=RunOptions(plots=False, stats_cache=tmp_path / "stats"))
    assert report["verify"]["loading_info"] and not any(report["verify"]["loading_info"].values())
    assert report["verify"]["max_abs_logit_diff"] < 1e-4
    assert report["details"]["experts_after"] == e // 2
    assert report["bytes_after"] < report["bytes_before"] and report["params_after"] < report["params_before"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert adapter_for(again).num_experts(again.config) == e // 2


# ---- refusals ------------------------------------------------------------------------------------------------
def test_bad_ratio_refused_before_weights_load(tmp_path, capsys):
    src = tiny_checkpoint(tmp_path / "m")  # 4 experts, top-2
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # loading would fail loudly with another message
    code, _, err = run_cli(["merge", src, "--out", tmp_path / "o", "--ratio", "0.9"], capsys)
    assert code == 2 and "ratio 0.9" in err and "ratio ≤ 0.5" in err
    assert not (tmp_path / "o").exists()
    code, _, err = run_cli(["merge", src, "--out", tmp_path / "o", "--ratio", "0.5", "--rank", "4"], capsys)
    assert code == 2 and "subspace" in err


def test_group_limited_uneven_keep_refused(tmp_path):
    src = tiny_checkpoint(tmp_path / "ds", "deepseek_v3")  # 8 experts in 2 routing groups
    with pytest.raises(UserError, match="multiple of 2"):
        run_pass(MergeExpertsConfig(keep=5), src, tmp_path / "o")
