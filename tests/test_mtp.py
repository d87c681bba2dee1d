"""Multi-token-prediction layers (moecompress.io.mtp): miniatures write them in the real key layout, passes keep
them consistent with config.json (same expert count and width) or drop them explicitly, and every reload and
streamed verification accepts exactly the MTP keys the config announces."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moecompress.io.checkpoint import auto_class, read_config
from moecompress.io.mtp import layout, unexpected_mtp
from tests.helpers import calib_file, run_cli

REAL = Path(__file__).parent / "data" / "real-configs"
DEEPSEEK = REAL / "DeepSeek-V3.json"
QWEN35 = REAL / "Qwen3.5-35B-A3B.json"
pytestmark = pytest.mark.skipif(not DEEPSEEK.is_file(), reason="tests/data/real-configs not present")
CALIB = ["--calib-samples", "4", "--calib-seqlen", "32"]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


def experts_in(keys, prefix: str) -> set[int]:
    pat = re.compile(re.escape(prefix) + r"mlp\.experts\.(\d+)\.")
    return {int(m.group(1)) for k in keys if (m := pat.match(k))}


def reload_info(folder: Path) -> tuple[dict, list[str]]:
    """Vanilla from_pretrained loading info, with the announced MTP keys split off the unexpected ones."""
    cfg = read_config(folder)
    _, info = auto_class(cfg).from_pretrained(folder, output_loading_info=True)
    mtp, info["unexpected_keys"] = unexpected_mtp(cfg, info["unexpected_keys"])
    return info, mtp


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """A DeepSeek-V3 miniature (3 decoder layers, 16 experts in 4 routing groups, 1 MTP layer) + calibration."""
    from moecompress.zoo.miniature import write_miniature

    root = tmp_path_factory.mktemp("mtp-ds")
    info = write_miniature(DEEPSEEK, root / "mini")
    assert info["mtp_tensors"] > 0
    return root / "mini", calib_file(root / "c.jsonl", n=20)


def test_miniature_writes_mtp_layers_in_the_real_layout(deepseek):
    mini, _ = deepseek
    cfg = read_config(mini)
    n = cfg["num_hidden_layers"]
    t = tensors(mini)
    prefix = f"model.layers.{n}."
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    assert t[prefix + "eh_proj.weight"].shape == (hidden, 2 * hidden)
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        assert t[prefix + name].shape == (hidden,)
    assert t[prefix + "shared_head.head.weight"].shape == (vocab, hidden)
    assert t[prefix + "embed_tokens.weight"].shape == (vocab, hidden)
    assert experts_in(t, prefix) == set(range(cfg["n_routed_experts"]))  # per-expert, as DeepSeek-V3 stores them
    assert t[prefix + "mlp.gate.weight"].shape == (cfg["n_routed_experts"], hidden)
    assert t[prefix + "mlp.gate.e_score_correction_bias"].shape == (cfg["n_routed_experts"],)
    assert not any(k.startswith(f"model.layers.{n + 1}.") for k in t)
    info, mtp = reload_info(mini)
    assert not any(info.values()), info
    assert mtp and all(k.startswith(prefix) for k in mtp)


def test_real_depth_mtp_keys_are_ignored_by_transformers():
    """At the real depth (61 decoder layers) the MTP keys we write are the ones DeepseekV3ForCausalLM ignores on
    load, so a real checkpoint reloads with zero unexpected keys; a miniature's shallower index is reported."""
    config = json.loads(DEEPSEEK.read_text())
    lay = layout(config)
    assert lay is not None and lay.style == "decoder" and lay.block_prefix(0) == "model.layers.61."
    cls = auto_class(config)
    key = lay.block_prefix(0) + "mlp.experts.0.gate_proj.weight"
    assert any(re.search(p, key) for p in cls._keys_to_ignore_on_load_unexpected)
    assert lay.owns(key) and not lay.owns("model.layers.60.mlp.gate.weight")
    assert not lay.owns("model.layers.62.enorm.weight")  # only the announced count


