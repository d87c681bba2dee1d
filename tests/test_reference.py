"""Corpus, word-order task, metrics and a tiny end-to-end reference build that must reload in vanilla transformers."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from moecompress.errors import UserError  # noqa: E402
from moecompress.zoo.corpus import (  # noqa: E402
    DOMAINS,
    generate_corpus,
    split_docs,
    text_file_docs,
    word_order_task,
)
from moecompress.zoo.metrics import balance_loss, load_jsonl_texts, normalized_entropy  # noqa: E402


def test_corpus_is_deterministic_per_seed():
    a, b, c = generate_corpus(60, seed=3), generate_corpus(60, seed=3), generate_corpus(60, seed=4)
    assert a == b
    assert a != c


def test_all_domains_present_in_equal_shares():
    docs = generate_corpus(12 * len(DOMAINS), seed=0)
    counts = {d: sum(doc.domain == d for doc in docs) for d in DOMAINS}
    assert len(DOMAINS) >= 5
    assert set(counts.values()) == {12}
    assert all(doc.text.strip() for doc in docs)


def test_unknown_domain_is_a_user_error():
    with pytest.raises(UserError, match="choose from"):
        generate_corpus(5, domains=["poetry"])


def test_split_holds_out_every_domain():
    train, val = split_docs(generate_corpus(120, seed=1), val_fraction=0.1, seed=1)
    assert len(train) + len(val) == 120
    assert {d.domain for d in val} == set(DOMAINS)


def test_word_order_rows_are_well_formed():
    docs = generate_corpus(120, seed=2)
    rows = word_order_task(docs, seed=2, per_domain=10)
    assert len(rows) >= 40
    labels = set()
    for row in rows:
        assert len(row.choices) == 4 and len(set(row.choices)) == 4
        real = row.choices[row.label]
        assert any(real in d.text for d in docs), real  # the label points at the verbatim text
        for c in row.choices:
            assert sorted(c.split()) == sorted(real.split())  # the others are shuffles of the same words
        labels.add(row.label)
    assert labels == {0, 1, 2, 3}
    assert word_order_task(docs, seed=2, per_domain=10) == rows


def test_text_file_docs(tmp_path: Path):
    f = tmp_path / "book.txt"
    f.write_text("\n\n".join(f"Paragraph {i} says something quite ordinary about day {i}." * 3 for i in range(40)))
    docs = text_file_docs(f, target_chars=300)
    assert len(docs) > 5 and {d.domain for d in docs} == {"text"}
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="no text"):
        text_file_docs(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="does not exist"):
        text_file_docs(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="UTF-8"):
        text_file_docs(tmp_path / "bin.txt")


def test_balance_loss_is_per_layer_and_masks_padding():
    uniform = torch.zeros(64, 8)
    collapsed = torch.zeros(64, 8)
    collapsed[:, :2] = 10.0
    assert balance_loss([uniform], 2).item() == pytest.approx(1.0)
    # one collapsed layer must show even when the other layer is balanced (a pooled loss would hide it)
    assert balance_loss([uniform, collapsed], 2).item() > 1.5
    mask = torch.tensor([1] * 32 + [0] * 32)
    half = torch.cat([uniform[:32], collapsed[32:]])
    assert balance_loss([half], 2, mask).item() == pytest.approx(1.0)
    assert normalized_entropy([0.25] * 4) == pytest.approx(1.0)
    assert normalized_entropy([1.0, 0, 0, 0]) == pytest.approx(0.0)


def test_load_jsonl_texts_errors(tmp_path: Path):
    good = tmp_path / "v.jsonl"
    good.write_text('{"text": "a b", "domain": "x"}\n{"text": "c", "domain": "y"}\n')
    assert load_jsonl_texts(good) == ["a b", "c"]
    assert load_jsonl_texts(good, domain="y") == ["c"]
    with pytest.raises(UserError, match="domains present: x, y"):
        load_jsonl_texts(good, domain="z")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        load_jsonl_texts(bad)


TINY = dict(n_docs=480, mc_per_domain=5, vocab_size=384, hidden=64, layers=2, experts=4, top_k=2,
            expert_width=32, heads=4, seqlen=64, batch_size=8)


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory):
    from moecompress.zoo.reference import build_reference

    out = tmp_path_factory.mktemp("ref")
    result = build_reference(out, seed=0, minutes=5.0, max_steps=20, log=lambda s: None, **TINY)
    return out, result


def test_build_reference_writes_a_clean_checkpoint(tiny_reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecompress.zoo.metrics import perplexity
    from moecompress.zoo.reference import ReferenceResult

    out, result = tiny_reference
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "reference.json",
                 "data/train.jsonl", "data/val.jsonl", "data/mc.jsonl"):
        assert (out / name).is_file(), name
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert all(not v for v in info.values()), info
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts"] == cfg["num_local_experts"] == 4
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("17 + 25 = 42").input_ids) == "17 + 25 = 42"

    saved = ReferenceResult.model_validate_json((out / "reference.json").read_text())
    assert saved == result and result.steps == 20
    assert len(result.expert_usage) == 2 and all(len(u) == 4 for u in result.expert_usage)
    assert all(0.0 <= h <= 1.0 for h in result.layer_entropy)
    assert math.isfinite(result.unigram_ppl) and 0.0 <= result.mc_accuracy <= 1.0
    assert set(result.domain_ppl) == set(DOMAINS)
    # the reloaded model scores the same as the one evaluated in memory
    val = load_jsonl_texts(out / "data" / "val.jsonl")
    assert perplexity(model.eval(), tok, val, seqlen=64) == pytest.approx(result.val_ppl, rel=1e-4)


def test_data_files_are_well_formed(tiny_reference):
    out, _ = tiny_reference
    mc = [json.loads(line) for line in (out / "data" / "mc.jsonl").read_text().splitlines()]
    assert mc and all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 and r["domain"] in DOMAINS for r in mc)
    val = [json.loads(line) for line in (out / "data" / "val.jsonl").read_text().splitlines()]
    assert {r["domain"] for r in val} == set(DOMAINS)


def test_cli_refuses_non_empty_out(tmp_path: Path, capsys: pytest.CaptureFixture):
    from tests.helpers import run_cli

    (tmp_path / "keep.txt").write_text("mine")
    code, _, err = run_cli(["zoo", "reference", "--out", tmp_path, "--max-steps", "1"], capsys)
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "keep.txt").read_text() == "mine"
    code, _, err = run_cli(["zoo", "reference", "--out", tmp_path / "new", "--minutes", "0"], capsys)
    assert code == 2 and "--minutes" in err and not (tmp_path / "new").exists()


def test_inspect_counts_on_the_reference_model(tiny_reference, capsys: pytest.CaptureFixture):
    """`moecompress inspect` on a (small) trained reference: counts match the loaded model exactly."""
    from transformers import AutoModelForCausalLM

    from moecompress.arch import moe_layers
    from tests.helpers import run_cli

    out, _ = tiny_reference
    code, stdout, _ = run_cli(["inspect", out, "--json"], capsys)
    assert code == 0
    data = json.loads(stdout)
    model = AutoModelForCausalLM.from_pretrained(out)
    routed = sum(p.numel() for ly in moe_layers(model) for p in ly.experts.parameters())
    assert data["total_params"] == sum(t.numel() for t in model.state_dict().values())
    assert data["groups"]["routed_experts"]["params"] == routed
    assert (data["experts_per_layer"], data["top_k"], data["expert_width"]) == (TINY["experts"], 2, TINY["expert_width"])
    assert data["moe_layers"] == list(range(TINY["layers"]))


def test_demo_runs_the_recipe_on_the_reference_and_resumes(tiny_reference, tmp_path: Path, cache_dir,
                                                           capsys: pytest.CaptureFixture):
    """`moecompress demo` reuses a built reference, prunes then quantizes it with evaluation, names its outputs."""
    import shutil

    from transformers import AutoModelForCausalLM

    from tests.helpers import run_cli

    ref = tmp_path / "ref"
    shutil.copytree(tiny_reference[0], ref)
    code, out, err = run_cli(["demo", "--reference", ref, "--out", tmp_path / "demo"], capsys)
    assert code == 0, err
    assert "reusing" in out and "checkpoint" in out and "run.md" in out
    rows = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert [r["step"] for r in rows] == ["input", "1: prune_experts", "2: quantize"]
    assert rows[0]["bytes"] > rows[1]["bytes"] > rows[2]["bytes"]
    assert all("ref_ppl word_perplexity" in r["metrics"] and "ref_mc acc" in r["metrics"] for r in rows)
    last = tmp_path / "demo" / "02-quantize"
    _, info = AutoModelForCausalLM.from_pretrained(last, output_loading_info=True)
    assert all(not v for v in info.values()), info
    # step 2's input is step 1's verified output: its results were cached when step 1 measured them in memory
    reports = json.loads((tmp_path / "demo" / "run.json").read_text())
    assert reports[1]["eval"]["base"] == reports[0]["eval"]["compressed"]
    # the written recipe names this machine's model and calibration file, and a rerun resumes
    recipe = (tmp_path / "demo" / "recipe.yaml").read_text()
    assert str(ref) in recipe and "train.jsonl" in recipe
    code, out, err = run_cli(["demo", "--reference", ref, "--out", tmp_path / "demo"], capsys)
    assert code == 0, err
    assert out.count("finished earlier, skipping") == 2


def test_demo_refuses_a_folder_that_is_not_a_reference(tmp_path: Path, capsys: pytest.CaptureFixture):
    from tests.helpers import run_cli

    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "notes.txt").write_text("mine")
    code, _, err = run_cli(["demo", "--reference", tmp_path / "ref", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "reference.json" in err
    assert not (tmp_path / "o").exists() and (tmp_path / "ref" / "notes.txt").read_text() == "mine"
