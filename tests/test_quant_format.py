"""pack-quantized checkpoints reload in vanilla transformers with clean loading info and the in-memory logits."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from moecompress.errors import UserError
from moecompress.quant import QuantResult, quantize_rtn, save_quantized

_COMMON = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False,
)
_FAMILY = {
    "qwen3_moe": (dict(num_experts=4, moe_intermediate_size=64, intermediate_size=128), "mlp", ("gate_proj", "up_proj", "down_proj")),
    "mixtral": (dict(num_local_experts=4, intermediate_size=64), "block_sparse_moe", ("w1", "w3", "w2")),
}

Slot = tuple[str, torch.Tensor, Callable[[torch.Tensor], None]]


def _tiny(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    extra, _, _ = _FAMILY[family]
    cfg = AutoConfig.for_model(family, **_COMMON, **extra)
    torch.manual_seed(seed)
    # from_config(dtype=...) keeps rotary buffers in float32 as a reload does; .to(bf16) would not.
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def _expert_slots(model: torch.nn.Module, family: str) -> list[Slot]:
    """(checkpoint module name, current weight [out, in], setter) for every routed expert projection."""
    _, block, (gname, uname, dname) = _FAMILY[family]
    slots: list[Slot] = []
    for li, layer in enumerate(model.model.layers):
        ex = layer.mlp.experts
        inter = ex.down_proj.shape[-1]
        for e in range(ex.gate_up_proj.shape[0]):
            prefix = f"model.layers.{li}.{block}.experts.{e}"
            views = {
                gname: (ex.gate_up_proj, e, slice(0, inter)),
                uname: (ex.gate_up_proj, e, slice(inter, 2 * inter)),
                dname: (ex.down_proj, e, slice(None)),
            }
            for pname, (param, idx, rows) in views.items():
                def setter(v: torch.Tensor, p=param, i=idx, r=rows) -> None:
                    with torch.no_grad():
                        p[i, r].copy_(v)
                slots.append((f"{prefix}.{pname}", param[e, rows].detach().clone(), setter))
    return slots


def _quantize_experts(model, family, bits_of: Callable[[int], int], group_size: int) -> dict[str, QuantResult]:
    out = {}
    for k, (name, w, set_w) in enumerate(_expert_slots(model, family)):
        res = quantize_rtn(w, bits_of(k), group_size)
        set_w(res.dequant)
        out[name] = res
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _reload_equal(path, model, atol: float = 1e-5) -> torch.nn.Module:
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    reloaded, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    got = _logits(reloaded.eval(), ids)
    assert (got - ref).abs().max().item() <= atol
    return reloaded


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_rtn_w4_experts_roundtrip(tmp_path, family):
    model = _tiny(family)
    before = _logits(model, torch.arange(16).unsqueeze(0))
    quantized = _quantize_experts(model, family, lambda _: 4, 32)
    assert (_logits(model, torch.arange(16).unsqueeze(0)) - before).abs().max() > 1e-4  # weights really changed
    info = save_quantized(model, tmp_path, quantized)
    _reload_equal(tmp_path, model)

    names = set(load_file(tmp_path / "model.safetensors"))
    one = next(iter(quantized))
    assert {f"{one}.weight_packed", f"{one}.weight_scale", f"{one}.weight_shape"} <= names
    assert f"{one}.weight" not in names
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    assert "lm_head" in qc["ignore"] and any(i.endswith(".gate") for i in qc["ignore"])  # routers stay float
    assert info.expert_scheme == {"bits": 4, "group_size": 32}
    assert info.weight_bytes < info.dense_weight_bytes
    assert info.bits_per_param_with_scales == pytest.approx(4 + 32 / 32, abs=0.05)  # fp32 scale per 32


@pytest.mark.parametrize(("bits", "group_size"), [(2, 32), (3, -1), (5, 32), (6, 16), (7, 64), (8, 64)])
def test_other_bit_widths_load_exactly(tmp_path, bits, group_size):
    model = _tiny("qwen3_moe", seed=1)
    quantized = _quantize_experts(model, "qwen3_moe", lambda _: bits, group_size)
    save_quantized(model, tmp_path, quantized)
    _reload_equal(tmp_path, model)


def test_bf16_model_roundtrip(tmp_path):
    model = _tiny("qwen3_moe", dtype=torch.bfloat16)
    quantized = _quantize_experts(model, "qwen3_moe", lambda _: 4, 32)
    assert next(iter(quantized.values())).scale.dtype == torch.bfloat16
    save_quantized(model, tmp_path, quantized)
    _reload_equal(tmp_path, model, atol=0.0)


def test_mixed_expert_bits_refused_unless_padded(tmp_path):
    model = _tiny("qwen3_moe")
    quantized = _quantize_experts(model, "qwen3_moe", lambda k: 2 if k % 3 == 0 else 4, 32)
    with pytest.raises(UserError, match="one scheme"):
        save_quantized(model, tmp_path / "a", quantized)
    info = save_quantized(model, tmp_path / "b", quantized, pad_mixed_experts=True)
    assert info.stored_bits == 4 and info.effective_bits < 4
    _reload_equal(tmp_path / "b", model)


def test_transformers_applies_one_scheme_to_all_experts(tmp_path):
    """Why the guard above exists: a 2-bit expert under a 4-bit experts scheme loads silently wrong."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    model = _tiny("qwen3_moe")
    quantized = _quantize_experts(model, "qwen3_moe", lambda _: 4, 32)
    save_quantized(model, tmp_path, quantized)
    name = "model.layers.0.mlp.experts.1.gate_proj"
    w = model.model.layers[0].mlp.experts.gate_up_proj[1, :64].detach().clone()
    res = quantize_rtn(w, 2, 32)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj[1, :64] = res.dequant
    sd = load_file(tmp_path / "model.safetensors")
    sd[f"{name}.weight_packed"] = pack_to_int32(res.qweight, 2)
    sd[f"{name}.weight_scale"] = res.scale
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AssertionError):
        _reload_equal(tmp_path, model)  # loading info is clean, logits are not


