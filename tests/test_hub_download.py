"""Hub ids as model arguments, against the fake Hub on 127.0.0.1 with the real huggingface_hub client.

huggingface_hub reads HF_ENDPOINT when it is imported, so the CLI runs in a subprocess driver that executes a
list of commands (each with its own environment changes) and reports exit code, stdout and stderr of each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import calib_file, tiny_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from fake_hub import FakeHub  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_carolTOKEN0123456789abcdef"

DRIVER = """
import contextlib, io, json, os, sys
import huggingface_hub.constants as constants
from moecompress.cli import main
steps_file, results_file = sys.argv[1:3]
results = []
for step in json.load(open(steps_file)):
    for k, v in step.get("env", {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    constants.HF_HUB_OFFLINE = os.environ.get("HF_HUB_OFFLINE") == "1"
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["moecompress", *step["argv"]]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
json.dump(results, open(results_file, "w"))
"""


def drive(hub: FakeHub, tmp: Path, steps: list[dict], hf_home: Path, offline: bool = False) -> list[dict]:
    plan, result = tmp / f"steps-{len(list(tmp.glob('steps-*')))}.json", tmp / "results.json"
    plan.write_text(json.dumps(steps))
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONPATH": str(ROOT),
           "COLUMNS": "200", "HF_HUB_DOWNLOAD_TIMEOUT": "10"}
    env.pop("HF_TOKEN", None)
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(plan), str(result)], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and result.exists(), (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    return json.loads(result.read_text())


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "moecompress.json"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One online driver run and one offline run (subprocess start-up dominates), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("hubdl")
    v1 = files_of(tiny_checkpoint(tmp / "v1", "qwen3_moe", seed=0))
    v2 = files_of(tiny_checkpoint(tmp / "v2", "qwen3_moe", seed=1, num_experts=6))
    hub = FakeHub(tokens={TOKEN: "carol"}).start()
    c1 = hub.add_files("alice/tiny-moe", v1, "four experts")
    c2 = hub.add_files("alice/tiny-moe", v2, "six experts")
    flaky = hub.add_files("alice/flaky-moe", {"config.json": v1["config.json"]})
    gated = hub.create_repo("bob/gated-moe")
    gated.gated, gated.access = True, {"carol"}
    hub.add_files("bob/gated-moe", v1)
    home, calib = tmp / "hf", str(calib_file(tmp / "c.jsonl"))
    prune = ["prune", "alice/tiny-moe", "--keep", "2", "--criterion", "random", "--calib", calib,
             "--calib-samples", "4", "--calib-seqlen", "16"]
    # config.json of alice/flaky-moe: the connection drops after 200 bytes, then the client's own resume gets a 503
    hub.faults["config.json"] = [200, 503]
    online = drive(hub, tmp, [
        {"argv": ["inspect", "alice/flaky-moe", "--json"]},                                     # 0 interrupted
        {"argv": ["inspect", "alice/flaky-moe", "--json"]},                                     # 1 rerun resumes
        {"argv": ["inspect", "alice/tiny-moe", "--json"]},                                      # 2 main, config only
        {"argv": ["inspect", "alice/tiny-moe", "--revision", c1, "--json"]},                    # 3 pinned
        {"argv": [*prune, "--out", "out-pinned", "--revision", c1]},                            # 4 pinned pass
        {"argv": ["inspect", "nobody/nothing-here"]},                                            # 5 404
        {"argv": ["inspect", "alice/tiny-moe", "--revision", "v9.9"]},                           # 6 bad revision
        {"argv": [*prune, "--out", "out-bad-rev", "--revision", "deadbeef"]},                   # 7 bad rev, pass
        {"argv": ["inspect", "bob/gated-moe"]},                                                  # 8 gated, no token
        {"argv": ["inspect", "bob/gated-moe", "--json"], "env": {"HF_TOKEN": TOKEN}},            # 9 gated, token
        {"argv": ["plan", "prune", "alice/tiny-moe", "--keep", "2", "--json"], "env": {"HF_TOKEN": None}},  # 10
    ], home)
    offline = drive(hub, tmp, [
        {"argv": ["inspect", "alice/tiny-moe", "--json"]},                                      # 0 cached config
        {"argv": [*prune, "--out", "offline-out", "--revision", c1]},                           # 1 cached weights
        {"argv": [*prune, "--out", "partial"]},                                                  # 2 main: config only
        {"argv": ["inspect", "never/cached"]},                                                   # 3 not cached
    ], home, offline=True)
    yield {"hub": hub, "tmp": tmp, "home": home, "online": online, "offline": offline, "c1": c1, "c2": c2,
           "flaky": flaky, "v1": v1}
    hub.stop()


def one_line_error(result: dict, needle: str) -> None:
    assert result["code"] == 2 and needle in result["err"], result["err"]
    assert len(result["err"].strip().splitlines()) == 1 and "Traceback" not in result["err"]


def test_download_only_what_is_needed_and_pin_revisions(runs):
    r, tmp, home, c1, c2 = runs["online"], runs["tmp"], runs["home"], runs["c1"], runs["c2"]
    for i in (2, 3, 4, 9, 10):
        assert r[i]["code"] == 0, (i, r[i]["err"][-2000:])
    main_ins, pinned_ins = json.loads(r[2]["out"]), json.loads(r[3]["out"])
    assert main_ins["experts_per_layer"] == 6 and pinned_ins["experts_per_layer"] == 4
    assert main_ins["path"] == f"alice/tiny-moe@{c2[:12]}"
    snaps = home / "hub" / "models--alice--tiny-moe" / "snapshots"
    assert sorted(p.name for p in (snaps / c2).iterdir()) == ["config.json"]  # inspect/plan fetch config.json alone
    assert (snaps / c1 / "model.safetensors").exists() and (snaps / c1 / "tokenizer.json").exists()
    prov = json.loads((tmp / "out-pinned" / "moecompress.json").read_text())
    assert prov["base_model"] == "alice/tiny-moe" and prov["base_revision"] == c1
    assert json.loads((tmp / "out-pinned" / "report.json").read_text())["source"] == f"alice/tiny-moe@{c1[:12]}"
    from moecompress.io.model_card import build_model_card

    card = str(build_model_card(tmp / "out-pinned", "carol/tiny-pruned"))
    assert "base_model: alice/tiny-moe" in card and c1 in card
    assert json.loads(r[9]["out"])["experts_per_layer"] == 4  # gated repo with a granted token
    assert json.loads(r[10]["out"])["steps"][0]["after"]["experts_per_layer"] == 2


def test_hub_failures_are_one_line(runs):
    r, tmp = runs["online"], runs["tmp"]
    one_line_error(r[5], "not found")
    one_line_error(r[6], "revision 'v9.9' does not exist")
    one_line_error(r[7], "revision 'deadbeef' does not exist")
    one_line_error(r[8], "hf auth login")
    assert not (tmp / "out-bad-rev").exists()


def test_interrupted_download_resumes_on_rerun(runs):
    r, hub, home = runs["online"], runs["hub"], runs["home"]
    one_line_error(r[0], "rerun resumes")
    assert r[1]["code"] == 0, r[1]["err"]
    gets = [p for m, p in hub.requests if m == "GET" and "alice/flaky-moe/resolve/" in p and p.endswith("config.json")]
    assert len(gets) == 3  # the cut first attempt, the client's failed resume, the rerun's resume
    snap = home / "hub" / "models--alice--flaky-moe" / "snapshots" / runs["flaky"]
    assert (snap / "config.json").read_bytes() == runs["v1"]["config.json"]


def test_offline_uses_the_warm_cache(runs):
    r, tmp = runs["offline"], runs["tmp"]
    assert r[0]["code"] == 0 and json.loads(r[0]["out"])["experts_per_layer"] == 6
    assert r[1]["code"] == 0, r[1]["err"][-2000:]
    assert json.loads((tmp / "offline-out" / "moecompress.json").read_text())["base_revision"] == runs["c1"]
    one_line_error(r[2], "holds only part")
    assert not (tmp / "partial").exists()
    one_line_error(r[3], "not in the cache")
