"""What is in a checkpoint: family, routing, expert counts, and where the parameters and bytes are.

Reads config.json and the safetensors headers only (no weights load), so it is instant on any size and
shows the real on-disk bytes of quantized tensors.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from moecompress.arch.adapter import MoEAdapter
from moecompress.errors import UserError
from moecompress.io.checkpoint import check_model_dir
from moecompress.report import human_bytes

_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8}
GROUPS = ("routed_experts", "shared_experts", "router", "attention", "embeddings", "other")


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


class Inspection(BaseModel):
    path: str
    family: str
    routing: str
    num_layers: int
    moe_layers: list[int]
    experts_per_layer: int
    top_k: int
    expert_width: int
    routing_groups: int
    shared_experts: bool
    quantization: dict[str, Any] | None
    groups: dict[str, GroupStats]
    total_params: int
    total_bytes: int
    expert_fraction: float
    tensors: list[TensorInfo]
    layer_pattern: str | None = None  # per-layer kinds from the modeling code ("3×attention/dense, 58×attention/moe")


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


def classify(name: str, adapter: MoEAdapter) -> str:
    blocks = {f".{b}." if b else "." for b in (adapter.block_attr, adapter.checkpoint_block or adapter.block_attr)}
    if any(f"{b}{adapter.experts_attr}." in name for b in blocks):
        return "routed_experts"
    if any(f"{b}{s}." in name or f"{b}{s}_" in name for b in blocks for s in adapter.shared_attrs):
        return "shared_experts"
    if any(f"{b}{adapter.router_attr}." in name for b in blocks):
        return "router"
    if "attn" in name or "attention" in name:
        return "attention"
    if "embed" in name or name.startswith("lm_head"):
        return "embeddings"
    return "other"


def inspect_checkpoint(path: Path) -> Inspection:
    path = Path(path)
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
            group = classify(name, adapter)
            params = _numel(shape)
            if name.endswith(("weight_shape", "weight_zero_point", "weight_g_idx")):
                params = 0
            elif name.endswith("weight_packed"):
                bits = _packed_bits(qcfg, name)
                params = params * 32 // bits
            elif name.endswith("weight_scale"):
                params = 0
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
    return Inspection(
        path=str(path),
        family=adapter.model_type,
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
        layer_pattern=_pattern(config),
    )


def _pattern(config: dict[str, Any]) -> str | None:
    from moecompress.arch.layers import layer_pattern

    try:
        return layer_pattern(config).summary()
    except UserError:
        return None


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
    head.add_row("family", ins.family)
    head.add_row("routing", ins.routing)
    head.add_row("layers (MoE)", f"{ins.num_layers} ({len(ins.moe_layers)} MoE: {_ranges(ins.moe_layers)})")
    if ins.layer_pattern:
        head.add_row("layer pattern", ins.layer_pattern)
    head.add_row("experts per layer / top-k", f"{ins.experts_per_layer} / {ins.top_k}")
    head.add_row("expert width", str(ins.expert_width))
    if ins.routing_groups > 1:
        head.add_row("routing groups", str(ins.routing_groups))
    head.add_row("shared experts", "yes" if ins.shared_experts else "no")
    if ins.quantization:
        head.add_row("quantization", str(ins.quantization.get("quant_method", "?")))
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
