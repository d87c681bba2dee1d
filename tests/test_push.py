"""`moecompress push` against a fake Hub on 127.0.0.1, driven by the real huggingface_hub client.

The client reads HF_ENDPOINT at import time and other test modules may have imported it already
(possibly with HF_HUB_OFFLINE=1), so every networked step runs in a fresh subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from moecompress.errors import UserError
from moecompress.io.hub import push_checkpoint, push_command, validate_checkpoint, validate_repo_id
from moecompress.io.model_card import build_model_card

sys.path.insert(0, str(Path(__file__).parent))
from fake_hub import FakeHub  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_fAkEtOkEn1234567890abcdefSECRET"
REPO = "alice/tiny-moe-pruned"

# Runs `push` the way the CLI does: Typer parses the options, UserError -> one line + exit 2.
PUSH_SCRIPT = """
import sys, typer
from moecompress.errors import UserError
from moecompress.io.hub import push_command
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(push_command)
try:
    app(sys.argv[1:])
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""

# Reads everything back through the real client: file list, each file's bytes, repo info.
READ_SCRIPT = """
import json, sys
from huggingface_hub import HfApi, hf_hub_download
repo, cache, out = sys.argv[1:4]
api = HfApi()
files = api.list_repo_files(repo)
info = api.model_info(repo)
json.dump({
    "files": {f: hf_hub_download(repo, f, cache_dir=cache) for f in files},
    "private": info.private,
    "card_data": info.card_data.to_dict() if info.card_data else None,
}, open(out, "w"))
"""


def make_checkpoint(d: Path, *, provenance: bool = True, report: bool = True) -> Path:
    """A fake sharded checkpoint: tiny config, one small and one >10 MiB binary shard, tokenizer, metadata."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 2,
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "hidden_size": 64,
    }))
    rng = np.random.default_rng(0)
    save_file({"model.layers.0.mlp.gate.weight": rng.standard_normal((4, 64)).astype(np.float32)},
              str(d / "model-00001-of-00002.safetensors"))
    save_file({"model.embed_tokens.weight": rng.standard_normal((2_700_000,)).astype(np.float32)},
              str(d / "model-00002-of-00002.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "model.layers.0.mlp.gate.weight": "model-00001-of-00002.safetensors",
        "model.embed_tokens.weight": "model-00002-of-00002.safetensors",
    }}))
    (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}))
    (d / "recipe.yaml").write_text("passes:\n  - name: prune_experts\n    ratio: 0.5\n")
    if provenance:
        (d / "moecompress.json").write_text(json.dumps({
            "moecompress_version": "0.1.0", "base_model": "Qwen/Qwen3-30B-A3B",
            "source": "/data/models/Qwen3-30B-A3B",
            "passes": [{"pass": "prune_experts", "config": {"ratio": 0.5, "criterion": "reap"},
                        "summary": "kept 2 of 4 experts per layer by REAP score"}],
            "versions": {"torch": "2.9.0", "transformers": "5.23.0"},
        }))
    if report:
        (d / "report.json").write_text(json.dumps({
            "pass": "prune_experts", "params_before": 30_500_000_000, "params_after": 15_300_000_000,
            "bytes_before": 61_000_000_000, "bytes_after": 30_600_000_000,
            "eval": {
                "base": {"arc_easy": {"acc,none": 0.72, "acc_stderr,none": 0.01},
                         "wikitext": {"word_perplexity,none": 12.5}},
                "compressed": {"arc_easy": {"acc,none": 0.70, "acc_stderr,none": 0.01},
                               "wikitext": {"word_perplexity,none": 13.75}},
            },
        }))
    return d


def snapshot(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


def client_env(hub: FakeHub, tmp_path: Path, *, xet: bool, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(
        HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT),
    )
    if not xet:
        env["HF_HUB_DISABLE_XET"] = "1"
    if token:
        env["HF_TOKEN"] = token
    return env


def run(script: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def read_back(hub: FakeHub, tmp_path: Path, repo: str) -> dict:
    out = tmp_path / "readback.json"
    r = run(READ_SCRIPT, [repo, str(tmp_path / "dl_cache"), str(out)], client_env(hub, tmp_path, xet=False,
                                                                                     token=TOKEN))
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def test_push_roundtrip_lfs(tmp_path: Path) -> None:
    """Sharded checkpoint through the LFS protocol (basic + multipart): every byte comes back, card included."""
    ckpt = make_checkpoint(tmp_path / "ckpt")
    before = snapshot(ckpt)
    with FakeHub({TOKEN: "alice"}) as hub:
        r = run(PUSH_SCRIPT, [str(ckpt), "--repo", REPO, "--private", "--token", TOKEN],
                client_env(hub, tmp_path, xet=False))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{hub.url}/{REPO}"
        assert TOKEN not in r.stdout + r.stderr
        assert hub.unhandled == []
        repo = hub.repos[REPO]
        assert repo.private and len(repo.commits) == 2  # initial + exactly one upload commit
        assert repo.files["model-00002-of-00002.safetensors"].lfs and repo.files["model-00001-of-00002.safetensors"].lfs
        assert not repo.files["tokenizer.json"].lfs
        assert hub.stats["lfs_multipart"] == 1 and hub.stats["lfs_basic"] == 1
        back = read_back(hub, tmp_path, REPO)

    local = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}
    assert set(back["files"]) == local | {"README.md", ".gitattributes"}
    for name in local:
        assert Path(back["files"][name]).read_bytes() == (ckpt / name).read_bytes(), name
    assert back["private"] is True

    readme = Path(back["files"]["README.md"]).read_text()
    assert "base_model: Qwen/Qwen3-30B-A3B" in readme
    assert "| arc_easy | acc | 0.7200 | 0.7000 | 97.2% |" in readme
    assert "| wikitext | word_perplexity | 12.5000 | 13.7500 | 90.9% |" in readme
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}"' in readme
    card = back["card_data"]
    assert card["base_model"] == "Qwen/Qwen3-30B-A3B" and card["library_name"] == "transformers"
    assert {"moe", "moecompress", "prune-experts"} <= set(card["tags"])
    metrics = {m["type"]: m["value"] for res in card["model-index"][0]["results"] for m in res["metrics"]}
    assert metrics == {"acc": 0.7, "word_perplexity": 13.75}
    assert snapshot(ckpt) == before, "push must not modify the checkpoint folder"


def test_push_default_client_keeps_user_readme_and_is_idempotent(tmp_path: Path) -> None:
    """Default client settings (Xet on), token from HF_TOKEN; a user's README wins; re-push commits nothing."""
    ckpt = make_checkpoint(tmp_path / "ckpt", report=False)
    (ckpt / "README.md").write_text("---\nlicense: mit\n---\n# my own card\n")
    with FakeHub({TOKEN: "alice"}, lfs=False) as hub:  # all files regular: no Xet storage needed
        env = client_env(hub, tmp_path, xet=True, token=TOKEN)
        for _ in range(2):
            r = run(PUSH_SCRIPT, [str(ckpt), "--repo", REPO], env)
            assert r.returncode == 0, r.stderr
            assert TOKEN not in r.stdout + r.stderr
        assert len(hub.repos[REPO].commits) == 2  # the second push found nothing changed
        assert hub.repos[REPO].private is False
        back = read_back(hub, tmp_path, REPO)
    for name in ("README.md", "model-00002-of-00002.safetensors", "config.json"):
        assert Path(back["files"][name]).read_bytes() == (ckpt / name).read_bytes()


