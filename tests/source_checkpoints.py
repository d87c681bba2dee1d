"""Tiny checkpoints in the exact on-disk layouts of published quantized MoE models, with their known originals.

- FP8 block (DeepSeek-V3/R1, Qwen3-*-FP8, MiniMax, Kimi): every linear `weight` in float8_e4m3fn + float32
  `weight_scale_inv` [ceil(out/b0), ceil(in/b1)]; router, norms, embeddings and lm_head stay bf16
  (`modules_to_not_convert`); `quantization_config` {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
  "dynamic", "weight_block_size": [b0, b1], "modules_to_not_convert": [...]}.
- MXFP4 (gpt-oss): experts' `gate_up_proj_blocks` / `down_proj_blocks` uint8 [E, rows, K/32, 16] + `_scales` uint8
  [E, rows, K/32] (exponent + 127); biases, attention, router, embeddings bf16.
The originals are exactly representable (FP8 values × scale; FP4 grid × power of two), so "dequantized == known"
is an exact check up to the final bf16 rounding.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moecompress.zoo.tiny import tiny

FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _fp8_linear(name: str, t: torch.Tensor) -> bool:
    skip = ("embed_tokens", "lm_head", "norm", ".gate.weight", "router")
    return t.ndim == 2 and name.endswith(".weight") and not any(s in name for s in skip)


def fp8_checkpoint(out: Path, family: str = "qwen3_moe", block: tuple[int, int] = (48, 48), seed: int = 0,
                   **overrides) -> dict[str, torch.Tensor]:
    """Write a tiny FP8 block-scaled checkpoint; returns the known dequantized float32 weights by stored key."""
    model, tok = tiny(family, seed=seed, **overrides)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    new, known = fp8_blocks(load_file(out / "model.safetensors"), block)
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block),
                                  "modules_to_not_convert": ["lm_head", "model.embed_tokens"] + [
                                      f"model.layers.{i}.mlp.gate" for i in range(cfg["num_hidden_layers"])]}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return known


def fp8_blocks(stored: dict[str, torch.Tensor], block: tuple[int, int]
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every linear weight of `stored` as float8_e4m3fn + `_scale_inv` blocks (as DeepSeek-V3 ships them); also
    returns the exactly representable float32 values they decode to."""
    new, known = {}, {}
    for key, w in stored.items():
        if not _fp8_linear(key, w):
            new[key] = w
            continue
        rows, cols = w.shape
        scales = torch.empty(math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
        for i in range(scales.shape[0]):
            for j in range(scales.shape[1]):
                sl = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
                blk = w[sl].float()
                scales[i, j] = blk.abs().max().clamp_min(1e-8) / 448.0
                q[sl] = (blk / scales[i, j]).to(torch.float8_e4m3fn)
                known.setdefault(key, torch.empty(rows, cols))[sl] = q[sl].float() * scales[i, j]
        new[key], new[key + "_scale_inv"] = q, scales
    return new, known


def mxfp4_checkpoint(out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write a tiny gpt-oss MXFP4 checkpoint; returns the known float32 expert tensors in transformers' layout."""
    model, tok = tiny("gpt_oss", seed=seed, intermediate_size=64, hidden_size=64)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    stored = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    lut = torch.tensor(FP4_GRID)
    new, known = {}, {}
    for key, w in stored.items():
        if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            new[key] = w
            continue
        e, k_in, rows = w.shape  # transformers: gate_up [E, H, 2I], down [E, I, H] -> stored [E, rows=out, K=in]
        nib = torch.randint(0, 16, (e, rows, k_in), generator=g)
        exp = torch.randint(124, 130, (e, rows, k_in // 32), generator=g, dtype=torch.int32)
        values = lut[nib] * torch.exp2((exp - 127).float()).repeat_interleave(32, dim=-1)
        known[key] = values.transpose(1, 2).contiguous()  # back to transformers' [E, in, out]
        packed = (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)
        new[key + "_blocks"] = packed.reshape(e, rows, k_in // 32, 16)
        new[key + "_scales"] = exp.to(torch.uint8)
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return known
