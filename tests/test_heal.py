"""Heal: the closed-form fits never raise what they minimise, healed checkpoints reload, wrong references fail early."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from moecompress.arch import moe_layers
from moecompress.heal.fit import block_errors, expert_tokens, fit_adam, solve_down
from moecompress.heal.run import calibration_kl, heal_model, reconstruct_selection
from moecompress.heal.select import HealedReconstruction, select_reconstruct
from moecompress.heal.spec import HealSpec
from moecompress.heal.walk import walk_two_streams
from moecompress.passes.merge_experts import block_output
from moecompress.passes.merging import Group
from moecompress.surgery import keep_experts_everywhere
from moecompress.zoo.tiny import tiny
from tests.helpers import calib_file, run_cli, tiny_checkpoint

CALIB = ["--calib-samples", "24", "--calib-seqlen", "32"]


def batches_for(model, n: int = 20, seq: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, seq // 2 :] = 0  # padding must be ignored
    return [(ids[i : i + 8], mask[i : i + 8]) for i in range(0, n, 8)]


def pruned_pair(family: str = "qwen3_moe", **overrides):
    model, _ = tiny(family, **overrides)
    e = moe_layers(model)[0].num_experts
    keep = {ly.index: list(range(0, e, 2)) for ly in moe_layers(model)}
    cmp = copy.deepcopy(model)
    keep_experts_everywhere(cmp, keep)
    groups = {i: [Group([k]) for k in v] for i, v in keep.items()}
    return model, cmp, groups


def first_layer_data(ref, cmp, batches) -> list[tuple]:
    seen: list[tuple] = []
    walk_two_streams(ref, cmp, batches, lambda i, rl, ly, d: seen.append((rl, ly, d)), holdout=0.2)
    return seen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_down_fit_cannot_increase_the_mse_it_minimises(family: str, dtype: torch.dtype):
    """(b) is block coordinate descent with exact ridge solves: the fitted MSE is non-increasing after every
    sweep, to within 1e-9 relative with float64 token products, 1e-6 with the float32 products `fit_down` uses
    (rounding of the residual), and the live block agrees to 1e-5 (fp32 forward)."""
    tol = 1e-9 if dtype == torch.float64 else 1e-6
    extra = {"num_experts": 8} if family == "qwen3_moe" else {}
    ref, cmp, _ = pruned_pair(family, **extra)
    for _, layer, data in first_layer_data(ref, cmp, batches_for(ref)):
        from moecompress.arch.experts import ExpertView

        w = ExpertView(layer).get_all()
        parts, routed = expert_tokens(layer, data.x, w, dtype=dtype)
        other = block_output(layer, data.x) - routed
        target = data.y - other
        _, _, history = solve_down(parts, list(w.down.unbind(0)), target, data.fit, ridge=1e-2, sweeps=4)
        for before, after in zip(history, history[1:], strict=False):
            assert after <= before * (1 + tol), history
        assert history[-1] < history[0]
        start = block_errors(layer, data)["fit"]
        from moecompress.heal.fit import fit_down

        fit_down(layer, data, ridge=1e-2, sweeps=2)
        assert block_errors(layer, data)["fit"] <= start * (1 + 1e-5)


def test_heal_lowers_held_out_error_and_keeps_shapes():
    ref, cmp, groups = pruned_pair(num_experts=8)
    shapes = {n: tuple(p.shape) for n, p in cmp.named_parameters()}
    config = cmp.config.to_dict()
    batches = batches_for(ref)
    kl0 = calibration_kl(ref, cmp, batches)
    rep = heal_model(ref, cmp, batches, groups, HealSpec(steps=20))
    assert {n: tuple(p.shape) for n, p in cmp.named_parameters()} == shapes
    assert cmp.config.to_dict() == config
    for layer in rep["layers"].values():
        assert layer["end_held"] <= layer["start"]["held"] * (1 + 1e-9)  # revert_worse guarantees this
        assert "adam" in layer and layer["adam"]["held_rel_mse_best"] <= layer["adam"]["held_rel_mse_start"]
    assert calibration_kl(ref, cmp, batches) < kl0


def test_adam_keeps_the_best_held_out_state():
    ref, cmp, _ = pruned_pair(num_experts=8)
    _, layer, data = first_layer_data(ref, cmp, batches_for(ref))[0]
    start = block_errors(layer, data)["held"]
    info = fit_adam(layer, data, steps=30, lr=1e-3, batch_tokens=64, eval_every=5, patience=2)
    assert block_errors(layer, data)["held"] == pytest.approx(info["held_rel_mse_best"], rel=1e-4, abs=1e-7)
    assert info["held_rel_mse_best"] <= start * (1 + 1e-6)


def test_reconstruct_selection_never_worse_than_its_seed():
    model, _ = tiny("qwen3_moe", num_experts=8)
    batches = batches_for(model)
    seen: list[tuple] = []
    walk_two_streams(model, copy.deepcopy(model), batches, lambda i, rl, ly, d: seen.append((ly, d)), holdout=0.2)
    layer, data = seen[0]
    rec = HealedReconstruction(layer, data, HealSpec())
    seed = [1, 3, 5, 7]
    rivals = {"evens": [0, 2, 4, 6], "low": [0, 1, 2, 3]}
    keep, info = select_reconstruct(rec, 4, seed_keep=seed, rivals=rivals)
    assert len(keep) == 4 and len(set(keep)) == 4
    for subset in (seed, *rivals.values()):  # the same arithmetic on a cached subset: never worse than a rival
        assert rec.error(keep) <= rec.error(subset) * (1 + 1e-12)
    assert set(info["rival_healed_error"]) == set(rivals)
    assert info["candidates"] < info["exhaustive_would_be"] + 10
    kept, _ = reconstruct_selection(model, batches, 4, 1, HealSpec(), seed_keep={0: seed, 1: seed})
    assert set(kept) == {ly.index for ly in moe_layers(model)}
    assert all(len(v) == 4 for v in kept.values())
    assert moe_layers(model)[0].num_experts == 8  # the input model is untouched


def test_whole_model_choice_measures_each_candidate_healed():
    """`choose_whole_model` heals each candidate selection on a scratch copy and picks the lowest held-out
    calibration KL; each KL is what healing that selection and measuring it directly gives (same arithmetic,
    1e-9 relative), duplicates are measured once, and the input model is untouched."""
    from moecompress.heal.run import choose_whole_model, held_out_batches
    from moecompress.passes.merging import Group
    from moecompress.surgery import keep_experts

    model, _ = tiny("qwen3_moe", num_experts=8)
    batches = batches_for(model)
    ids = [ly.index for ly in moe_layers(model)]
    cands = {"low": {i: [0, 1, 2, 3] for i in ids}, "odd": {i: [1, 3, 5, 7] for i in ids},
             "low again": {i: [0, 1, 2, 3] for i in ids}}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    winner, chosen, info = choose_whole_model(model, batches, cands, HealSpec(), refine=False)
    kls = info["healed_heldout_kl"]
    assert kls["low"] == kls["low again"] and winner == min(kls, key=lambda n: kls[n]) and chosen == cands[winner]
    assert info["selections_measured"] == 2
    _, mixed, refined = choose_whole_model(model, batches, cands, HealSpec())
    assert refined["final_healed_heldout_kl"] <= min(kls.values())
    assert all(mixed[i] in (cands["low"][i], cands["odd"][i]) for i in ids)  # layers take a candidate's set
    direct = copy.deepcopy(model)
    for ly in moe_layers(direct):
        keep_experts(ly, cands["odd"][ly.index])
    heal_model(model, direct, batches, {i: [Group([k]) for k in v] for i, v in cands["odd"].items()}, HealSpec())
    assert kls["odd"] == pytest.approx(calibration_kl(model, direct, held_out_batches(batches, 0.1)), rel=1e-9, abs=1e-12)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_prune_with_heal_reloads_clean_and_reports(tmp_path: Path, cache_dir, capsys):
    from transformers import AutoModelForCausalLM

    ref = tiny_checkpoint(tmp_path / "ref", num_experts=8)
    calib = calib_file(tmp_path / "c.jsonl")
    code, out, err = run_cli(["prune", ref, "--out", tmp_path / "p", "--ratio", "0.5", "--heal",
                              "--calib", calib, *CALIB], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    d = report["details"]
    assert set(d["removed_routed_mass"]) == {"0", "1"} and all(0 < v < 1 for v in d["removed_routed_mass"].values())
    assert d["calibration_kl"]["healed"] < d["calibration_kl"]["unhealed"]
    assert report["verify"]["max_abs_logit_diff"] <= 1e-5
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "p", output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert "calibration KL" in (tmp_path / "p" / "report.md").read_text()
    # the same checkpoint healed afterwards by `moecompress heal` matches the in-pass heal
    code, _, err = run_cli(["prune", ref, "--out", tmp_path / "u", "--ratio", "0.5", "--no-heal", "--calib", calib,
                            *CALIB], capsys)
    assert code == 0, err
    unhealed = json.loads((tmp_path / "u" / "report.json").read_text())["details"]["calibration_kl"]
    assert unhealed["healed"] is None and unhealed["unhealed"] == pytest.approx(d["calibration_kl"]["unhealed"])
    code, _, err = run_cli(["heal", tmp_path / "u", "--reference", ref, "--out", tmp_path / "h", "--calib", calib,
                            *CALIB], capsys)
    assert code == 0, err
    healed, info = AutoModelForCausalLM.from_pretrained(tmp_path / "h", output_loading_info=True)
    assert all(not v for v in info.values()), info
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(healed(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "h" / "config.json").read_text())["num_experts"] == 4


def _bad_reference_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    from transformers import AutoTokenizer

    other_arch = tiny_checkpoint(tmp_path / "arch", num_experts=8, hidden_size=96)
    fewer = tiny_checkpoint(tmp_path / "fewer", num_experts=2)
    other_tok = tmp_path / "tok"
    shutil.copytree(tmp_path / "ref", other_tok)
    tok = AutoTokenizer.from_pretrained(other_tok)
    tok.add_tokens(["zzqx", "qqzv"])
    tok.save_pretrained(other_tok)
    other_weights = tiny_checkpoint(tmp_path / "seed", num_experts=8, seed=7)
    return {"architecture": (other_arch, "another architecture"), "experts": (fewer, "experts per layer"),
            "tokenizer": (other_tok, "another tokenizer"), "weights": (other_weights, "not compressed from")}


def test_heal_refuses_a_reference_it_was_not_made_from(tmp_path: Path, cache_dir, capsys):
    ref = tiny_checkpoint(tmp_path / "ref", num_experts=8)
    calib = calib_file(tmp_path / "c.jsonl")
    code, _, err = run_cli(["prune", ref, "--out", tmp_path / "p", "--ratio", "0.5", "--criterion", "random",
                            "--calib", calib, *CALIB], capsys)
    assert code == 0, err
    (tmp_path / "p" / "report.json").unlink()  # force the router-row correspondence
    for what, (bad, message) in _bad_reference_cases(tmp_path).items():
        out = tmp_path / f"out-{what}"
        code, stdout, err = run_cli(["heal", tmp_path / "p", "--reference", bad, "--out", out, "--calib", calib,
                                     *CALIB], capsys)
        assert code == 2, (what, err)
        assert message in err and "Traceback" not in err, (what, err)
        assert len(err.strip().splitlines()) <= 3, err
        assert not out.exists(), what
        assert not list(tmp_path.glob(f".out-{what}.tmp-*")), what


def test_heal_recipe_step_uses_the_recipe_input(tmp_path: Path, cache_dir, capsys):
    ref = tiny_checkpoint(tmp_path / "ref", num_experts=8)
    calib = calib_file(tmp_path / "c.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {ref}\ncalibration: {{source: {calib}, samples: 24, seqlen: 32}}\npasses:\n"
                      "  - pass: merge_experts\n    ratio: 0.5\n    method: msmoe\n"
                      "  - pass: heal\n    steps: 10\n")
    code, _, err = run_cli(["run", recipe, "--out", tmp_path / "run"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "run" / "02-heal" / "report.json").read_text())
    assert rep["config"]["reference"] == str(ref)
    assert rep["details"]["correspondence"] == "report.json"  # step 1's source is the reference: merge groups
    assert any(len(members) > 1 for g in rep["details"]["groups"].values() for members in g)
    merged = json.loads((tmp_path / "run" / "01-merge_experts" / "report.json").read_text())["details"]
    assert "removed_routed_mass" in merged and merged["calibration_kl"]["healed"] is None
    kl = rep["details"]["calibration_kl"]
    assert kl["healed"] <= kl["unhealed"] * (1 + 1e-6)


def test_select_reconstruct_from_the_cli_and_masked_layout_says_it_saves_nothing(tmp_path: Path, cache_dir, capsys):
    ref = tiny_checkpoint(tmp_path / "ref", num_experts=8)
    calib = calib_file(tmp_path / "c.jsonl")
    code, out, err = run_cli(["prune", ref, "--out", tmp_path / "s", "--keep", "4", "--select", "reconstruct",
                              "--calib", calib, *CALIB], capsys)
    assert code == 0, err
    d = json.loads((tmp_path / "s" / "report.json").read_text())["details"]
    assert d["heal"]["spec"]["router"] and d["calibration_kl"]["healed"] is not None  # reconstruct implies heal
    for layer in ("0", "1"):
        info = d["layers"][layer]["reconstruct"]
        assert len(set(d["kept"][layer])) == 4 and set(d["kept"][layer]) <= set(range(8))
        assert info["healed_error"] <= info["seed_healed_error"] * (1 + 1e-9)
    whole = d["layers"]["0"]["reconstruct"]["whole_model"]  # search and criteria compete as whole models
    kls = whole["healed_heldout_kl"]
    assert {"search", "reap", "ean", "frequency"} <= set(kls)
    assert whole["final_healed_heldout_kl"] <= min(kls.values())  # refinement only accepts lower KLs
    assert (whole["winner"] == "mixed") == bool(whole["swaps"])
    code, out, err = run_cli(["prune", ref, "--out", tmp_path / "m", "--neuron-ratio", "0.5", "--criterion",
                              "magnitude", "--layout", "masked", "--calib", calib, *CALIB], capsys)
    assert code == 0, err
    assert "saves NO bytes" in out.replace("\n", " ") and "saves NO bytes" in (tmp_path / "m" / "report.md").read_text()
    code, _, err = run_cli(["prune", ref, "--out", tmp_path / "x", "--neuron-ratio", "0.5", "--select",
                            "reconstruct", "--calib", calib, *CALIB], capsys)
    assert code == 2 and "--select" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_capture_without_running_layers_matches_the_full_forward(family: str):
    """The walk's cheap capture (decoder layers passed through) gives exactly the full forward's layer-0
    inputs and every layer's keyword arguments."""
    from moecompress.calib.layers import capture_layer_inputs

    model, _ = tiny(family)
    batches = batches_for(model, n=10, seq=12)
    fast_h, fast_kw = capture_layer_inputs(model, batches, run_layers=False)
    full_h, full_kw = capture_layer_inputs(model, batches)
    assert len(fast_h) == len(full_h) == len(batches)
    assert all(torch.equal(a, b) for a, b in zip(fast_h, full_h, strict=True))
    assert fast_kw.keys() == full_kw.keys()
    for i in full_kw:
        for a, b in zip(fast_kw[i], full_kw[i], strict=True):
            assert a.keys() == b.keys()
            for k, v in b.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(a[k], v), (i, k)
                elif isinstance(v, tuple):
                    assert all(torch.equal(x, y) for x, y in zip(a[k], v, strict=True)), (i, k)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("width", [4, 48], ids=["weight-space", "token-space"])
