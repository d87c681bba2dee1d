"""Bytes on disk per parameter group, for the dtype and quantization a checkpoint stores (from config alone).

FP8 block-scaled checkpoints are sized by transformers' own FP8 skeleton (its quantizer swaps the meta model's
linears and experts for the FP8 modules, so scale shapes and skipped modules are exactly what it would load);
MXFP4 (gpt-oss) and compressed-tensors `pack-quantized` follow their documented layouts (4-bit values + one
byte-exponent per 32 / int32-packed values + a bf16 scale per group).
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

from moecompress.arch.skeleton import GROUPS, Skeleton, ceil_div, hf_config

_SCALE_SUFFIX = re.compile(r"(_scale_inv|_scale|_scales|_blocks|_zero_point|_packed)$")


def float_bytes(model: torch.nn.Module, skel: Skeleton) -> dict[str, int]:
    """Bytes per group with every tensor stored at the model's (meta) dtype."""
    out: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        out[skel.param_group[name]] += p.numel() * p.element_size()
    return {g: out.get(g, 0) for g in GROUPS}


def stored_bytes(config: dict[str, Any], model: torch.nn.Module, skel: Skeleton) -> tuple[dict[str, int], str]:
    """(bytes per group, format name) for the checkpoint described by `config`."""
    qcfg = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    method = (qcfg or {}).get("quant_method")
    if not method:
        return float_bytes(model, skel), str(next(model.parameters()).dtype).removeprefix("torch.")
    if method == "fp8":
        return fp8_bytes(config, skel), f"fp8 {qcfg.get('fmt', 'e4m3')} block {qcfg.get('weight_block_size')}"
    if method == "mxfp4":
        skip = list(qcfg.get("modules_to_not_convert") or [])
        return mxfp4_bytes(model, skel, skip), "mxfp4 (routed experts)"
    if method == "compressed-tensors":
        return compressed_tensors_bytes(model, skel, qcfg), f"compressed-tensors {qcfg.get('format', '?')}"
    return float_bytes(model, skel), f"{method} (unknown to moecompress: bytes shown at the float dtype)"


def fp8_bytes(config: dict[str, Any], skel: Skeleton) -> dict[str, int]:
    """Size the FP8 skeleton transformers itself builds for this config (weights fp8, block scales float32)."""
    from transformers.quantizers import AutoHfQuantizer

    from moecompress.arch.skeleton import meta_model

    model = meta_model(config)
    qcfg = hf_config(config).quantization_config
    quantizer = AutoHfQuantizer.from_config(qcfg, pre_quantized=True)
    quantizer.quantization_config.dequantize = False  # on CPU transformers would dequantize; we want the layout
    quantizer.preprocess_model(model, device_map=None, keep_in_fp32_modules=[], config=model.config)
    out: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        base = name if name in skel.param_group else _SCALE_SUFFIX.sub("", name)
        if base not in skel.param_group and not base.endswith(".weight"):
            base = base.rsplit(".", 1)[0] + ".weight"
        out[skel.param_group.get(base, "other")] += p.numel() * p.element_size()
    return {g: out.get(g, 0) for g in GROUPS}


def _skipped(name: str, patterns: list[str]) -> bool:
    from transformers.quantizers.quantizers_utils import should_convert_module

    return not should_convert_module(name.rsplit(".", 1)[0], patterns)


def mxfp4_bytes(model: torch.nn.Module, skel: Skeleton, skip: list[str]) -> dict[str, int]:
    """gpt-oss MXFP4: routed expert matrices as 4-bit e2m1 pairs (`_blocks`) + one uint8 exponent per 32 (`_scales`)."""
    out = float_bytes(model, skel)
    for name, p in model.named_parameters():
        if skel.param_group[name] == "routed_experts" and p.ndim == 3 and not _skipped(name, skip):
            out["routed_experts"] += p.numel() // 2 + ceil_div(p.numel(), 32) - p.numel() * p.element_size()
    return out


def int_packed_bytes(rows: int, cols: int, bits: int, group_size: int, *, symmetric: bool = True,
                     scale_bytes: int = 2) -> int:
    """compressed-tensors pack-quantized: int32-packed values + a scale per group in the model's float dtype
    (+ int32 zero points if asymmetric) + the int64[2] weight_shape."""
    groups = 1 if group_size in (-1, 0) else ceil_div(cols, group_size)
    packed = rows * ceil_div(cols * bits, 32) * 4
    scales = rows * groups * scale_bytes
    zeros = 0 if symmetric else rows * groups * 4
    return packed + scales + zeros + 2 * 8  # weight_shape int64[2]


def linear_shapes(name: str, p: torch.Tensor) -> tuple[int, int, int]:
    """(number of linears, rows, cols) of a 2-D weight or a fused [E, a, b] experts tensor (per-expert linears)."""
    if p.ndim == 3:
        return int(p.shape[0]), int(p.shape[1]), int(p.shape[2])
    return 1, int(p.shape[0]), int(p.shape[1])


def compressed_tensors_bytes(model: torch.nn.Module, skel: Skeleton, qcfg: dict[str, Any]) -> dict[str, int]:
    """Bytes of a compressed-tensors checkpoint: matched Linear targets (and fused experts) packed, the rest float."""
    out = float_bytes(model, skel)
    ignore = list(qcfg.get("ignore") or [])
    groups = list((qcfg.get("config_groups") or {}).values())
    linear_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        is_linear = (module in linear_names and name.endswith(".weight")) or (
            skel.param_group[name] == "routed_experts" and p.ndim == 3)
        if not is_linear or _ct_ignored(module, ignore):
            continue
        scheme = next((g.get("weights") for g in groups if _ct_targets(module, g.get("targets") or [])), None)
        if not scheme or not scheme.get("num_bits"):
            continue
        n, rows, cols = linear_shapes(name, p)
        new = n * int_packed_bytes(rows, cols, int(scheme["num_bits"]), int(scheme.get("group_size") or -1),
                                   symmetric=bool(scheme.get("symmetric", True)))
        out[skel.param_group[name]] += new - p.numel() * p.element_size()
    return out


def _ct_ignored(module: str, ignore: list[str]) -> bool:
    for pat in ignore:
        if pat.startswith("re:") and re.match(pat[3:], module):
            return True
        if module == pat or module.endswith("." + pat):
            return True
    return False


def _ct_targets(module: str, targets: list[str]) -> bool:
    for t in targets:
        if t == "Linear":
            return True
        if t.startswith("re:") and re.match(t[3:], module):
            return True
        if module.endswith(t):
            return True
    return False


def scheme_bytes(model: torch.nn.Module, skel: Skeleton, groups: set[str], bits: int, group_size: int) -> dict[str, int]:
    """Bytes after our `quantize` pass: matrices of `groups` pack-quantized, everything else as stored."""
    linear_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    out: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        group = skel.param_group[name]
        matrix = (p.ndim == 3 and group == "routed_experts") or (
            p.ndim == 2 and name.endswith(".weight") and name.rsplit(".", 1)[0] in linear_names)
        if group in groups and matrix:
            n, rows, cols = linear_shapes(name, p)
            out[group] += n * int_packed_bytes(rows, cols, bits, group_size, scale_bytes=p.element_size())
        else:
            out[group] += p.numel() * p.element_size()
    return {g: out.get(g, 0) for g in GROUPS}
