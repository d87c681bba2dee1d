"""Recipes: validated before weights load with located errors; multi-pass runs resume after a kill."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import calib_file, run_cli, tiny_checkpoint

MALFORMED = {
    "not_a_mapping": ("- pass: prune_experts\n", "must be a YAML mapping"),
    "bad_yaml": ("passes: [\n  - pass: prune_experts\n", "not valid YAML at line"),
    "no_passes": ("model: x\n", "passes: Field required"),
    "empty_passes": ("passes: []\n", "passes: List should have at least 1 item"),
    "unknown_top_key": ("pases: []\npasses:\n  - pass: prune_experts\n    ratio: 0.5\n", "pases: Extra inputs"),
    "misspelt_pass": ("passes:\n  - pass: prune_expert\n    ratio: 0.5\n", "did you mean 'prune_experts'"),
    "ratio_too_big": ("passes:\n  - pass: prune_experts\n    ratio: 0.5\n  - pass: prune_experts\n    ratio: 1.5\n",
                      "passes[1].ratio: Input should be less than 1"),
    "unknown_pass_key": ("passes:\n  - pass: prune_experts\n    ratio: 0.5\n    critrion: reap\n",
                         "passes[0].critrion: Extra inputs are not permitted"),
    "bad_criterion": ("passes:\n  - pass: prune_experts\n    ratio: 0.5\n    criterion: magic\n",
                      "passes[0].criterion: Input should be"),
    "ratio_and_keep": ("passes:\n  - pass: prune_experts\n    ratio: 0.5\n    keep: 2\n",
                       "passes[0]: give exactly one of ratio or keep"),
    "item_without_pass": ("passes:\n  - ratio: 0.5\n", "passes[0]: must be a mapping with a 'pass:' key"),
    "bad_calibration": ("calibration: {source: x.jsonl, samples: -1}\npasses:\n  - pass: prune_experts\n    ratio: 0.5\n",
                        "calibration.samples: Input should be greater than or equal to 1"),
    "too_few_experts": ("passes:\n  - pass: prune_experts\n    ratio: 0.5\n  - pass: prune_experts\n    keep: 1\n",
                        "keep 1 of 2 experts"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_recipes_get_located_messages(case, tmp_path, capsys, monkeypatch):
    text, expected = MALFORMED[case]
    model = tiny_checkpoint(tmp_path / "m")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)

    def boom(*a, **k):
        raise AssertionError("weights loaded before the recipe was validated")

    monkeypatch.setattr("moecompress.runner.load_model", boom)
    code, _, err = run_cli(["run", recipe, "--out", tmp_path / "run", "--model", model], capsys)
    assert code == 2, err
    assert expected in err, err
    assert err.count("\n") <= 2  # one clear message, no traceback


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import moecompress.io.checkpoint as ck
    real = ck.verify_reload
    def verify_then_die(path, *a, **k):
        if "02-" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)  # the machine dies mid-write of step 2
        return real(path, *a, **k)
    ck.verify_reload = verify_then_die
    from moecompress.cli import main
    sys.argv = ["moecompress"] + sys.argv[1:]
    main()
""")


def test_two_pass_recipe_resumes_after_kill(tmp_path, cache_dir, capsys):
    model = tiny_checkpoint(tmp_path / "m", "mixtral")
    data = calib_file(tmp_path / "c.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        model: {model}
        calibration: {{source: {data}, samples: 8, seqlen: 32}}
        passes:
          - pass: prune_experts
            keep: 3
            criterion: reap
          - pass: prune_experts
            keep: 2
            criterion: frequency
    """))
    out = tmp_path / "run"
    env = {**os.environ, "MOECOMPRESS_CACHE": str(cache_dir)}
    killed = subprocess.run([sys.executable, "-c", _KILLER, "run", str(recipe), "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    step1 = out / "01-prune_experts"
    assert (step1 / "report.json").is_file()
    assert not (out / "02-prune_experts").exists()
    assert any(".02-prune_experts.tmp-" in p.name for p in out.iterdir())  # the interrupted write
    stamp = (step1 / "model.safetensors").stat().st_mtime_ns

    code, stdout, err = run_cli(["run", recipe, "--out", out], capsys)
    assert code == 0, err
    assert "step 1 prune_experts: finished earlier, skipping" in stdout.replace("\n", " ")
    assert (step1 / "model.safetensors").stat().st_mtime_ns == stamp
    step2 = out / "02-prune_experts"
    report = json.loads((step2 / "report.json").read_text())
    assert report["details"]["experts_before"] == 3 and report["details"]["experts_after"] == 2
    assert not any(".tmp-" in p.name for p in out.iterdir())
    assert (out / "run.md").is_file() and (step2 / "expert_usage.png").is_file()
    prov = json.loads((step2 / "moecompress.json").read_text())
    assert [p["pass"] for p in prov["passes"]] == ["zoo.tiny", "prune_experts", "prune_experts"] or \
        [p["pass"] for p in prov["passes"]][-2:] == ["prune_experts", "prune_experts"]
