"""Source checkpoint formats: read published FP8 block-scaled and MXFP4 checkpoints as float, tensor by tensor.

One seam for every reader (the in-memory loader, the layer-streaming engine):

    fmt = detect_source_format(config, tensors)      # tensors: {key: (dtype, shape)} from safetensors headers
    fmt.validate()                                   # scales present and of the right shape, or one UserError
    for key in fmt.logical_keys(): ...               # the keys a float checkpoint of this model would hold
    w = fmt.read(key, get_tensor)                    # dequantized (bf16 by default), reading only what it needs

The dequantization itself is transformers' code (``integrations.finegrained_fp8`` for FP8 blocks and FP4 expert
nibbles, ``integrations.mxfp4.convert_moe_packed_tensors`` for MXFP4), so a checkpoint reads the same here as in
``from_pretrained``. compressed-tensors checkpoints (our own quantize output) are refused as pass input with one
line: they are final artifacts, never silently read as if they were float.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from moecompress.errors import UserError

GetTensor = Callable[[str], torch.Tensor]
TensorMeta = tuple[str, list[int]]  # safetensors dtype string, shape
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "float8_e4m3fn", "float8_e5m2")
_FP4_PACKED = ("I8", "int8")


def _quant_config(config: Mapping[str, Any]) -> dict[str, Any]:
    q = config.get("quantization_config")
    if not q and isinstance(config.get("text_config"), dict):
        q = config["text_config"].get("quantization_config")
    return dict(q or {})


def _as_meta(tensors: Mapping[str, Any] | Iterable[str]) -> dict[str, TensorMeta | None]:
    if isinstance(tensors, Mapping):
        out: dict[str, TensorMeta | None] = {}
        for k, v in tensors.items():
            if isinstance(v, Mapping):  # a safetensors header entry
                out[k] = (str(v["dtype"]), list(v["shape"]))
            elif isinstance(v, torch.Tensor):
                out[k] = (str(v.dtype).removeprefix("torch."), list(v.shape))
            else:
                out[k] = v
        return out
    return {k: None for k in tensors}


class SourceFormat:
    """Float checkpoint: every stored key is a logical key, read as is (cast to `dtype`)."""

    name = "float"

    def __init__(self, config: Mapping[str, Any], tensors: Mapping[str, TensorMeta | None],
                 dtype: torch.dtype = torch.bfloat16) -> None:
        self.config, self.tensors, self.dtype = config, dict(tensors), dtype

    @property
    def quantized(self) -> bool:
        return False

    def logical_keys(self) -> list[str]:
        return sorted(self.tensors)

    def stored_keys(self, key: str) -> list[str]:
        """The stored tensors `read(key)` needs (so a streaming reader knows which shards to open)."""
        return [key]

    def validate(self) -> None:
        """Raise one UserError if the stored tensors cannot be read as this format (headers only)."""

    def read(self, key: str, get_tensor: GetTensor) -> torch.Tensor:
        t = get_tensor(key)
        return t.to(self.dtype) if t.is_floating_point() and self.dtype is not None else t


class FP8BlockFormat(SourceFormat):
    """`weight` float8 [out, in] + `weight_scale_inv` float32 [ceil(out/b0), ceil(in/b1)] (DeepSeek, Qwen3-FP8 …)."""

    name = "fp8"

    def __init__(self, config: Mapping[str, Any], tensors: Mapping[str, TensorMeta | None],
                 dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(config, tensors, dtype)
        q = _quant_config(config)
        block = q.get("weight_block_size")
        self.block: list[int] | None = [int(b) for b in block] if block else None

    @property
    def quantized(self) -> bool:
        return True

    def _scale_key(self, key: str) -> str:
        return key + "_scale_inv"

    def _is_quantized(self, key: str) -> bool:
        meta = self.tensors.get(key)
        if meta is not None:
            return meta[0] in _FP8_DTYPES or meta[0] in _FP4_PACKED
        return self._scale_key(key) in self.tensors

    def logical_keys(self) -> list[str]:
        return sorted(k for k in self.tensors if not k.endswith(("_scale_inv", ".input_scale", "activation_scale")))

    def stored_keys(self, key: str) -> list[str]:
        return [key, self._scale_key(key)] if self._is_quantized(key) else [key]

    def validate(self) -> None:
        for key in self.logical_keys():
            if not self._is_quantized(key):
                continue
            scale_key = self._scale_key(key)
            if scale_key not in self.tensors:
                raise UserError(f"FP8 checkpoint is incomplete: {key} is stored in 8 bits but its scale "
                                f"{scale_key} is missing (a truncated or mixed-up download?)")
            meta, smeta = self.tensors[key], self.tensors[scale_key]
            if meta is None or smeta is None:
                continue
            shape, sshape = meta[1], smeta[1]
            if meta[0] in _FP4_PACKED:
                shape = [*shape[:-1], 2 * shape[-1]]  # two FP4 values per byte
            expected = self._scale_shape(shape, sshape, fp4=meta[0] in _FP4_PACKED)
            if list(sshape) != expected:
                raise UserError(f"FP8 checkpoint is inconsistent: {scale_key} has shape {list(sshape)} but {key} "
                                f"{list(meta[1])} with weight_block_size {self.block} needs {expected}")

    def _scale_shape(self, shape: list[int], sshape: list[int], fp4: bool = False) -> list[int]:
        if self.block is None:  # per-tensor scales
            return list(sshape) if math.prod(sshape) == 1 else [1]
        rows, cols = shape[-2], shape[-1]
        if fp4 and len(sshape) >= 2 and rows % sshape[-2] == 0 and cols % sshape[-1] == 0:
            # packed FP4 experts carry their own grid (e.g. [1, 32] blocks): it must tile the weight exactly
            return [*shape[:-2], sshape[-2], sshape[-1]]
        return [*shape[:-2], -(-rows // self.block[0]), -(-cols // self.block[1])]

    def read(self, key: str, get_tensor: GetTensor) -> torch.Tensor:
        if not self._is_quantized(key):
            return super().read(key, get_tensor)
        weight, scale = get_tensor(key), get_tensor(self._scale_key(key))
        return dequantize_fp8(weight, scale, self.block, self.dtype)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, block: list[int] | None,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W = q · s per block, with transformers' own kernels (FP8 with partial edge blocks; packed FP4 experts)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    if weight.dtype in (torch.int8, getattr(torch, "float4_e2m1fn_x2", torch.int8)):
        return Fp8Dequantize(None)._dequantize_one(weight, scale, output_dtype=torch.float32).to(dtype)
    return _dequantize_fp8_weight(weight, scale.float(), block, torch.float32).to(dtype)


class MXFP4Format(SourceFormat):
    """gpt-oss MXFP4: `<name>_blocks` uint8 [E, rows, K/32, 16] + `<name>_scales` uint8 [E, rows, K/32] → `<name>`."""

    name = "mxfp4"

    @property
    def quantized(self) -> bool:
        return True

    def logical_keys(self) -> list[str]:
        out = {k.removesuffix("_blocks") if k.endswith("_blocks") else k for k in self.tensors
               if not k.endswith("_scales")}
        return sorted(out)

    def stored_keys(self, key: str) -> list[str]:
        return [key + "_blocks", key + "_scales"] if key + "_blocks" in self.tensors else [key]

    def validate(self) -> None:
        for key in self.tensors:
            if not key.endswith("_blocks"):
                continue
            base = key.removesuffix("_blocks")
            scale_key = base + "_scales"
            if scale_key not in self.tensors:
                raise UserError(f"MXFP4 checkpoint is incomplete: {key} has no {scale_key} (a truncated download?)")
            meta, smeta = self.tensors[key], self.tensors[scale_key]
            if meta is not None and smeta is not None and (list(meta[1][:-1]) != list(smeta[1]) or meta[1][-1] != 16):
                raise UserError(f"MXFP4 checkpoint is inconsistent: {key} {list(meta[1])} needs {scale_key} of shape "
                                f"{list(meta[1][:-1])} and 16 bytes per 32-value block, got {list(smeta[1])}")

    def read(self, key: str, get_tensor: GetTensor) -> torch.Tensor:
        if key + "_blocks" not in self.tensors:
            return super().read(key, get_tensor)
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        return convert_moe_packed_tensors(get_tensor(key + "_blocks"), get_tensor(key + "_scales"), dtype=self.dtype)


class CompressedTensorsFormat(SourceFormat):
    """compressed-tensors `pack-quantized` (llm-compressor, our `quantize`): refused as a source, in one line."""

    name = "compressed-tensors"

    @property
    def quantized(self) -> bool:
        return True

    def validate(self) -> None:
        raise UserError("this is a compressed-tensors (pack-quantized) checkpoint, e.g. the output of `moecompress "
                        "quantize`; prune/merge/quantize start from float, FP8 or MXFP4 checkpoints — run them on the "
                        "model it was quantized from and quantize last (a recipe does this in order)")

    def read(self, key: str, get_tensor: GetTensor) -> torch.Tensor:
        self.validate()
        raise AssertionError("unreachable")


def detect_source_format(config: Mapping[str, Any], tensors: Mapping[str, Any] | Iterable[str],
                         dtype: torch.dtype = torch.bfloat16) -> SourceFormat:
    """The reader for a checkpoint, from its config's `quantization_config` and its stored keys (and dtypes)."""
    meta = _as_meta(tensors)
    method = _quant_config(config).get("quant_method")
    has_scale_inv = any(k.endswith("weight_scale_inv") for k in meta)
    has_blocks = any(k.endswith("_blocks") for k in meta)
    if method == "compressed-tensors" or any(k.endswith("weight_packed") for k in meta):
        return CompressedTensorsFormat(config, meta, dtype)
    if method == "mxfp4" or has_blocks:
        if method not in (None, "mxfp4"):
            raise UserError(f"checkpoint says quant_method {method!r} but stores MXFP4 `_blocks` tensors")
        return MXFP4Format(config, meta, dtype)
    if method == "fp8" or has_scale_inv:
        if method not in (None, "fp8"):
            raise UserError(f"checkpoint says quant_method {method!r} but stores FP8 `weight_scale_inv` tensors")
        return FP8BlockFormat(config, meta, dtype)
    if method:
        raise UserError(f"quantization {method!r} is not a source format moecompress reads (it reads float, FP8 "
                        "block-scaled and MXFP4 checkpoints)")
    fp8 = [k for k, m in meta.items() if m is not None and m[0] in _FP8_DTYPES]
    if fp8:
        raise UserError(f"{fp8[0]} is stored in FP8 but config.json has no quantization_config and there are no "
                        "scales: the checkpoint cannot be read correctly")
    return SourceFormat(config, meta, dtype)