def test_prune_keeps_mtp_with_the_pruned_expert_count(deepseek, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini, calib = deepseek
    out = tmp_path / "p"
    code, _, err = run_cli(["prune", mini, "--out", out, "--ratio", "0.5", "--calib", calib, *CALIB], capsys)
    assert code == 0, err
    cfg = read_config(out)
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["n_routed_experts"] == 8
    n, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    prefix = f"model.layers.{n}."
    src, got = tensors(mini), tensors(out)
    assert experts_in(got, prefix) == set(range(8))
    assert got[prefix + "mlp.gate.weight"].shape == (8, hidden)
    assert got[prefix + "mlp.gate.e_score_correction_bias"].shape == (8,)
    report = json.loads((out / "report.json").read_text())
    line = report["mtp"]
    assert line.startswith("kept 1 multi-token-prediction layer") and "16 → 8" in line and "REAP" in line
    kept = json.loads(re.search(r"layer 0: (\[[\d, ]+\])", line).group(1))
    groups = torch.bincount(torch.tensor(kept) // 4, minlength=4)  # 4 routing groups of 4 experts
    assert groups.tolist() == [2, 2, 2, 2]
    for new, old in enumerate(kept):  # the same surgery as decoder layers: rows and experts in kept order
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(got[f"{prefix}mlp.experts.{new}.{proj}.weight"],
                               src[f"{prefix}mlp.experts.{old}.{proj}.weight"])
        assert torch.equal(got[prefix + "mlp.gate.weight"][new], src[prefix + "mlp.gate.weight"][old])
        assert torch.equal(got[prefix + "mlp.gate.e_score_correction_bias"][new],
                           src[prefix + "mlp.gate.e_score_correction_bias"][old])
    for name in ("eh_proj.weight", "enorm.weight", "shared_head.head.weight", "self_attn.q_a_proj.weight"):
        assert torch.equal(got[prefix + name], src[prefix + name])  # untouched by expert pruning
    assert {k for k in got if k.startswith(prefix)} == {k for k in src if k.startswith(prefix)
                                                       and experts_in([k], prefix) <= set(range(8))}
    info, mtp = reload_info(out)
    assert not any(info.values()), info
    assert mtp and all(k.startswith(prefix) for k in mtp)
    assert report["verify"]["mtp_keys"] == len([k for k in got if k.startswith(prefix)])
    prov = json.loads((out / "moecompress.json").read_text())
    assert prov["passes"][-1]["mtp"] == line
    from moecompress.io.model_card import build_model_card

    assert "Multi-token prediction: kept 1" in str(build_model_card(out, "me/x"))
    assert f"multi-token prediction: {line}" in (out / "report.md").read_text()


def test_mtp_ranking_is_the_same_when_experts_stream_in_chunks(deepseek, tmp_path, capsys, monkeypatch):
    """Under a memory budget smaller than a decoder layer the written model is streamed with its experts read in
    chunks to feed the MTP router: the MTP layer keeps the same experts as with the layers read whole."""
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini, calib = deepseek
    kept = []
    for name, extra in (("whole", []), ("chunked", ["--max-memory", "500KB"])):
        out = tmp_path / name
        code, _, err = run_cli(["prune", mini, "--out", out, "--ratio", "0.5", "--calib", calib, *CALIB, *extra],
                               capsys)
        assert code == 0, err
        report = json.loads((out / "report.json").read_text())
        kept.append(re.search(r"layer 0: (\[[\d, ]+\])", report["mtp"]).group(1))
    assert report["engine"]["expert_chunks"] is not None  # the second run did read experts in chunks
    assert kept[0] == kept[1]


def test_mtp_drop_removes_them_and_says_so(deepseek, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini, calib = deepseek
    out = tmp_path / "d"
    code, _, err = run_cli(["prune", mini, "--out", out, "--ratio", "0.5", "--mtp", "drop", "--calib", calib, *CALIB],
                           capsys)
    assert code == 0, err
    cfg = read_config(out)
    assert cfg["num_nextn_predict_layers"] == 0
    assert not any(k.startswith(f"model.layers.{cfg['num_hidden_layers']}.") for k in tensors(out))
    report = json.loads((out / "report.json").read_text())
    assert report["mtp"].startswith("dropped 1 multi-token-prediction layer(s) (--mtp drop)")
    info, mtp = reload_info(out)
    assert not any(info.values()) and not mtp


def test_bad_mtp_value_is_one_line_exit_2(deepseek, tmp_path, capsys):
    mini, calib = deepseek
    code, _, err = run_cli(["prune", mini, "--out", tmp_path / "x", "--ratio", "0.5", "--mtp", "maybe",
                            "--calib", calib], capsys)
    assert code == 2 and "Traceback" not in err
    assert "mtp" in err and "'keep' or 'drop'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_neuron_pruning_shrinks_mtp_experts_to_the_config_width(deepseek, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini, calib = deepseek
    out = tmp_path / "h"
    code, _, err = run_cli(["prune", mini, "--out", out, "--neuron-ratio", "0.5", "--calib", calib, *CALIB], capsys)
    assert code == 0, err
    cfg = read_config(out)
    width, prefix = cfg["moe_intermediate_size"], f"model.layers.{cfg['num_hidden_layers']}."
    assert width == 16 and cfg["n_routed_experts"] == 16 and cfg["num_nextn_predict_layers"] == 1
    got = tensors(out)
    assert got[prefix + "mlp.experts.3.gate_proj.weight"].shape == (width, cfg["hidden_size"])
    assert got[prefix + "mlp.experts.3.down_proj.weight"].shape == (cfg["hidden_size"], width)
    assert "expert width reduced 32 → 16" in json.loads((out / "report.json").read_text())["mtp"]
    info, _ = reload_info(out)
    assert not any(info.values()), info


def test_quantize_keeps_mtp_in_high_precision_and_ignored(deepseek, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini, calib = deepseek
    out = tmp_path / "q"
    code, _, err = run_cli(["quantize", mini, "--out", out, "--bits", "4", "--method", "rtn", "--group-size", "32",
                            "--calib", calib, *CALIB], capsys)
    assert code == 0, err
    cfg = read_config(out)
    prefix = f"model.layers.{cfg['num_hidden_layers']}."
    got, src = tensors(out), tensors(mini)
    mtp_keys = {k for k in src if k.startswith(prefix)}
    assert mtp_keys <= set(got) and all(torch.equal(got[k], src[k]) for k in mtp_keys)  # copied, float
    ignore = set(cfg["quantization_config"]["ignore"])
    assert f"{prefix}mlp.experts.0.gate_proj" in ignore and f"{prefix}eh_proj" in ignore
    assert "high precision" in json.loads((out / "report.json").read_text())["mtp"]


def test_streamed_verification_takes_exactly_the_announced_mtp_keys(deepseek, tmp_path, capsys, monkeypatch):
    """MTP keys are no module's: the stray-key check accepts them while config.json announces them, not after."""
    import shutil

    from moecompress.engine.run import verify_streamed
    from moecompress.io.checkpoint import probe_input

    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini, _ = deepseek
    folder = tmp_path / "m"
    shutil.copytree(mini, folder)
    ids = probe_input(320)
    model = auto_class(read_config(folder)).from_pretrained(folder)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    summary = verify_streamed(folder, ids, ref, budget=1 << 30, device="cpu", full_reload=False)
    assert summary["mtp_keys"] == len([k for k in tensors(mini) if k.startswith("model.layers.3.")])
    cfg = read_config(folder)
    cfg["num_nextn_predict_layers"] = 0  # the config no longer announces them: the same keys are strays
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="keys no module takes"):
        verify_streamed(folder, ids, ref, budget=1 << 30, device="cpu", full_reload=False)


def test_mtp_feed_is_what_the_compressed_model_gives(deepseek, tmp_path):
    """The calibration feed of the MTP router: final hidden states equal the model's own last_hidden_state
    (after the final norm, as servers hand it to the MTP layer), next-token embeddings are shifted by one, and
    every real token with a successor is routed to top-k experts exactly once."""
    from moecompress.calib.data import CalibSpec, load_calibration
    from moecompress.io.mtp import _Block, _feed, _route
    from moecompress.zoo.tiny import tiny_tokenizer

    mini, calib = deepseek
    batch = load_calibration(CalibSpec(source=str(calib), samples=4, seqlen=32), tiny_tokenizer())
    batches = list(batch.batches(2))
    feed = _feed(mini, batches)
    model = auto_class(read_config(mini)).from_pretrained(mini)
    cfg = read_config(mini)
    for (ids, mask), f in zip(batches, feed, strict=True):
        with torch.no_grad():
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            e = model.model.embed_tokens(ids[:, 1:])
        assert (f.hidden.float() - h.float()).abs().max() <= 1e-2 * max(1.0, float(h.abs().max()))
        assert torch.equal(f.next_embeds[:, :-1], e)
        assert int(f.mask.sum()) == int((mask[:, 1:].bool() & mask[:, :-1].bool()).sum())
    n = cfg["num_hidden_layers"]
    src = tensors(mini)
    block = _Block(cfg, torch.bfloat16)
    prefix = f"model.layers.{n}."
    takes = block.takes(list(src), prefix)
    block.load({takes[k]: src[k] for k in takes}, "mtp")
    beside = {k[len(prefix):]: v for k, v in src.items() if k.startswith(prefix) and k not in takes}
    stats = _route(block, feed, beside)
    tokens = sum(int(f.mask.sum()) for f in feed)
    assert stats.n_tokens == tokens
    assert float(stats.sums["freq"].sum()) == tokens * cfg["num_experts_per_tok"]


@pytest.mark.skipif(not QWEN35.is_file(), reason="no Qwen3.5 config")
def test_qwen35_mtp_module_pruned_consistently(tmp_path, capsys, monkeypatch):
    """Qwen3.5 keeps MTP under `mtp.*` (mtp.fc, mtp.pre_fc_norm_*, mtp.norm, mtp.layers.0.*), nested text_config."""
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini = tmp_path / "mini"
    assert run_cli(["zoo", "miniature", QWEN35, "--out", mini], capsys)[0] == 0
    src = tensors(mini)
    assert {"mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight",
            "mtp.norm.weight"} <= set(src)
    assert experts_in(src, "mtp.layers.0.") == set(range(16))
    out = tmp_path / "p"
    code, _, err = run_cli(["prune", mini, "--out", out, "--ratio", "0.5", "--calib",
                            calib_file(tmp_path / "c.jsonl", n=20), *CALIB], capsys)
    assert code == 0, err
    text = read_config(out)["text_config"]
    assert text["mtp_num_hidden_layers"] == 1 and text["num_experts"] == 8
    got = tensors(out)
    assert experts_in(got, "mtp.layers.0.") == set(range(8))
    assert got["mtp.layers.0.mlp.gate.weight"].shape == (8, text["hidden_size"])
    assert torch.equal(got["mtp.fc.weight"], src["mtp.fc.weight"])
    _, info = auto_class(read_config(out)).from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # transformers ignores ^mtp.* at any depth: nothing to split off


def test_fp8_source_mtp_layers_are_read_as_float(deepseek, tmp_path, capsys, monkeypatch):
    """DeepSeek-V3 ships its MTP layer in FP8 blocks like the decoder: pruning reads it through the same
    dequantizing reader and writes bf16 (no `_scale_inv` left), reduced to the pruned expert count."""
    import shutil

    from safetensors.torch import save_file

    from tests.source_checkpoints import fp8_blocks

    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini, calib = deepseek
    src = tmp_path / "fp8"
    src.mkdir()
    for f in mini.iterdir():
        if not f.name.endswith((".safetensors", ".index.json")):
            shutil.copy2(f, src / f.name)
    stored, known = fp8_blocks(tensors(mini), (16, 16))
    save_file(stored, str(src / "model.safetensors"), metadata={"format": "pt"})
    cfg = read_config(src)
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [16, 16], "modules_to_not_convert": ["lm_head"]}
    (src / "config.json").write_text(json.dumps(cfg))
    prefix = f"model.layers.{cfg['num_hidden_layers']}."
    assert stored[prefix + "mlp.experts.0.up_proj.weight"].dtype == torch.float8_e4m3fn
    out = tmp_path / "p"
    code, _, err = run_cli(["prune", src, "--out", out, "--ratio", "0.5", "--calib", calib, *CALIB], capsys)
    assert code == 0, err
    got = tensors(out)
    assert not any(k.endswith("_scale_inv") for k in got)
    assert experts_in(got, prefix) == set(range(8))
    kept = json.loads(re.search(r"layer 0: (\[[\d, ]+\])", json.loads((out / "report.json").read_text())["mtp"]).group(1))
    w = got[prefix + "mlp.experts.0.down_proj.weight"]
    assert w.dtype == torch.bfloat16
    ref = known[prefix + f"mlp.experts.{kept[0]}.down_proj.weight"]
    assert (w.float() - ref).abs().max() <= 1e-2 * float(ref.abs().max())  # bf16 rounding of the decoded value
    assert torch.equal(got[prefix + "eh_proj.weight"].float(), known[prefix + "eh_proj.weight"].bfloat16().float())


def test_recipe_wide_mtp_choice(tmp_path):
    from moecompress.recipe import parse_recipe

    parsed = parse_recipe({"mtp": "drop", "passes": [{"pass": "prune_experts", "ratio": 0.5},
                                                     {"pass": "quantize", "bits": 4, "mtp": "keep"}]})
    assert [p.mtp for p in parsed.passes] == ["drop", "keep"]  # a pass's own choice wins
    from moecompress.errors import UserError

    with pytest.raises(UserError, match="mtp"):
        parse_recipe({"mtp": "sometimes", "passes": [{"pass": "prune_experts", "ratio": 0.5}]})


def test_mtp_shards_respect_the_shard_size(tmp_path):
    """MTP tensors go into their own shards of at most --max-shard-size (deferred ones read as written); the
    existing shards are renamed k-of-n and the index names every tensor once."""
    from safetensors.torch import save_file

    from moecompress.io.mtp import _append_shards

    save_file({"a": torch.zeros(4, 4), "b": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    new = {f"model.layers.3.t{i}": torch.full((16, 16), float(i)) for i in range(5)}  # 1 KiB each in float32
    _append_shards(tmp_path, new, max_shard_bytes=2048)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert index["a"] == files[0] and len({index[k] for k in new}) == 3  # 2 + 2 + 1 tensors of 1 KiB
    got = tensors(tmp_path)
    assert set(got) == {"a", "b", *new} and all(torch.equal(got[k], v) for k, v in new.items())


def test_data_free_criterion_without_calibration(deepseek, tmp_path, capsys, monkeypatch):
    """Without calibration data the MTP experts are ranked by weight norms (said in the line), still the same
    number from each routing group, and the written checkpoint reloads."""
    from moecompress.io.mtp import MTPRequest, carry_mtp, expert_scores

    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini, calib = deepseek
    out = tmp_path / "d"
    assert run_cli(["prune", mini, "--out", out, "--ratio", "0.5", "--mtp", "drop", "--calib", calib, *CALIB],
                   capsys)[0] == 0
    cfg = read_config(out)
    cfg["num_nextn_predict_layers"] = 1  # as the pass leaves it before carry_mtp
    (out / "config.json").write_text(json.dumps(cfg))
    line = carry_mtp(out, mini, MTPRequest(calibration=lambda: None))
    assert "16 → 8" in line and "data-free" in line and "(no calibration data)" in line
    kept = json.loads(re.search(r"layer 0: (\[[\d, ]+\])", line).group(1))
    assert torch.bincount(torch.tensor(kept) // 4, minlength=4).tolist() == [2, 2, 2, 2]
    from moecompress.io.mtp import _Block

    src = tensors(mini)
    prefix = f"model.layers.{cfg['num_hidden_layers']}."
    block = _Block(read_config(mini), torch.bfloat16)
    takes = block.takes(list(src), prefix)
    block.load({takes[k]: src[k] for k in takes}, "mtp")
    scores = expert_scores(block.moe())
    for g in range(4):  # within each group: the 2 highest-scoring experts
        top = sorted((g * 4 + scores[g * 4:(g + 1) * 4].topk(2).indices).tolist())
        assert [k for k in kept if k // 4 == g] == top
    info, _ = reload_info(out)
    assert not any(info.values()), info


def test_unknown_mtp_block_layout_is_dropped_not_fatal(deepseek, tmp_path, capsys, monkeypatch):
    """MTP tensors that are not a decoder layer of the family (a vendor layout) cannot be reduced consistently:
    the pass still succeeds, drops them and says why, rather than writing a checkpoint servers would misread."""
    import shutil

    from safetensors.torch import save_file

    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "cache"))
    mini, calib = deepseek
    src = tmp_path / "vendor"
    src.mkdir()
    for f in mini.iterdir():
        if not f.name.endswith((".safetensors", ".index.json")):
            shutil.copy2(f, src / f.name)
    stored = tensors(mini)
    prefix = f"model.layers.{read_config(mini)['num_hidden_layers']}."
    stored[prefix + "self_attn.qkv_proj.weight"] = stored.pop(prefix + "self_attn.q_a_proj.weight")
    save_file(stored, str(src / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "p"
    code, _, err = run_cli(["prune", src, "--out", out, "--ratio", "0.5", "--calib", calib, *CALIB], capsys)
    assert code == 0, err
    assert read_config(out)["num_nextn_predict_layers"] == 0
    line = json.loads((out / "report.json").read_text())["mtp"]
    assert line.startswith("dropped 1") and "do not fit the family's decoder layer" in line
    assert not any(k.startswith(prefix) for k in tensors(out))
