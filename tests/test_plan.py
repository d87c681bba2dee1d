"""`moecompress plan` and the serving checks every pass runs first: numbers from config alone that match what the
passes then write, and refusals (with --target vllm) before anything loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moecompress.calib.data import CalibSpec
from moecompress.errors import UserError
from moecompress.inspect import inspect_checkpoint
from moecompress.passes.prune_experts import PruneExpertsConfig
from moecompress.passes.quantize import QuantizeConfig
from moecompress.plan import parse_size, plan_passes
from moecompress.runner import run_pass
from tests.helpers import calib_file, run_cli, tiny_checkpoint

REAL = Path(__file__).parent / "data" / "real-configs"


def config_only(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name.removesuffix(".json")
    d.mkdir()
    shutil.copy(REAL / name, d / "config.json")
    return d


def test_plan_matches_what_the_passes_write(tmp_path, cache_dir):
    """Plan prune 50% + W4 on a tiny model, then run both passes: experts, parameters and bytes agree."""
    src = tiny_checkpoint(tmp_path / "m", "qwen3_moe")
    config = json.loads((src / "config.json").read_text())
    steps = [PruneExpertsConfig(ratio=0.5, criterion="frequency"), QuantizeConfig(bits=4, group_size=32, method="rtn")]
    plan = plan_passes(config, steps)
    spec = CalibSpec(source=str(calib_file(tmp_path / "c.jsonl")), samples=8, seqlen=32)
    run_pass(steps[0], src, tmp_path / "p", calibration=spec)
    run_pass(steps[1], tmp_path / "p", tmp_path / "q", calibration=spec)
    before, pruned, quant = (inspect_checkpoint(p) for p in (src, tmp_path / "p", tmp_path / "q"))
    s1, s2 = plan.steps
    assert s1.before.experts_per_layer == before.experts_per_layer == 4
    assert s1.after.experts_per_layer == pruned.experts_per_layer == 2
    assert s1.before.total_params == before.total_params and s1.after.total_params == pruned.total_params
    assert s1.before.bytes == before.total_bytes and s1.after.bytes == pruned.total_bytes
    assert s2.after.bytes == pytest.approx(quant.total_bytes, rel=0.01)
    assert s1.after.active_params == pytest.approx(pruned.active_params, rel=1e-6)


def test_plan_cli_on_real_configs(tmp_path, capsys):
    qwen = config_only(tmp_path, "Qwen3-30B-A3B.json")
    code, out, err = run_cli(["plan", "prune", qwen, "--ratio", "0.5", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    step = data["steps"][0]
    assert step["before"]["experts_per_layer"] == 128 and step["after"]["experts_per_layer"] == 64
    assert 15e9 < step["after"]["total_params"] < 17e9
    mem = step["memory"]
    assert mem["cpu_peak_bytes"] < mem["in_memory_bytes"] and mem["gpu_peak_bytes"] > mem["layer_bytes"]
    # a recipe, with the model overridden, in tables
    code, out, err = run_cli(["plan", "recipes/reap50-w4.yaml", "--model", qwen], capsys)
    assert code == 0, err
    assert "step 2: quantize" in out and "W4A16 g128" in out and "serving group_size: ok" in out


def test_fp8_source_plans_a_bf16_output(tmp_path, capsys):
    ds = config_only(tmp_path, "DeepSeek-V3.json")
    code, out, err = run_cli(["plan", "recipes/reap50-w4.yaml", "--model", ds, "--ep-size", "16", "--json"], capsys)
    assert code == 0, err
    s1, s2 = json.loads(out)["steps"]
    assert s1["before"]["format"].startswith("fp8") and s1["after"]["format"] == "bfloat16"
    assert s1["after"]["experts_per_layer"] == 128
    assert {f["check"] for f in s1["findings"]} == {"n_group", "ep_size"} and all(f["ok"] for f in s1["findings"])
    assert s2["after"]["bytes"] < 0.35 * s2["before"]["bytes"]


def test_serving_checks_warn_or_refuse(tmp_path, capsys):
    mix = config_only(tmp_path, "Mixtral-8x7B-v0.1.json")
    code, out, err = run_cli(["plan", "prune", mix, "--keep", "6", "--ep-size", "4"], capsys)
    assert code == 0 and "serving ep_size: warn" in out and "keep 4 experts instead" in out
    code, out, err = run_cli(["plan", "prune", mix, "--keep", "6", "--ep-size", "4", "--target", "vllm"], capsys)
    assert code == 2 and "not servable by vLLM" in err and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(["plan", "quantize", mix, "--bits", "3", "--group-size", "128", "--target", "vllm"], capsys)
    assert code == 2 and "4-bit" not in err and "(4, 8)" in err
    code, out, err = run_cli(["plan", "quantize", mix, "--bits", "4", "--group-size", "256", "--target", "vllm"], capsys)
    assert code == 2 and "group size 256" in err


def test_heapr_width_must_be_a_multiple_of_64_for_vllm(tmp_path, capsys):
    qwen = config_only(tmp_path, "Qwen3-30B-A3B.json")  # width 768
    code, out, err = run_cli(["plan", "prune", qwen, "--neuron-ratio", "0.3", "--target", "vllm"], capsys)
    assert code == 2 and "expert width 536 is not a multiple of 64" in err
    code, out, err = run_cli(["plan", "prune", qwen, "--neuron-ratio", "0.25", "--target", "vllm", "--json"], capsys)
    assert code == 0 and json.loads(out)["steps"][0]["after"]["expert_width"] == 576


def test_every_pass_runs_the_serving_checks_first(tmp_path, cache_dir, capsys):
    src = tiny_checkpoint(tmp_path / "m", "qwen3_moe")
    out_dir = tmp_path / "out"
    code, _, err = run_cli(["prune", src, "--out", out_dir, "--keep", "3", "--ep-size", "2", "--target", "vllm",
                            "--criterion", "random"], capsys)
    assert code == 2 and "3 experts do not divide by --ep-size 2" in err and not out_dir.exists()
    calib = calib_file(tmp_path / "c.jsonl")
    code, out, err = run_cli(["prune", src, "--out", out_dir, "--keep", "3", "--ep-size", "2", "--criterion", "random",
                              "--calib", calib, "--calib-samples", "4", "--calib-seqlen", "16"], capsys)
    assert code == 0 and "serving warning" in out
    report = json.loads((out_dir / "report.json").read_text())
    assert [f["ok"] for f in report["serving_checks"]] == [False]


def test_max_memory(tmp_path, capsys):
    qwen = config_only(tmp_path, "Qwen3-30B-A3B.json")
    code, out, _ = run_cli(["plan", "prune", qwen, "--ratio", "0.5", "--calib-samples", "1024", "--calib-seqlen",
                            "4096", "--no-heal", "--json"], capsys)
    free = json.loads(out)["steps"][0]["memory"]
    assert free["heal_bytes"] == 0
    capped_at = free["cpu_peak_bytes"] - 4 * 1024**3
    code, out, _ = run_cli(["plan", "prune", qwen, "--ratio", "0.5", "--calib-samples", "1024", "--calib-seqlen",
                            "4096", "--no-heal", "--max-memory", f"{capped_at}B", "--json"], capsys)
    capped = json.loads(out)["steps"][0]["memory"]
    assert capped["cpu_peak_bytes"] <= capped_at and capped["spilled_to_disk_bytes"] >= 4 * 1024**3 - 1
    code, _, err = run_cli(["plan", "prune", qwen, "--ratio", "0.5", "--max-memory", "1GiB"], capsys)
    assert code == 2 and "below what the run needs" in err


def test_parse_size():
    assert parse_size("64GiB") == 64 * 1024**3 and parse_size("1.5TB") == 1.5e12 and parse_size("512M") == 512 * 1024**2
    with pytest.raises(UserError):
        parse_size("lots")


def test_plan_counts_the_default_heal_and_its_stepping_aside(tmp_path, capsys):
    """prune heals by default, so `plan prune` adds heal's working set (one layer's calibration tokens in RAM: it
    grows with them); under a cap it does not fit, the default heal steps aside in the plan as in the run, and an
    explicit --heal run stops before anything is read, naming what to change."""
    qwen = config_only(tmp_path, "Qwen3-30B-A3B.json")

    def memory(*extra: str) -> dict:
        code, out, err = run_cli(["plan", "prune", qwen, "--ratio", "0.5", *extra, "--json"], capsys)
        assert code == 0, err
        return json.loads(out)["steps"][0]["memory"]

    small, large = memory("--calib-samples", "128", "--calib-seqlen", "256"), memory("--calib-samples", "1024")
    assert 0 < small["heal_bytes"] < large["heal_bytes"]
    assert memory("--no-heal", "--calib-samples", "1024")["cpu_peak_bytes"] < large["cpu_peak_bytes"]
    capped = memory("--calib-samples", "1024", "--max-memory", f"{large['heal_bytes']}B")
    assert capped["heal_bytes"] == 0

    src = tiny_checkpoint(tmp_path / "tiny")
    code, _, err = run_cli(["prune", src, "--out", tmp_path / "o", "--ratio", "0.5", "--heal", "--calib",
                            calib_file(tmp_path / "c.jsonl"), "--calib-samples", "4096", "--calib-seqlen", "4096",
                            "--max-memory", "2GiB"], capsys)
    assert code == 2 and "calibration tokens need" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