def test_dense_linears_with_experts(tmp_path):
    model = _tiny("qwen3_moe")
    quantized = _quantize_experts(model, "qwen3_moe", lambda _: 4, 32)
    dense = {}
    for li, layer in enumerate(model.model.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(layer.self_attn, proj)
            bits = 8 if li == 0 else 3
            res = quantize_rtn(lin.weight.detach(), bits, -1)
            with torch.no_grad():
                lin.weight.copy_(res.dequant)
            dense[f"model.layers.{li}.self_attn.{proj}"] = res
    with pytest.raises(UserError, match="dense"):
        save_quantized(model, tmp_path / "a", {**quantized, **dense})
    save_quantized(model, tmp_path / "b", {**quantized, **dense}, allow_mixed_dense=True)
    reloaded = _reload_equal(tmp_path / "b", model)
    assert hasattr(reloaded.model.layers[0].self_attn.q_proj, "quantization_scheme")


def test_one_dense_scheme_is_exact_with_dequantize_true(tmp_path):
    """A single experts scheme + a single dense scheme also loads exactly when the user dequantizes on load."""
    from transformers import CompressedTensorsConfig

    model = _tiny("mixtral")
    quantized = _quantize_experts(model, "mixtral", lambda _: 4, 32)
    for li, layer in enumerate(model.model.layers):
        res = quantize_rtn(layer.self_attn.o_proj.weight.detach(), 8, 64)
        with torch.no_grad():
            layer.self_attn.o_proj.weight.copy_(res.dequant)
        quantized[f"model.layers.{li}.self_attn.o_proj"] = res
    save_quantized(model, tmp_path, quantized)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    assert {k: v for k, v in info.items() if v} == {}
    assert (_logits(reloaded.eval(), ids) - _logits(model, ids)).abs().max().item() <= 1e-5


def test_sharded_checkpoint(tmp_path):
    model = _tiny("qwen3_moe")
    quantized = _quantize_experts(model, "qwen3_moe", lambda _: 4, 32)
    info = save_quantized(model, tmp_path, quantized, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not any(k.endswith("experts.0.gate_proj.weight") for k in index["weight_map"])
    assert info.weight_bytes < info.dense_weight_bytes
    _reload_equal(tmp_path, model)


def test_refuses_partial_unknown_and_mismatched(tmp_path):
    model = _tiny("qwen3_moe")
    quantized = _quantize_experts(model, "qwen3_moe", lambda _: 4, 32)
    with pytest.raises(UserError, match="nothing to quantize"):
        save_quantized(model, tmp_path / "e", {})
    half = {k: v for k, v in quantized.items() if ".layers.0." in k}
    with pytest.raises(UserError, match="every routed expert"):
        save_quantized(model, tmp_path / "a", half)
    typo = dict(quantized)
    typo["model.layers.0.mlp.expert.0.gate_proj"] = typo.pop("model.layers.0.mlp.experts.0.gate_proj")
    with pytest.raises(UserError, match="closest"):
        save_quantized(model, tmp_path / "b", typo)
    swapped = dict(quantized)
    g, u = "model.layers.1.mlp.experts.2.gate_proj", "model.layers.1.mlp.experts.2.up_proj"
    swapped[g], swapped[u] = swapped[u], swapped[g]
    with pytest.raises(UserError, match="wrong tensor"):
        save_quantized(model, tmp_path / "c", swapped)


@pytest.mark.parametrize("dequantize", [False, True])
def test_shared_experts_are_dense_modules(tmp_path, dequantize):
    """DeepSeek-style ``shared_experts`` (a name containing "experts") must not be taken for the routed group."""
    import re

    from transformers import CompressedTensorsConfig

    from moecompress.zoo.tiny import tiny

    model, _ = tiny("deepseek_v3")
    quantized = {}
    for li, layer in enumerate(model.model.layers):
        if not hasattr(layer.mlp, "experts"):
            continue  # first_k_dense_replace: a dense layer
        ex = layer.mlp.experts
        inter = ex.down_proj.shape[-1]
        for e in range(ex.gate_up_proj.shape[0]):
            for pname, t in (("gate_proj", ex.gate_up_proj[e, :inter]), ("up_proj", ex.gate_up_proj[e, inter:]),
                             ("down_proj", ex.down_proj[e])):
                res = quantize_rtn(t.detach(), 4, 32)
                with torch.no_grad():
                    t.copy_(res.dequant)
                quantized[f"model.layers.{li}.mlp.experts.{e}.{pname}"] = res
        for pname in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layer.mlp.shared_experts, pname)
            res = quantize_rtn(lin.weight.detach(), 8, 16)
            with torch.no_grad():
                lin.weight.copy_(res.dequant)
            quantized[f"model.layers.{li}.mlp.shared_experts.{pname}"] = res
    info = save_quantized(model, tmp_path, quantized)
    assert info.expert_scheme == {"bits": 4, "group_size": 32}
    assert info.dense_schemes == [{"bits": 8, "group_size": 16}]
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]
    assert all(not t.startswith("re:") for t in groups["group_1"]["targets"])
    assert all(re.search(r"shared_experts", t) for t in groups["group_1"]["targets"])
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    reloaded, info_ = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, **kw)
    assert {k: v for k, v in info_.items() if v} == {}
    assert (_logits(reloaded.eval(), ids) - _logits(model, ids)).abs().max().item() <= 1e-5
