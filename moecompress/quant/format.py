"""Write quantized MoE checkpoints as compressed-tensors ``pack-quantized`` that vanilla transformers reloads.

On disk each quantized linear ``<module>`` has ``<module>.weight_packed`` (int32, the library's dense
packing of the signed codes), ``<module>.weight_scale`` (``[out, in / group_size]``, or ``[out, 1]``
per-channel) and ``<module>.weight_shape`` (int64 ``[out, in]``); ``config.json`` gets a
``quantization_config`` with ``quant_method: compressed-tensors``, ``format: pack-quantized``,
``quantization_status: compressed``, config groups and an ``ignore`` list. Routed experts are written in
the per-expert layout ``save_pretrained`` produces (``mlp.experts.{e}.gate_proj`` for Qwen-style families,
``block_sparse_moe.experts.{e}.w1`` for Mixtral, …), which is what transformers, vLLM and converters read.

What transformers 5.23 + compressed-tensors 0.20 actually load exactly (each line measured with a reload →
logits test on tiny Qwen3-MoE; ``tests/test_quant_format.py`` keeps the important ones proven):

- **Routed experts: one scheme for all of them, model-wide.** transformers has no per-expert modules; it
  collects each layer's per-expert tensors and decompresses them with a single scheme chosen by
  ``integrations.compressed_tensors.get_experts_scheme`` (the first config group whose ``re:`` targets
  mention ``experts``). Different bit widths per expert, per projection (gate/up vs down) or per layer
  load *without any error or missing key* but with wrong weights (max logit error 0.56 / 0.04 / 0.76 on
  the tiny model). A different group size per expert fails on shape. So :func:`save_quantized` refuses
  mixed expert schemes unless ``pad_mixed_experts=True``, which stores every expert at the largest bit
  width: a ``b``-bit code is also a valid code of any wider grid and the weight is ``q * scale`` either
  way, so this loads exactly — the quality of per-expert mixed precision, without its disk saving.
- **All routed experts or none.** With a quantization config, the expert converters expect packed
  tensors; a layer (or a single expert) left in float fails to load. :func:`save_quantized` checks this.
- **Dense linears (attention, shared experts, dense MLPs): one scheme per module** loads exactly in
  transformers' default mode, because they are real ``nn.Linear`` that compressed-tensors converts one by
  one. Under ``CompressedTensorsConfig(dequantize=True)`` transformers decompresses every dense module
  with the first non-expert group, so mixed dense schemes are only exact in the default mode; they are
  refused unless ``allow_mixed_dense=True``.
- **Bit widths 2–8 all load exactly** (``pack_to_int32`` packs 1–8 bits densely and the stored
  ``weight_shape`` makes unpacking exact for 3/5/6/7 bits too); vLLM's kernels serve 4 and 8 only.
  Per-channel (``group_size=-1``, strategy ``channel``) and grouped scales both load.

So the unit that mixed precision can really save bytes on is: all routed experts together, plus each dense
linear. Per-expert allocations (MC-MoE) are real in quality but need ``pad_mixed_experts`` to be stored.

Config layout we write: ``group_0`` is the routed experts, one ``re:`` target with layer and expert indices
wildcarded; dense groups list exact module names (no ``re:``), so DeepSeek-style ``shared_experts`` are
never mistaken for the routed group. Measured exact (both load modes, max logit error ≤ 3e-7): Qwen3-MoE,
Mixtral, OLMoE, Qwen2-MoE / DeepSeek-V3 / GLM4-MoE with quantized shared experts; float32 and bfloat16.
Families whose original checkpoints keep experts fused on disk (gpt-oss, Llama4) have no per-expert 2-D
weights to pack and are not supported here (their keys are reported as unknown).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moecompress.errors import UserError
from moecompress.quant.rtn import QuantResult, qrange

ROUTED_EXPERT_RE = re.compile(r"(^|\.)experts\.\d+\.")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


@dataclass
class QuantizedCheckpointInfo:
    """What was written: schemes, sizes on disk and bits per quantized weight."""

    path: str
    expert_scheme: dict[str, int] | None  # {"bits": stored bits, "group_size": g}
    dense_schemes: list[dict[str, int]]
    n_quantized_modules: int
    n_quantized_params: int
    effective_bits: float  # mean code width over quantized params (what the quantizer used)
    stored_bits: float  # mean code width as stored (≥ effective when mixed experts were padded)
    bits_per_param_with_scales: float  # stored codes + scales (+ shapes) per quantized param
    bytes_on_disk: int  # every file in the folder
    weight_bytes: int  # safetensors files after quantization
    dense_weight_bytes: int  # safetensors files as save_pretrained wrote them (unquantized)
    ignore: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_routed_expert_key(module_name: str) -> bool:
    """Per-expert checkpoint module names (``...experts.3.gate_proj``), not shared experts."""
    return bool(ROUTED_EXPERT_RE.search(module_name))


def save_quantized(
    model: torch.nn.Module,
    out_dir: str | Path,
    quantized: Mapping[str, QuantResult],
    ignore: Sequence[str] | None = None,
    *,
    pad_mixed_experts: bool = False,
    allow_mixed_dense: bool = False,
    check_model: bool = True,
    **save_kwargs: Any,
) -> QuantizedCheckpointInfo:
    """Save ``model`` to ``out_dir`` with the linears in ``quantized`` stored as pack-quantized integers.

    ``quantized`` maps *checkpoint* module names (as ``save_pretrained`` writes them, without
    ``.weight``) to their :class:`QuantResult`. With ``check_model`` (default) the model must already hold
    each result's ``dequant`` weights: the saved float weight is compared with it, which catches
    wrong key mappings (gate vs up, wrong expert) and guarantees the reload equals the in-memory model.
    ``save_kwargs`` go to ``save_pretrained`` (``save_original_format`` must stay True: experts need the
    per-expert layout).
    """
    if save_kwargs.get("save_original_format") is False:
        raise UserError("quantized checkpoints need the per-expert layout; drop save_original_format=False")
    out = Path(out_dir)
    model.save_pretrained(out, **save_kwargs)
    return quantize_saved_checkpoint(
        out,
        quantized,
        ignore,
        pad_mixed_experts=pad_mixed_experts,
        allow_mixed_dense=allow_mixed_dense,
        check_weights=check_model,
    )


def quantize_saved_checkpoint(
    folder: str | Path,
    quantized: Mapping[str, QuantResult],
    ignore: Sequence[str] | None = None,
    *,
    pad_mixed_experts: bool = False,
    allow_mixed_dense: bool = False,
    check_weights: bool = True,
) -> QuantizedCheckpointInfo:
    """Rewrite a float checkpoint folder (safetensors, per-expert layout) in place as pack-quantized.

    See :func:`save_quantized`; ``check_weights`` compares each stored float weight with ``dequant``.
    Everything that can be checked from names and shapes is checked before any file changes; a failed
    weight comparison can leave earlier shards rewritten, so write into a temporary folder (as
    ``io.checkpoint.write_checkpoint`` does) and publish it only on success.
    """
    if not quantized:
        raise UserError("nothing to quantize: the mapping of module names to quantized weights is empty")
    folder = Path(folder)
    cfg_path = folder / "config.json"
    config = json.loads(cfg_path.read_text())
    if config.get("quantization_config"):
        raise UserError(f"{folder} is already quantized ({config['quantization_config'].get('quant_method')})")
    key_to_file, index = _weight_files(folder)
    dense_bytes = sum((folder / f).stat().st_size for f in set(key_to_file.values()))
    shapes = _tensor_shapes(folder, set(key_to_file.values()))

    unknown = [m for m in quantized if f"{m}.weight" not in key_to_file]
    if unknown:
        modules = sorted({k[: -len(".weight")] for k in key_to_file if k.endswith(".weight")})
        hints = {m: difflib.get_close_matches(m, modules, n=1) for m in unknown[:3]}
        raise UserError(
            f"{len(unknown)} quantized module(s) are not in the checkpoint, e.g. "
            + "; ".join(f"{m!r} (closest: {h[0]!r})" if h else repr(m) for m, h in hints.items())
            + ". Keys must be checkpoint module names as save_pretrained writes them, without '.weight'."
        )
    for name, res in quantized.items():
        if tuple(shapes[f"{name}.weight"]) != res.shape:
            raise UserError(
                f"{name}: quantized shape {res.shape} != checkpoint weight shape {tuple(shapes[name + '.weight'])}"
            )

    expert_scheme, dense_groups, stored_bits = _plan_schemes(
        quantized, shapes, pad_mixed_experts=pad_mixed_experts, allow_mixed_dense=allow_mixed_dense
    )
    if ignore is None:
        ignore = sorted(
            k[: -len(".weight")]
            for k, s in shapes.items()
            if k.endswith(".weight") and len(s) == 2 and k[: -len(".weight")] not in quantized
            and "embed" not in k.rsplit(".", 2)[-2]
        )

    # Rewrite each shard that holds a quantized weight.
    by_file: dict[str, list[str]] = {}
    for name in quantized:
        by_file.setdefault(key_to_file[f"{name}.weight"], []).append(name)
    for fname, names in by_file.items():
        path = folder / fname
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        for name in names:
            res = quantized[name]
            weight = tensors.pop(f"{name}.weight")
            if check_weights:
                _check_same(name, weight, res)
            tensors.update({f"{name}.{k}": v for k, v in _packed_tensors(res, stored_bits[name]).items()})
            if index is not None:
                del index["weight_map"][f"{name}.weight"]
                for suffix in ("weight_packed", "weight_scale", "weight_shape"):
                    index["weight_map"][f"{name}.{suffix}"] = fname
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    if index is not None:
        index.setdefault("metadata", {})["total_size"] = _total_tensor_bytes(folder, set(index["weight_map"].values()))
        (folder / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    config["quantization_config"] = _quantization_config(quantized, stored_bits, list(ignore))
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    n_params = {name: res.shape[0] * res.shape[1] for name, res in quantized.items()}
    total = sum(n_params.values()) or 1
    q_bytes = sum(_packed_nbytes(res, stored_bits[name]) for name, res in quantized.items())
    files = set(key_to_file.values())
    return QuantizedCheckpointInfo(
        path=str(folder),
        expert_scheme=expert_scheme,
        dense_schemes=[{"bits": b, "group_size": g} for (b, g) in dense_groups],
        n_quantized_modules=len(quantized),
        n_quantized_params=sum(n_params.values()),
        effective_bits=sum(n_params[m] * r.bits for m, r in quantized.items()) / total,
        stored_bits=sum(n_params[m] * stored_bits[m] for m in quantized) / total,
        bits_per_param_with_scales=8 * q_bytes / total,
        bytes_on_disk=sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
        weight_bytes=sum((folder / f).stat().st_size for f in files),
        dense_weight_bytes=dense_bytes,
        ignore=list(ignore),
    )


def _weight_files(folder: Path) -> tuple[dict[str, str], dict[str, Any] | None]:
    """Tensor name → shard file, and the shard index (None for a single-file checkpoint)."""
    if (folder / _INDEX).is_file():
        index = json.loads((folder / _INDEX).read_text())
        return dict(index["weight_map"]), index
    if (folder / _SINGLE).is_file():
        with safe_open(str(folder / _SINGLE), framework="pt") as f:
            return {k: _SINGLE for k in f.keys()}, None  # noqa: SIM118
    raise UserError(f"{folder} has no safetensors weights; save with safe_serialization (the default)")


def _tensor_shapes(folder: Path, files: set[str]) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for fname in files:
        with safe_open(str(folder / fname), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118
                shapes[k] = list(f.get_slice(k).get_shape())
    return shapes


def _total_tensor_bytes(folder: Path, files: set[str]) -> int:
    total = 0
    for fname in files:
        with safe_open(str(folder / fname), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118
                sl = f.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * _DTYPE_BYTES.get(sl.get_dtype(), 4)
    return total


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _plan_schemes(
    quantized: Mapping[str, QuantResult],
    shapes: Mapping[str, list[int]],
    *,
    pad_mixed_experts: bool,
    allow_mixed_dense: bool,
) -> tuple[dict[str, int] | None, list[tuple[int, int]], dict[str, int]]:
    """Decide the stored schemes (see the module docstring for why they are this restricted)."""
    experts = {m: r for m, r in quantized.items() if is_routed_expert_key(m)}
    dense = {m: r for m, r in quantized.items() if m not in experts}
    stored = {m: r.bits for m, r in quantized.items()}

    expert_scheme = None
    if experts:
        all_routed = {
            k[: -len(".weight")] for k, s in shapes.items()
            if k.endswith(".weight") and len(s) == 2 and is_routed_expert_key(k)
        }
        missing = sorted(all_routed - set(experts))
        if missing:
            raise UserError(
                f"{len(missing)} of {len(all_routed)} routed expert weights are not quantized (e.g. {missing[0]!r}); "
                "vanilla transformers loads quantized experts only if every routed expert of the model is "
                "quantized — quantize them all (8 bits for ones you want near-lossless)"
            )
        groups = {r.group_size for r in experts.values()}
        if len(groups) > 1:
            raise UserError(
                f"routed experts use several group sizes {sorted(groups)}; transformers decompresses all routed "
                "experts with one scheme, so use a single group_size for them"
            )
        bits = {r.bits for r in experts.values()}
        if len(bits) > 1 and not pad_mixed_experts:
            raise UserError(
                f"routed experts use several bit widths {sorted(bits)}; transformers 5 decompresses all routed "
                "experts with one scheme, so per-expert/per-layer bit widths reload as wrong weights. Use one "
                "bit width for all routed experts, or pass pad_mixed_experts=True to store them all at "
                f"{max(bits)} bits (exact, but no disk saving over {max(bits)}-bit)"
            )
        container = max(bits)
        for m in experts:
            stored[m] = container
        expert_scheme = {"bits": container, "group_size": groups.pop()}

    dense_groups = sorted({(r.bits, r.group_size) for r in dense.values()})
    if len(dense_groups) > 1 and not allow_mixed_dense:
        raise UserError(
            f"dense (non-expert) linears use several schemes {dense_groups} (bits, group_size); they reload "
            "exactly only in transformers' default mode, not with dequantize=True. Use one scheme, or pass "
            "allow_mixed_dense=True"
        )
    return expert_scheme, dense_groups, stored


def _check_same(name: str, weight: torch.Tensor, res: QuantResult) -> None:
    expect = res.dequant.to(weight.dtype)
    diff = float((weight.float() - expect.float()).abs().max()) if weight.numel() else 0.0
    tol = 1e-6 * max(1.0, float(expect.float().abs().max()))
    if not diff <= tol:
        raise UserError(
            f"{name}: the model's weight differs from its dequantized value by {diff:.3g}; put each "
            "QuantResult.dequant into the model before saving (or the key maps to the wrong tensor, "
            "e.g. gate vs up or another expert)"
        )


def _packed_tensors(res: QuantResult, bits: int) -> dict[str, torch.Tensor]:
    """The three tensors compressed-tensors expects for one module, packed by the library's own packer."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = res.qweight.to(torch.int8)
    lo, hi = qrange(bits)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"codes out of the {bits}-bit range [{lo}, {hi}]")
    return {
        "weight_packed": pack_to_int32(q, bits),
        "weight_scale": res.scale.contiguous(),
        "weight_shape": torch.tensor(list(res.shape), dtype=torch.int64),
    }


