"""Coverage that cannot fall behind: every model type transformers ships with routed experts is either
compressed (adapter + surgery → write → vanilla reload round trip, below) or listed as unsupported with a reason."""

import json

import pytest
import torch

from moecompress import surgery
from moecompress.arch import adapter_for, moe_layers
from moecompress.arch.adapter import decoder_layers
from moecompress.arch.families import (
    derived_adapter,
    reference_config,
    routed_expert_model_types,
    unsupported_reason,
)
from moecompress.arch.flat_experts import fuse_flat_experts
from moecompress.io.checkpoint import auto_class, read_config, write_checkpoint
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
    # a coupled expert set (JetMoE's attention experts) must reach the same count: the passes rank it by its own
    # routing statistics (test_attention_experts_cut_by_their_own_routing); here, with none, the same positions
    coupled = {ly.index: keep for ly in layers} if adapter.coupled is not None else None
    surgery.keep_experts_everywhere(model, {ly.index: keep for ly in layers}, coupled)
    write_checkpoint(model, None, tmp_path / "out", source=None)  # verifies reload: no missing keys, same logits
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert adapter.num_experts(saved) == len(keep)
    again = auto_class(saved).from_pretrained(tmp_path / "out")
    fuse_flat_experts(again)  # as moecompress loads it (DBRX: flattened experts viewed fused; a no-op elsewhere)
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
        # picks of zero-computation experts (LongCat-Flash) are no routed expert's: counted apart
        assert float(ls.sums["freq"].sum()) + ls.extra_picks == visits * k


def _passes(text_config, index: int) -> int:
    """How often a layer sees each token: looped stacks (Inkling-2-Loop) run layers start..end-1 several times."""
    start, end = (getattr(text_config, k, None) for k in ("loop_layer_index_start", "loop_layer_index_end"))
    if start is not None and end is not None and start <= index < end:
        return int(text_config.loop_num_passes)
    return 1


# Routers scoring more classes than there are routed experts: Inkling (shared-expert gate rows), LongCat-Flash
# (zero-computation identity experts), ZAYA (a skip class). Their extra rows come last and must stay in place.
EXTRA_ROWS = ["inkling", "longcat_flash", "zaya"]


@pytest.mark.parametrize("model_type", EXTRA_ROWS)
def test_extra_router_rows_stay_in_place(model_type):
    model = build_miniature(_default_config(model_type))
    adapter = adapter_for(model)
    layers = moe_layers(model)
    n, extra = layers[0].num_experts, layers[0].extra_rows
    assert extra >= 1 and adapter.router_extra_rows == extra
    before = {ly.index: (ly.router.weight.detach().clone(), [p.detach().clone() for p in _vectors(ly)])
              for ly in layers}
    keep = list(range(1, n, 2))
    surgery.keep_experts_everywhere(model, {ly.index: keep for ly in layers})
    for ly in moe_layers(model):
        w, vecs = before[ly.index]
        assert ly.num_experts == len(keep) and ly.extra_rows == extra
        assert torch.equal(ly.router.weight, torch.cat([w[keep], w[n:]]))  # routed rows picked, extras untouched
        for old, new in zip(vecs, _vectors(ly), strict=True):
            assert torch.equal(new, torch.cat([old[keep], old[n:]]))
        for mod in ly.block.modules():  # cached class totals follow: routed + extra
            for name in ("total_experts", "num_router_classes", "n_total_experts", "n_routed_experts"):
                if isinstance(getattr(mod, name, None), int):
                    assert getattr(mod, name) in (len(keep), len(keep) + extra), (name, getattr(mod, name))
    # the config's extra count is unchanged; the routed count is the kept one
    text = adapter.text_config(model.config)
    assert adapter.num_experts(model.config) == len(keep)
    for key in ("zero_expert_num", "n_shared_experts"):
        if hasattr(text, key):
            assert getattr(text, key) == extra
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(model(ids).logits).all()


def _vectors(layer):
    out = []
    for vec in (*layer.adapter.router_vectors, *layer.adapter.block_vectors):
        owner = layer.router if vec in layer.adapter.router_vectors else layer.block
        t = owner.get_parameter(vec.path) if vec.path in dict(owner.named_parameters()) else owner.get_buffer(vec.path)
        if t.shape[vec.axis] > layer.num_experts:
            out.append(t.movedim(vec.axis, 0))
    return out


