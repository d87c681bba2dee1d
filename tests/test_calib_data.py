"""Calibration data: every source kind, deterministic sampling, and a clear message for each user mistake."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from moecompress.calib.data import CalibSpec, load_calibration, load_texts, parse_hub_source  # noqa: E402
from moecompress.errors import UserError  # noqa: E402
from moecompress.zoo.tokenizer import train_bpe_tokenizer  # noqa: E402

WORDS = "alpha beta gamma delta river stone cloud seven apple orange field light".split()


def _doc(i: int, n: int = 12) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer([_doc(i) for i in range(50)], vocab_size=300)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return _jsonl(tmp_path / "train.jsonl",
                  [{"text": _doc(i), "domain": "code" if i % 3 == 0 else "prose"} for i in range(60)])


def test_packing_shapes_and_determinism(corpus: Path, tok) -> None:
    spec = CalibSpec(source=str(corpus), samples=4, seqlen=16, seed=1)
    a = load_calibration(spec, tok)
    b = load_calibration(spec, tok)
    assert a.input_ids.shape == (4, 16) and a.input_ids.dtype == torch.long
    assert a.attention_mask.all() and a.n_tokens == 64 and len(a) == 4
    assert torch.equal(a.input_ids, b.input_ids)
    c = load_calibration(spec.model_copy(update={"seed": 2}), tok)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert (a.input_ids == tok.eos_token_id).any()  # documents are joined with EOS
    assert [x.shape[0] for x, _ in a.batches(3)] == [3, 1]


def test_unpacked_rows_are_padded_and_masked(tmp_path: Path, tok) -> None:
    src = _jsonl(tmp_path / "d.jsonl", [{"content": _doc(i, n=2 + i)} for i in range(6)])
    batch = load_calibration(CalibSpec(source=str(src), samples=10, seqlen=8, packing=False), tok)
    assert len(batch) == 6 and batch.requested == 10  # ran out of documents: fewer rows, no error
    lengths = batch.attention_mask.sum(1)
    assert lengths.max() <= 8 and lengths.min() < lengths.max()
    assert batch.n_tokens == int(lengths.sum())
    assert (batch.input_ids[batch.attention_mask == 0] == tok.pad_token_id).all()


def test_domain_filter(corpus: Path) -> None:
    texts = load_texts(CalibSpec(source=str(corpus), domain="code"))
    assert len(texts) == 20 and texts[0] == _doc(0)
    with pytest.raises(UserError, match=r"domains present: prose \(40\), code \(20\)"):
        load_texts(CalibSpec(source=str(corpus), domain="math"))


def test_txt_paragraphs_lines_folder_json_parquet(tmp_path: Path) -> None:
    (tmp_path / "para.txt").write_text("first line\nstill first\n\n  \nsecond\n")
    assert load_texts(CalibSpec(source=str(tmp_path / "para.txt"))) == ["first line\nstill first", "second"]
    (tmp_path / "lines.txt").write_text("one\ntwo\nthree\n")
    assert load_texts(CalibSpec(source=str(tmp_path / "lines.txt"))) == ["one", "two", "three"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("x\ny\n")
    _jsonl(folder / "b.jsonl", [{"text": "z"}])
    (folder / ".hidden.txt").write_text("ignored\n")
    assert load_texts(CalibSpec(source=str(folder))) == ["x", "y", "z"]
    (tmp_path / "rows.json").write_text(json.dumps({"data": [{"body": "p"}, {"body": "q"}]}))
    assert load_texts(CalibSpec(source=str(tmp_path / "rows.json"))) == ["p", "q"]  # the only string column
    (tmp_path / "cols.json").write_text(json.dumps({"document": ["m", "n"], "n": [1, 2]}))
    assert load_texts(CalibSpec(source=str(tmp_path / "cols.json"))) == ["m", "n"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["r", "s"], "domain": ["a", "b"]}), tmp_path / "t.parquet")
    assert load_texts(CalibSpec(source=str(tmp_path / "t.parquet"), domain="b")) == ["s"]


def test_cache_key_tracks_spec_and_file(corpus: Path) -> None:
    spec = CalibSpec(source=str(corpus))
    key = spec.cache_key()
    assert key == CalibSpec(source=str(corpus)).cache_key() and len(key) == 16
    assert key != spec.model_copy(update={"samples": 3}).cache_key()
    with corpus.open("a") as f:
        f.write(json.dumps({"text": "more"}) + "\n")
    assert spec.cache_key() != key


@pytest.mark.parametrize(
    ("setup", "spec_kw", "match"),
    [
        (None, {"source": "missing/train.jsonl"}, "does not exist"),
        ("empty.jsonl", {}, "is empty"),
        ("bad.jsonl", {}, r"bad.jsonl:2: not valid JSON"),
        ("bad.parquet", {}, "cannot read .* as parquet"),
        ("latin.txt", {}, "not UTF-8"),
        ("ambiguous.jsonl", {}, "cannot tell which column .*columns: a, b"),
        ("ambiguous.jsonl", {"text_field": "c"}, "text_field 'c' is not a column"),
        ("ambiguous.jsonl", {"domain": "x"}, "no `domain` field"),
        ("short.jsonl", {"seqlen": 500}, r"has only \d+ tokens.*lower seqlen"),
    ],
)
def test_user_errors(tmp_path: Path, tok, setup: str | None, spec_kw: dict, match: str) -> None:
    files = {
        "empty.jsonl": b"\n",
        "bad.jsonl": b'{"text": "ok"}\n{"text": oops}\n',
        "bad.parquet": b"PAR1 this is not parquet",
        "latin.txt": "caf\u00e9".encode("latin-1"),
        "ambiguous.jsonl": b'{"a": "x", "b": "y"}\n',
        "short.jsonl": b'{"text": "a few words only"}\n',
    }
    kw = dict(spec_kw)
    if setup is not None:
        (tmp_path / setup).write_bytes(files[setup])
        kw.setdefault("source", str(tmp_path / setup))
    with pytest.raises(UserError, match=match):
        load_calibration(CalibSpec(**kw), tok)


def test_hub_name_offline_suggests_local_file(tok) -> None:
    assert parse_hub_source("wikitext:wikitext-2-raw-v1@train[:100]") == ("wikitext", "wikitext-2-raw-v1",
                                                                          "train[:100]")
    assert parse_hub_source("allenai/c4") == ("allenai/c4", None, "train")
    with pytest.raises(UserError, match="could not be downloaded.*local"):
        load_calibration(CalibSpec(source="moecompress-test/no-such-dataset"), tok)


def test_spec_is_strict() -> None:
    with pytest.raises(ValidationError):
        CalibSpec(source="x.txt", sample=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        CalibSpec(source="x.txt", seqlen=1)