def test_down_fit_matches_plain_ridge_solves(with_bias: bool, width: int):
    """`solve_down`'s algebra (Cholesky factors and right-hand sides reused across sweeps; experts with fewer
    fitted tokens than their width solved in token space) gives what plain per-expert ridge solves in the same
    order give, to 1e-9 relative (float64)."""
    from moecompress.heal.fit import ExpertTokens, _dual_is_smaller

    gen = torch.Generator().manual_seed(3)
    n, h, i, e = 60, 5, width, 3
    assert _dual_is_smaller(28, i, 8) == (width == 48)  # ~28 fitted tokens per expert: which path runs
    target = torch.randn(n, h, generator=gen, dtype=torch.float64)
    fit = torch.rand(n, generator=gen) > 0.2
    parts, down = [], []
    for _ in range(e):
        tok = torch.randperm(n, generator=gen)[:35].sort().values
        g = torch.rand(tok.numel(), 1, generator=gen, dtype=torch.float64)
        gb = g * torch.randn(h, generator=gen, dtype=torch.float64) if with_bias else None
        parts.append(ExpertTokens(tok=tok, act=g * torch.randn(tok.numel(), i, generator=gen, dtype=torch.float64), gbias=gb))
        down.append(torch.randn(h, i, generator=gen, dtype=torch.float64))
    ridge, sweeps = 1e-2, 2
    got, pred, _ = solve_down(parts, down, target, fit, ridge, sweeps)

    w = [d.clone() for d in down]

    def contribution(k: int) -> torch.Tensor:
        c = torch.zeros_like(target)
        c[parts[k].tok] = parts[k].act @ w[k].T + (parts[k].gbias if parts[k].gbias is not None else 0)
        return c

    for _ in range(sweeps):
        for k, p in enumerate(parts):
            others = sum(contribution(j) for j in range(e) if j != k)
            m = fit[p.tok]
            a = p.act[m]
            r = (target - others)[p.tok][m] - (p.gbias[m] if p.gbias is not None else 0)
            gram = a.T @ a
            lam = ridge * float(gram.diagonal().mean()) + 1e-12
            w[k] = torch.linalg.solve(gram + lam * torch.eye(i, dtype=gram.dtype), a.T @ r + lam * w[k].T).T
    for a, b in zip(got, w, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert torch.allclose(pred, sum(contribution(j) for j in range(e)), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("pass_args", [["prune", "--ratio", "0.5"], ["merge", "--ratio", "0.5", "--method", "hc"],
                                       ["prune", "--neuron-ratio", "0.25"]], ids=["prune", "merge", "heapr"])
def test_heal_inside_the_engine_equals_healing_the_whole_model(pass_args, tmp_path: Path, cache_dir, capsys):
    """`--heal` runs inside the layer-streaming engine (one layer resident); healing the unhealed checkpoint
    with both models in memory (heal.run.heal_model) gives the same weights and the same calibration KLs."""
    from moecompress.calib.data import CalibSpec, load_calibration
    from moecompress.heal.run import calibration_batches, groups_from_details, held_out_batches
    from moecompress.io.checkpoint import load_model

    ref = tiny_checkpoint(tmp_path / "ref", "qwen3_moe", num_experts=8)
    calib = calib_file(tmp_path / "c.jsonl")
    outs = {}
    for name, extra in (("plain", ["--no-heal"]), ("healed", ["--heal"])):
        code, _, err = run_cli([pass_args[0], ref, "--out", tmp_path / name, *pass_args[1:], *extra, "--calib", calib,
                                *CALIB], capsys)
        assert code == 0, err
        outs[name] = json.loads((tmp_path / name / "report.json").read_text())
    assert outs["healed"]["engine"]["mode"] == "streamed"
    original = load_model(ref).model
    model = load_model(tmp_path / "plain").model
    batches = calibration_batches(load_calibration(CalibSpec(source=str(calib), samples=24, seqlen=32),
                                                   load_model(ref).tokenizer))
    layer_ids = [ly.index for ly in moe_layers(model)]
    groups, _ = groups_from_details(outs["plain"]["pass"], outs["plain"]["details"], layer_ids,
                                    moe_layers(original)[0].num_experts)
    spec = HealSpec()
    held = held_out_batches(batches, spec.holdout)
    unhealed_kl = calibration_kl(original, model, held)
    heal_model(original, model, batches, groups, spec)
    healed = load_model(tmp_path / "healed").model.state_dict()
    for k, v in model.state_dict().items():  # the engine's experts implementation vs the walk's eager loop
        torch.testing.assert_close(healed[k], v, rtol=1e-4, atol=1e-5, msg=k)
    kl = outs["healed"]["details"]["calibration_kl"]
    assert kl["tokens"] == sum(int(m.sum()) for _, m in held)
    # the report rounds KLs to 6 decimals
    assert kl["unhealed"] == pytest.approx(unhealed_kl, rel=1e-3, abs=6e-7)
    assert kl["healed"] == pytest.approx(calibration_kl(original, model, held), rel=1e-3, abs=6e-7)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3", "qwen2_moe", "llama4_text", "scaled",
                                    "on-disk"])