@pytest.mark.parametrize("model_type", ["inkling", "longcat_flash"])
def test_pruning_with_extra_rows_equals_never_choosing_the_dropped_experts(model_type):
    """Dropped experts whose router logits are hugely negative are never chosen and weigh nothing: the pruned block
    must then give the same output as the unpruned one, so top-k over the kept + extra rows (LongCat's zero experts
    indexed after the routed ones, Inkling's shared gates) routes exactly as before."""
    model = build_miniature(_default_config(model_type)).float()
    layer = moe_layers(model)[0]
    n = layer.num_experts
    keep = list(range(0, n, 2))
    drop = [e for e in range(n) if e not in keep]
    d = torch.nn.functional.normalize(torch.randn(layer.router.weight.shape[1], generator=torch.Generator().manual_seed(0)),
                                      dim=0)
    x = (8 * d + 0.05 * torch.randn(1, 24, d.numel(), generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        layer.router.weight[drop] = -100 * d  # logit ≈ −800 on these inputs: softmax/sigmoid give exactly 0
        want = layer.block(x)
    want = want[0] if isinstance(want, tuple) else want
    surgery.keep_experts(layer, keep)
    with torch.no_grad():
        got = layer.block(x)
    got = got[0] if isinstance(got, tuple) else got
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_zero_computation_experts_in_the_tap():
    """LongCat-Flash's router hands indices past the routed experts (identity experts) to the experts call: the
    tap gives the family's own output and counts those picks apart from every expert's."""
    from moecompress.calib.collect import collecting

    model = build_miniature(_default_config("longcat_flash")).float()
    layer = moe_layers(model)[0]
    n, extra = layer.num_experts, layer.extra_rows
    x = torch.randn(40, layer.router.weight.shape[1], generator=torch.Generator().manual_seed(0))
    index = torch.stack([torch.arange(40) % (n + extra), (torch.arange(40) + 5) % (n + extra)], dim=1)
    weights = torch.rand(40, 2, generator=torch.Generator().manual_seed(1))
    want = layer.experts(x, index, weights)
    n_extra = int((index >= n).sum())
    assert n_extra > 0
    with collecting(model, sample_tokens=0, total_tokens=40) as taps:
        got = layer.experts(x, index, weights)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    stats = taps[layer.index].stats
    assert stats.extra_picks == n_extra and float(stats.sums["freq"].sum()) == 80 - n_extra


def test_hash_routing_table_remapped_on_pruning():
    """DeepSeek-V4's first layers pick experts by token id (tid2eid [vocab, k]). After pruning, ids are the kept
    experts' new positions, every token still has k distinct experts, and a token whose experts were all kept
    routes to the same experts with the same weights: its block output is unchanged."""
    model = build_miniature(_default_config("deepseek_v4")).float()
    layer = moe_layers(model)[0]
    gate = layer.router
    assert layer.adapter.expert_id_tables and hasattr(gate, "tid2eid")
    table = gate.tid2eid.clone()
    n = layer.num_experts
    assert bool((table.sort(1).values[:, 1:] != table.sort(1).values[:, :-1]).all())  # the miniature's are distinct
    keep = list(range(0, n, 2))
    ids = torch.arange(table.shape[0])[None, :]
    x = torch.randn(1, ids.shape[1], gate.weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = layer.block(x, input_ids=ids)
    surgery.keep_experts(layer, keep)
    new = gate.tid2eid
    assert new.shape == table.shape and int(new.min()) >= 0 and int(new.max()) < len(keep)
    assert bool((new.sort(1).values[:, 1:] != new.sort(1).values[:, :-1]).all())  # still k distinct per token
    pos = {e: i for i, e in enumerate(keep)}
    kept_rows = torch.isin(table, torch.tensor(keep)).all(1)
    assert int(kept_rows.sum()) > 0
    for t in kept_rows.nonzero().squeeze(1).tolist():
        assert new[t].tolist() == [pos[e] for e in table[t].tolist()]
    with torch.no_grad():
        got = layer.block(x, input_ids=ids)
    assert torch.allclose(got[0, kept_rows], want[0, kept_rows], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0, ~kept_rows], want[0, ~kept_rows], rtol=1e-5, atol=1e-6)


def test_remap_expert_ids_picks_the_nearest_unused_kept_expert():
    rows = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    table = torch.tensor([[0, 2], [1, 0], [3, 2], [1, 3]])
    # keep experts 0 and 2 (new positions 0, 1): 1 is nearest 0, 3 is nearest 2, but a token never gets one
    # twice: token 1 already has 0, so its 1 goes to 2; token 2 already has 2, so its 3 goes to 0
    got = surgery.remap_expert_ids(table, torch.tensor([0, 2]), rows)
    assert got.tolist() == [[0, 1], [1, 0], [0, 1], [0, 1]]


def test_flattened_experts_saved_in_their_own_layout(tmp_path):
    """DBRX keeps experts as flattened [E*I, H] matrices: moecompress views them fused (same forward), prunes, and
    writes mlp.w1 / v1 / w2 back flattened for the kept experts — a vanilla reload gives the same logits."""
    from safetensors import safe_open

    from moecompress.arch.flat_experts import FusedFlatExperts

    model = build_miniature(_default_config("dbrx"))
    layers = moe_layers(model)
    assert all(isinstance(ly.experts, FusedFlatExperts) for ly in layers)
    n = layers[0].num_experts
    w = layers[0].experts.gate_up_proj.detach().clone()
    keep = list(range(0, n, 2))
    surgery.keep_experts_everywhere(model, {ly.index: keep for ly in layers})
    write_checkpoint(model, None, tmp_path / "out", source=None)  # vanilla reload, same logits
    with safe_open(str(next((tmp_path / "out").glob("*.safetensors"))), "pt") as fh:
        names = list(fh.keys())  # noqa: SIM118
        w1 = fh.get_tensor("transformer.blocks.0.ffn.experts.mlp.w1")
    assert not any("gate_up_proj" in k or "down_proj" in k for k in names)
    i = w.shape[1] // 2
    assert torch.equal(w1, w[keep, :i].reshape(len(keep) * i, -1).to(w1.dtype))
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["ffn_config"]["moe_num_experts"] == len(keep)


def test_skip_class_picks_are_no_experts():
    """ZAYA's router may pick its skip class (the extra router row); the block then hands expert 0 with weight 0 to
    the experts. Those picks count apart, not as expert 0's (which would halve its REAP mean)."""
    from moecompress.calib.collect import collect_stats

    model = build_miniature(_default_config("zaya"))
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    layers = moe_layers(model)
    with torch.no_grad():
        layers[-1].block.gate.balancing_biases[-1] = 10.0  # the last layer always skips
    stats = collect_stats(model, [(ids, mask)], total_tokens=20, sample_tokens=0)
    last, first = stats.layers[layers[-1].index], stats.layers[layers[0].index]
    assert last.extra_picks == 20 and float(last.sums["freq"].sum()) == 0
    assert first.extra_picks == 0 and float(first.sums["freq"].sum()) == 20


def test_stacked_shared_experts_narrow_with_the_routed_width(tmp_path):
    """Inkling's shared experts are stacked [S, I, H] parameters sized by the routed experts' width key: narrowing
    the routed experts narrows them too (each keeps its largest neurons), and the checkpoint reloads."""
    model = build_miniature(_default_config("inkling"))
    adapter = adapter_for(model)
    assert adapter.shared_width_coupled
    layers = moe_layers(model)
    w = layers[0].experts.down_proj.shape[-1]
    new = w // 2
    for ly in layers:
        surgery.shrink_neurons(ly, torch.arange(new).repeat(ly.num_experts, 1))
    surgery.sync_config(model)
    shared = layers[0].block.shared_experts
    assert shared.gate_proj.shape[1] == shared.up_proj.shape[1] == shared.down_proj.shape[2] == new
    write_checkpoint(model, None, tmp_path / "out", source=None)  # vanilla reload, same logits
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert adapter.expert_width(saved) == new


# ---- JetMoE: one num_local_experts sizes the MLP experts and the attention experts (MoA) ------------------------
ROUTED_MOA = [1, 2, 5, 6]


MOA_IDS = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))


