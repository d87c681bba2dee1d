"""HEAPr atomic-expert pruning: exact streamed statistics, sensible selections, vanilla-loadable outputs."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from moecompress.arch import ExpertView, moe_layers
from moecompress.calib.data import CalibSpec
from moecompress.calib.gradients import collect_gradient_stats, next_token_loss
from moecompress.errors import UserError
from moecompress.passes.prune_atomic import (
    PruneAtomicConfig,
    global_selection,
    heapr_scores,
    heapr_scores_explicit,
    per_expert_selection,
)
from moecompress.runner import run_pass
from moecompress.zoo.tiny import FAMILIES, tiny, tiny_config
from tests.helpers import calib_file, run_cli, tiny_checkpoint

IDS = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[1, 14:] = 0  # right padding
MASK[2, 8:] = 0


def _batches():
    return [(IDS[:2], MASK[:2]), (IDS[2:], MASK[2:])]


def _reload(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert all(not v for v in info.values()), info
    return model.eval()


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _calib(tmp_path):
    return CalibSpec(source=str(calib_file(tmp_path / "calib.jsonl", n=40)), samples=6, seqlen=24)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_projected_score_equals_explicit_m_and_autograd(family):
    """Σ(gᵀw)² streamed per neuron == diag(Wᵀ M W) from the explicit H×H M == a plain autograd reference."""
    model, _ = tiny(family)
    layers = moe_layers(model)
    gs = collect_gradient_stats(model, _batches(), explicit_layers=[ly.index for ly in layers])
    for ly in layers:
        lg = gs.layers[ly.index]
        assert lg.n_tokens == int(MASK.sum())
        down = ExpertView(ly).get_all().down
        torch.testing.assert_close(heapr_scores(lg), heapr_scores_explicit(lg, down), rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(heapr_scores(lg, False), heapr_scores_explicit(lg, down, False), rtol=1e-9,
                                   atol=1e-15)

    # independent reference: library eager experts, gradient retained at the experts' output
    model.set_experts_implementation("eager")
    seen: dict[int, list] = {}

    def keep_grad(module, args, out, index):
        out.retain_grad()
        seen.setdefault(index, []).append((args, out))

    handles = [ly.experts.register_forward_hook(lambda m, a, o, i=ly.index: keep_grad(m, a, o, i)) for ly in layers]
    for ids, mask in _batches():
        next_token_loss(model(ids, attention_mask=mask).logits, ids, mask).backward()
    for h in handles:
        h.remove()
    flat_mask = [m.reshape(-1).bool() for _, m in _batches()]
    for ly in layers:
        want = torch.zeros_like(gs.layers[ly.index].proj_sq)
        for (args, out), real in zip(seen[ly.index], flat_mask, strict=True):
            _, index, weights = args
            for t in torch.nonzero(real).flatten().tolist():
                for j in range(index.shape[1]):
                    e = int(index[t, j])
                    g = float(weights[t, j].detach()) * out.grad[t].double()
                    want[e] += (g @ ExpertView(ly).get_all().down[e].double()) ** 2
        torch.testing.assert_close(gs.layers[ly.index].proj_sq, want, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("qwen3_moe", "deepseek_v3", "llama4_text")])
def test_streamed_statistics_on_every_family(family):
    """Every family's routed experts go through the gradient tap (layouts, biases, clamped SwiGLU, shared MLPs)."""
    model, _ = tiny(family)
    layers = moe_layers(model)
    gs = collect_gradient_stats(model, [(IDS[1:], MASK[1:])], explicit_layers=[ly.index for ly in layers])
    for ly in layers:
        lg = gs.layers[ly.index]
        assert lg.n_tokens == int(MASK[1:].sum())
        assert float(lg.freq.sum()) == lg.n_tokens * ly.adapter.top_k(model.config)  # padding masked
        assert float(lg.proj_sq.sum()) > 0
        torch.testing.assert_close(heapr_scores(lg), heapr_scores_explicit(lg, ExpertView(ly).get_all().down),
                                   rtol=1e-9, atol=1e-15)
        assert bool(ly.adapter.shared_width_coupled) == bool(lg.shared)


