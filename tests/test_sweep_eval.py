"""A pass with --eval reports base vs compressed; a sweep produces a table and a Pareto plot."""

import json

import pytest

from tests.helpers import calib_file, run_cli, tiny_checkpoint


def _data_dir(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    calib_file(data / "train.jsonl", n=120)
    calib_file(data / "val.jsonl", n=20, seed=1)
    rows = [{"choices": ["the dog sat", "sat the dog", "dog the sat", "the sat dog"], "label": 0, "domain": "toy"}] * 6
    (data / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data


def test_prune_with_eval_reports_retention(tmp_path, cache_dir, capsys):
    model = tiny_checkpoint(tmp_path / "m")
    data = _data_dir(tmp_path)
    code, out, err = run_cli(["prune", model, "--out", tmp_path / "o", "--ratio", "0.5", "--criterion", "frequency",
                              "--calib", data / "train.jsonl", "--calib-samples", "8", "--calib-seqlen", "32",
                              "--eval", "ref_ppl,ref_mc", "--eval-data", data], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    comp = rep["eval"]["comparison"]
    assert set(comp) == {"ref_ppl", "ref_mc"}
    wp = comp["ref_ppl"]["word_perplexity"]
    # retention = base / compressed x 100 (lower-is-better metric); computed in another order -> tolerance
    assert wp["retention"] == pytest.approx(100 * wp["base"] / wp["compressed"], rel=1e-12)
    assert "retention" in (tmp_path / "o" / "report.md").read_text()


def test_unknown_eval_task_fails_before_compressing(tmp_path, cache_dir, capsys):
    model = tiny_checkpoint(tmp_path / "m")
    data = _data_dir(tmp_path)
    code, _, err = run_cli(["prune", model, "--out", tmp_path / "o", "--ratio", "0.5", "--criterion", "random",
                            "--calib", data / "train.jsonl", "--eval", "ref_pll", "--eval-data", data], capsys)
    assert code == 2 and "ref_pll" in err
    assert not (tmp_path / "o").exists()


def test_sweep_table_and_pareto(tmp_path, cache_dir, capsys):
    model = tiny_checkpoint(tmp_path / "m", "deepseek_v3")
    data = _data_dir(tmp_path)
    code, out, err = run_cli(["sweep", model, "--out", tmp_path / "s", "--methods", "prune:frequency,prune:reap",
                              "--ratios", "0.25,0.5", "--calib", data / "train.jsonl", "--calib-samples", "8",
                              "--calib-seqlen", "32", "--eval", "ref_ppl", "--eval-data", data], capsys)
    assert code == 0, err
    table = (tmp_path / "s" / "sweep.md").read_text()
    assert table.count("| prune:") == 4 and "| base |" in table
    assert (tmp_path / "s" / "pareto.png").stat().st_size > 1000
    reports = json.loads((tmp_path / "s" / "sweep.json").read_text())
    hits = [r["report"]["statistics"]["cache"] for r in reports]
    assert hits[0] == "miss" and set(hits[1:]) == {"hit"}  # one statistics pass for the whole sweep