def _packed_nbytes(res: QuantResult, bits: int) -> int:
    out, inn = res.shape
    return out * -(-inn * bits // 32) * 4 + res.scale.numel() * res.scale.element_size() + 16


def _generalise(name: str) -> str:
    """Regex for a module name with every numeric path component (layer, expert index) wildcarded."""
    return r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in name.split("."))


def _scheme(targets: list[str], bits: int, group_size: int) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if group_size == -1:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel", dynamic=False)
    else:
        args = QuantizationArgs(
            num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group_size, dynamic=False
        )
    return QuantizationScheme(targets=targets, weights=args, format="pack-quantized")


def _quantization_config(
    quantized: Mapping[str, QuantResult], stored: Mapping[str, int], ignore: list[str]
) -> dict[str, Any]:
    """The config.json block, built with compressed-tensors' own schema.

    The routed-expert group comes first and is the only one whose ``re:`` target mentions ``experts``:
    that is how transformers picks the experts' scheme. Dense groups list exact module names, so a shared
    expert (``shared_experts.*``) can never be mistaken for the routed experts' group.
    """
    from compressed_tensors.quantization import QuantizationConfig

    groups: dict[str, Any] = {}
    experts = [m for m in quantized if is_routed_expert_key(m)]
    if experts:
        pats = sorted({_generalise(m) for m in experts})
        res = quantized[experts[0]]
        target = "re:^(?:" + "|".join(pats) + ")$"
        groups["group_0"] = _scheme([target], stored[experts[0]], res.group_size)
    members: dict[tuple[int, int], list[str]] = {}
    for m, r in quantized.items():
        if not is_routed_expert_key(m):
            members.setdefault((stored[m], r.group_size), []).append(m)
    for (bits, gs), names in sorted(members.items()):
        groups[f"group_{len(groups)}"] = _scheme(sorted(names), bits, gs)
    cfg = QuantizationConfig(
        config_groups=groups, format="pack-quantized", quantization_status="compressed", ignore=ignore
    )
    return cfg.model_dump(mode="json")


