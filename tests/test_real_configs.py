"""Every published config in shared/real-configs: the layer pattern is named from config.json alone, and its
miniature goes through the CLI (zoo miniature → prune --ratio 0.5 → vanilla reload). The full matrix (merge,
HEAPr, quantize too) is the slow test below and bench/families_bench.py."""

import json
from pathlib import Path

import pytest

from moecompress.arch.families import unsupported_reason
from moecompress.arch.layers import layer_pattern
from moecompress.io.checkpoint import auto_class, read_config
from moecompress.io.mtp import layout, unexpected_mtp
from tests.helpers import calib_file, run_cli

REAL = Path(__file__).parent / "data" / "real-configs"  # copies of shared/real-configs (SOURCES.md)
CONFIGS = sorted(p for p in REAL.glob("*.json") if p.name != "published.json")  # published.json: model-card numbers
pytestmark = pytest.mark.skipif(not CONFIGS, reason="tests/data/real-configs not present")
# What the real checkpoints are, as their model cards describe them (dense-first layers, hybrid periods, MTP).
EXPECTED_PATTERN = {
    "DeepSeek-V3": "3×attention/dense, 58×attention/moe (+1 MTP)",
    "Qwen3.5-35B-A3B": "10×[3×linear-attention/moe, 1×attention/moe] (+1 MTP)",
    "Qwen3-Next-80B-A3B-Thinking.RESERIALIZED": "12×[3×linear-attention/moe, 1×attention/moe]",
    "Mixtral-8x7B-v0.1": "32×attention/moe",
    "Llama-4-Maverick-17B-128E-Instruct": "24×[1×attention/dense, 1×attention/moe]",
}
EXPECTED_PARAMS_B = {"Qwen3-30B-A3B": 30.53, "Mixtral-8x7B-v0.1": 46.70, "gpt-oss-120b": 116.83, "DeepSeek-V3": 671.03,
                     "OLMoE-1B-7B-0924": 6.92, "Qwen3-235B-A22B": 235.09}  # SOURCES.md


