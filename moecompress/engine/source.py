"""Source: a checkpoint folder as a model skeleton on the meta device whose parts are materialised on demand.

The skeleton is the real transformers model class built from config.json with its parameters on ``meta``
(buffers such as rotary frequencies are real and tiny). ``materialise(part)`` reads the part's on-disk tensors
through the ``TensorReader`` seam and loads them with transformers' own loader, which applies the family's
checkpoint conversion rules (``transformers.conversion_mapping``: per-expert keys fused into 3-D tensors, legacy
renames) exactly as ``from_pretrained`` does — the engine never restates a family's layout. ``release(part)``
puts the part back on ``meta``, so at most one decoder layer (plus embeddings/head) is in memory at a time.

A decoder layer too large for the budget (``ModelSource(budget=...)``, see ``chunk_plan``) is materialised
without its routed experts: they stay on ``meta`` and an ``ExpertChunks`` reader attached to the experts module
loads a few experts at a time, by source expert id, through the same loader (``load_experts``).
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


_EXPERT_NUMBER = re.compile(r"\.experts\.(\d+)\.")  # per-expert on-disk keys: ...experts.<e>.gate_proj...
# ERNIE-4.5-VL keeps text and vision experts in one on-disk list (experts.0..E-1 text, E..2E-1 vision) that
# transformers splits in half at load: a read of some experts by id would split them wrongly, so such layers
# are read whole
_PAIRED_ON_DISK = "its expert sets share one on-disk expert list that transformers splits by count at load"
FILL_BYTES = 32 << 20  # a whole layer's routed experts larger than twice this are read this much at a time
LAYER_COPIES = 3  # a layer is in memory up to ~3x while transformers' loader stacks/concatenates and surgery copies


def chunk_plan(budget: int, layer_bytes: int, expert_bytes: int, num_experts: int) -> int:
    """Experts per chunk for a layer (0: read the layer whole).

    The layer gets half the budget (the activation caches the other half) and needs ``LAYER_COPIES`` times its
    bytes while it loads; a layer that does not fit reads its experts in chunks of at most a sixth of the budget.
    """
    share = budget // 2 // LAYER_COPIES
    if layer_bytes <= share or num_experts <= 1:
        return 0
    per_expert = max(1, expert_bytes // num_experts)
    return int(min(num_experts, max(1, share // per_expert)))


class _Lazy:
    """A tensor read through the seam only when the loader indexes it (in its worker, one at a time)."""

    def __init__(self, reader: TensorReader, key: str) -> None:
        self.reader, self.key = reader, key

    def __getitem__(self, idx: Any) -> torch.Tensor:
        t = self.reader.get(self.key)
        return t if idx is Ellipsis else t[idx]


class _Rows:
    """Rows `ids` (expert dim 0) of a fused on-disk tensor, read as contiguous runs of the shard."""

    def __init__(self, reader: TensorReader, key: str, ids: list[int]) -> None:
        self.reader, self.key, self.ids = reader, key, ids

    def __getitem__(self, idx: Any) -> torch.Tensor:
        sl = self.reader.get_slice(self.key)
        runs, start = [], 0
        for j in range(1, len(self.ids) + 1):
            if j == len(self.ids) or self.ids[j] != self.ids[j - 1] + 1:
                runs.append(sl[self.ids[start] : self.ids[j - 1] + 1])
                start = j
        t = runs[0] if len(runs) == 1 else torch.cat(runs)
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
                 reader: TensorReader | None = None, budget: int | None = None) -> None:
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
        from moecompress.arch.flat_experts import has_flat_experts

        if has_flat_experts(self.model):
            from moecompress.engine.loop import NotStreamable

            raise NotStreamable(f"{type(self.model).__name__}: its experts are flattened [E*I, H] matrices or grouped "
                                "ParallelExperts (viewed fused only when the model is loaded whole)")
        from moecompress.calib.collect import pad_expert_rows

        pad_expert_rows(self.model)  # bounded matmul shapes in every sweep (oneDNN keeps a kernel per shape)
        self._layers_path = self._find_layers_path()
        self._parts = self._assign_keys()
        from moecompress.engine.chunks import ChunkMeter

        self.meter = ChunkMeter()
        self._chunks: dict[int, int] = self._plan_chunks(budget) if budget is not None else {}
        self._loaded: set[Any] = set()  # parts whose tensors are in memory now
        self._fill: dict[Any, int] = {}  # layer → experts per read when read whole (see `_fill_plan`)
        # True: `release` keeps the part in memory, so the next sweep finds it read (set by the runner while the
        # sweeps before compression run on a model small next to the budget: no tensor is read twice)
        self.hold = False

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
        self._targets: dict[str, str] = {}
        from moecompress.io.mtp import MTP_PART, layout

        mtp = layout(self.config_dict)
        for key in self.reader.keys():
            if mtp is not None and mtp.owns(key):  # no module of the model takes them (moecompress.io.mtp)
                parts.setdefault(MTP_PART, []).append(key)
                continue
            target, _ = rename_source_key(key, renamings, converters, self.model.base_model_prefix, meta)
            self._targets[key] = target
            m = pattern.match(target)
            parts.setdefault(int(m.group(1)) if m else REST, []).append(key)
        self._remember_used_conversions()
        return parts

    def keys_of(self, part: Any) -> list[str]:
        return list(self._parts.get(part, []))

    def part_bytes(self, part: Any) -> int:
        """Bytes the part takes in memory once read (a decoder layer: from the meta model's shapes and dtypes,
        so dequantized FP8/MXFP4 sources are counted as read and no tensor is touched)."""
        if part == REST:
            return self._bytes_of(self.keys_of(part))
        return _module_bytes(self.layer(part))

    # -- expert chunks ---------------------------------------------------------------------------------
    def moe_layer(self, i: int) -> Any:
        """The MoE view of decoder layer `i` (None for a dense layer)."""
        from moecompress.arch.adapter import moe_layers

        return next((ly for ly in moe_layers(self.model, self.adapter) if ly.index == i), None)

    def experts_prefix(self, i: int) -> str | None:
        """Full in-memory key prefix of layer `i`'s routed experts module (None for a dense layer)."""
        moe = self.moe_layer(i)
        if moe is None:
            return None
        rel = next(name for name, m in self.layer(i).named_modules() if m is moe.experts)
        return f"{self.layer_prefix(i)}{rel}."

    def expert_keys(self, i: int) -> list[tuple[str, int | None]]:
        """On-disk keys of layer `i`'s routed experts: (key, expert index) per-expert, (key, None) fused."""
        prefix = self.experts_prefix(i)
        if prefix is None:
            return []
        out: list[tuple[str, int | None]] = []
        for key in self.keys_of(i):
            if self._targets[key].startswith(prefix):
                m = _EXPERT_NUMBER.search(key)
                out.append((key, int(m.group(1)) if m else None))
        return out

    def _plan_chunks(self, budget: int) -> dict[int, int]:
        """Layers whose experts are read in chunks under `budget`, with the experts per chunk."""
        plan: dict[int, int] = {}
        for i in range(self.num_layers):
            moe = self.moe_layer(i)
            if moe is None:
                continue
            e = moe.num_experts
            n = chunk_plan(budget, self.part_bytes(i), _module_bytes(moe.experts), e)
            if not n:
                continue
            keys = self.expert_keys(i)
            plain = getattr(self.reader, "fmt", None) is None  # a dequantizing reader would convert to tell the shape
            why = None
            if self.adapter.routing == "sigmoid_input_scale":
                why = "its experts run densely on every token"
            elif self.adapter.paired_sets:
                why = _PAIRED_ON_DISK
            elif plain and any(idx is None and self.reader.get_slice(k).get_shape()[0] != e for k, idx in keys):
                why = "a fused expert tensor does not have the experts first"
            if why:
                raise UserError(f"decoder layer {i} ({self.part_bytes(i) / 2**30:.2f} GiB) does not fit the memory "
                                f"budget and its experts cannot be read in chunks ({why}); give --max-memory "
                                f"{self.min_unchunked_budget() / 2**30:.2f}GiB or more")
            plan[i] = n
        if plan:  # chunked experts run through the tap implementation, which reads chunks (calib.collect)
            from moecompress.calib.collect import TAP_IMPLEMENTATION, set_experts_implementation

            set_experts_implementation(self.model, TAP_IMPLEMENTATION)
        return plan

    def chunked(self, i: Any) -> int:
        """Experts per chunk of layer `i` (0: the layer is read whole)."""
        return self._chunks.get(i, 0) if i != REST else 0

    @property
    def chunked_layers(self) -> list[int]:
        return sorted(self._chunks)

    def memory_bytes(self) -> int:
        """Bytes of the whole model once read (dequantized sources counted as read)."""
        return sum(self.part_bytes(p) for p in [REST, *range(self.num_layers)])

    def min_unchunked_budget(self) -> int:
        """The smallest --max-memory at which every decoder layer is read whole."""
        return max(self.part_bytes(i) for i in range(self.num_layers)) * 2 * LAYER_COPIES

    def _bytes_of(self, keys: Any) -> int:
        total = 0
        for key in keys:
            s = self.reader.get_slice(key)
            n = 1
            for d in s.get_shape():
                n *= d
            total += n * _DTYPE_BYTES.get(s.get_dtype(), 4)
        return total

    def load_experts(self, i: int, ids: list[int]) -> dict[str, torch.Tensor]:
        """Source experts `ids` of layer `i`, in the experts module's in-memory layout ([len(ids), ...] each,
        by parameter name), read through the seam and converted by transformers' loader like a whole layer."""
        prefix = self.experts_prefix(i)
        assert prefix is not None
        module = self.model.get_submodule(prefix[:-1])
        saved = dict(module._parameters)
        for name, p in saved.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty((len(ids), *p.shape[1:]), dtype=p.dtype, device="meta"), requires_grad=False)
        position = {e: j for j, e in enumerate(ids)}
        state: dict[str, Any] = {}
        for key, e in self.expert_keys(i):
            if e is None:
                state[key] = _Rows(self.reader, key, list(ids))
            elif e in position:
                m = _EXPERT_NUMBER.search(key)
                assert m is not None
                state[key[: m.start(1)] + str(position[e]) + key[m.end(1):]] = _Lazy(self.reader, key)
        try:
            self._load(state, {prefix + n for n, p in saved.items() if p is not None}, f"experts of layer {i}")
            return {n: module._parameters[n].data for n, p in saved.items() if p is not None}
        finally:
            module._parameters.update(saved)

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
        """Read the part's tensors from the shards into the skeleton (on the engine's device).

        A chunked layer is read without its routed experts; an ``ExpertChunks`` reader on the experts module
        loads them a chunk at a time when the layer runs or is written."""
        if part in self._loaded:  # read by an earlier sweep and held (see `hold`), or REST read again
            return self.module_of(part)
        keys = self.keys_of(part)
        expected = self.expected_keys(part)
        per_chunk = self.chunked(part)
        fill = 0 if per_chunk else self._fill_plan(part)
        if per_chunk or fill:
            experts = {k for k, _ in self.expert_keys(part)}
            keys = [k for k in keys if k not in experts]
            prefix = self.experts_prefix(part)
            expected = {k for k in expected if not k.startswith(prefix)}
        what = "the decoder layer" if part != REST else "embeddings/head"
        self._load({k: _Lazy(self.reader, k) for k in keys}, expected, f"{what} {part}")
        if fill:
            self._fill_experts(part, fill)
        if per_chunk:
            from moecompress.engine.chunks import ExpertChunks

            moe = self.moe_layer(part)
            moe.experts.expert_chunks = ExpertChunks(lambda ids, i=part: self.load_experts(i, ids),
                                                     moe.num_experts, per_chunk, self.meter)
        self._tie()
        self._loaded.add(part)
        return self.module_of(part)

    def _fill_plan(self, part: Any) -> int:
        """Experts per read when a whole layer's routed experts are read a few at a time (0: in one go).

        transformers' loader holds a part's per-expert tensors, their stacks and the joined result at once (~1.7x
        the layer measured on a 198 MiB Qwen3-MoE layer); read in pieces of ``FILL_BYTES`` the transient is that
        of one piece. Small layers are read in one go (every loader call costs fixed time). Only layouts whose
        experts can be read by id (those ``chunk_plan`` may chunk) are filled this way."""
        if part == REST or part in self._fill:
            return self._fill.get(part, 0)
        n = 0
        moe = self.moe_layer(part)
        if moe is not None and moe.num_experts > 1 and not self.adapter.paired_sets:  # see _PAIRED_ON_DISK
            expert_bytes = _module_bytes(moe.experts)
            keys = self.expert_keys(part)
            plain = getattr(self.reader, "fmt", None) is None
            fused = [k for k, idx in keys if idx is None]
            if expert_bytes > 2 * FILL_BYTES and keys and (not fused or plain) and all(
                    self.reader.get_slice(k).get_shape()[0] == moe.num_experts for k in fused):
                n = max(1, FILL_BYTES // max(1, expert_bytes // moe.num_experts))
        self._fill[part] = n
        return n

    def _fill_experts(self, part: int, per_read: int) -> None:
        """Read layer `part`'s routed experts `per_read` at a time (``load_experts``: the family's own
        conversion, as for a chunked layer) into whole tensors, which replace the module's meta parameters."""
        prefix = self.experts_prefix(part)
        assert prefix is not None
        module = self.model.get_submodule(prefix[:-1])
        n = self.moe_layer(part).num_experts
        full: dict[str, torch.Tensor] = {}
        for start in range(0, n, per_read):
            ids = list(range(start, min(n, start + per_read)))
            for name, t in self.load_experts(part, ids).items():
                if name not in full:
                    full[name] = torch.empty((n, *t.shape[1:]), dtype=t.dtype, device=t.device)
                full[name][start : start + len(ids)].copy_(t)
        for name, t in full.items():  # as the loader sets parameters (set_param_for_module)
            module._parameters[name] = torch.nn.Parameter(t, requires_grad=t.is_floating_point())

    def _load(self, state: dict[str, Any], expected: set[str], what: str) -> None:
        """transformers' loader on `state` (lazy on-disk tensors); every key of `expected` must arrive cleanly."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        dtype_plan = {}
        with contextlib.suppress(Exception):
            dtype_plan = self.model._get_dtype_plan(self.dtype)
        load_config = LoadStateDictConfig(device_map={"": self.device}, dtype=self.dtype, dtype_plan=dtype_plan,
                                          weight_mapping=self.conversion())
        with _quiet_transformers(), _frugal_loading():
            info, _ = convert_and_load_state_dict_in_model(self.model, state, load_config)
        self._remember_used_conversions()
        missing = sorted(k for k in info.missing_keys if k in expected)
        problems = {"missing": missing, "unexpected": sorted(info.unexpected_keys),
                    "mismatched": sorted(str(m[0]) for m in info.mismatched_keys),
                    "errors": [str(e) for e in getattr(info, "error_msgs", [])]}
        conv = getattr(info, "conversion_errors", None)
        if conv:
            problems["errors"] += [f"{k}: {v}" for k, v in conv.items()]
        bad = {k: v for k, v in problems.items() if v}
        if bad:
            first = next(iter(bad.items()))
            raise UserError(f"{self.folder}: {what} does not load cleanly ({first[0]}: {first[1][:3]}); "
                            "the checkpoint is incomplete or does not match its config.json")

    def state_of(self, part: Any) -> dict[str, torch.Tensor]:
        """The part's in-memory tensors under full model keys (what ``model.state_dict()`` would hold)."""
        if part == REST:
            layers = re.compile(re.escape(self._layers_path) + r"\.\d+\.")
            return {k: v for k, v in self.model.state_dict().items() if not layers.match(k)}
        prefix = self.layer_prefix(part)
        return {prefix + k: v for k, v in self.layer(part).state_dict().items() if v.device.type != "meta"}

    def _tie(self) -> None:
        tied = getattr(self.model, "all_tied_weights_keys", {}) or {}
        for target, source in tied.items():
            src_mod, _, src_name = source.rpartition(".")
            dst_mod, _, dst_name = target.rpartition(".")
            value = getattr(self.model.get_submodule(src_mod), src_name)
            if value.device.type != "meta":
                setattr(self.model.get_submodule(dst_mod), dst_name, value)

    def release(self, part: Any) -> None:
        """Drop the part's tensors (back to meta; shapes are kept, so surgery done on it stays visible); with
        `hold`, keep them for the next sweep."""
        if self.hold:
            return
        self._loaded.discard(part)
        module = self.module_of(part)
        if part == REST:
            inside = {id(m) for m in decoder_layers(self.model).modules()}
            for sub in self.model.modules():
                if id(sub) not in inside:
                    _to_meta(sub, recurse=False)
            return
        for sub in module.modules():
            _to_meta(sub, recurse=False)
            sub.__dict__.pop("expert_chunks", None)
        return_freed_memory()

    def close(self) -> None:
        self.reader.close()


def _module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and persistent buffers (meta tensors included: shapes and dtypes only)."""
    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for sub in module.modules():
        for name, b in sub._buffers.items():
            if b is not None and name not in sub._non_persistent_buffers_set:
                total += b.numel() * b.element_size()
    return total


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_M_ARENA_MAX = -8  # glibc mallopt option numbers (malloc.h)
_LOADING_THRESHOLD = 1 << 20  # while a part's tensors are read and converted: MiB-size blocks from mmap
_COMPUTE_THRESHOLD = 32 << 20  # otherwise: glibc's own ceiling for its dynamic threshold (64-bit)
_engine_mallopt = False  # set by prefer_mmap_for_large_blocks (the engine opened a source in this process)


def _mallopt(option: int, value: int) -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(option, value)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


_threshold_now = _COMPUTE_THRESHOLD  # the last threshold set (weight_allocations restores it on exit)


def _mmap_threshold(threshold: int) -> None:
    global _threshold_now
    _threshold_now = threshold
    _mallopt(_M_MMAP_THRESHOLD, threshold)


def prefer_mmap_for_large_blocks() -> None:
    """Let the engine steer glibc's mmap threshold from now on (see ``_frugal_loading``).

    glibc's dynamic threshold rises (up to 32 MiB) after the first freed mmapped block, after which the MiB-size
    per-expert tensors the loader creates for later layers land in a heap that keeps their pages (bench/README.md:
    layer streaming). Outside the loader the threshold is glibc's ceiling, so activations and other compute
    temporaries reuse heap blocks instead of paying an mmap + page faults + munmap per tensor (0.4 s of a 2.7 s
    streamed prune of the trained reference when the 1 MiB threshold applied everywhere)."""
    global _engine_mallopt
    _engine_mallopt = True
    _mmap_threshold(_COMPUTE_THRESHOLD)
    # One heap for every thread: the matmul and LAPACK worker threads' own arenas each kept a layer's worth of
    # freed blocks, so a GPTQ sweep's peak rose ~50 MiB per layer (4-layer copy of the stream bench: 1.18 →
    # 1.35 GiB; with one arena 1.25 → 1.28, same wall time)
    _mallopt(_M_ARENA_MAX, 1)


@contextlib.contextmanager
def _frugal_loading() -> Iterator[None]:
    """While transformers' loader reads and converts a part.

    * Tensors are read when their conversion needs them, not all at once: the loader's default thread pool
      submits every read of the part up front, so a whole layer of per-expert tensors sits in memory before the
      first stack/concatenate starts (``HF_DEACTIVATE_ASYNC_LOAD``, read by the loader at each call).
    * Blocks of ≥ 1 MiB come from mmap (once the engine steers glibc, ``prefer_mmap_for_large_blocks``), so the
      layer's tensors and the loader's per-expert temporaries go back to the OS as soon as they are freed."""
    import os

    saved = os.environ.get(_ASYNC_OFF)
    os.environ[_ASYNC_OFF] = "1"
    try:
        with weight_allocations():
            yield
    finally:
        if saved is None:
            del os.environ[_ASYNC_OFF]
        else:
            os.environ[_ASYNC_OFF] = saved


@contextlib.contextmanager
def weight_allocations(active: bool = True) -> Iterator[None]:
    """Blocks of >= 1 MiB from mmap while weights are read or rewritten (the loader, surgery), so what is freed
    goes back to the OS at once; on exit, the threshold before (the compute threshold, or the rule of an enclosing
    context). No-op unless the engine steers glibc."""
    if not (active and _engine_mallopt):
        yield
        return
    before = _threshold_now  # nested inside another rule's context: that rule again on exit
    _mmap_threshold(_LOADING_THRESHOLD)
    try:
        yield
    finally:
        _mmap_threshold(before)


_ASYNC_OFF = "HF_DEACTIVATE_ASYNC_LOAD"


def return_freed_memory() -> None:
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