def test_engine_heal_propagation_skips_attention_and_is_the_layer_output(family: str, tmp_path: Path):
    """The healed layer's outputs are the residual stream plus the healed block's output (attention is not run
    again); bitwise what the whole layer gives, and the block inputs are those the layer hands its block. A layer
    that does more to the block's output than add it ("scaled": its output times 1.5) runs whole instead, and so
    does a flow that lives on disk ("on-disk": no boundary's worth of residuals is held in RAM)."""
    from moecompress.calib.layers import block_io
    from moecompress.engine.heal import _block_inputs, _propagate
    from moecompress.engine.loop import run_layer, start_flow
    from moecompress.engine.source import REST, ModelSource

    folder = tiny_checkpoint(tmp_path / "m", "qwen3_moe" if family in ("scaled", "on-disk") else family)
    source = ModelSource(folder)
    source.materialise(REST)
    model = source.model
    batches = batches_for(model)
    moe = next(i for i in range(source.num_layers) if source.moe_layer(i) is not None)
    flows = [start_flow(source, batches, budget=0 if family == "on-disk" else 1 << 30) for _ in range(2)]
    for i in range(moe + 1):
        layer = source.materialise(i)
        if i < moe:
            for f in flows:
                run_layer(f, i, layer)
            continue
        block = source.moe_layer(i).block
        if family == "scaled":
            layer.register_forward_hook(lambda m, a, out: (out[0] * 1.5, *out[1:]) if isinstance(out, tuple) else out * 1.5)
        ins, calls, residuals = _block_inputs(flows[0], i, layer, block)
        with torch.no_grad():  # stands for heal: the block changes between its inputs and the propagation
            block.experts.down_proj.mul_(0.5)
        shortcut = _propagate(flows[0], i, layer, block, ins, calls, residuals)
        with block_io(block) as (want_ins, _):
            run_layer(flows[1], i, layer)
    # gpt-oss's and Llama-4's blocks return tuples, Llama-4's output is [tokens, H]: the shortcut serves them too
    assert (residuals is not None) == (family != "on-disk") and shortcut == (family not in ("scaled", "on-disk"))
    for a, b in zip(ins, want_ins, strict=True):
        assert torch.equal(a, b)
    for b in range(len(batches)):
        assert torch.equal(flows[0].acts.get(b), flows[1].acts.get(b))
    assert flows[0].position == flows[1].position


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_heal_reads_the_statistics_sweeps_recording_of_the_original(family: str, tmp_path: Path, cache_dir, capsys):
    """On a statistics cache miss the sweep records the original blocks' inputs/outputs and last boundary, and heal
    does not run the original layers again; on a hit heal runs them. Both give the same checkpoint: bitwise where
    the statistics tap's experts forward adds the top-k outputs as transformers' does (Qwen3-MoE; also Mixtral and
    gpt-oss, checked by hand), to float32 rounding where it does not (DeepSeek-V3)."""
    from safetensors.torch import load_file

    ref = tiny_checkpoint(tmp_path / "ref", family)
    calib = calib_file(tmp_path / "c.jsonl")
    reports = {}
    for name in ("miss", "hit"):
        code, _, err = run_cli(["prune", ref, "--out", tmp_path / name, "--ratio", "0.5", "--heal", "--calib", calib,
                                *CALIB], capsys)
        assert code == 0, err
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    assert [reports[n]["statistics"]["cache"] for n in ("miss", "hit")] == ["miss", "hit"]
    assert reports["miss"]["details"]["heal"]["original_targets"] == "recorded by the statistics sweep"
    assert reports["hit"]["details"]["heal"]["original_targets"] == "original layers run again"
    kls = [reports[n]["details"]["calibration_kl"] for n in ("miss", "hit")]
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in ("miss", "hit"))
    assert a.keys() == b.keys()
    if family == "qwen3_moe":
        assert kls[0] == kls[1] and all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert kls[0]["healed"] == pytest.approx(kls[1]["healed"], rel=1e-4, abs=1e-6)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("act_dtype", [torch.float32, torch.bfloat16])