def _supported(config: dict) -> bool:
    return unsupported_reason(config["model_type"]) is None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_layer_pattern_from_config_alone(path):
    config = json.loads(path.read_text())
    pattern = layer_pattern(config)
    assert pattern.layers and pattern.moe_layers
    if _supported(config):
        assert pattern.family is not None
    else:
        assert pattern.unsupported and "not supported" in pattern.unsupported
    if path.stem in EXPECTED_PATTERN:
        assert pattern.summary() == EXPECTED_PATTERN[path.stem]
    if path.stem in EXPECTED_PARAMS_B:
        assert abs(pattern.total_params / 1e9 - EXPECTED_PARAMS_B[path.stem]) < 0.01


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_miniature_prune_reload(path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    config = json.loads(path.read_text())
    mini = tmp_path / "mini"
    code, _, err = run_cli(["zoo", "miniature", path, "--out", mini], capsys)
    assert code == 0, err
    saved = read_config(mini)
    assert saved["model_type"] == config["model_type"]
    import transformers

    if all(hasattr(transformers, a) for a in config.get("architectures") or []):  # else: remote-code class names
        assert saved.get("architectures") == config.get("architectures")
    assert isinstance(saved.get("text_config"), dict) == isinstance(config.get("text_config"), dict)
    calib = calib_file(tmp_path / "c.jsonl", n=20)
    args = ["prune", mini, "--out", tmp_path / "p", "--ratio", "0.5", "--calib", calib, "--calib-samples", "4",
            "--calib-seqlen", "32"]
    code, _, err = run_cli(args, capsys)
    if not _supported(config):  # named in one line, exit 2, no traceback
        assert code == 2 and "not supported" in err and "Traceback" not in err
        return
    assert code == 0, err
    out_cfg = read_config(tmp_path / "p")
    model, info = auto_class(out_cfg).from_pretrained(tmp_path / "p", output_loading_info=True)
    # MTP layers are kept (tests/test_mtp.py); transformers ignores them by a pattern naming the real depth
    # (model.layers.61), so at the miniature's depth exactly the announced MTP keys come back as unexpected
    mtp, info["unexpected_keys"] = unexpected_mtp(out_cfg, info["unexpected_keys"])
    assert not any(info.values()), info
    lay = layout(saved)
    index = mini / "model.safetensors.index.json"
    if lay is not None and index.is_file() and any(map(lay.owns, json.loads(index.read_text())["weight_map"])):
        assert layout(out_cfg) is not None and layout(out_cfg).count == lay.count  # kept: the count is unchanged


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_full_pass_matrix(path, tmp_path, monkeypatch):
    import sys

    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from families_bench import run_config

    config = json.loads(path.read_text())
    row = run_config(path.stem, config, tmp_path, calib_file(tmp_path / "c.jsonl", n=40))
    if not _supported(config):
        assert all(v.startswith("exit 2") for k, v in row.items() if k in ("prune", "merge", "heapr", "quantize"))
        return
    bad = {k: v for k, v in row.items() if not k.endswith("_s") and v != "ok"}
    assert not bad, bad


# Families with adapters but no file in shared/real-configs: a config.json from transformers' own config class
# (its defaults at full size, as a user's checkpoint would carry) goes through the same one-line CLI path.
# Hybrid stacks, dense-first layers, multimodal wrappers and a family whose layers pass extra state.
NOT_IN_REAL = ["minimax_m2", "jamba", "granitemoehybrid", "lfm2_moe", "hunyuan_v1_moe", "glm4v_moe", "glm_moe_dsa",
               "phimoe", "inkling", "longcat_flash", "zaya", "qwen3_omni_moe", "deepseek_ocr2", "dbrx"]


@pytest.mark.parametrize("model_type", NOT_IN_REAL)
def test_default_config_miniature_prune_reload(model_type, tmp_path, capsys, monkeypatch):
    from moecompress.arch.families import reference_config

    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    assert model_type not in {json.loads(p.read_text())["model_type"] for p in CONFIGS}
    config = reference_config(model_type)
    assert config is not None and unsupported_reason(model_type) is None
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(config))
    mini = tmp_path / "mini"
    code, _, err = run_cli(["zoo", "miniature", cfg_file, "--out", mini], capsys)
    assert code == 0, err
    calib = calib_file(tmp_path / "c.jsonl", n=20)
    code, _, err = run_cli(["prune", mini, "--out", tmp_path / "p", "--ratio", "0.5", "--calib", calib,
                            "--calib-samples", "4", "--calib-seqlen", "32"], capsys)
    assert code == 0, err
    before, after = read_config(mini), read_config(tmp_path / "p")
    from moecompress.arch.adapter import adapter_for_config_dict

    adapter = adapter_for_config_dict(before)
    assert adapter.num_experts(after) == adapter.num_experts(before) // 2
    model, info = auto_class(after).from_pretrained(tmp_path / "p", output_loading_info=True)
    assert not any(info.values()), info


