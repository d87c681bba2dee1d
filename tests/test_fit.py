"""fit: every plan meets the size, the winner is the least measured damage, its recipe reruns to the same
checkpoint, and a size no plan meets is refused before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moecompress.fit.measure import choose, choose_to_measure
from moecompress.fit.space import Candidate, Choice, SearchSpace, Sizer, enumerate_candidates, header_model
from moecompress.io.checkpoint import check_model_dir, checkpoint_bytes
from moecompress.plan import config_bytes
from tests.helpers import calib_file, run_cli, tiny_checkpoint

CALIB = ["--calib-samples", "24", "--calib-seqlen", "32", "--held-out", "8"]


def _sizer(ref: Path, **space) -> Sizer:
    config, adapter = check_model_dir(ref)
    return Sizer(config, adapter, SearchSpace(**space), header_model(ref, config_bytes(config)))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_fit_meets_the_size_and_its_recipe_reruns_to_the_same_checkpoint(tmp_path: Path, cache_dir, capsys,
                                                                         monkeypatch):
    from transformers import AutoModelForCausalLM

    ref = tiny_checkpoint(tmp_path / "ref", num_experts=8)
    calib = calib_file(tmp_path / "c.jsonl")
    out = tmp_path / "fit"
    code, stdout, err = run_cli(["fit", ref, "--out", out, "--target-ratio", "0.58", "--bits", "8", "--measure", "2",
                                 "--calib", calib, *CALIB], capsys)
    assert code == 0, err
    data = json.loads((out / "fit.json").read_text())
    s, rows = data["summary"], data["candidates"]
    target = int(0.58 * checkpoint_bytes(ref))
    assert s["target_bytes"] == target
    assert rows and all(r["bytes"] <= target for r in rows)
    assert all(r["bits"] in (None, 8) for r in rows)  # --bits 8: no 4-bit plan
    measured = [r for r in rows if r["measured_kl"] is not None]
    assert len(measured) == 2
    (chosen,) = [r for r in rows if r["chosen"]]
    assert chosen["measured_kl"] == min(r["measured_kl"] for r in measured)
    checkpoint = Path(s["checkpoint"])
    written = checkpoint_bytes(checkpoint)
    assert written == s["written_bytes"] <= target
    assert written <= chosen["bytes"] <= written * 1.05  # headers estimated, conservatively, within 5%
    assert (out / "recipe.yaml").is_file() and (out / "fit.md").is_file() and (out / "fit.png").is_file()
    _, info = AutoModelForCausalLM.from_pretrained(checkpoint, output_loading_info=True)
    assert all(not v for v in info.values()), info
    recipe_text = (out / "recipe.yaml").read_text()
    first = _weights(checkpoint)
    # --overwrite with another target: the previous winner's steps do not linger beside the new ones
    code, _, err = run_cli(["fit", ref, "--out", out, "--target-ratio", "0.53", "--bits", "4", "--no-heal",
                            "--measure", "1", "--overwrite", "--calib", calib, *CALIB], capsys)
    assert code == 0, err
    s2 = json.loads((out / "fit.json").read_text())["summary"]
    assert [Path(p).name for p in s2["steps"]] != [Path(p).name for p in s["steps"]]  # another winner
    assert {p.name for p in out.glob("[0-9][0-9]-*")} == {Path(p).name for p in s2["steps"]}
    assert s2["written_bytes"] <= int(0.53 * checkpoint_bytes(ref))
    # the first recipe alone, with an empty cache (statistics recollected), rebuilds the same tensors
    first_recipe = tmp_path / "first.yaml"
    first_recipe.write_text(recipe_text)
    monkeypatch.setenv("MOECOMPRESS_CACHE", str(tmp_path / "fresh-cache"))
    code, _, err = run_cli(["run", first_recipe, "--out", tmp_path / "again"], capsys)
    assert code == 0, err
    again = tmp_path / "again" / checkpoint.name
    a, b = first, _weights(again)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_unreachable_or_needless_targets_exit_2_and_write_nothing(tmp_path: Path, cache_dir, capsys):
    ref = tiny_checkpoint(tmp_path / "ref", num_experts=8)
    calib = calib_file(tmp_path / "c.jsonl")
    cases = {
        "unreachable": (["--target-size", "100KB"], "no plan fits"),
        "needless": (["--target-size", "10MB"], "nothing to compress"),
        "both": (["--target-size", "1MB", "--target-ratio", "0.5"], "exactly one of"),
        "neither": ([], "exactly one of"),
        "ratio": (["--target-ratio", "1.5"], "between 0 and 1"),
        "bits": (["--target-ratio", "0.6", "--bits", "3"], "8 or 4"),
    }
    for what, (args, message) in cases.items():
        out = tmp_path / f"out-{what}"
        code, _, err = run_cli(["fit", ref, "--out", out, *args, "--calib", calib, *CALIB], capsys)
        assert code == 2, (what, err)
        assert message in err and "Traceback" not in err, (what, err)
        assert len(err.strip().splitlines()) <= 3, err
        assert not out.exists(), what
    code, _, err = run_cli(["fit", ref, "--out", tmp_path / "x", "--target-size", "100KB", "--bits", "8",
                            "--calib", calib, *CALIB], capsys)
    assert code == 2 and "smallest plan" in err and "--bits 8,4" in err


def test_enumeration_is_the_size_frontier_under_serving_constraints(tmp_path: Path):
    ref = tiny_checkpoint(tmp_path / "ref", num_experts=8)
    target = int(0.6 * checkpoint_bytes(ref))
    sizer = _sizer(ref, ep_size=2)
    cands = enumerate_candidates(sizer, target)
    assert cands and all(c.bytes <= target for c in cands)
    assert all(c.choice.keep % 2 == 0 for c in cands)  # divisible by --ep-size
    assert all(c.choice.width % 8 == 0 for c in cands)
    for c in cands:  # the next count divisible by the EP size no longer fits (or is the whole model)
        nxt = c.choice.keep + 2
        if nxt <= 8:
            bigger = sizer.size(nxt, c.choice.width, c.choice.bits)
            assert bigger is None or bigger[0] > target, c.label
    healed = {c.choice for c in cands if c.choice.heal}
    assert healed and all(Choice(ch.keep, ch.width, ch.bits, False) in {c.choice for c in cands} for ch in healed)
    # tensor parallelism: widths split into --tp-size shards (lcm with the width multiple 8)
    tp = enumerate_candidates(_sizer(ref, tp_size=3), target)
    assert tp and all(c.choice.width % 3 == 0 for c in tp)
    # --target vllm: widths stay multiples of 64 (the tiny experts are 32 wide: no neuron pruning), 4/8 bits only
    vllm = enumerate_candidates(_sizer(ref, target="vllm"), target)
    assert vllm and all(c.choice.width == 32 and c.choice.bits in (None, 4, 8) for c in vllm)
    assert all(f.ok for c in vllm for f in c.findings)
    # bytes grow with what is kept
    assert sizer.size(8, 32, 4)[0] < sizer.size(8, 32, 8)[0] < sizer.size(8, 24, 8)[0] + sizer.size(8, 32, 8)[0]
    assert sizer.size(4, 32, None)[0] < sizer.size(6, 32, None)[0]


def test_a_masked_layout_counts_as_full_size(tmp_path: Path):
    from moecompress.passes.prune_atomic import PruneAtomicConfig
    from moecompress.plan import plan_passes

    ref = tiny_checkpoint(tmp_path / "ref", num_experts=8)
    config, _ = check_model_dir(ref)
    masked = plan_passes(config, [PruneAtomicConfig(neuron_ratio=0.5, layout="masked")]).steps[0]
    uniform = plan_passes(config, [PruneAtomicConfig(neuron_ratio=0.5)]).steps[0]
    assert masked.after.bytes == masked.before.bytes > uniform.after.bytes


def test_tp_size_serving_finding_and_plan_option(tmp_path: Path, capsys):
    from moecompress.passes.quantize import QuantizeConfig
    from moecompress.serving import serving_findings

    ref = tiny_checkpoint(tmp_path / "ref", num_experts=8)
    config, adapter = check_model_dir(ref)
    ok = serving_findings(QuantizeConfig(bits=4, group_size=32), adapter, config, config, tp_size=2)
    tp = {f.check: f for f in ok}
    assert not tp["tp_size"].ok and "group size 32" in tp["tp_size"].message  # shards of 16 < group 32
    bad = serving_findings(QuantizeConfig(bits=4, group_size=32), adapter, config, config, tp_size=3)
    assert not {f.check: f for f in bad}["tp_size"].ok
    fine = serving_findings(QuantizeConfig(bits=4, group_size=-1), adapter, config, config, tp_size=2)
    assert {f.check: f for f in fine}["tp_size"].ok
    code, out, err = run_cli(["plan", "quantize", ref, "--bits", "4", "--group-size", "32", "--tp-size", "2",
                              "--target", "vllm"], capsys)
    assert code == 2 and "tp-size 2" in err


def test_predictions_from_one_statistics_pass(tmp_path: Path):
    from moecompress.calib.collect import collect_stats
    from moecompress.fit.predict import predict_all, probes
    from moecompress.zoo.tiny import tiny

    model, _ = tiny("qwen3_moe", num_experts=8)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (16, 32), generator=gen)
    stats = collect_stats(model, [(ids[:8], torch.ones_like(ids[:8])), (ids[8:], torch.ones_like(ids[8:]))],
                          total_tokens=ids.numel(), sample_tokens=512)
    layers = list(probes(model, stats, "reap"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in layers:
        assert p.structural(8, 32, False) == 0.0
        masses = [p.removed_mass(k) for k in range(1, 9)]
        assert all(a >= b for a, b in zip(masses, masses[1:], strict=False)) and masses[-1] == 0.0
        assert p.structural(4, 32, False) > 0 and p.structural(8, 16, False) > 0
        assert 0 < p.quantization(8, 32) < p.quantization(4, 32)
    for n, p in model.named_parameters():  # probing never changes the model
        assert torch.equal(p, before[n]), n
    c = Candidate(Choice(4, 24, 4, True), [], 1, 8, 32)
    predict_all([c], model, stats, "reap", 64)
    assert c.predicted == pytest.approx(c.parts["structural"] + c.parts["quantization"], rel=1e-4)
    assert c.parts["structural"] == pytest.approx(sum(p.structural(4, 24, True) for p in layers), rel=1e-5)
    assert c.parts["quantization"] == pytest.approx(sum(p.quantization(4, -1) for p in layers), rel=1e-5)  # no
    # preferred group size divides width 24: one scale per row
    assert 0 < c.parts["removed_routed_mass"] < 1
    assert all(p.structural(4, 24, True) <= p.structural(4, 24, False) for p in layers)  # heal reverts a worse fit


def test_the_measured_set_covers_each_kind_of_plan():
    def cand(keep: int, width: int, bits: int | None, pred: float, nbytes: int = 10) -> Candidate:
        c = Candidate(Choice(keep, width, bits, False), [], nbytes, 8, 32)
        c.predicted = pred
        return c

    quant = [cand(8, 32, 4, 0.1), cand(8, 32, 8, 0.2)]
    width = cand(8, 24, None, 0.3)
    experts = cand(6, 32, None, 0.4)
    picked = choose_to_measure([*quant, width, experts], 3)
    assert picked == [quant[0], width, experts]  # one per kind before the second-best quantized plan
    assert choose_to_measure([*quant, width], 3) == [quant[0], quant[1], width]
    for c, kl in zip(picked, (0.3, 0.1, 0.1), strict=True):
        c.measured_kl = kl
    experts.bytes = 5
    assert choose(picked) is experts  # least KL; ties to the smaller plan


def test_families_heal_cannot_reconstruct_fall_back_to_routed_mass_and_energy():
    """llama4_text runs experts densely on gate-scaled inputs: no reconstruction, so the structural prediction is
    the removed routed mass plus the dropped neuron energy of the rest (heal or not)."""
    from moecompress.calib.collect import collect_stats
    from moecompress.fit.predict import probes
    from moecompress.zoo.tiny import tiny

    model, _ = tiny("llama4_text")
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(1))
    stats = collect_stats(model, [(ids, torch.ones_like(ids))], total_tokens=ids.numel(), sample_tokens=256)
    for p in probes(model, stats, "reap"):
        assert p.rec is None
        assert p.structural(4, 32, False) == 0.0
        assert p.structural(2, 32, False) == pytest.approx(p.removed_mass(2), abs=1e-12)
        assert p.removed_mass(2) < p.structural(2, 16, False) == p.structural(2, 16, True) < 1
