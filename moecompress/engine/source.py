"""Source: a checkpoint folder as a model skeleton on the meta device whose parts are materialised on demand.

The skeleton is the real transformers model class built from config.json with its parameters on ``meta``
(buffers such as rotary frequencies are real and tiny). ``materialise(part)`` reads the part's on-disk tensors
through the ``TensorReader`` seam and loads them with transformers' own loader, which applies the family's
checkpoint conversion rules (``transformers.conversion_mapping``: per-expert keys fused into 3-D tensors, legacy
renames) exactly as ``from_pretrained`` does — the engine never restates a family's layout. ``release(part)``
puts the part back on ``meta``, so at most one decoder layer (plus embeddings/head) is in memory at a time.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moecompress.arch.adapter import MoEAdapter, adapter_for_config_dict, decoder_layers
from moecompress.engine.reader import TensorReader
from moecompress.errors import UserError
from moecompress.io.checkpoint import read_config

REST = "rest"  # the part holding everything outside the decoder layers (embeddings, final norm, head)


class _Lazy:
    """A tensor read through the seam only when the loader indexes it (in its worker, one at a time)."""

    def __init__(self, reader: TensorReader, key: str) -> None:
        self.reader, self.key = reader, key

    def __getitem__(self, idx: Any) -> torch.Tensor:
        t = self.reader.get(self.key)
        return t if idx is Ellipsis else t[idx]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """The loader's per-call progress bar and missing-key warnings are noise for partial loads."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def skeleton(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The model class of `config` with parameters on meta (no memory), buffers real, in eval mode."""
    from accelerate import init_empty_weights

    from moecompress.io.checkpoint import auto_class

    # the class in `architectures` (multimodal checkpoints keep their towers in REST), else the causal-LM class
    cls = auto_class({"architectures": getattr(config, "architectures", None)})
    with init_empty_weights(include_buffers=False), _quiet_transformers():
        model = cls.from_config(config, dtype=dtype) if hasattr(cls, "register") else cls._from_config(
            config, dtype=dtype)
    model.eval()
    return model