def _jetmoe_with_idle_attention_experts():
    """A JetMoE miniature whose attention router can only ever pick experts 1, 2, 5, 6: each layer's attention input
    keeps two coordinates a, b (the input norm's other weights zeroed; chosen where the tokens of MOA_IDS take both
    signs), and only rows 1, 2 (±10 on a) and 5, 6 (±10 on b) of the attention router read them: every token goes
    to one of {1, 2} and one of {5, 6}, the other four experts score 0 and are never in its top 2."""
    model = build_miniature(_default_config("jetmoe")).float()
    spec = adapter_for(model).coupled
    assert spec is not None
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(model)):
            hidden = model(MOA_IDS, output_hidden_states=True).hidden_states[i]  # this layer's input, as built so far
            a, b = ((hidden > 0).double().mean((0, 1)) - 0.5).abs().argsort()[:2].tolist()
            layer.input_layernorm.weight.zero_()
            layer.input_layernorm.weight[[a, b]] = 1.0
            rows = layer.get_submodule(f"{spec.path}.{spec.router}").weight
            rows.zero_()
            rows[ROUTED_MOA, [a, a, b, b]] = torch.tensor([10.0, -10.0, 10.0, -10.0])
    return model


def _moa(layer):
    return layer.self_attention.experts


@pytest.mark.parametrize("pass_name", ["prune_experts", "merge_experts"])
def test_attention_experts_cut_by_their_own_routing(pass_name, tmp_path):
    """Pruning or merging JetMoE's MLP experts cuts its attention experts to the same count (one config key sizes
    both); the kept attention experts are those their own router used on the calibration tokens, whatever the MLP
    criterion keeps, and the checkpoint reloads in vanilla transformers with that count everywhere."""
    from moecompress.calib.collect import collect_stats
    from moecompress.calib.stats import Stats
    from moecompress.passes.base import PassContext
    from moecompress.passes.merge_experts import MergeExpertsConfig, merge_experts
    from moecompress.passes.prune_experts import PruneExpertsConfig, prune_experts

    model = _jetmoe_with_idle_attention_experts()
    adapter = adapter_for(model)
    ids = MOA_IDS
    stats = collect_stats(model, [(ids, torch.ones_like(ids))], total_tokens=ids.numel(), sample_tokens=64)
    idle = [e for e in range(8) if e not in ROUTED_MOA]
    for ls in stats.layers.values():  # every real token picked two attention experts, all among the routed four
        assert float(ls.sums["coupled_freq"].sum()) == 2 * ids.numel()
        assert float(ls.sums["coupled_freq"][idle].sum()) == 0 and float(ls.sums["coupled_freq"][ROUTED_MOA].min()) > 0
    stats.save(tmp_path / "stats")  # the attention experts' statistics survive the statistics cache
    stats = Stats.load(tmp_path / "stats")
    assert all(torch.equal(ls.sums["coupled_freq"].sum(), torch.tensor(2.0 * ids.numel(), dtype=torch.float64))
               for ls in stats.layers.values())
    before = {i: _moa(ly).router.layer.weight.detach().clone() for i, ly in enumerate(decoder_layers(model))}
    cfg = (PruneExpertsConfig(ratio=0.5, criterion="frequency") if pass_name == "prune_experts"
           else MergeExpertsConfig(ratio=0.5))
    ctx = PassContext(model=model, tokenizer=None, adapter=adapter, config=cfg, get_stats=lambda: stats,
                      get_calibration=lambda: None)
    details = (prune_experts if pass_name == "prune_experts" else merge_experts)(ctx)
    assert "attention experts reduced too" in details["coupled"] and "attention experts" in details["summary"]
    for ly in moe_layers(model):
        moa = _moa(decoder_layers(model)[ly.index])
        assert ly.num_experts == moa.num_experts == moa.router.num_experts == moa.input_linear.num_experts == 4
        assert moa.input_linear.weight.shape[0] == moa.output_linear.weight.shape[0] == 4
        assert torch.equal(moa.router.layer.weight, before[ly.index][ROUTED_MOA])
        moa_info = details["layers"][str(ly.index)]["attention_experts"]
        assert moa_info["kept"] == ROUTED_MOA and moa_info["removed_gate_mass"] == 0.0
    write_checkpoint(model, None, tmp_path / "out", source=None)  # vanilla reload: no key missing, same logits
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["num_local_experts"] == 4
    again = auto_class(saved).from_pretrained(tmp_path / "out")
    for layer in again.model.layers:
        assert layer.mlp.input_linear.weight.shape[0] == layer.self_attention.experts.input_linear.weight.shape[0] == 4


