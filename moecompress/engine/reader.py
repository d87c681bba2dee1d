"""The one seam through which raw checkpoint tensors are read: ``TensorReader``.

Everything the engine reads from a checkpoint's shards goes through ``TensorReader.get`` / ``get_slice``, so
a reader that converts tensors as they are read (e.g. dequantizing FP8-block or MXFP4 source formats) plugs in
at one place. Shards are opened with ``safe_open`` and read with ``pread`` (not memory-mapped: pages of a
mapped shard stay resident in the process as the sweep touches them), so reading one layer reads only it.
Broken folders (a shard named in the index but missing, a truncated shard, a key in the index that no file
holds) fail here, up front, with one clear message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moecompress.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class TensorReader:
    """Raw on-disk tensors of a safetensors checkpoint folder, by their on-disk key."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._file_of = self._key_map()
        self._handles: dict[str, Any] = {}
        self._check_shards()

    # -- layout --------------------------------------------------------------------------------------
    def _key_map(self) -> dict[str, str]:
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UserError(f"{index} is not a valid safetensors index ({exc})") from exc
            return dict(weight_map)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            if any(self.folder.glob("*.bin")):
                raise UserError(f"{self.folder} holds only *.bin weights; streaming needs safetensors. Convert with "
                                "`model.save_pretrained(dst)` once, or run on a machine that fits the model.")
            raise UserError(f"{self.folder} has no *.safetensors weight files")
        if len(files) > 1:
            raise UserError(f"{self.folder} has several *.safetensors files but no {INDEX}")
        with self._open(files[0].name) as f:
            return {k: files[0].name for k in f.keys()}

    def _open(self, name: str) -> Any:
        path = self.folder / name
        if not path.is_file():
            raise UserError(f"shard {name} is named in {self.folder / INDEX} but missing from {self.folder}")
        try:
            try:  # pread: bytes are read into our tensors, not mapped (mapped pages would count as resident memory)
                return safe_open(str(path), framework="pt", device="cpu", backend="pread")
            except TypeError:  # older safetensors: memory-mapped only
                return safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt/truncated files
            raise UserError(f"shard {path} cannot be read ({str(exc).strip()[:200]}); is it truncated or "
                            "corrupt? Re-download it.") from exc

    def _check_shards(self) -> None:
        by_file: dict[str, set[str]] = {}
        for key, name in self._file_of.items():
            by_file.setdefault(name, set()).add(key)
        for name, keys in sorted(by_file.items()):
            handle = self._handle(name)
            missing = keys - set(handle.keys())
            if missing:
                raise UserError(f"{len(missing)} key(s) named in the index are not in shard {name}, e.g. "
                                f"{sorted(missing)[0]!r}; the checkpoint is incomplete or its index is stale")

    def _handle(self, name: str) -> Any:
        if name not in self._handles:
            self._handles[name] = self._open(name)
        return self._handles[name]

    # -- the seam ------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._file_of)

    def shard_of(self, key: str) -> str:
        return self._file_of[key]

    def get_slice(self, key: str) -> Any:
        """Lazy handle: ``[...]`` reads the whole tensor, ``[e0:e1]`` only those rows."""
        return self._handle(self._file_of[key]).get_slice(key)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handle(self._file_of[key]).get_tensor(key)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"cannot read {key!r} from {self.folder / self._file_of[key]}: "
                            f"{str(exc).strip()[:200]}") from exc

    def shape(self, key: str) -> list[int]:
        return list(self.get_slice(key).get_shape())

    def nbytes(self) -> int:
        return sum((self.folder / n).stat().st_size for n in set(self._file_of.values()))

    def close(self) -> None:
        self._handles.clear()


class PackedDequantReader(TensorReader):
    """Reads our compressed-tensors ``pack-quantized`` checkpoints as float: each module's ``weight_packed`` /
    ``weight_scale`` / ``weight_shape`` appear as one ``weight`` (codes x scale, computed as the loader does).

    Used to verify a streamed quantized output with the same float engine that wrote it.
    """

    _PARTS = ("weight_packed", "weight_scale", "weight_shape")

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        raw = super().keys()
        self._packed = {k[: -len(".weight_packed")] for k in raw if k.endswith(".weight_packed")}
        self._keys = [k for k in raw if k.rsplit(".", 1)[-1] not in self._PARTS or k.rsplit(".", 1)[0] not in
                      self._packed] + [f"{m}.weight" for m in sorted(self._packed)]

    def keys(self) -> list[str]:
        return list(self._keys)

    def shard_of(self, key: str) -> str:
        m = key[: -len(".weight")]
        return super().shard_of(f"{m}.weight_packed" if m in self._packed else key)

    def get(self, key: str) -> torch.Tensor:
        m = key[: -len(".weight")] if key.endswith(".weight") else None
        if m not in self._packed:
            return super().get(key)
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        from moecompress.quant.rtn import dequantize

        packed, scale = super().get(f"{m}.weight_packed"), super().get(f"{m}.weight_scale")
        out, inn = (int(v) for v in super().get(f"{m}.weight_shape"))
        bits = round(packed.shape[1] * 32 / inn)
        q = unpack_from_int32(packed, bits, torch.Size([out, inn]))
        groups = scale.shape[1]
        return dequantize(q, scale, -1 if groups == 1 else inn // groups)

    def get_slice(self, key: str) -> Any:
        m = key[: -len(".weight")] if key.endswith(".weight") else None
        if m not in self._packed:
            return super().get_slice(key)
        return _Materialised(self.get(key))


class _Materialised:
    """A slice-like view over a tensor computed in memory (dequantized weights)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __getitem__(self, idx: Any) -> torch.Tensor:
        return self.t[idx]

    def get_shape(self) -> list[int]:
        return list(self.t.shape)

    def get_dtype(self) -> str:
        return {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}.get(self.t.dtype, "F32")


class DequantizingReader(TensorReader):
    """FP8-block and MXFP4 sources read as float: each logical key is dequantized as it is read, by the format
    reader of ``moecompress.io.source_formats`` (transformers' own kernels), so the engine sees a float
    checkpoint and never holds more than the tensor in flight."""

    def __init__(self, folder: Path, fmt: Any) -> None:
        super().__init__(folder)
        self.fmt = fmt
        self._logical = fmt.logical_keys()

    def keys(self) -> list[str]:
        return list(self._logical)

    def _raw(self, key: str) -> bool:
        return self.fmt.stored_keys(key) == [key]

    def shard_of(self, key: str) -> str:
        return super().shard_of(self.fmt.stored_keys(key)[0])

    def get(self, key: str) -> torch.Tensor:
        return self.fmt.read(key, super().get)

    def get_slice(self, key: str) -> Any:
        if self._raw(key) and not super().get_slice(key).get_dtype().startswith("F8"):
            return super().get_slice(key)
        return _Materialised(self.get(key))


def reader_for(folder: Path, dtype: torch.dtype | None = None) -> TensorReader:
    """The reader a source folder needs: plain, or dequantizing for FP8-block / MXFP4 checkpoints."""
    from moecompress.io.checkpoint import read_config
    from moecompress.io.source_formats import detect_source_format

    plain = TensorReader(folder)
    metas = {k: (plain.get_slice(k).get_dtype(), plain.shape(k)) for k in plain.keys()}
    fmt = detect_source_format(read_config(Path(folder)), metas, dtype=dtype or torch.bfloat16)
    fmt.validate()  # compressed-tensors sources are refused here, in one line
    if not fmt.quantized:
        return plain
    plain.close()
    return DequantizingReader(folder, fmt)
