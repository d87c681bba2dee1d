"""Calibration data: a Hub dataset or local text files → a fixed, seeded batch of token sequences.

Statistics are cached per (model, calibration), so the spec must say exactly which tokens were used:
``CalibSpec.cache_key()`` hashes the spec together with the size and mtime of every local file it reads.
Local files are parsed here (not through ``datasets``) so that a broken line can be reported with its number.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from moecompress.errors import UserError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TEXT_FIELDS = ("text", "content", "document")
_METADATA_FIELDS = ("domain", "id", "source", "url", "label")
_TOKENIZE_CHUNK = 256


class CalibSpec(BaseModel):
    """Which text to calibrate on and how to cut it into sequences."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(
        description="Local .txt/.jsonl/.json/.parquet file or folder of them, or a HuggingFace dataset "
        "`name[:config][@split]` (split defaults to train; slicing like `train[:5000]` works)."
    )
    samples: int = Field(128, ge=1, description="Number of sequences.")
    seqlen: int = Field(512, ge=2, description="Tokens per sequence.")
    seed: int = Field(0, description="Seed of the document shuffle; same seed, same tokens.")
    packing: bool = Field(
        True,
        description="Concatenate documents (EOS between) and cut into seqlen chunks; otherwise one document "
        "per row, truncated to seqlen and right-padded.",
    )
    text_field: str | None = Field(None, description="Column with the text; auto-detected when unset.")
    domain: str | None = Field(None, description="Keep only rows whose `domain` field equals this.")

    def cache_key(self) -> str:
        """Short stable hash of the spec and of the content identity (size, mtime) of its local files."""
        h = hashlib.sha256(self.model_dump_json().encode())
        root = _local_path(self.source)
        if root is None:
            h.update(f"hub:{self.source}".encode())
        else:
            for f in _local_files(root):
                st = f.stat()
                rel = f.name if f == root else str(f.relative_to(root))
                h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