def checkpoint_dtype(config: Any, reader: TensorReader) -> torch.dtype:
    """What ``from_pretrained(dtype="auto")`` would pick: config dtype, else the first floating tensor's."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    if isinstance(d, torch.dtype):
        return d
    for key in reader.keys()[:64]:
        t = reader.get_slice(key)
        name = t.get_dtype()
        if name in ("BF16", "F16", "F32"):
            return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[name]
    return torch.float32


class ModelSource:
    """One checkpoint folder, read a part at a time. Parts: decoder layer indices and ``REST``."""

    def __init__(self, folder: Path, *, dtype: torch.dtype | str | None = None, device: str = "cpu",
                 reader: TensorReader | None = None) -> None:
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.config_dict = read_config(self.folder)
        self.adapter: MoEAdapter = adapter_for_config_dict(self.config_dict)
        try:
            self.config = AutoConfig.from_pretrained(self.folder)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"cannot read the config of {self.folder}: {exc}") from exc
        self.reader = reader or TensorReader(self.folder)
        if getattr(self.reader, "fmt", None) is not None:  # FP8/MXFP4 read as float: the skeleton and output are float
            self.config_dict.pop("quantization_config", None)
            if hasattr(self.config, "quantization_config"):
                del self.config.quantization_config
        if isinstance(dtype, str):
            dtype = None if dtype == "auto" else getattr(torch, dtype)
        self.dtype = dtype or checkpoint_dtype(self.config, self.reader)
        self.device = torch.device(device)
        self.model = skeleton(self.config, self.dtype)
        self._layers_path = self._find_layers_path()
        self._parts = self._assign_keys()

    # -- structure -----------------------------------------------------------------------------------
    def _find_layers_path(self) -> str:
        layers = decoder_layers(self.model)
        for name, module in self.model.named_modules():
            if module is layers:
                return name
        raise UserError(f"{type(self.model).__name__}: decoder layers not found")  # pragma: no cover

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    def layer(self, i: int) -> torch.nn.Module:
        return decoder_layers(self.model)[i]

    def layer_prefix(self, i: int) -> str:
        return f"{self._layers_path}.{i}."

    def conversion(self) -> list[Any]:
        """The family's checkpoint conversion rules, computed once; their use flags say what save must revert."""
        if not hasattr(self, "_mapping"):
            from transformers.conversion_mapping import get_model_conversion_mapping

            self._mapping = get_model_conversion_mapping(self.model)
        return self._mapping

    def _remember_used_conversions(self) -> None:
        """What ``from_pretrained`` leaves on the model so that saving writes the layout it read."""
        self.model._weight_conversions = [m for m in self.conversion() if m.was_used()]

    def _assign_keys(self) -> dict[Any, list[str]]:
        """On-disk key → the part owning its in-memory target, using transformers' renaming rules."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = self.conversion()
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        meta = self.model.state_dict()
        pattern = re.compile(re.escape(self._layers_path) + r"\.(\d+)\.")
        parts: dict[Any, list[str]] = {}
        for key in self.reader.keys():
            target, _ = rename_source_key(key, renamings, converters, self.model.base_model_prefix, meta)
            m = pattern.match(target)
            parts.setdefault(int(m.group(1)) if m else REST, []).append(key)
        self._remember_used_conversions()
        return parts

    def keys_of(self, part: Any) -> list[str]:
        return list(self._parts.get(part, []))

    def part_bytes(self, part: Any) -> int:
        total = 0
        for key in self.keys_of(part):
            s = self.reader.get_slice(key)
            n = 1
            for d in s.get_shape():
                n *= d
            total += n * _DTYPE_BYTES.get(s.get_dtype(), 4)
        return total

    def module_of(self, part: Any) -> torch.nn.Module:
        return self.layer(part) if part != REST else self.model

    def expected_keys(self, part: Any) -> set[str]:
        """In-memory state-dict keys the part must receive (tied copies excluded)."""
        tied = set(getattr(self.model, "all_tied_weights_keys", {}) or {})
        if part == REST:
            layers = re.compile(re.escape(self._layers_path) + r"\.\d+\.")
            return {k for k in self.model.state_dict() if not layers.match(k) and k not in tied}
        prefix = self.layer_prefix(part)
        return {prefix + k for k in self.layer(part).state_dict()}

    # -- materialise / release -----------------------------------------------------------------------
    def materialise(self, part: Any) -> torch.nn.Module:
        """Read the part's tensors from the shards into the skeleton (on the engine's device)."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        keys = self.keys_of(part)
        state = {k: _Lazy(self.reader, k) for k in keys}
        dtype_plan = {}
        with contextlib.suppress(Exception):
            dtype_plan = self.model._get_dtype_plan(self.dtype)
        load_config = LoadStateDictConfig(device_map={"": self.device}, dtype=self.dtype, dtype_plan=dtype_plan,
                                          weight_mapping=self.conversion())
        with _quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(self.model, state, load_config)
        self._remember_used_conversions()
        expected = self.expected_keys(part)
        missing = sorted(k for k in info.missing_keys if k in expected)
        problems = {"missing": missing, "unexpected": sorted(info.unexpected_keys),
                    "mismatched": sorted(str(m[0]) for m in info.mismatched_keys),
                    "errors": [str(e) for e in getattr(info, "error_msgs", [])]}
        conv = getattr(info, "conversion_errors", None)
        if conv:
            problems["errors"] += [f"{k}: {v}" for k, v in conv.items()]
        bad = {k: v for k, v in problems.items() if v}
        if bad:
            what = "the decoder layer" if part != REST else "embeddings/head"
            first = next(iter(bad.items()))
            raise UserError(f"{self.folder}: {what} {part} does not load cleanly ({first[0]}: {first[1][:3]}); "
                            "the checkpoint is incomplete or does not match its config.json")
        self._tie()
        return self.module_of(part)

    def state_of(self, part: Any) -> dict[str, torch.Tensor]:
        """The part's in-memory tensors under full model keys (what ``model.state_dict()`` would hold)."""
        if part == REST:
            layers = re.compile(re.escape(self._layers_path) + r"\.\d+\.")
            return {k: v for k, v in self.model.state_dict().items() if not layers.match(k)}
        prefix = self.layer_prefix(part)
        return {prefix + k: v for k, v in self.layer(part).state_dict().items()}

    def _tie(self) -> None:
        tied = getattr(self.model, "all_tied_weights_keys", {}) or {}
        for target, source in tied.items():
            src_mod, _, src_name = source.rpartition(".")
            dst_mod, _, dst_name = target.rpartition(".")
            value = getattr(self.model.get_submodule(src_mod), src_name)
            if value.device.type != "meta":
                setattr(self.model.get_submodule(dst_mod), dst_name, value)

    def release(self, part: Any) -> None:
        """Drop the part's tensors (back to meta; shapes are kept, so surgery done on it stays visible)."""
        module = self.module_of(part)
        if part == REST:
            inside = {id(m) for m in decoder_layers(self.model).modules()}
            for sub in self.model.modules():
                if id(sub) not in inside:
                    _to_meta(sub, recurse=False)
            return
        for sub in module.modules():
            _to_meta(sub, recurse=False)
        _return_freed_memory()

    def close(self) -> None:
        self.reader.close()


def _return_freed_memory() -> None:
    """Hand memory freed with a layer back to the OS (glibc keeps freed heap pages otherwise; RSS would creep)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _to_meta(module: torch.nn.Module, recurse: bool) -> None:
    """Parameters and persistent buffers of `module` back to meta (non-persistent buffers are computed, kept)."""
    for sub in (module.modules() if recurse else [module]):
        for pname, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[pname] = torch.nn.Parameter(p.detach().to("meta"), requires_grad=False)
        for bname, b in list(sub._buffers.items()):
            if b is not None and bname not in sub._non_persistent_buffers_set and b.device.type != "meta":
                sub._buffers[bname] = b.to("meta")


_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U32": 4, "U16": 2}
