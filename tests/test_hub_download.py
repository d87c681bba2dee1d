"""Hub ids as model arguments, against the fake Hub on 127.0.0.1 with the real huggingface_hub client.

huggingface_hub reads HF_ENDPOINT when it is imported, so the CLI runs in a subprocess driver that executes a
list of commands (each with its own environment changes) and reports exit code, stdout and stderr of each.
"""

from __future__ import annotations

import hashlib
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
def hub_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hubdl")
    v1 = files_of(tiny_checkpoint(tmp / "v1", "qwen3_moe", seed=0))
    v2 = files_of(tiny_checkpoint(tmp / "v2", "qwen3_moe", seed=1, num_experts=6))
    hub = FakeHub(tokens={TOKEN: "carol"}).start()
    c1 = hub.add_files("alice/tiny-moe", v1, "four experts")
    c2 = hub.add_files("alice/tiny-moe", v2, "six experts")
    hub.add_files("alice/flaky-moe", v1)
    gated = hub.create_repo("bob/gated-moe")
    gated.gated, gated.access = True, {"carol"}
    hub.add_files("bob/gated-moe", v1)
    yield hub, tmp, {"c1": c1, "c2": c2, "v1": v1}
    hub.stop()


def test_hub_ids_download_pin_and_fail_clearly(hub_setup, tmp_path):
    hub, _, info = hub_setup
    home = tmp_path / "hf"
    calib = str(calib_file(tmp_path / "c.jsonl"))
    hub.faults["model.safetensors"] = []
    prune = ["prune", "alice/tiny-moe", "--keep", "2", "--criterion", "random", "--calib", calib,
             "--calib-samples", "4", "--calib-seqlen", "16"]
    steps = [
        {"argv": ["inspect", "alice/tiny-moe", "--json"]},                                      # 0 config only
        {"argv": ["inspect", "alice/tiny-moe", "--revision", info["c1"], "--json"]},            # 1 pinned
        {"argv": [*prune, "--out", "out-pinned", "--revision", info["c1"]]},                    # 2 pinned pass
        {"argv": [*prune, "--out", "out-main"]},                                                # 3 main
        {"argv": ["inspect", "nobody/nothing-here"]},                                            # 4 404
        {"argv": ["inspect", "alice/tiny-moe", "--revision", "v9.9"]},                           # 5 bad rev
        {"argv": [*prune, "--out", "out-bad-rev", "--revision", "deadbeef"]},                   # 6 bad rev, pass
        {"argv": ["inspect", "bob/gated-moe"]},                                                  # 7 gated, no token
        {"argv": ["inspect", "bob/gated-moe", "--json"], "env": {"HF_TOKEN": TOKEN}},            # 8 gated, token
        {"argv": ["plan", "prune", "alice/tiny-moe", "--keep", "2", "--json"], "env": {"HF_TOKEN": None}},  # 9
    ]
    r = drive(hub, tmp_path, steps, home)
    for i in (0, 1, 2, 3, 8, 9):
        assert r[i]["code"] == 0, (i, r[i]["err"][-2000:])
    main_ins, pinned_ins = json.loads(r[0]["out"]), json.loads(r[1]["out"])
    assert main_ins["experts_per_layer"] == 6 and pinned_ins["experts_per_layer"] == 4
    assert main_ins["path"] == f"alice/tiny-moe@{info['c2'][:12]}"
    # inspect fetched config.json alone; the passes fetched weights, only for the commits they used
    snaps = home / "hub" / "models--alice--tiny-moe" / "snapshots"
    assert (snaps / info["c1"] / "model.safetensors").exists() and (snaps / info["c2"] / "model.safetensors").exists()
    gated_snaps = list((home / "hub" / "models--bob--gated-moe" / "snapshots").iterdir())
    assert [p.name for p in gated_snaps[0].iterdir()] == ["config.json"]  # inspect fetched nothing else
    prov = json.loads((tmp_path / "out-pinned" / "moecompress.json").read_text())
    assert prov["base_model"] == "alice/tiny-moe" and prov["base_revision"] == info["c1"]
    assert json.loads((tmp_path / "out-main" / "moecompress.json").read_text())["base_revision"] == info["c2"]
    report = json.loads((tmp_path / "out-pinned" / "report.json").read_text())
    assert report["source"] == f"alice/tiny-moe@{info['c1'][:12]}"
    from moecompress.io.model_card import build_model_card

    card = str(build_model_card(tmp_path / "out-pinned", "carol/tiny-pruned"))
    assert "base_model: alice/tiny-moe" in card and info["c1"] in card
    for i, needle in ((4, "not found"), (5, "revision 'v9.9' does not exist"), (6, "revision 'deadbeef' does not exist"),
                      (7, "hf auth login")):
        assert r[i]["code"] == 2 and needle in r[i]["err"], (i, r[i]["err"])
        assert len(r[i]["err"].strip().splitlines()) == 1 and "Traceback" not in r[i]["err"]
    assert not (tmp_path / "out-bad-rev").exists()
    assert json.loads(r[8]["out"])["experts_per_layer"] == 4
    assert json.loads(r[9]["out"])["steps"][0]["after"]["experts_per_layer"] == 2


def test_offline_warm_cache_and_interrupted_download(hub_setup, tmp_path):
    hub, _, info = hub_setup
    home = tmp_path / "hf"
    calib = str(calib_file(tmp_path / "c.jsonl"))
    prune = ["prune", "alice/flaky-moe", "--keep", "2", "--criterion", "random", "--calib", calib,
             "--calib-samples", "4", "--calib-seqlen", "16"]
    hub.faults["model.safetensors"] = [1000, 503]  # cut after 1 kB, then the client's resume attempt fails
    r = drive(hub, tmp_path, [
        {"argv": [*prune, "--out", "first"]},
        {"argv": [*prune, "--out", "second"]},
        {"argv": ["inspect", "alice/tiny-moe", "--json"]},
    ], home)
    assert r[0]["code"] == 2 and "rerun resumes" in r[0]["err"] and not (tmp_path / "first").exists(), r[0]["err"]
    assert r[1]["code"] == 0, r[1]["err"][-2000:]
    ranged = [p for m, p in hub.requests if "alice/flaky-moe/resolve/" in p and p.endswith("/model.safetensors") and m == "GET"]
    assert len(ranged) >= 3  # first attempt, the failed resume, the rerun's resume
    snap = next((home / "hub" / "models--alice--flaky-moe" / "snapshots").iterdir())
    assert hashlib.sha256((snap / "model.safetensors").read_bytes()).digest() == \
        hashlib.sha256(info["v1"]["model.safetensors"]).digest()
    # offline: what is cached works, what is not says so in one line
    r = drive(hub, tmp_path, [
        {"argv": ["inspect", "alice/tiny-moe", "--json"]},
        {"argv": [*prune, "--out", "offline-out"]},
        {"argv": ["prune", "alice/tiny-moe", "--out", "partial", "--keep", "2", "--criterion", "random",
                  "--calib", calib]},
        {"argv": ["inspect", "never/cached"]},
    ], home, offline=True)
    assert r[0]["code"] == 0 and json.loads(r[0]["out"])["experts_per_layer"] == 6
    assert r[1]["code"] == 0, r[1]["err"][-2000:]
    assert r[2]["code"] == 2 and "holds only part" in r[2]["err"] and not (tmp_path / "partial").exists()
    assert r[3]["code"] == 2 and "not in the cache" in r[3]["err"] and len(r[3]["err"].strip().splitlines()) == 1