def test_layer_checkpointing_changes_nothing_and_state_is_restored():
    model, _ = tiny("qwen3_moe")
    before = _logits(model)
    impl = model.config._experts_implementation
    a = collect_gradient_stats(model, _batches(), checkpoint_layers=True)
    b = collect_gradient_stats(model, _batches(), checkpoint_layers=False)
    for i in a.layers:
        torch.testing.assert_close(a.layers[i].proj_sq, b.layers[i].proj_sq, rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(a.layers[i].act_sq, b.layers[i].act_sq)
        assert a.layers[i].freq.tolist() == b.layers[i].freq.tolist()
    assert model.config._experts_implementation == impl
    assert not any(ly.training for ly in model.model.layers)
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


def test_zero_down_column_scores_zero_and_is_pruned_first(tmp_path):
    model, tok = tiny("qwen3_moe")
    dead = {}
    for ly in moe_layers(model):
        with torch.no_grad():
            for e in range(ly.num_experts):
                ks = [(3 * e + ly.index + 4 * j) % 32 for j in range(8)]
                ly.experts.down_proj[e, :, ks] = 0
                dead[(ly.index, e)] = ks
    gs = collect_gradient_stats(model, _batches())
    scores = {ly.index: heapr_scores(gs.layers[ly.index]) for ly in moe_layers(model)}
    total = sum(s.numel() for s in scores.values())
    for (i, e), ks in dead.items():
        assert bool((scores[i][e, ks] == 0).all())
        assert int((scores[i][e] > 0).sum()) == 24  # every other neuron matters a little
        assert not per_expert_selection(scores[i], 24)[e, ks].any()
    kept = global_selection(scores, total - 8 * len(dead))
    assert all(not kept[i][e, ks].any() for (i, e), ks in dead.items())
    assert sum(int(m.sum()) for m in kept.values()) == total - 8 * len(dead)

    # through the pass: removing a quarter of the neurons removes exactly the dead ones
    from moecompress.io.checkpoint import write_checkpoint

    src = tmp_path / "src"
    write_checkpoint(model, tok, src, source=None, verify=False)
    out = tmp_path / "out"
    rep = run_pass(PruneAtomicConfig(neuron_ratio=0.25, criterion="heapr"), src, out, calibration=_calib(tmp_path))
    assert rep["details"]["width_after"] == 24
    again = _reload(out)
    for ly in moe_layers(again):
        assert bool((ExpertView(ly).get_all().down.abs().sum(1) > 0).all())


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_uniform_reloads_clean_and_masked_equals_uniform(family, tmp_path, cache_dir):
    src = tiny_checkpoint(tmp_path / "src", family)
    calib = _calib(tmp_path)
    uni = run_pass(PruneAtomicConfig(neuron_ratio=0.25), src, tmp_path / "uni", calibration=calib)
    assert uni["verify"]["loading_info"] and not any(uni["verify"]["loading_info"].values())
    assert uni["verify"]["max_abs_logit_diff"] < 1e-5  # reload == the in-memory pruned model
    assert uni["details"]["width_after"] == 24 and uni["params_after"] < uni["params_before"]
    m_uni = _reload(tmp_path / "uni")
    cfg = m_uni.config
    assert cfg.moe_intermediate_size == 24
    if family == "deepseek_v3":  # coupled shared width shrank with the routed width
        for ly in moe_layers(m_uni):
            assert ly.block.shared_experts.gate_proj.weight.shape[0] == 24 * cfg.n_shared_experts
    # the second run reuses the cached gradient statistics
    masked = run_pass(PruneAtomicConfig(neuron_ratio=0.25, layout="masked", ranking="per_expert"), src,
                      tmp_path / "masked", calibration=calib)
    assert masked["details"]["gradient_statistics"]["cache"] == "hit"
    m_masked = _reload(tmp_path / "masked")
    assert m_masked.config.moe_intermediate_size == 32 and masked["params_after"] == masked["params_before"]
    assert masked["details"]["nonzero_params"] == uni["details"]["nonzero_params"]
    torch.testing.assert_close(_logits(m_masked), _logits(m_uni), atol=1e-5, rtol=1e-5)

    # global ranking: uneven widths, same neuron budget, reported per expert
    glob = run_pass(PruneAtomicConfig(neuron_ratio=0.25, layout="masked"), src, tmp_path / "global",
                    calibration=calib)
    g = glob["details"]["global_ranking"]
    kept = [c for counts in g["kept_per_expert"].values() for c in counts]
    assert sum(kept) == 24 * len(kept)
    assert glob["details"]["nonzero_params"] == uni["details"]["nonzero_params"]
    _reload(tmp_path / "global")


@pytest.mark.parametrize("criterion", ["camera", "magnitude", "random"])
def test_other_atomic_criteria_and_combined_expert_pruning(criterion, tmp_path, cache_dir):
    src = tiny_checkpoint(tmp_path / "src", "deepseek_v3")
    rep = run_pass(PruneAtomicConfig(neuron_ratio=0.5, criterion=criterion, expert_ratio=0.5), src,
                   tmp_path / "out", calibration=_calib(tmp_path))
    assert rep["details"]["experts"]["experts_after"] == 4
    m = _reload(tmp_path / "out")
    assert (m.config.n_routed_experts, m.config.moe_intermediate_size) == (4, 16)


def test_camera_and_magnitude_rank_a_zero_column_last(tmp_path):
    from moecompress.calib.collect import collect_stats
    from moecompress.passes.prune_atomic import camera_scores, magnitude_scores

    model, _ = tiny("qwen3_moe")
    ly = moe_layers(model)[0]
    with torch.no_grad():
        ly.experts.down_proj[1, :, 5] = 0
    stats = collect_stats(model, _batches(), total_tokens=int(MASK.sum()))
    cam = camera_scores(stats.layers[ly.index], ExpertView(ly).get_all().down)
    mag = magnitude_scores(ly)
    assert cam[1, 5] == 0 and mag[1, 5] == 0
    assert int(cam[1].argmin()) == 5 and int(mag[1].argmin()) == 5


def test_preconditions_fail_before_weights_load(tmp_path, capsys):
    from moecompress.arch.adapter import ADAPTERS

    cfg = tiny_config("qwen3_moe").to_dict()
    with pytest.raises(UserError, match="no reduction"):
        PruneAtomicConfig(neuron_ratio=0.1).check(ADAPTERS["qwen3_moe"], cfg)  # 32 neurons → 28.8 → 32
    assert PruneAtomicConfig(neuron_ratio=0.99).new_width(32) == 8  # never below one multiple
    assert PruneAtomicConfig(neuron_ratio=0.1, width_multiple=4).new_width(32) == 28
    with pytest.raises(UserError, match="llama4_text"):
        PruneAtomicConfig(neuron_ratio=0.5).check(ADAPTERS["llama4_text"], tiny_config("llama4_text").to_dict())
    with pytest.raises(ValueError, match="masked"):
        PruneAtomicConfig(neuron_ratio=0.5, ranking="global")
    planned = PruneAtomicConfig(neuron_ratio=0.25, expert_ratio=0.5).planned_config(ADAPTERS["qwen3_moe"], cfg)
    assert (planned["moe_intermediate_size"], planned["num_experts"]) == (24, 2)

    src = tiny_checkpoint(tmp_path / "src")
    code, _, err = run_cli(["prune", src, "--out", tmp_path / "o", "--criterion", "heapr"], capsys)
    assert code == 2 and "--neuron-ratio" in err
    code, _, err = run_cli(["prune", src, "--out", tmp_path / "o", "--neuron-ratio", "0.25", "--criterion", "reap"],
                           capsys)
    assert code == 2 and "--expert-criterion reap" in err


def test_cli_neuron_ratio_end_to_end(tmp_path, cache_dir, capsys):
    src = tiny_checkpoint(tmp_path / "src")
    calib = calib_file(tmp_path / "calib.jsonl", n=40)
    code, out, err = run_cli(["prune", src, "--out", tmp_path / "o", "--neuron-ratio", "0.5", "--ratio", "0.5",
                              "--calib", calib, "--calib-samples", "4", "--calib-seqlen", "24"], capsys)
    assert code == 0, err
    m = _reload(tmp_path / "o")
    assert (m.config.num_experts, m.config.moe_intermediate_size) == (2, 16)