# ---- streamed writing (moecompress.engine): one layer's tensors at a time ------------------------------------
def packed_module_tensors(name: str, weight: torch.Tensor, res: QuantResult, stored_bits: int) -> dict[str, torch.Tensor]:
    """The on-disk tensors replacing ``{name}.weight`` (checked against the float weight written in its place)."""
    _check_same(name, weight, res)
    return {f"{name}.{k}": v for k, v in _packed_tensors(res, stored_bits).items()}


def streamed_quantization_config(
    records: Mapping[str, Any],
    shapes: Mapping[str, list[int]],
    *,
    pad_mixed_experts: bool,
    allow_mixed_dense: bool,
    expert_container: int | None = None,
) -> dict[str, Any]:
    """config.json's quantization block for a checkpoint written layer by layer.

    `records` hold bits/group_size/shape per quantized module; `shapes` are the written tensors' shapes (packed
    modules appear as ``weight_packed``). Same checks and schema as ``quantize_saved_checkpoint``. A streamed
    mixed-precision run cannot know the widest chosen width before the last layer, so routed experts are
    stored at `expert_container` bits (the widest candidate).
    """
    float_shapes = {k: v for k, v in shapes.items() if k.endswith(".weight")}
    float_shapes.update({f"{m}.weight": list(r.shape) for m, r in records.items()})
    _, _, stored = _plan_schemes(records, float_shapes, pad_mixed_experts=pad_mixed_experts,
                                 allow_mixed_dense=allow_mixed_dense)
    if expert_container is not None:
        stored.update({m: expert_container for m in records if is_routed_expert_key(m)})
    ignore = sorted(
        k[: -len(".weight")] for k, s in float_shapes.items()
        if len(s) == 2 and k[: -len(".weight")] not in records and "embed" not in k.rsplit(".", 2)[-2]
    )
    return _quantization_config(records, stored, ignore)