@pytest.mark.parametrize(("source", "lm_layers", "count_at"), [
    ("Llama-4-Scout-17B-16E-Instruct.TRIMMED", "language_model.model.layers.", ("text_config",)),
    ("Llama-4-Maverick-17B-128E-Instruct", "language_model.model.layers.", ("text_config",)),
    ("qwen3_omni_moe", "thinker.model.layers.", ("thinker_config", "text_config")),
    ("deepseek_ocr2", "model.layers.", ("text_config",)),
])
def test_multimodal_towers_carried_byte_identical(source, lm_layers, count_at, tmp_path, capsys, monkeypatch):
    """Multimodal checkpoints calibrated on text only (Llama-4 through its language model, Qwen3-Omni through its
    thinker): every tensor outside the language model's layers (vision/audio towers, projectors, embeddings, and
    Qwen3-Omni's speech talker with its own MoE stack) comes out of prune byte for byte as it went in; only the
    language model's expert count changes in the config."""
    import torch
    from safetensors import safe_open

    from moecompress.arch.families import reference_config

    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    cfg_file = REAL / f"{source}.json"
    if not cfg_file.is_file():  # no published config here: transformers' own defaults at full size
        cfg_file = tmp_path / "config.json"
        cfg_file.write_text(json.dumps(reference_config(source)))
    mini = tmp_path / "mini"
    assert run_cli(["zoo", "miniature", cfg_file, "--out", mini], capsys)[0] == 0
    calib = calib_file(tmp_path / "c.jsonl", n=20)
    code, _, err = run_cli(["prune", mini, "--out", tmp_path / "p", "--ratio", "0.5", "--calib", calib,
                            "--calib-samples", "4", "--calib-seqlen", "32"], capsys)
    assert code == 0, err

    def carried(folder: Path) -> dict[str, tuple]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                for k in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if lm_layers not in k:
                        t = fh.get_tensor(k)
                        out[k] = (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return out

    before, after = carried(mini), carried(tmp_path / "p")
    towers = [k for k in before if not any(w in k for w in ("embed_tokens", "lm_head", "model.norm"))]
    assert len(towers) > 4, sorted(before)  # vision/audio towers and projectors, not just embeddings
    assert before == after
    text_before, text_after = read_config(mini), read_config(tmp_path / "p")
    for step in count_at:  # every other part of the config on the way (vision, audio, talker) is untouched
        assert {k: v for k, v in text_after.items() if k != step} == {k: v for k, v in text_before.items() if k != step}
        text_before, text_after = text_before[step], text_after[step]
    changed = {k for k in text_before if text_before[k] != text_after.get(k)}
    assert changed and all("expert" in k for k in changed), changed


def test_hash_routing_tables_remapped_in_the_checkpoint(tmp_path, capsys, monkeypatch):
    """DeepSeek-V4-Flash: the pruned checkpoint's tid2eid tables (one per hash-routed layer) name only kept experts,
    k distinct ones per token, and the config keeps its hash-routed layers."""
    import torch
    from safetensors import safe_open

    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini = tmp_path / "mini"
    assert run_cli(["zoo", "miniature", REAL / "DeepSeek-V4-Flash.json", "--out", mini], capsys)[0] == 0
    calib = calib_file(tmp_path / "c.jsonl", n=20)
    code, _, err = run_cli(["prune", mini, "--out", tmp_path / "p", "--ratio", "0.5", "--calib", calib,
                            "--calib-samples", "4", "--calib-seqlen", "32"], capsys)
    assert code == 0, err
    cfg = read_config(tmp_path / "p")
    hashed = cfg["mlp_layer_types"].count("hash_moe")  # transformers writes num_hash_layers out as layer types
    assert cfg["mlp_layer_types"] == read_config(mini)["mlp_layer_types"] and hashed >= 1
    tables = {}
    for f in sorted((tmp_path / "p").glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            tables.update({k: fh.get_tensor(k) for k in fh.keys() if k.endswith("tid2eid")})  # noqa: SIM118
    assert len(tables) == hashed
    for t in tables.values():
        assert int(t.min()) >= 0 and int(t.max()) < cfg["n_routed_experts"]
        s = t.sort(1).values
        assert bool((s[:, 1:] != s[:, :-1]).all())
        assert torch.unique(t).numel() == cfg["n_routed_experts"]  # every kept expert still serves some tokens


@pytest.mark.parametrize("model_type", ["inkling", "longcat_flash", "zaya", "qwen3_omni_moe", "deepseek_ocr2", "dbrx"])
def test_default_config_inspect(model_type, tmp_path, capsys):
    """`moecompress inspect` on a folder holding only the config.json of a supported family (no real config here):
    it names the family, the routed-expert count and top-k (DBRX's sit in ffn_config, LongCat's experts keep extra
    gate/up rows), with no weight file read."""
    from moecompress.arch.families import reference_config

    config = reference_config(model_type)
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, err = run_cli(["inspect", tmp_path, "--json"], capsys)
    assert code == 0, err
    info = json.loads(out)
    text = json.dumps(info)
    assert model_type in text
    pattern = layer_pattern(config)
    assert pattern.family is not None and pattern.moe_layers


@pytest.mark.parametrize("name", ["gemma-4-26B-A4B"])
def test_heal_on_a_family_it_does_not_support_is_one_clear_message(name, tmp_path, capsys, monkeypatch):
    """`prune --heal` and `heal` where heal has no block to reconstruct (gemma-4's experts sit between norms inside
    the decoder layer): exit 2 with the reason, no traceback, nothing at --out, before the statistics sweep."""
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini = tmp_path / "mini"
    code, _, err = run_cli(["zoo", "miniature", REAL / f"{name}.json", "--out", mini], capsys)
    assert code == 0, err
    calib = calib_file(tmp_path / "c.jsonl", n=20)
    code, _, err = run_cli(["prune", mini, "--out", tmp_path / "p", "--ratio", "0.5", "--heal", "--calib", calib,
                            "--calib-samples", "4", "--calib-seqlen", "32"], capsys)
    assert code == 2 and "heal: not supported for" in err and "Traceback" not in err, err
    assert not (tmp_path / "p").exists()
    assert not list((tmp_path / "cache").rglob("*.safetensors")), "the statistics sweep ran before the check"
    # the in-memory walk (`moecompress heal` on an unhealed prune) stops the same way
    code, out, err = run_cli(["prune", mini, "--out", tmp_path / "u", "--ratio", "0.5", "--calib", calib,
                              "--calib-samples", "4", "--calib-seqlen", "32"], capsys)
    assert code == 0, err  # the default heal steps aside, says why, and the report keeps it
    skipped = json.loads((tmp_path / "u" / "report.json").read_text())["details"]["heal_skipped"]
    assert "heal: not supported for" in skipped and "running without heal" in " ".join((out + err).split())
    code, _, err = run_cli(["heal", tmp_path / "u", "--reference", mini, "--out", tmp_path / "h", "--calib", calib,
                            "--calib-samples", "4", "--calib-seqlen", "32"], capsys)
    assert code == 2 and "heal: not supported for" in err and "Traceback" not in err, err
    assert not (tmp_path / "h").exists()


def _shortened(config: dict, layers: int) -> dict:
    """A default config cut to its first `layers` decoder layers (every per-layer list with it): glm_moe_dsa's
    default has 78, and heal walks it by re-running the forward up to each MoE layer."""
    n = config["num_hidden_layers"]
    out = {k: (v[:layers] if isinstance(v, list) and len(v) == n else v) for k, v in config.items()}
    out["num_hidden_layers"] = layers
    return out


def _miniature(name: str, tmp_path: Path, capsys) -> Path:
    """The miniature of a real config (by file stem) or of a family's default config (by model type)."""
    from moecompress.arch.families import reference_config

    src = REAL / f"{name}.json"
    if not src.is_file():
        src = tmp_path / "config.json"
        config = reference_config(name)
        src.write_text(json.dumps(_shortened(config, 5) if config.get("num_hidden_layers", 0) > 40 else config))
    mini = tmp_path / "mini"
    code, _, err = run_cli(["zoo", "miniature", src, "--out", mini], capsys)
    assert code == 0, err
    return mini


# Families whose routing heal reads through the block itself (found crashing inside heal on 4 Dec 2026): hash
# routing by token id (DeepSeek-V4), routers needing the block's score bias (MiniMax-M2, LFM2), router outputs in
# other layouts (Hunyuan, DBRX, ZAYA), and layers handing the next one more than hidden states (GLM-DSA, ZAYA).
HEAL_THROUGH_BLOCK = ["DeepSeek-V4-Flash", "minimax_m2", "lfm2_moe", "hunyuan_v1_moe", "dbrx", "glm_moe_dsa", "zaya"]


@pytest.mark.parametrize("name", HEAL_THROUGH_BLOCK)
def test_heal_reads_routing_through_the_block(name, tmp_path, capsys, monkeypatch):
    """`prune --heal` on these miniatures: exit 0, a vanilla reload with zero loading-info entries, every MoE layer
    healed (hash-routed ones too) and none left worse on its held-out block error; and the routing heal reads
    reproduces the block: on blocks that add nothing besides their routed experts, the gate-weighted sum of the
    experts heal fits equals the block's own output (float32, relative 1e-5)."""
    import torch

    from moecompress.arch.adapter import adapter_for, moe_layers
    from moecompress.calib.layers import BlockArgs
    from moecompress.heal.fit import adds_more_than_routed, expert_tokens
    from moecompress.io.checkpoint import load_model
    from moecompress.passes.merge_experts import block_output

    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini = _miniature(name, tmp_path, capsys)
    calib = calib_file(tmp_path / "c.jsonl", n=40)
    code, _, err = run_cli(["prune", mini, "--out", tmp_path / "p", "--ratio", "0.5", "--heal", "--calib", calib,
                            "--calib-samples", "16", "--calib-seqlen", "32"], capsys)
    assert code == 0, err
    out_cfg = read_config(tmp_path / "p")
    _, info = auto_class(out_cfg).from_pretrained(tmp_path / "p", output_loading_info=True)
    _, info["unexpected_keys"] = unexpected_mtp(out_cfg, info["unexpected_keys"])
    assert not any(info.values()), info
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["verify"]["max_abs_logit_diff"] <= 1e-5  # the reload gives the logits the run had in memory
    heal = report["details"]["heal"]["layers"]
    model = load_model(mini, dtype="float32", tokenizer=False).model
    model.set_experts_implementation("eager")
    layers = moe_layers(model, adapter_for(model))
    assert sorted(heal, key=int) == [str(ly.index) for ly in layers]
    for entry in heal.values():
        assert entry["end_held"] <= entry["start"]["held"] * (1 + 1e-9)
    gen = torch.Generator().manual_seed(0)
    for ly in layers:
        x = torch.randn(48, int(ly.router.weight.shape[-1]), generator=gen)
        call = BlockArgs()
        if ly.hash_routed:
            call = BlockArgs((), {"input_ids": torch.randint(0, 64, (48,), generator=gen)}, frozenset({"input_ids"}))
        if adds_more_than_routed(ly):
            continue
        _, routed = expert_tokens(ly, x, routed_output=True, call=call)
        full = block_output(ly, x, call)
        assert float((full - routed).norm() / full.norm()) < 1e-5


@pytest.mark.parametrize("name", ["minimax_m2", "hunyuan_v1_moe", "zaya"])
def test_select_reconstruct_routes_candidates_through_the_block(name, tmp_path, capsys, monkeypatch):
    """`--select reconstruct` where the router cannot run alone (MiniMax-M2: its score bias lives on the block;
    Hunyuan: another output layout; ZAYA: a router MLP, a skip class and state from the layer below): candidate
    subsets are routed by the block itself with its router rows, vectors and counts cut to the subset
    (``surgery.routed_as_subset``), which puts everything back on exit — routing the full set inside it is the
    block's own routing, bitwise — and the run writes a clean checkpoint."""
    import torch

    from moecompress.arch.adapter import adapter_for, moe_layers
    from moecompress.heal.fit import routing
    from moecompress.io.checkpoint import load_model
    from moecompress.surgery import routed_as_subset

    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini = _miniature(name, tmp_path, capsys)
    model = load_model(mini, dtype="float32", tokenizer=False).model
    ly = moe_layers(model, adapter_for(model))[0]
    x = torch.randn(32, int(ly.experts.down_proj.shape[1]), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in ly.block.state_dict().items()}
    counts = {(n, a): getattr(m, a) for n, m in ly.block.named_modules() for a in vars(m) if isinstance(getattr(m, a), int)}
    weights, index = routing(ly, x)
    with routed_as_subset(ly, list(range(ly.num_experts))):
        w_all, i_all = routing(ly, x)
    assert torch.equal(i_all, index) and torch.equal(w_all, weights)
    with routed_as_subset(ly, [0, 2]):
        _, i_two = routing(ly, x)
    assert int(i_two[i_two < ly.num_experts].max()) <= 1  # routed experts renumbered 0, 1 (extra classes after)
    after = ly.block.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert counts == {(n, a): getattr(m, a) for n, m in ly.block.named_modules() for a in vars(m)
                      if isinstance(getattr(m, a), int)}
    calib = calib_file(tmp_path / "c.jsonl", n=40)
    code, _, err = run_cli(["prune", mini, "--out", tmp_path / "p", "--ratio", "0.5", "--select", "reconstruct",
                            "--calib", calib, "--calib-samples", "16", "--calib-seqlen", "32"], capsys)
    assert code == 0, err
    out_cfg = read_config(tmp_path / "p")
    _, info = auto_class(out_cfg).from_pretrained(tmp_path / "p", output_loading_info=True)
    assert not any(info.values()), info
    assert json.loads((tmp_path / "p" / "report.json").read_text())["verify"]["max_abs_logit_diff"] <= 1e-5


def test_default_heal_steps_aside_on_latent_experts_in_the_engine(tmp_path, capsys, monkeypatch):
    """Muse Spark's experts read a latent projection of the block input, which heal cannot refit: the layer-streaming
    engine's default heal steps aside (exit 0, the reason in the report) as the in-memory path's does, and an
    explicit --heal stops before anything is written (this default heal stopped the run before)."""
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini = _miniature("muse_spark", tmp_path, capsys)
    calib = calib_file(tmp_path / "c.jsonl", n=20)
    args = ["--ratio", "0.5", "--calib", calib, "--calib-samples", "8", "--calib-seqlen", "32"]
    code, _, err = run_cli(["prune", mini, "--out", tmp_path / "p", *args], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["engine"]["mode"] == "streamed" and "latent projection" in report["details"]["heal_skipped"]
    code, _, err = run_cli(["prune", mini, "--out", tmp_path / "h", "--heal", *args], capsys)
    assert code == 2 and "latent projection" in err and "Traceback" not in err
    assert not (tmp_path / "h").exists()