@dataclass
class CalibBatch:
    """Token sequences ready for a forward pass; rows are right-padded where `attention_mask` is 0."""

    input_ids: torch.Tensor  # [N, L] long
    attention_mask: torch.Tensor  # [N, L] long
    n_tokens: int  # real (unpadded) tokens
    n_docs: int  # documents that contributed tokens
    requested: int  # spec.samples; more than N when the source ran out

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(input_ids, attention_mask) slices of at most `batch_size` rows, in order."""
        for i in range(0, len(self), max(1, batch_size)):
            yield self.input_ids[i : i + batch_size], self.attention_mask[i : i + batch_size]

    def forward_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batching every forward-only sweep uses (statistics, MTP ranking): up to 8 sequences and about 8k
        tokens per batch, so long sequences do not make one batch's activations large."""
        return list(self.batches(max(1, min(8, 8192 // self.input_ids.shape[1]))))


# ----------------------------------------------------------------------------------------- sources


def _local_path(source: str) -> Path | None:
    """The local path `source` names, None when it names a Hub dataset; a missing path is an error."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    looks_local = (
        source.startswith((".", "/", "~"))
        or path.suffix.lower() in LOCAL_SUFFIXES
        or "\\" in source
        or source.count("/") > 1
    )
    if looks_local:
        raise UserError(
            f"calibration source {source} does not exist; give an existing .txt/.jsonl/.json/.parquet file or "
            "folder, or a HuggingFace dataset name like `wikitext:wikitext-2-raw-v1@train`"
        )
    return None


def _local_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise UserError(f"calibration folder {root} holds no {'/'.join(LOCAL_SUFFIXES)} files")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def _as_row(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        return {"text": value}
    raise UserError(f"{where}: expected a JSON object or string per row, got {type(value).__name__}")


def _read_txt(path: Path) -> list[dict[str, Any]]:
    """One document per blank-line-separated paragraph, or per line when there are no blank lines."""
    text = _read_text(path).replace("\r\n", "\n").strip()
    if re.search(r"\n[ \t]*\n", text):
        parts = re.split(r"\n[ \t]*\n", text)
    else:
        parts = text.split("\n")
    return [{"text": p.strip()} for p in parts if p.strip()]


def jsonl_values(path: Path, text: str | None = None) -> list[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a JSON-lines file; bad JSON names its line."""
    text = _read_text(path) if text is None else text
    values = []
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append((i, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{i}: not valid JSON ({exc.msg}); fix or delete that line") from None
    return values


def _read_jsonl(path: Path, text: str | None = None) -> list[dict[str, Any]]:
    return [_as_row(value, f"{path}:{i}") for i, value in jsonl_values(path, text)]


def _read_json(path: Path) -> list[dict[str, Any]]:
    """A list of rows, {"key": [rows]} or columns {"text": [...], ...}; JSON Lines saved as .json also work."""
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            return _read_jsonl(path, text)
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if isinstance(data, list):
        return [_as_row(v, f"{path}[{i}]") for i, v in enumerate(data)]
    if isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        if len(lists) == 1 and all(isinstance(v, (dict, str)) for v in next(iter(lists.values()))):
            key, values = next(iter(lists.items()))
            return [_as_row(v, f"{path}:{key}[{i}]") for i, v in enumerate(values)]
        if lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
            n = len(next(iter(lists.values())))
            return [{k: v[i] for k, v in lists.items()} for i in range(n)]
    raise UserError(f"{path}: expected a list of rows, {{\"data\": [rows]}} or equal-length columns")


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise UserError(f"cannot read {path} as parquet ({exc}); is the file complete?") from None


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def _read_local(root: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for f in _local_files(root):
        reader = _READERS.get(f.suffix.lower())
        if reader is None:
            raise UserError(f"{f}: unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
        rows.extend(reader(f))
    return rows


def parse_hub_source(source: str) -> tuple[str, str | None, str]:
    """`name[:config][@split]` → (name, config, split); split defaults to train."""
    name, _, split = source.partition("@")
    name, _, config = name.partition(":")
    if not name:
        raise UserError(f"calibration source {source!r} has no dataset name; write name[:config][@split]")
    return name, (config or None), (split or "train")


def _read_hub(source: str) -> list[dict[str, Any]]:
    import datasets

    name, config, split = parse_hub_source(source)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except (OSError, datasets.exceptions.DatasetNotFoundError) as exc:  # ConnectionError when offline
        raise UserError(
            f"dataset {name!r} could not be downloaded ({type(exc).__name__}: {str(exc)[:200]}); you may be offline "
            "or the name is wrong — use a local .txt/.jsonl/.json/.parquet file or folder as the calibration "
            "source instead"
        ) from None
    except (ValueError, KeyError) as exc:
        raise UserError(f"dataset {source!r}: {exc}; check the config name and split (name[:config][@split])") from None
    if isinstance(ds, datasets.DatasetDict):  # not reached with split=..., kept for safety
        raise UserError(f"dataset {source!r} has several splits ({', '.join(ds)}); name one with @split")
    return ds.to_list()


# ---------------------------------------------------------------------------------- texts and tokens


def _columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            seen.setdefault(k, None)
    return list(seen)


def _string_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    out = []
    for c in columns:
        first = next((r[c] for r in rows if r.get(c) is not None), None)
        if isinstance(first, str):
            out.append(c)
    return out


def _pick_text_field(rows: Sequence[dict[str, Any]], spec: CalibSpec) -> str:
    columns = _columns(rows)
    if spec.text_field is not None:
        if spec.text_field not in columns:
            raise UserError(
                f"text_field {spec.text_field!r} is not a column of {spec.source}; columns: {', '.join(columns)}"
            )
        return spec.text_field
    for name in TEXT_FIELDS:
        if name in columns:
            return name
    strings = [c for c in _string_columns(rows, columns) if c not in _METADATA_FIELDS]
    if len(strings) == 1:
        return strings[0]
    raise UserError(
        f"cannot tell which column of {spec.source} holds the text (columns: {', '.join(columns) or 'none'}); "
        "set text_field to one of them"
    )


def _filter_domain(rows: list[dict[str, Any]], spec: CalibSpec) -> list[dict[str, Any]]:
    if spec.domain is None:
        return rows
    if not any("domain" in r for r in rows):
        raise UserError(
            f"domain {spec.domain!r} was requested but {spec.source} has no `domain` field; "
            f"columns: {', '.join(_columns(rows))}"
        )
    kept = [r for r in rows if r.get("domain") == spec.domain]
    if not kept:
        counts = Counter(str(r.get("domain")) for r in rows if "domain" in r)
        listing = ", ".join(f"{d} ({n})" for d, n in counts.most_common())
        raise UserError(f"no rows of {spec.source} have domain {spec.domain!r}; domains present: {listing}")
    return kept


def load_texts(spec: CalibSpec) -> list[str]:
    """The non-empty documents `spec` selects, in source order (before the seeded shuffle)."""
    root = _local_path(spec.source)
    rows = _read_hub(spec.source) if root is None else _read_local(root)
    if not rows:
        raise UserError(f"calibration source {spec.source} is empty (no rows); point it at a file with text")
    rows = _filter_domain(rows, spec)
    field = _pick_text_field(rows, spec)
    texts = [v for r in rows if isinstance(v := r.get(field), str) and v.strip()]
    if not texts:
        raise UserError(f"column {field!r} of {spec.source} holds no non-empty text")
    return texts


def _tokenize(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    return list(tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"])


def _shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def _pack(texts: Sequence[str], tokenizer: Any, spec: CalibSpec) -> tuple[list[list[int]], int]:
    """Shuffle documents, join them with EOS and cut the stream into seqlen chunks (stops when enough)."""
    need = spec.samples * spec.seqlen
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    n_docs = 0
    order = _shuffled(len(texts), spec.seed)
    for start in range(0, len(order), _TOKENIZE_CHUNK):
        chunk = [texts[i] for i in order[start : start + _TOKENIZE_CHUNK]]
        for ids in _tokenize(tokenizer, chunk, add_special_tokens=False):
            if not ids:
                continue
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
            n_docs += 1
            if len(stream) >= need:
                break
        if len(stream) >= need:
            break
    n_rows = min(spec.samples, len(stream) // spec.seqlen)
    if n_rows == 0:
        raise UserError(
            f"calibration source {spec.source} has only {len(stream)} tokens"
            f"{f' in domain {spec.domain!r}' if spec.domain else ''}, fewer than one sequence of seqlen="
            f"{spec.seqlen}; lower seqlen to at most {max(len(stream), 2)} (and samples accordingly) or add text"
        )
    return [stream[i * spec.seqlen : (i + 1) * spec.seqlen] for i in range(n_rows)], n_docs


def _rows(texts: Sequence[str], tokenizer: Any, spec: CalibSpec) -> tuple[list[list[int]], int]:
    """One shuffled document per row, truncated to seqlen (the tokenizer adds its usual special tokens)."""
    out: list[list[int]] = []
    order = _shuffled(len(texts), spec.seed)
    for start in range(0, len(order), _TOKENIZE_CHUNK):
        chunk = [texts[i] for i in order[start : start + _TOKENIZE_CHUNK]]
        for ids in _tokenize(tokenizer, chunk, add_special_tokens=True):
            if ids:
                out.append(ids[: spec.seqlen])
            if len(out) == spec.samples:
                return out, len(out)
    return out, len(out)


def load_calibration(spec: CalibSpec, tokenizer: Any) -> CalibBatch:
    """Tokenize the documents `spec` selects into `spec.samples` rows (fewer if the source runs out)."""
    texts = load_texts(spec)
    seqs, n_docs = (_pack if spec.packing else _rows)(texts, tokenizer, spec)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    input_ids = torch.full((len(seqs), width), int(pad), dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, : len(s)] = 1
    return CalibBatch(input_ids=input_ids, attention_mask=attention_mask, n_tokens=int(attention_mask.sum()),
                      n_docs=n_docs, requested=spec.samples)
