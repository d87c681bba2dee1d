"""What is in a checkpoint: family, layer pattern, expert counts, total and active parameters, bytes by group.

Works from config.json alone (users size a run before downloading 60-1,300 GB): transformers builds the model
on the meta device (``moecompress.arch.skeleton``) and bytes follow the stored dtype / quantization
(``moecompress.io.storage``). When safetensors files are present and the family has an adapter, parameter and
byte counts come from their headers instead (the real on-disk bytes); no weight is ever read.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from moecompress.arch.adapter import MoEAdapter
from moecompress.arch.skeleton import (
    GROUPS,
    Skeleton,
    analyse,
    attention_like,
    config_dtype,
    meta_model,
    text_config_dict,
)
from moecompress.errors import UserError
from moecompress.io.checkpoint import check_model_dir, read_config
from moecompress.report import human_bytes

_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8}


class GroupStats(BaseModel):
    params: int = 0
    bytes: int = 0


class TensorInfo(BaseModel):
    name: str
    group: str
    dtype: str
    shape: list[int]
    params: int
    bytes: int
    bits: float


class LayerRow(BaseModel):
    index: int
    mixer: str
    ffn: str
    experts: int = 0
    top_k: int = 0


class Inspection(BaseModel):
    path: str
    family: str
    text_family: str | None = None  # the language model's model_type when nested (multimodal)
    adapter: bool = True  # whether moecompress passes support this family yet
    routing: str
    num_layers: int
    moe_layers: list[int]
    layer_pattern: str = ""
    layers: list[LayerRow] = []
    experts_per_layer: int
    top_k: int
    expert_width: int
    routing_groups: int
    topk_groups: int = 1
    shared_experts: bool
    quantization: dict[str, Any] | None
    stored_format: str = ""
    bytes_source: str = "safetensors headers"
    groups: dict[str, GroupStats]
    parts: dict[str, int] = {}  # language_model vs the rest (vision tower, projector, ...)
    total_params: int
    active_params: int = 0  # per token, every language-model parameter except routed experts it skips
    active_params_no_embedding: int = 0  # the same without the token-embedding table (OpenAI/DeepSeek cards)
    active_params_no_embedding_no_head: int = 0
    total_bytes: int
    expert_fraction: float
    tensors: list[TensorInfo]
    notes: list[str] = []


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file; a clear error if the file is truncated or not safetensors."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise ValueError("implausible header length")
            header = json.loads(fh.read(n))
        size = path.stat().st_size
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"truncated: header promises {8 + n + end} bytes, file has {size}")
        return header
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError, KeyError) as exc:
        raise UserError(f"{path} is not a valid safetensors file ({exc}); the checkpoint looks corrupt") from exc


def classify(name: str, adapter: MoEAdapter, shape: list[int] | None = None, num_experts: int = 0) -> str:
    blocks = {f".{b}." if b else "." for b in (adapter.block_attr, adapter.checkpoint_block or adapter.block_attr)}
    experts, routers = {adapter.experts_attr}, {adapter.router_attr}
    if adapter.paired_sets:  # on disk the sets share one list, one router and its statistics (ERNIE-4.5-VL)
        experts.add(adapter.experts_attr.rsplit(".", 1)[-1])
        routers |= {adapter.router_attr.rsplit(".", 1)[-1], "moe_statics"}
    if any(f"{b}{e}." in name for b in blocks for e in experts):
        return "routed_experts"
    if any(f"{b}{s}." in name or f"{b}{s}_" in name for b in blocks for s in adapter.shared_attrs):
        return "shared_experts"
    if (adapter.checkpoint_expert_linears is None and shape is not None and len(shape) == 3 and num_experts
            and shape[0] == num_experts and any(b != "." and b in name for b in blocks)):
        return "routed_experts"  # fused on disk under names of the family's own (JetMoE: mlp.input_linear.weight)
    if any(f"{b}{r}." in name for b in blocks for r in routers):
        return "router"
    if attention_like(name):  # not `post_attention_layernorm`: a norm, not attention
        return "attention"
    if "embed" in name or name.startswith("lm_head"):
        return "embeddings"
    return "other"


def _find_adapter(config: dict[str, Any]) -> MoEAdapter | None:
    """The family's adapter if moecompress has one (whatever lookup the adapter registry offers), else None."""
    from moecompress.arch.adapter import adapter_for_config_dict

    try:
        return adapter_for_config_dict(config)
    except UserError:  # unsupported family (or layout, e.g. a multimodal wrapper): passes would refuse it
        return None