def test_attention_experts_left_uncut_are_refused():
    """A JetMoE model whose MLP experts were cut but not its attention experts cannot be written as one config."""
    from moecompress.errors import UserError

    model = build_miniature(_default_config("jetmoe"))
    layers = moe_layers(model)
    with pytest.raises(UserError, match="attention experts hold"):
        surgery.keep_experts_everywhere(model, {ly.index: [0, 2, 4, 6] for ly in layers})


def test_jetmoe_view_is_the_vanilla_model(tmp_path):
    """The fused view of JetMoE's MLP experts (top-k router, fused experts) gives vanilla JetMoE's logits and saves
    its tensor names; narrowing the MLP experts (HEAPr's surgery) leaves the attention experts' width alone."""
    model = build_miniature(_default_config("jetmoe"))
    cfg = model.config
    vanilla = type(model)(cfg).eval()
    assert vanilla.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = vanilla(ids).logits, model(ids).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    width, attn = cfg.intermediate_size, cfg.kv_channels * cfg.num_key_value_heads
    for ly in moe_layers(model):
        surgery.shrink_neurons(ly, torch.arange(width // 2).repeat(ly.num_experts, 1))
    surgery.sync_config(model)
    write_checkpoint(model, None, tmp_path / "out", source=None)  # vanilla reload, same logits
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["intermediate_size"] == width // 2 and saved["kv_channels"] * saved["num_key_value_heads"] == attn
def _ernie_vl_sets(model) -> list[tuple]:
    """(text_moe, vision_moe) of each MoE layer of an ERNIE-4.5-VL model."""
    return [(ly.block.text_moe, ly.block.vision_moe) for ly in moe_layers(model)]


def test_ernie_vl_vision_experts_follow_the_text_count(tmp_path):
    """ERNIE-4.5-VL: one moe_num_experts counts both expert sets, so pruning the text experts takes the vision
    experts (their router rows and e_score_correction_bias entries too) to the same count, ranked by the stated
    data-free score; the checkpoint reloads with the same logits on a sequence with image tokens, which run
    the vision experts."""
    model = build_miniature(_default_config("ernie4_5_vl_moe"))
    adapter = adapter_for(model)
    assert adapter.paired_sets == ("vision_moe",) and adapter.width_index == 0
    layers = moe_layers(model)
    n = layers[0].num_experts
    vision = [ly.paired()[0] for ly in layers]
    want = {ly.index: (v.experts.down_proj.detach().clone(), v.router.weight.detach().clone(),
                       v.router.moe_statics.e_score_correction_bias.detach().clone(), surgery.paired_keep(v, n // 2))
            for ly, v in zip(layers, vision, strict=True)}
    keep = list(range(0, n, 2))
    surgery.keep_experts_everywhere(model, {ly.index: keep for ly in layers})
    for ly, (text, vis) in zip(layers, _ernie_vl_sets(model), strict=True):
        down, rows, bias, kept = want[ly.index]
        assert kept != keep  # the vision set is ranked on its own, not by the text experts' indices
        assert text.experts.down_proj.shape[0] == vis.experts.down_proj.shape[0] == len(keep)
        assert vis.gate.weight.shape[0] == vis.experts.num_experts == vis.gate.num_experts == len(keep)
        assert torch.equal(vis.experts.down_proj, down[kept]) and torch.equal(vis.gate.weight, rows[kept])
        assert torch.equal(vis.gate.moe_statics.e_score_correction_bias, bias[:, kept])
    out = tmp_path / "out"
    write_checkpoint(model, None, out, source=None)  # vanilla reload, text logits equal
    saved = json.loads((out / "config.json").read_text())
    assert adapter.num_experts(saved) == len(keep)
    again, info = auto_class(saved).from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert all(t.experts.down_proj.shape[0] == v.experts.down_proj.shape[0] == len(keep)
               for t, v in _ernie_vl_sets(again))
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    kinds = torch.zeros_like(ids)
    kinds[:, 3:9] = 1  # image tokens: routed to the vision experts
    with torch.no_grad():
        a = model.eval()(input_ids=ids, moe_mm_token_type_ids=kinds).logits
        b = again.eval()(input_ids=ids, moe_mm_token_type_ids=kinds).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-5)


def test_ernie_vl_cli_prune_and_heapr_keep_the_vision_tower(tmp_path, capsys, monkeypatch):
    """Through the CLI: prune leaves both expert sets at the count the config says and says so in the report; the
    vision tower, resampler and processor files come out byte for byte; HEAPr narrows only the text experts."""
    from safetensors import safe_open

    from tests.helpers import calib_file, run_cli

    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(_default_config("ernie4_5_vl_moe")))
    mini = tmp_path / "mini"
    assert run_cli(["zoo", "miniature", cfg_file, "--out", mini], capsys)[0] == 0
    extra = {"preprocessor_config.json": '{"processor_class": "Ernie4_5_VLMoeProcessor"}\n',
             "chat_template.jinja": "{% for m in messages %}{{ m.content }}{% endfor %}\n"}
    for name, text in extra.items():
        (mini / name).write_text(text)
    from moecompress.inspect import inspect_checkpoint, inspect_config

    ins, conf = inspect_checkpoint(mini), inspect_config(read_config(mini))
    assert ins.moe_layers == [1] and ins.shared_experts and conf.shared_experts
    assert conf.layer_pattern == "1×attention/dense, 1×attention/moe 16x2"
    mod = build_miniature(read_config(mini))
    (text, vis), = _ernie_vl_sets(mod)
    routed = [sum(p.numel() for p in m.experts.parameters()) for m in (text, vis)]
    assert ins.groups["routed_experts"].params == conf.groups["routed_experts"].params == sum(routed)
    lm = sum(p.numel() for n, p in mod.named_parameters() if n.startswith("model.language_model."))
    assert conf.active_params == round(lm - sum(routed) + routed[0] * 2 / 16)  # a text token: 2 of 16 text experts
    calib = calib_file(tmp_path / "c.jsonl", n=20)
    common = ["--calib", calib, "--calib-samples", "4", "--calib-seqlen", "32"]
    # the engine reads big layers' experts a few at a time by id; the on-disk list holding both sets must not be
    monkeypatch.setattr("moecompress.engine.source.FILL_BYTES", 256)
    code, _, err = run_cli(["prune", mini, "--out", tmp_path / "p", "--ratio", "0.5", *common], capsys)
    assert code == 0, err
    code, _, err = run_cli(["prune", mini, "--out", tmp_path / "h", "--neuron-ratio", "0.5", "--criterion", "heapr",
                            *common], capsys)
    assert code == 0, err

    def tensors(folder) -> dict[str, bytes]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                    t = fh.get_tensor(k)
                    out[k] = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        return out

    before, after = tensors(mini), tensors(tmp_path / "p")
    tower = {k for k in before if not k.startswith("model.layers.")}
    assert any("vision" in k for k in tower) and any("resampler" in k for k in tower), sorted(tower)
    assert {k: after[k] for k in tower} == {k: before[k] for k in tower}
    for name, text in extra.items():
        assert (tmp_path / "p" / name).read_text() == text
    cfg0, cfg = read_config(mini), read_config(tmp_path / "p")
    n = cfg["text_config"]["moe_num_experts"]
    assert n == cfg0["text_config"]["moe_num_experts"] // 2
    assert cfg["text_config"]["moe_intermediate_size"] == cfg0["text_config"]["moe_intermediate_size"]
    model, info = auto_class(cfg).from_pretrained(tmp_path / "p", output_loading_info=True)
    assert not any(info.values()), info
    assert all(t.experts.down_proj.shape[0] == v.experts.down_proj.shape[0] == t.gate.weight.shape[0]
               == v.gate.weight.shape[0] == n for t, v in _ernie_vl_sets(model))
    report = json.loads((tmp_path / "p" / "report.json").read_text())["paired_experts"]
    assert "vision_moe experts" in report and "image/video quality was not measured" in report
    assert "vision_moe" in (tmp_path / "p" / "report.md").read_text()
    from moecompress.io.model_card import build_model_card

    assert report in str(build_model_card(tmp_path / "p", "me/ernie-vl-pruned"))
    widths0, widths = cfg0["text_config"]["moe_intermediate_size"], read_config(tmp_path / "h")["text_config"][
        "moe_intermediate_size"]
    assert widths[0] < widths0[0] and widths[1] == widths0[1]
    info = auto_class(cfg).from_pretrained(tmp_path / "h", output_loading_info=True)[1]
    assert not any(info.values()), info