def test_push_rejected_token_is_user_error_and_not_echoed(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt")
    bad = "hf_wrongTOKENwrongTOKENwrong123"
    with FakeHub({TOKEN: "alice"}) as hub:
        r = run(PUSH_SCRIPT, [str(ckpt), "--repo", REPO, "--token", bad], client_env(hub, tmp_path, xet=False))
        assert REPO not in hub.repos
    assert r.returncode == 2, r.stderr
    assert "token was rejected" in r.stderr and "hf auth login" in r.stderr
    assert bad not in r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_push_other_namespace_and_public_repo_with_private_flag(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt")
    with FakeHub({TOKEN: "alice"}) as hub:
        hub.create_repo(REPO, private=False)
        env = client_env(hub, tmp_path, xet=False, token=TOKEN)
        r = run(PUSH_SCRIPT, [str(ckpt), "--repo", REPO, "--private"], env)
        assert r.returncode == 2 and "already exists and is public" in r.stderr, r.stderr
        assert len(hub.repos[REPO].commits) == 1  # nothing uploaded
        r = run(PUSH_SCRIPT, [str(ckpt), "--repo", "bob/model"], env)
        assert r.returncode == 2 and "may not write to 'bob'" in r.stderr, r.stderr
        assert TOKEN not in r.stdout + r.stderr


def test_storage_failure_is_user_error() -> None:
    """hf_xet reports storage-side network failures as ConnectionError: one actionable line, token scrubbed.

    Tested on the translation itself: the fake Hub does not speak the Xet protocol, and driving the real
    hf_xet client against it depends on that client's retry timing (it hung past 120 s on a clean CI run).
    """
    from moecompress.io.hub import _as_user_error

    exc = ConnectionError(f"request to storage failed (Authorization: Bearer {TOKEN})\nretries exhausted")
    err = _as_user_error(exc, REPO, "http://127.0.0.1:1", TOKEN)
    assert isinstance(err, UserError)
    assert "HF_HUB_DISABLE_XET" in str(err) and TOKEN not in str(err)


def test_unreachable_hub_and_rejected_card_are_user_errors(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt")
    (ckpt / "README.md").write_text("---\nbase_model: /home/me/models/base\n---\n# card\n")
    with FakeHub({TOKEN: "alice"}) as hub:
        env = client_env(hub, tmp_path, xet=False, token=TOKEN)
        r = run(PUSH_SCRIPT, [str(ckpt), "--repo", REPO], env)
        assert r.returncode == 2 and "rejected the model card metadata" in r.stderr, r.stderr
        assert "base_model" in r.stderr and len(hub.repos[REPO].commits) == 1
    r = run(PUSH_SCRIPT, [str(ckpt), "--repo", REPO], env)  # server gone now
    assert r.returncode == 2 and "could not reach" in r.stderr and "HF_ENDPOINT" in r.stderr, r.stderr
    assert TOKEN not in r.stdout + r.stderr


def test_not_logged_in_fails_before_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    ckpt = make_checkpoint(tmp_path / "ckpt", report=False)
    with pytest.raises(UserError, match="not logged in"):
        push_checkpoint(ckpt, REPO)


def test_bad_checkpoint_dirs(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a folder"):
        validate_checkpoint(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        push_checkpoint(empty, REPO, token=TOKEN)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        validate_checkpoint(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no weight files"):
        validate_checkpoint(empty)
    ckpt = make_checkpoint(tmp_path / "ckpt", report=False)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="missing shard"):
        push_checkpoint(ckpt, REPO, token=TOKEN)


@pytest.mark.parametrize("repo_id", ["justname", "a/b/c", "a--b/x", "-x/y", "x/y-", "x/y.git", "x/a..b", "", "x/",
                                     "x/" + "n" * 97, "al ice/x"])
def test_bad_repo_ids(repo_id: str) -> None:
    with pytest.raises(UserError, match="invalid repo id"):
        validate_repo_id(repo_id)


def test_good_repo_ids() -> None:
    for repo_id in ("alice/qwen3-moe_pruned.v2", "Org-1/M", "a/" + "n" * 96):
        validate_repo_id(repo_id)


def test_help_does_not_show_token(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command()(push_command)
    result = CliRunner().invoke(app, ["--help"], env={"HF_TOKEN": TOKEN})
    assert result.exit_code == 0 and "--repo" in result.output
    assert TOKEN not in result.output


def test_model_card_without_provenance_or_report(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", provenance=False, report=False)
    card = build_model_card(ckpt, REPO)
    assert "base_model" not in card.data.to_dict()
    assert "model-index" not in card.data.to_dict()
    assert "No provenance" in card.text and "No evaluation results" in card.text
    assert "## Recipe" in card.text and "ratio: 0.5" in card.text
    assert "| Weights on disk | n/a |" in card.text  # size of the files, no 'before' known


def test_model_card_local_source_is_not_base_model(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt")
    prov = json.loads((ckpt / "moecompress.json").read_text())
    prov["base_model"] = str(tmp_path / "my-local-base")
    (ckpt / "moecompress.json").write_text(json.dumps(prov))
    card = build_model_card(ckpt, REPO)
    assert card.data.base_model is None
    assert "a local checkpoint (`my-local-base`)" in card.text
    assert str(tmp_path) not in card.text
    card = build_model_card(ckpt, REPO, base_model="Qwen/Qwen3-30B-A3B")
    assert card.data.base_model == "Qwen/Qwen3-30B-A3B"


def _step_report(name: str, out: Path, before: tuple[int, int], after: tuple[int, int], base: float, comp: float) -> dict:
    return {"pass": name, "output": str(out), "params_before": before[0], "params_after": after[0],
            "bytes_before": before[1], "bytes_after": after[1],
            "eval": {"base": {}, "compressed": {},
                     "comparison": {"word_order": {"acc,none": {"base": base, "compressed": comp, "retention": 0}}}}}


def test_model_card_for_last_step_of_recipe_run(tmp_path: Path) -> None:
    """The runner's layout (OUT/NN-pass/ + OUT/run.json): the card compares the final step with the original."""
    step1, step2 = tmp_path / "out" / "01-prune_experts", tmp_path / "out" / "02-quantize"
    make_checkpoint(step2, report=False)
    prov = json.loads((step2 / "moecompress.json").read_text())
    prov["passes"].append({"pass": "quantize", "config": {"bits": 4}, "summary": "int4 experts"})
    (step2 / "moecompress.json").write_text(json.dumps(prov))
    r1 = _step_report("prune_experts", step1, (1000, 4000), (600, 2400), 0.80, 0.76)
    r2 = _step_report("quantize", step2, (600, 2400), (600, 900), 0.76, 0.75)
    (step2 / "report.json").write_text(json.dumps(r2))

    alone = build_model_card(step2, REPO)  # without run.json: only the last pass is known
    assert "| word_order | acc | 0.7600 | 0.7500 | 98.7% |" in alone.text
    assert "Before last pass" in alone.text

    (tmp_path / "out" / "run.json").write_text(json.dumps([r1, r2]))
    card = build_model_card(step2, REPO)
    assert "| word_order | acc | 0.8000 | 0.7500 | 93.8% |" in card.text
    assert "| Parameters | 1.00K | 600 | -40.0% |" in card.text and "| Weights on disk | 4.00 kB | 900 B | -77.5% |" in card.text
    assert "Before last pass" not in card.text
    assert "2. **quantize**: int4 experts" in card.text


def test_base_model_override_must_be_hub_id(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt", report=False)
    with pytest.raises(UserError, match="--base-model"):
        push_checkpoint(ckpt, REPO, token=TOKEN, base_model="/local/base")