def _has_weights(path: Path) -> bool:
    return any(p.name.endswith((".safetensors", ".bin")) for p in path.iterdir())


def inspect_checkpoint(path: Path) -> Inspection:
    """Inspect a checkpoint folder: from safetensors headers when present (and the family is supported), else config."""
    path = Path(path)
    config = read_config(path)
    if not _has_weights(path) or _find_adapter(config) is None or not list(path.glob("*.safetensors")):
        return inspect_config(config, str(path))
    return _inspect_headers(path)


def inspect_config(config: dict[str, Any], where: str = "config.json") -> Inspection:
    """Everything inspect reports, from config.json alone (no weight file needed or read)."""
    from moecompress.io.storage import stored_bytes

    model = meta_model(config)
    skel = analyse(model, config)
    by_group, fmt = stored_bytes(config, model, skel)
    adapter = _find_adapter(config)
    text = text_config_dict(config)
    moe = skel.moe_layers
    first = moe[0]
    notes = list(skel.notes)
    if config_dtype(config) is None:
        notes.append("config.json names no dtype; bytes assume bfloat16 for unquantized tensors")
    if adapter is None:
        notes.append(f"no moecompress adapter for {config.get('model_type')!r} yet: counts come from transformers' "
                     "model; passes will refuse this family")
    counts = {(ly.experts, ly.top_k) for ly in moe}
    if len(counts) > 1:
        notes.append(f"MoE layers differ in experts/top-k: {sorted(counts)}")
    from moecompress.io.mtp import mtp_layers

    mtp = mtp_layers(config)
    if mtp:
        notes.append(f"{mtp[2]} multi-token-prediction layer(s) in the checkpoint are not counted (transformers does "
                     "not build them); passes keep them consistent with the new expert count (--mtp drop removes them)")
    qcfg = config.get("quantization_config") or text.get("quantization_config")
    groups = {g: GroupStats(params=skel.groups[g], bytes=by_group[g]) for g in GROUPS}
    routing = _routing_text(adapter, config, text)
    return Inspection(
        path=where,
        family=str(config.get("model_type")),
        text_family=text.get("model_type") if text is not config else None,
        adapter=adapter is not None,
        routing=routing,
        num_layers=len(skel.layers),
        moe_layers=[ly.index for ly in moe],
        layer_pattern=layer_pattern(skel),
        layers=[LayerRow(index=ly.index, mixer=ly.mixer, ffn=ly.ffn, experts=ly.experts, top_k=ly.top_k)
                for ly in skel.layers],
        experts_per_layer=first.experts,
        top_k=first.top_k,
        expert_width=first.expert_width,
        routing_groups=skel.routing_groups,
        topk_groups=skel.topk_groups,
        shared_experts=skel.groups["shared_experts"] > 0,
        quantization=qcfg,
        stored_format=fmt,
        bytes_source="config.json (computed; no weight file read)",
        groups=groups,
        parts=skel.parts,
        total_params=skel.total_params,
        active_params=skel.active_params,
        active_params_no_embedding=skel.active_conventions["no_embedding"],
        active_params_no_embedding_no_head=skel.active_conventions["no_embedding_no_head"],
        total_bytes=sum(by_group.values()),
        expert_fraction=skel.groups["routed_experts"] / skel.total_params,
        tensors=[],
        notes=notes,
    )


def _routing_text(adapter: MoEAdapter | None, config: dict[str, Any], text: dict[str, Any]) -> str:
    if adapter is None:
        return "?"
    return adapter.routing + (" +renorm" if adapter.renormalises(text) else "")