def test_gated_activations_in_float32_are_the_float64_products_rounded_once(act_dtype: torch.dtype):
    """g·a in float32 without a float64 detour: the exact product of two float32 (or narrower) numbers fits a
    double, so both routes round the same exact value once — bitwise equal, not merely close."""
    from moecompress.heal.fit import _gated

    gen = torch.Generator().manual_seed(0)
    g = torch.rand(4096, 1, generator=gen)
    act = (torch.randn(4096, 64, generator=gen) * torch.logspace(-30, 30, 64)).to(act_dtype)
    assert torch.equal(_gated(g, act, torch.float32), (g.double() * act.double()).to(torch.float32))
    assert _gated(g, act, torch.float64).dtype == torch.float64


def test_heal_is_the_default_and_steps_aside_where_it_cannot_run(tmp_path: Path, cache_dir, capsys):
    """prune / merge heal without being asked (`heal.auto` in the report's config) and give the same checkpoint
    as an explicit --heal; where heal cannot run (layers read in expert chunks, no calibration data) the default
    run goes on unhealed and its report says why, while an explicit --heal still stops (exit 2, nothing written);
    --no-heal with --heal-steps is refused."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_engine import _chunk_budget

    ref = tiny_checkpoint(tmp_path / "ref", num_experts=8)
    calib = calib_file(tmp_path / "c.jsonl")
    for name, flags in (("default", []), ("explicit", ["--heal"])):
        code, out, err = run_cli(["prune", ref, "--out", tmp_path / name, "--ratio", "0.5", *flags, "--calib", calib,
                                  *CALIB], capsys)
        assert code == 0, err
    default = json.loads((tmp_path / "default" / "report.json").read_text())
    assert default["config"]["heal"]["auto"] is True and "heal_skipped" not in default["details"]
    kl = default["details"]["calibration_kl"]
    assert kl["healed"] < kl["unhealed"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "default" / "model.safetensors"), load_file(tmp_path / "explicit" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same arithmetic: bitwise
    code, _, err = run_cli(["merge", ref, "--out", tmp_path / "m", "--ratio", "0.5", "--calib", calib, *CALIB], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "report.json").read_text())["details"]["heal"]["layers"]

    budget, *_ = _chunk_budget(ref, per_chunk=2)
    code, out, err = run_cli(["prune", ref, "--out", tmp_path / "c", "--ratio", "0.5", "--calib", calib, *CALIB,
                              "--max-memory", str(budget)], capsys)
    assert code == 0, err
    chunked = json.loads((tmp_path / "c" / "report.json").read_text())
    assert chunked["engine"]["expert_chunks"] is not None and "heal" not in chunked["details"]
    assert "expert chunks" in chunked["details"]["heal_skipped"] and "running without heal" in " ".join((out + err).split())
    code, _, err = run_cli(["prune", ref, "--out", tmp_path / "c2", "--ratio", "0.5", "--heal", "--calib", calib,
                            *CALIB, "--max-memory", str(budget)], capsys)
    assert code == 2 and "Traceback" not in err and not (tmp_path / "c2").exists()

    code, _, err = run_cli(["prune", ref, "--out", tmp_path / "r", "--ratio", "0.5", "--criterion", "random"], capsys)
    assert code == 0, err
    assert "no calibration data" in json.loads((tmp_path / "r" / "report.json").read_text())["details"]["heal_skipped"]
    code, _, err = run_cli(["prune", ref, "--out", tmp_path / "x", "--ratio", "0.5", "--no-heal", "--heal-steps", "5",
                            "--calib", calib], capsys)
    assert code == 2 and "--heal-steps" in err and not (tmp_path / "x").exists()
