"""Sink: finished parts of the model stream into safetensors shards plus ``model.safetensors.index.json``.

Keys are what ``save_pretrained`` would write: ignored and tied keys dropped, then transformers' own
``revert_weight_conversion`` (per-expert layout where the family's checkpoints use it). A shard is written as
its tensors arrive (data appended to a side file, header + data joined when the shard closes), so the writer
never holds more than the part it is given. Shards are named like ``save_pretrained`` names them.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from moecompress.engine.reader import INDEX, SINGLE

_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '1.5GiB' / bytes → bytes (decimal units like save_pretrained, binary with 'i')."""
    from moecompress.errors import UserError

    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise UserError(f"cannot read size {text!r}; use e.g. 5GB, 800MB or 24GiB") from None


def on_disk_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory (full-key) tensors → the keys and layout ``save_pretrained`` writes."""
    from transformers.core_model_loading import revert_weight_conversion

    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    kept = {k: v for k, v in state.items() if k not in ignore and k not in tied}
    return revert_weight_conversion(model, kept)


class ShardWriter:
    """Append tensors into shards of at most `max_shard_bytes` (a tensor larger than that gets its own shard)."""

    def __init__(self, folder: Path, max_shard_bytes: int) -> None:
        self.folder = Path(folder)
        self.max = max_shard_bytes
        self._done: list[tuple[Path, list[str]]] = []
        self._entries: dict[str, dict[str, Any]] = {}
        self._data: Any = None
        self._size = 0
        self.total = 0
        self.shapes: dict[str, list[int]] = {}
        self._pending: dict[str, list[int]] = {}  # reserved tensor → [data offset, bytes per row, rows left]

    def _new_entry(self, key: str, shape: list[int], dtype: torch.dtype, n: int) -> None:
        if key in self._entries or any(key in keys for _, keys in self._done):
            raise RuntimeError(f"tensor {key} written twice")
        if dtype not in _ST_DTYPES:
            raise RuntimeError(f"cannot write dtype {dtype} of {key}")
        self._entries[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                              "data_offsets": [self._size, self._size + n]}
        self._size += n
        self.total += n
        self.shapes[key] = list(shape)

    def _room(self, n: int) -> None:
        """Close the current shard if `n` more bytes would overflow it (never while reserved rows are unfilled)."""
        if self._entries and self._size + n > self.max and not self._pending:
            self._close_shard()
        if self._data is None:
            self._data = open(self.folder / f".shard-{len(self._done) + 1:05d}.data", "wb")  # noqa: SIM115

    def reserve(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        """Room in the current shard for tensors that arrive in pieces of rows (``fill``), e.g. a fused expert
        tensor written one chunk of experts at a time; the shard stays open until every row is filled."""
        sizes = {k: int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size()
                 for k, (shape, dt) in specs.items()}
        self._room(sum(sizes.values()))
        for key, (shape, dt) in specs.items():
            start = self._size
            self._new_entry(key, list(shape), dt, sizes[key])
            self._pending[key] = [start, sizes[key] // max(1, shape[0]), shape[0]]
        self._data.flush()
        self._data.truncate(self._size)
        self._data.seek(self._size)

    def fill(self, key: str, row: int, t: torch.Tensor) -> None:
        """Rows row.. of a reserved tensor."""
        start, row_bytes, left = self._pending[key]
        t = t.detach().to("cpu").contiguous()
        if t.numel() * t.element_size() != row_bytes * t.shape[0] or t.shape[0] > left:
            raise RuntimeError(f"{key}: rows of shape {tuple(t.shape)} do not fit the reserved tensor")
        self._data.flush()
        os.pwrite(self._data.fileno(), t.reshape(-1).view(torch.uint8).numpy().data, start + row * row_bytes)
        self._pending[key][2] -= t.shape[0]
        if self._pending[key][2] == 0:
            del self._pending[key]

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, t in tensors.items():
            t = t.detach().to("cpu").contiguous()
            n = t.numel() * t.element_size()
            self._room(n)
            self._new_entry(key, list(t.shape), t.dtype, n)
            if n:
                self._data.write(t.reshape(-1).view(torch.uint8).numpy().data)

    def _close_shard(self) -> None:
        if self._pending:
            raise RuntimeError(f"shard closed before its reserved rows were written: {sorted(self._pending)[:3]}")
        data_path = Path(self._data.name)
        self._data.close()
        header = dict(self._entries)
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        final = self.folder / f".shard-{len(self._done) + 1:05d}.safetensors"
        with open(final, "wb") as out, open(data_path, "rb") as src:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(src, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        data_path.unlink()
        self._done.append((final, list(self._entries)))
        self._entries, self._data, self._size = {}, None, 0

    def finish(self) -> dict[str, str]:
        """Close the last shard, give shards their final names, write the index (several shards only)."""
        if self._data is not None:
            self._close_shard()
        n = len(self._done)
        weight_map: dict[str, str] = {}
        for i, (path, keys) in enumerate(self._done, start=1):
            name = SINGLE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return weight_map


class ShapeRecorder:
    """A writer that writes nothing and keeps the shapes: what a data-parallel rank other than 0 hands the
    layer loop (rank 0 alone writes; every rank needs the written shapes for the config update)."""

    def __init__(self) -> None:
        self.shapes: dict[str, list[int]] = {}
        self.total = 0

    def reserve(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.shapes.update({k: list(shape) for k, (shape, _) in specs.items()})

    def fill(self, key: str, row: int, t: torch.Tensor) -> None:
        """Rows of a reserved tensor: nothing to keep."""

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        self.shapes.update({k: list(t.shape) for k, t in tensors.items()})

    def finish(self) -> dict[str, str]:
        return {}