def layer_pattern(skel: Skeleton) -> str:
    """Summary of the decoder stack in the same form as `arch.layers.layer_pattern(config).summary()`, with the
    skeleton's mixer names and experts × top-k, e.g. `3×full_attention/dense, 58×full_attention/moe 256x8`."""
    from moecompress.arch.layers import summarize

    return summarize([f"{ly.mixer}/{ly.ffn} {ly.experts}x{ly.top_k}" if ly.experts else f"{ly.mixer}/{ly.ffn}"
                      for ly in skel.layers])


def _skeleton_active_fraction(config: dict[str, Any]) -> tuple[float, Skeleton | None]:
    """Share of routed-expert parameters a token uses, and the skeleton (None if transformers cannot build it)."""
    try:
        skel = analyse(meta_model(config), config)
    except UserError:
        return 0.0, None
    routed = sum(ly.routed_params for ly in skel.layers)
    used = sum((ly.routed_params - ly.other_set_params) * ly.top_k / ly.experts for ly in skel.moe_layers)
    return (used / routed if routed else 0.0), skel


def _inspect_headers(path: Path) -> Inspection:
    config, adapter = check_model_dir(path)
    qcfg = config.get("quantization_config")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no .safetensors weights; inspect reads safetensors headers only")
    groups: dict[str, GroupStats] = defaultdict(GroupStats)
    tensors: list[TensorInfo] = []
    moe_layer_ids: set[int] = set()
    headers = {f: read_safetensors_header(f) for f in files}
    for header in headers.values():
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            nbytes = meta["data_offsets"][1] - meta["data_offsets"][0]
            shape = list(meta["shape"])
            group = classify(name, adapter, list(meta["shape"]), adapter.num_experts(config))
            params = _numel(shape)
            if name.endswith(("weight_shape", "weight_zero_point", "weight_g_idx")):
                params = 0
            elif name.endswith("weight_packed"):
                bits = _packed_bits(qcfg, name)
                params = params * 32 // bits
            elif name.endswith(("weight_scale", "_scale_inv", "_scales")):
                params = 0  # quantization scales (compressed-tensors, FP8 blocks, MXFP4) are not parameters
            elif name.endswith("_blocks"):
                params = params * 2  # MXFP4: two 4-bit values per byte
            groups[group].params += params
            groups[group].bytes += nbytes
            bits = 8.0 * nbytes / params if params else 0.0
            tensors.append(TensorInfo(name=name, group=group, dtype=meta["dtype"], shape=shape, params=params,
                                      bytes=nbytes, bits=round(bits, 3)))
            if group == "routed_experts":
                parts = name.split(".")
                if "layers" in parts:
                    moe_layer_ids.add(int(parts[parts.index("layers") + 1]))
    total_p = sum(g.params for g in groups.values())
    total_b = sum(g.bytes for g in groups.values())
    fraction, skel = _skeleton_active_fraction(config)
    routed_p = groups["routed_experts"].params
    return Inspection(
        path=str(path),
        family=str(config.get("model_type")),
        layer_pattern=layer_pattern(skel) if skel else "",
        layers=[LayerRow(index=ly.index, mixer=ly.mixer, ffn=ly.ffn, experts=ly.experts, top_k=ly.top_k)
                for ly in skel.layers] if skel else [],
        active_params=(active := int(round(total_p - routed_p + routed_p * fraction))),
        active_params_no_embedding=active - (skel.input_embedding_params if skel else 0),
        active_params_no_embedding_no_head=active - (skel.input_embedding_params + skel.output_head_params
                                                     if skel else 0),
        parts=skel.parts if skel else {},
        stored_format=_header_format(qcfg, tensors),
        routing=adapter.routing + (" +renorm" if adapter.renormalises(config) else ""),
        num_layers=int(adapter.text_config(config).get("num_hidden_layers", 0)),
        moe_layers=sorted(moe_layer_ids),
        experts_per_layer=adapter.num_experts(config),
        top_k=adapter.top_k(config),
        expert_width=adapter.expert_width(config),
        routing_groups=adapter.num_groups(config),
        shared_experts=groups["shared_experts"].params > 0,
        quantization=qcfg,
        groups={g: groups[g] for g in GROUPS},
        total_params=total_p,
        total_bytes=total_b,
        expert_fraction=(groups["routed_experts"].params / total_p) if total_p else 0.0,
        tensors=tensors,
    )


