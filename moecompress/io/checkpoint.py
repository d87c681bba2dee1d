"""Loading user checkpoints safely and writing ours atomically, verified by a vanilla reload.

The contract: what we write reloads with plain ``AutoModelForCausalLM.from_pretrained`` with zero
missing/unexpected/mismatched keys and gives the logits we had in memory. We check both before the
output directory appears (temp dir beside the target, then rename), so a failure leaves nothing behind
and the input is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

import moecompress
from moecompress.arch.adapter import MoEAdapter, adapter_for_config_dict
from moecompress.arch.discover import text_model
from moecompress.errors import UserError

PROVENANCE = "moecompress.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class LoadedModel(BaseModel):
    """A model in memory plus where it came from."""

    model_config = {"arbitrary_types_allowed": True}
    model: Any
    tokenizer: Any | None
    adapter: MoEAdapter
    path: Path


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a checkpoint folder, with clear errors for the usual mistakes."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; pass the checkpoint folder that holds config.json")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path} has no config.json; is it a HuggingFace checkpoint folder?")
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{cfg_file} is not valid JSON: {exc}") from exc


def check_model_dir(path: Path) -> tuple[dict[str, Any], MoEAdapter]:
    """Validate a model folder from its config alone: exists, MoE family supported, weights present."""
    config = read_config(path)
    adapter = adapter_for_config_dict(config)
    if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in Path(path).iterdir()):
        raise UserError(f"{path} has a config.json but no weight files (*.safetensors / *.bin)")
    return config, adapter


def source_format(path: Path, dtype: torch.dtype = torch.bfloat16, *, validate: bool = True) -> Any:
    """The checkpoint's source format (float, FP8 block, MXFP4, compressed-tensors) from config + safetensors
    headers, validated (scales present, right shapes, files not truncated) — no weight is read.

    `validate=False` only detects: loading for evaluation accepts compressed-tensors, which passes refuse."""
    from moecompress.inspect import read_safetensors_header
    from moecompress.io.source_formats import detect_source_format

    path = Path(path)
    config = read_config(path)
    tensors: dict[str, Any] = {}
    for f in sorted(path.glob("*.safetensors")):
        header = read_safetensors_header(f)
        tensors.update({k: v for k, v in header.items() if k != "__metadata__"})
    fmt = detect_source_format(config, tensors, dtype=dtype)
    if validate:
        fmt.validate()
    return fmt


def dequantized_copy(path: Path, fmt: Any, dst: Path) -> Path:
    """A float (bf16) copy of a quantized checkpoint, written shard by shard through the format's reader.

    transformers' CPU dequantization of FP8 derives the block size from the scale grid, which misreads edge
    blocks (e.g. 576 rows in 128-row blocks); our reader uses the declared `weight_block_size`.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    path, dst = Path(path), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    index: dict[str, str] = {}
    owner: dict[str, Path] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            owner.update({k: f for k in h.keys()})
    by_shard: dict[Path, list[str]] = {}
    for key in fmt.logical_keys():
        stored = fmt.stored_keys(key)
        by_shard.setdefault(owner[stored[0]], []).append(key)
    handles: dict[Path, Any] = {}

    def get_tensor(name: str) -> torch.Tensor:
        f = owner[name]
        if f not in handles:
            handles[f] = safe_open(str(f), "pt")
        return handles[f].get_tensor(name)

    try:
        for n, (_, keys) in enumerate(sorted(by_shard.items()), start=1):
            name = f"model-{n:05d}-of-{len(by_shard):05d}.safetensors"
            save_file({k: fmt.read(k, get_tensor).contiguous() for k in keys}, str(dst / name),
                      metadata={"format": "pt"})
            index.update({k: name for k in keys})
            handles.clear()
    finally:
        handles.clear()
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config = read_config(path)
    config.pop("quantization_config", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"].pop("quantization_config", None)
    config["dtype"] = str(fmt.dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for other in path.iterdir():
        if other.is_file() and not other.name.endswith((".safetensors", ".bin")) and other.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy2(other, dst / other.name)
    return dst


@contextlib.contextmanager
def loadable(path: Path, dtype: torch.dtype = torch.bfloat16) -> Iterator[Path]:
    """A folder `from_pretrained` reads correctly: the checkpoint itself, or for FP8/MXFP4 sources a temporary
    dequantized copy made by our reader (removed on exit). Validates the source format first."""
    fmt = source_format(path, dtype=dtype, validate=False) if any(Path(path).glob("*.safetensors")) else None
    if fmt is not None and fmt.name != "compressed-tensors":  # our own quantized output loads for evaluation
        fmt.validate()
    if fmt is None or not fmt.quantized or fmt.name == "compressed-tensors":  # transformers reads these itself
        yield Path(path)
        return
    cache = Path(os.environ.get("MOECOMPRESS_CACHE", Path.home() / ".cache" / "moecompress"))
    cache.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix="dequant-", dir=cache))  # as large as the model in bf16
    try:
        yield dequantized_copy(path, fmt, staged)
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def load_model(path: Path, *, dtype: torch.dtype | str | None = None, tokenizer: bool = True,
               max_memory: int | None = None, offload_folder: Path | None = None) -> LoadedModel:
    """Load a supported MoE checkpoint for compression (eval mode, no grad).

    With `max_memory` (bytes of CPU RAM) a checkpoint larger than that is placed by accelerate
    (``device_map="auto"``: GPUs first when present, then CPU up to the budget, the rest offloaded to disk in
    `offload_folder`), e.g. to evaluate a model that the engine compressed without ever holding it whole.

    FP8 block-scaled and MXFP4 checkpoints are dequantized as they are read (bf16 unless `dtype` says otherwise),
    through ``moecompress.io.source_formats`` — the same reader the layer-streaming engine uses.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    config, adapter = check_model_dir(path)
    placement: dict[str, Any] = {}
    if max_memory is not None and checkpoint_bytes(path) > max_memory // 2:
        placement = {"device_map": "auto", "max_memory": {"cpu": int(max_memory)},
                     "offload_folder": str(offload_folder or temp_dir_beside(path.parent / f".{path.name}-offload"))}
    float_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    try:
        with loadable(path, float_dtype if isinstance(float_dtype, torch.dtype) else torch.bfloat16) as folder:
            model = auto_class(config).from_pretrained(folder, dtype=dtype or "auto", **placement)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"could not load weights from {path}: {_short(exc)}. Is a weight file corrupt or truncated?") from exc
    except Exception as exc:  # safetensors raises its own error types on corrupt headers
        if "safetensor" in type(exc).__module__.lower() or "header" in str(exc).lower():
            raise UserError(f"could not load weights from {path}: {_short(exc)}. Is a weight file corrupt?") from exc
        raise
    model.eval()
    from moecompress.arch.flat_experts import fuse_flat_experts

    fuse_flat_experts(model)  # DBRX: fused view of flattened experts; saved back in its own layout
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception:  # a checkpoint without tokenizer is still compressible; eval will say so
            tok = None
    return LoadedModel(model=model, tokenizer=tok, adapter=adapter, path=path)


def auto_class(config: dict[str, Any]):
    """The class that loads a checkpoint whole: `architectures[0]` (multimodal checkpoints keep their towers),
    else the family's causal-LM class."""
    import transformers

    for name in config.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None and hasattr(cls, "from_pretrained"):
            return cls
    return transformers.AutoModelForCausalLM


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def prepare_output(out: Path, *, overwrite: bool, source: Path | None = None) -> None:
    """Refuse to clobber: an existing non-empty output needs --overwrite; never write into the input. Temp
    folders a killed earlier run left beside `out` are removed."""
    out = Path(out)
    remove_dead_beside(out)
    if source is not None:
        src, dst = Path(source).resolve(), out.resolve()
        if dst == src or src in dst.parents:
            raise UserError(f"output {out} is the input checkpoint or inside it; choose another --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"output {out} already exists and is not empty; pass --overwrite or choose another --out")


def temp_dir_beside(out: Path, kind: str = "tmp") -> Path:
    """A private folder beside `out` (same filesystem, so publishing is a rename), named after its owner
    process so a later run can remove what a killed one left (``remove_dead_beside``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}-", dir=out.parent))


def remove_dead_beside(out: Path) -> None:
    """Remove the temp folders beside `out` whose owner process (on this host) no longer runs: what a run killed
    by SIGKILL (or a data-parallel rank that died) left behind."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|acts|old)-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")
    host = socket.gethostname()
    for p in out.parent.iterdir():
        m = pattern.match(p.name)
        if m is None or m["host"] != host or not p.is_dir():
            continue
        try:
            os.kill(int(m["pid"]), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:  # alive, another user's
            continue


def publish(tmp: Path, out: Path) -> None:
    """Move a finished temp dir into place; an existing output (only with --overwrite) is replaced."""
    out = Path(out)
    tmp.chmod(0o755)  # mkdtemp makes 0700; a published checkpoint should be readable like any folder
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}-{int(time.time())}"
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def provenance(source: Path | str | None, pass_entry: dict[str, Any] | None,
               hub: dict[str, str] | None = None) -> dict[str, Any]:
    """Chain the source's provenance (if any) with this pass.

    `hub` (repo_id, revision, commit) names a source downloaded from the Hub: the repo id becomes the base model
    and the resolved commit is recorded, so the card links the exact weights that were compressed.
    """
    import transformers

    passes: list[dict[str, Any]] = []
    base = hub["repo_id"] if hub else (str(source) if source is not None else None)
    base_revision = hub.get("commit") if hub else None
    if source is not None and (Path(source) / PROVENANCE).is_file():
        prev = json.loads((Path(source) / PROVENANCE).read_text())
        passes = list(prev.get("passes", []))
        base = prev.get("base_model", base)
        base_revision = prev.get("base_revision", base_revision)
    if pass_entry:
        passes.append(pass_entry)
    out: dict[str, Any] = {
        "moecompress_version": moecompress.__version__,
        "base_model": base,
        "source": (f"{hub['repo_id']}@{hub.get('commit', '')}" if hub else str(source) if source is not None else None),
        "passes": passes,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if base_revision:
        out["base_revision"] = base_revision
    return out


def write_count_aliases(folder: Path) -> None:
    """Write the expert count under every config key the family is known by (design §3).

    transformers saves only one of the aliases (Qwen3-MoE: `num_local_experts`), but older readers look for
    `num_experts`; writing all of them keeps every reader of our checkpoints agreeing on the count.
    """
    cfg_file = Path(folder) / "config.json"
    config = json.loads(cfg_file.read_text())
    try:
        adapter = adapter_for_config_dict(config)
    except UserError:  # a family we do not compress (e.g. a miniature of it): nothing to align
        return
    n = adapter.num_experts(config)
    text = adapter.text_config(config)
    if all(text.get(k) == n for k in adapter.count_keys):
        return
    config = adapter.with_counts(config, n)
    cfg_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def verify_model_reload(model: torch.nn.Module, path: Path, *, atol: float | None = None) -> dict[str, Any]:
    """`verify_reload` against the logits `model` gives now on a fixed probe input."""
    ids = probe_input(min(text_model(model).get_input_embeddings().num_embeddings, 320))
    return verify_reload(path, logits_of(model, ids), ids, atol=atol)


def probe_input(vocab_size: int, seq: int = 24, batch: int = 2, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=g)


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return text_model(model)(input_ids=ids.to(model.device)).logits.float().cpu()


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence loaders' own progress bars and advisory logs (compressed-tensors forces tqdm on); errors still raise."""
    import io
    import logging

    loggers = [logging.getLogger(n) for n in ("compressed_tensors", "llmcompressor")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def verify_reload(path: Path, reference_logits: torch.Tensor, ids: torch.Tensor, *, atol: float | None = None,
                  keep: list[Any] | None = None) -> dict[str, Any]:
    """Reload with vanilla transformers; fail loudly on any loading-info entry or logit mismatch.

    `keep`: the verified model is appended to it (a caller that needs the output in memory reuses this load)."""
    with quiet_loading():
        model, info = auto_class(read_config(path)).from_pretrained(path, output_loading_info=True)
    from moecompress.io.mtp import unexpected_mtp

    mtp_keys, info["unexpected_keys"] = unexpected_mtp(read_config(path), info.get("unexpected_keys") or [])
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise RuntimeError(f"reload of {path} is not clean: {problems}")
    model.eval()
    with quiet_loading():  # compressed-tensors dispatches lazily, on the first forward
        got = logits_of(model, ids)
    diff = float((got - reference_logits).abs().max())
    scale = float(reference_logits.abs().max()) or 1.0
    tol = atol if atol is not None else 1e-4 * max(1.0, scale)
    if not diff <= tol:
        raise RuntimeError(f"reloaded logits differ from the in-memory model by {diff:.3g} (tolerance {tol:.3g})")
    summary: dict[str, Any] = {"max_abs_logit_diff": diff, "loading_info": {k: len(v) for k, v in info.items()}}
    if mtp_keys:  # announced MTP keys transformers' depth-specific ignore pattern does not name (miniatures)
        summary["mtp_keys_not_loaded"] = len(mtp_keys)
    if keep is not None:
        keep.append(model)
    return summary


def write_beside_weights(tmp: Path, *, tokenizer: Any | None, source: Path | None,
                         pass_entry: dict[str, Any] | None, hub: dict[str, str] | None = None,
                         extra_files: dict[str, str | bytes] | None = None, mtp: Any = "keep") -> None:
    """Everything a written checkpoint holds besides the model's weights and config, for the in-memory writer and
    the streaming engine alike: tokenizer, MTP layers (kept consistently or dropped, recorded), extra files,
    provenance and count aliases."""
    _save_tokenizer(tokenizer, source, tmp)
    if not str((pass_entry or {}).get("pass", "")).startswith("zoo."):  # miniatures write their own
        from moecompress.io.mtp import carry_mtp

        line = carry_mtp(tmp, source, mtp)  # never a config announcing weights that are not here
        if line and pass_entry is not None:
            pass_entry["mtp"] = line
    for name, content in (extra_files or {}).items():
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    (tmp / PROVENANCE).write_text(json.dumps(provenance(source, pass_entry, hub), indent=2))
    write_count_aliases(tmp)


def write_checkpoint(
    model: torch.nn.Module,
    tokenizer: Any | None,
    out: Path,
    *,
    source: Path | None,
    pass_entry: dict[str, Any] | None = None,
    extra_files: dict[str, str | bytes] | None = None,
    overwrite: bool = False,
    verify: bool = True,
    save_original_format: bool = True,
    save_fn: Any = None,
    verify_atol: float | None = None,
    hub: dict[str, str] | None = None,
    mtp: Any = "keep",
    after_save: Any = None,
) -> dict[str, Any]:
    """Save `model` (+ tokenizer, MTP layers, provenance, extra files) to `out` atomically and verify the reload.

    `mtp`: keep | drop or an ``MTPRequest`` (``moecompress.io.mtp``); `after_save(folder)` adds to the written weights before verification (a miniature's MTP layers).

    Returns the verification summary (max logit difference, loading-info counts).
    """
    out = Path(out)
    prepare_output(out, overwrite=overwrite, source=source)
    tmp = temp_dir_beside(out)
    try:
        if save_fn is not None:  # e.g. quantized formats write their own tensors
            save_fn(tmp)
        else:
            model.save_pretrained(tmp, save_original_format=save_original_format)
        if after_save is not None:
            after_save(tmp)
        write_beside_weights(tmp, tokenizer=tokenizer, source=source, pass_entry=pass_entry, hub=hub,
                             extra_files=extra_files, mtp=mtp)
        summary: dict[str, Any] = {}
        if verify:
            summary = verify_model_reload(model, tmp, atol=verify_atol)
        publish(tmp, out)
        return summary
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


# Files of multimodal checkpoints that no pass changes: carried over byte-identical.
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                    "chat_template.json", "chat_template.jinja", "generation_config.json")


def _save_tokenizer(tokenizer: Any | None, source: Path | None, dst: Path) -> None:
    if source is not None:
        for name in _PROCESSOR_FILES:
            src = Path(source) / name
            if src.is_file() and not (dst / name).exists():
                shutil.copy2(src, dst / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(dst)
        return
    if source is None:
        return
    for name in _TOKENIZER_FILES:
        src = Path(source) / name
        if src.is_file() and not (dst / name).exists():
            shutil.copy2(src, dst / name)


def checkpoint_bytes(path: Path) -> int:
    """Bytes of weight files in a checkpoint folder (what a user downloads)."""
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