def _header_format(qcfg: dict[str, Any] | None, tensors: list[TensorInfo]) -> str:
    if qcfg:
        return str(qcfg.get("quant_method", "?"))
    by_dtype: dict[str, int] = defaultdict(int)
    for t in tensors:
        by_dtype[t.dtype] += t.bytes
    return max(by_dtype, key=by_dtype.__getitem__) if by_dtype else "?"


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _packed_bits(qcfg: dict[str, Any] | None, name: str) -> int:
    """Bit width of a pack-quantized tensor from the compressed-tensors config (first matching group)."""
    if not qcfg:
        return 4
    for group in (qcfg.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        if w.get("num_bits"):
            targets = group.get("targets") or []
            if any(_target_matches(t, name) for t in targets) or len(qcfg["config_groups"]) == 1:
                return int(w["num_bits"])
    return 4


def _target_matches(target: str, name: str) -> bool:
    import re

    module = name.rsplit(".", 1)[0]
    if target.startswith("re:"):
        return re.search(target[3:], module) is not None
    return module.endswith(target) or target == "Linear"


def render(ins: Inspection, console: Any) -> None:
    from rich.table import Table

    head = Table(title=f"{ins.path}", show_header=False)
    family = ins.family + (f" (language model: {ins.text_family})" if ins.text_family else "")
    head.add_row("family", family + ("" if ins.adapter else " — no moecompress adapter yet"))
    head.add_row("routing", ins.routing)
    head.add_row("layers (MoE)", f"{ins.num_layers} ({len(ins.moe_layers)} MoE: {_ranges(ins.moe_layers)})")
    if ins.layer_pattern:
        head.add_row("layer pattern", ins.layer_pattern)
    head.add_row("experts per layer / top-k", f"{ins.experts_per_layer} / {ins.top_k}")
    head.add_row("expert width", str(ins.expert_width))
    if ins.routing_groups > 1:
        head.add_row("routing groups", f"{ins.routing_groups} (top-{ins.topk_groups} groups per token)")
    head.add_row("shared experts", "yes" if ins.shared_experts else "no")
    head.add_row("stored as", ins.stored_format or "?")
    head.add_row("parameters (total / active per token)",
                 f"{ins.total_params / 1e9:.2f}B / {ins.active_params / 1e9:.2f}B "
                 f"({ins.active_params_no_embedding / 1e9:.2f}B without the embedding table)")
    if len(ins.parts) > 1:
        head.add_row("parts", ", ".join(f"{k} {v / 1e9:.3f}B" for k, v in ins.parts.items()))
    head.add_row("bytes from", ins.bytes_source)
    console.print(head)
    t = Table(title="parameters and bytes")
    for col in ("group", "params", "bytes", "% params", "bits/param"):
        t.add_column(col, justify="right" if col != "group" else "left")
    for name, g in ins.groups.items():
        if g.params or g.bytes:
            t.add_row(name, f"{g.params:,}", human_bytes(g.bytes), f"{100 * g.params / max(ins.total_params, 1):.1f}",
                      f"{8 * g.bytes / g.params:.2f}" if g.params else "-")
    t.add_row("total", f"{ins.total_params:,}", human_bytes(ins.total_bytes), "100.0",
              f"{8 * ins.total_bytes / max(ins.total_params, 1):.2f}", style="bold")
    console.print(t)
    console.print(f"routed experts are {100 * ins.expert_fraction:.1f}% of the parameters")
    for note in ins.notes:
        console.print(f"[yellow]note:[/] {note}")


def _ranges(ids: list[int]) -> str:
    if not ids:
        return "-"
    out, start, prev = [], ids[0], ids[0]
    for i in ids[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(out)
