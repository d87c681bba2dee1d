"""Which model types have routed experts, and adapters derived from transformers' own modeling code.

``routed_expert_model_types`` finds families by what their modeling code is (a fused experts class
decorated with ``@use_experts_implementation`` or a class named ``…Experts``), so a new transformers
release that adds a family shows up here without anyone listing it. ``derived_adapter`` builds a
miniature of the family's default config, finds the experts / router / shared experts in it
(``arch.discover``) and reads the config keys whose values match what it found. Only what cannot be
derived is data: ``UNSUPPORTED`` (with the reason) and ``CONFIG_HINTS``.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import torch

from moecompress.errors import UserError

# Model types transformers ships with routed experts that moecompress does not compress, each with the reason.
# Text-generating decoders belong here only while a real gap remains; the enumeration test keeps this honest.
UNSUPPORTED: dict[str, str] = {
    "switch_transformers": "encoder-decoder (T5-style) with per-expert ModuleDict experts; not a causal decoder",
    "nllb_moe": "encoder-decoder translation model with per-expert ModuleDict experts; not a causal decoder",
    "openai_privacy_filter": "token-classification encoder (no text-generating head)",
}

# Families with routed experts that do not (yet) pass the miniature round trip; the reason is what breaks.
_NON_FUSED_REASON = {
    "diffusion_gemma": "diffusion (non-autoregressive) text model: no causal next-token head to verify against",
}


def modeling_root() -> str:
    import transformers

    return os.path.join(os.path.dirname(transformers.__file__), "models")


_EXPERTS_CLASS = re.compile(r"^class \w*Experts\w*\((?:nn\.Module|nn\.ModuleDict)", re.M)


@functools.lru_cache(maxsize=1)
def routed_expert_model_types() -> tuple[str, ...]:
    """Every `transformers/models/<dir>` whose modeling code defines routed experts (by reading the code)."""
    root = modeling_root()
    found = []
    for d in sorted(os.listdir(root)):
        path = os.path.join(root, d)
        if not os.path.isdir(path):
            continue
        for f in os.listdir(path):
            if f.startswith("modeling_") and f.endswith(".py"):
                with open(os.path.join(path, f), encoding="utf-8") as fh:
                    src = fh.read()
                if "@use_experts_implementation" in src or _EXPERTS_CLASS.search(src):
                    found.append(d)
                    break
    return tuple(found)


def top_model_type(dirname: str) -> str | None:
    """The model_type a modeling folder's checkpoints carry at the top of config.json (the folder name, or the
    one of its model types that builds a text-generating model)."""
    from transformers.models.auto import modeling_auto as ma
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    if dirname in CONFIG_MAPPING_NAMES:
        return dirname
    own = [mt for mt in CONFIG_MAPPING_NAMES if model_type_to_module_name(mt) == dirname]
    for mapping in (ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        for mt in own:
            if mt in mapping:
                return mt
    return own[0] if own else None


def unsupported_reason(model_type: str | None) -> str | None:
    if model_type in UNSUPPORTED:
        return UNSUPPORTED[model_type]
    if model_type in _NON_FUSED_REASON:
        return _NON_FUSED_REASON[model_type]
    return None


# ---- deriving an adapter ---------------------------------------------------------------------------
# Config keys by role, tried in order; the derivation keeps those whose value matches the built model.
WIDTH_KEYS = ("moe_intermediate_size", "expert_intermediate_size", "moe_hidden_size", "expert_ffn_hidden_size",
              "moe_ffn_hidden_size", "expert_dim", "intermediate_size", "ffn_hidden_size")


@functools.cache
def derived_adapter(model_type: str):
    """An MoEAdapter for `model_type` learned from a miniature built from transformers' defaults, or None."""
    if unsupported_reason(model_type):
        return None

    cfg = reference_config(model_type)
    return adapter_from_config(cfg) if cfg is not None else None


# transformers' default configs that do not describe a runnable model (a layer pattern left unset, a routing
# mode that needs a key the default lacks): the fix, as config data. Used only to build reference miniatures.
DEFAULT_FIXES: dict[str, dict[str, Any]] = {
    # the modeling code falls back to its own mrope_section when the config has none; state it so it shrinks
    "glm4v_moe": {"text_config": {"rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                                      "rope_type": "default", "mrope_section": [8, 12, 12]}}},
    "ernie4_5_vl_moe": {"text_config": {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default",
                                                            "mrope_section": [22, 22, 20]}}},
    "gemma4": {"text_config": {"enable_moe_block": True, "num_experts": 8, "top_k_experts": 2,
                               "moe_intermediate_size": 32}},
    "granitemoehybrid": {"layer_types": ["mamba", "attention", "mamba", "attention"], "num_hidden_layers": 4},
    # the text model builds a sliding-window mask for every forward, even when no layer slides
    "step3p7": {"text_config": {"sliding_window": 512}},
    # indexed-attention layers by default, but the QSA indexer sizes they need are unset (a real config sets them)
    "qwen4_exp": {"text_config": {"indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": 128,
                                  "indexer_budget": 2048, "indexer_compress_ratio": 4}},
    # the talker reads shared_expert_intermediate_size and spatial_merge_size, the thinker's rope index
    # vision_start_token_id: the default configs lack them (published checkpoints set them; Qwen's vision start id)
    "qwen3_omni_moe": {"talker_config": {"text_config": {"shared_expert_intermediate_size": 768},
                                         "spatial_merge_size": 2},
                       "thinker_config": {"vision_start_token_id": 151652}},
    # per-layer MLP kinds and top-k have no default (published DeepSeek-OCR-2: a dense first layer, top-6)
    "deepseek_ocr2": {"text_config": {"mlp_layer_types": ["dense"] + ["sparse"] * 11, "num_hidden_layers": 12,
                                      "num_experts_per_tok": 6}},
    # DbrxAttention needs attn_config.rope_theta (absent by default) and a clip_qkv (None fails its clamp); the
    # published DBRX values, and its 16 experts / top-4
    "dbrx": {"attn_config": {"rope_theta": 500000.0, "clip_qkv": 8.0},
             "ffn_config": {"moe_num_experts": 16, "moe_top_k": 4}},
    "hunyuan_v1_moe": {"num_experts": 8, "moe_topk": 2},  # the default is one expert: nothing to route
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"], "num_hidden_layers": 4,
                 "num_dense_layers": 1},
}


def reference_config(dirname: str) -> dict[str, Any] | None:
    """The config a family's adapter is derived from and its round trip is tested on: the tiny config for the
    declared families, else transformers' default for the folder's top model type (plus `DEFAULT_FIXES`)."""
    from transformers import AutoConfig

    from moecompress.zoo.tiny import TINY_OVERRIDES, tiny_config

    model_type = top_model_type(dirname) or dirname
    if model_type in TINY_OVERRIDES:
        cfg = tiny_config(model_type).to_dict()
    else:
        try:
            cfg = AutoConfig.for_model(model_type).to_dict()
        except (ValueError, KeyError):
            return None
        _merge(cfg, DEFAULT_FIXES.get(model_type, {}))
    cfg["model_type"] = model_type
    cfg["architectures"] = None
    return cfg


def _merge(cfg: dict[str, Any], fix: dict[str, Any]) -> None:
    """Apply a DEFAULT_FIXES entry: nested dicts are merged key by key (sub-configs of sub-configs included)."""
    for k, v in fix.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            _merge(cfg[k], v)
        else:
            cfg[k] = v


def adapter_from_config(config: dict[str, Any]):
    """Build a miniature of `config` and describe its MoE blocks as an MoEAdapter (None: no routed experts)."""
    from moecompress.zoo.miniature import build_miniature

    try:
        model = build_miniature(config)
    except UserError:
        return None
    return adapter_from_model(model, config.get("model_type"))


def adapter_from_model(model: torch.nn.Module, model_type: str | None = None):
    """Describe a live model's MoE blocks as an MoEAdapter (None if it has no recognisable routed experts)."""
    from moecompress.arch.adapter import ADAPTERS, CoupledExperts, MoEAdapter, RouterVector
    from moecompress.arch.discover import (
        coupled_expert_set,
        experts_layout,
        find_moe_blocks,
        router_vectors,
        shared_children,
    )

    blocks = [b for b in find_moe_blocks(model) if b.router is not None]
    if not blocks:
        return None
    b, paired, own = _lift_paired_sets(model, blocks)
    model_type = model_type or model.config.model_type
    text_key = _text_config_path(model.config, b.num_experts)
    text = model.config
    for part in (text_key or "").split(".") if text_key else ():
        text = getattr(text, part)
    base = ADAPTERS.get(getattr(text, "model_type", None))
    experts = b.experts
    n = b.num_experts
    width = _width(experts)
    cfg = text.to_dict()
    from moecompress.zoo.miniature import COUNT_KEYS, GROUP_KEYS, TOPK_GROUP_KEYS, TOPK_KEYS

    count_keys = tuple(k for k in COUNT_KEYS if cfg.get(k) == n)
    # published configs may use the alias the config class maps onto its field (Qwen3-VL-MoE: num_experts →
    # num_local_experts); both spell the count, so both are read and rewritten
    aliases = getattr(type(text), "attribute_map", {}) or {}
    count_keys += tuple(a for a, target in aliases.items() if target in count_keys and a not in count_keys)
    topk_key = next((k for k in TOPK_KEYS if isinstance(cfg.get(k), int)), None)
    width_key = next((k for k in WIDTH_KEYS if cfg.get(k) == width), None)
    width_index = None
    if width_key is None and paired:  # one width per expert set, in the block's order (ERNIE-4.5-VL: [text, vision])
        sets = sorted([own, *paired], key=lambda p: list(dict(b.block.named_children())).index(p))
        widths = [_width(b.block.get_submodule(f"{p}.{b.experts_attr.rsplit('.', 1)[-1]}")) for p in sets]
        width_key = next((k for k in WIDTH_KEYS if cfg.get(k) == widths), None)
        width_index = sets.index(own) if width_key else None
    if base is not None and (experts_layout(experts) == "interleaved" or not count_keys or topk_key is None
                             or width_key is None or not _own_forward_reproduced(b.router, experts)):
        # a multimodal wrapper around a declared language model whose experts keep a call of their own (Llama-4:
        # dense experts on sigmoid-scaled inputs): the declared adapter, found where the wrapper keeps its layers
        return base.model_copy(update=dict(model_type=model_type, layers_path=b.layers_path, text_config_key=text_key,
                                           derived=True))
    if not count_keys or topk_key is None or width_key is None:
        return None
    group_key = next((k for k in GROUP_KEYS if k in cfg), None)
    topk_group_key = next((k for k in TOPK_GROUP_KEYS if k in cfg), None)
    root_router = b.router_attr.split(".")[0] if not paired else ".".join(b.router_attr.split(".")[:2])
    shared = shared_children(b.block, {root_router.split(".")[0], b.experts_attr, *paired})
    extra = b.extra_router_rows  # router classes after the routed experts, kept in place by every surgery
    # layers may route differently (DeepSeek-V4: hash-routed first layers, top-k after): every layer's per-expert
    # router tensors count, each sliced where it exists
    vectors = tuple(RouterVector(path=p, axis=a) for p, a in dict.fromkeys(
        va for blk in blocks if blk.router_attr == blocks[0].router_attr and blk.router is not None
        for va in router_vectors(blk.router, n, extra)))
    id_tables = tuple(dict.fromkeys(
        f"{b.router_attr}.{name}" for blk in blocks if blk.router_attr == blocks[0].router_attr and blk.router is not None
        for name, t in blk.router.named_buffers()
        if not t.is_floating_point() and t.dim() == 2 and t.shape[-1] == cfg.get(topk_key or "", -1)))
    owned = {id(t) for m in (b.router, experts, *(getattr(b.block, s) for s in shared),
                             *(b.block.get_submodule(p) for p in paired)) for t in (*m.parameters(), *m.buffers())}
    block_vectors = tuple(RouterVector(path=p, axis=a) for p, a in router_vectors(b.block, n, extra)
                          if id(b.block.get_parameter(p) if p in dict(b.block.named_parameters()) else
                                b.block.get_buffer(p)) not in owned)
    layout = experts_layout(experts)
    if layout == "interleaved" or not _own_forward_reproduced(b.block.get_submodule(root_router), experts):
        return None
    routing = _probe_routing(b.router, int(b.router.weight.shape[-1]), n)  # the router reads the full hidden state
    layer = model.get_submodule(f"{b.layers_path}.{b.index}")
    found = coupled_expert_set(layer, b.block_attr, n, int(b.router.weight.shape[-1]))
    coupled = CoupledExperts(path=found[0], router=found[1], tensors=found[2]) if found else None
    disk = _on_disk_experts(model, b.experts_attr.rsplit(".", 1)[-1], b.layers_path)
    fields: dict[str, Any] = dict(
        model_type=model_type, block_attr=b.block_attr, router_attr=b.router_attr, experts_attr=b.experts_attr,
        shared_attrs=shared, layout=layout, has_expert_bias=bool(getattr(experts, "has_bias", False)),
        router_vectors=vectors, block_vectors=block_vectors, routing=routing, renorm_key="norm_topk_prob" if "norm_topk_prob" in cfg else None,
        count_keys=count_keys, topk_key=topk_key, width_key=width_key,
        shared_width_coupled=_shared_coupled(b.block, shared, width, cfg, width_key),
        group_key=group_key, topk_group_key=topk_group_key,
        checkpoint_block=disk[1] if disk else None, checkpoint_expert_linears=disk[2] if disk else None,
        checkpoint_layers_path=disk[0] if disk else None, other_expert_stacks=disk[3] if disk else (),
        layers_path=b.layers_path, text_config_key=text_key, has_gate=bool(getattr(experts, "has_gate", True)),
        router_extra_rows=extra, expert_id_tables=id_tables, coupled=coupled, width_index=width_index,
        paired_sets=paired, derived=True,
    )
    if base is not None:  # the language model is a declared family: keep its routing knowledge
        fields.update(routing=base.routing, renorm_key=base.renorm_key, always_renorm=base.always_renorm)
    return MoEAdapter(**fields)


def _lift_paired_sets(model: torch.nn.Module, blocks: list[Any]) -> tuple[Any, tuple[str, ...], str]:
    """The first MoE block, lifted to the parent of its sub-block when that parent holds other expert sets of the same
    count (ERNIE-4.5-VL: ``mlp.text_moe`` and ``mlp.vision_moe``, one ``moe_num_experts`` for both): the parent is
    then the block (its shared experts included), router and experts are reached through the first set's
    sub-block, and the others are paired sets. Returns (block, paired sub-block names, own sub-block name)."""
    import dataclasses

    b = blocks[0]
    same = [o for o in blocks[1:] if o.layers_path == b.layers_path and o.index == b.index]
    if not same or "." not in b.block_attr or b.router_attr is None:
        return b, (), ""
    parent, own = b.block_attr.rsplit(".", 1)
    if any(o.num_experts != b.num_experts or o.router_attr != b.router_attr or o.experts_attr != b.experts_attr
           or o.block_attr.rsplit(".", 1)[0] != parent for o in same):
        return b, (), ""
    block = model.get_submodule(f"{b.layers_path}.{b.index}.{parent}")
    lifted = dataclasses.replace(b, block_attr=parent, block=block, experts_attr=f"{own}.{b.experts_attr}",
                                 router_attr=f"{own}.{b.router_attr}")
    return lifted, tuple(o.block_attr.rsplit(".", 1)[1] for o in same), own


def _text_config_path(config: Any, num_experts: int) -> str | None:
    """Where the language model's MoE keys sit in a model config: None (flat), "text_config", a dotted path to it
    when a wrapper nests it twice (Qwen3-Omni: "thinker_config.text_config", found via get_text_config), or the
    sub-config that holds the expert count (DBRX: "ffn_config")."""
    from moecompress.zoo.miniature import COUNT_KEYS

    if getattr(config, "text_config", None) is not None:
        return "text_config"
    target = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    if target is config:
        if any(getattr(config, k, None) == num_experts for k in COUNT_KEYS):
            return None
        return next((name for name in getattr(config, "sub_configs", {}) or {}
                     if any(getattr(getattr(config, name, None), k, None) == num_experts for k in COUNT_KEYS)), None)
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is target:
            return name
        if sub is not None and getattr(sub, "text_config", None) is target:
            return f"{name}.text_config"
    return None


@torch.no_grad()
def _own_forward_reproduced(router: torch.nn.Module, experts: torch.nn.Module) -> bool:
    """Experts whose class does not dispatch on ``_experts_implementation`` keep a forward of their own; calibration
    swaps in moecompress' implementation, so it must give the same output as theirs (checked on routed tokens)."""
    from moecompress.arch.discover import router_choice
    from moecompress.calib.collect import dispatches, tap_experts_forward

    if dispatches(experts):
        return True
    n = int(experts.down_proj.shape[0])
    dtype = experts.down_proj.dtype
    x = torch.randn(64, _hidden(experts), generator=torch.Generator().manual_seed(0)).to(dtype)
    try:
        index, weights = router_choice(router(x), n)  # may index zero-computation experts past the routed ones
        want = experts(x, index, weights)
        got = tap_experts_forward(experts, x, index, weights)
    except Exception:  # a router or experts call that needs more than the common signature
        return False
    return bool(torch.allclose(got, want, rtol=1e-4, atol=1e-5))


def _width(experts: torch.nn.Module) -> int:
    down = experts.down_proj
    return int(down.shape[1] if getattr(experts, "is_transposed", False) else down.shape[2])


def _hidden(experts: torch.nn.Module) -> int:
    down = experts.down_proj
    return int(down.shape[2] if getattr(experts, "is_transposed", False) else down.shape[1])


def _shared_coupled(block: torch.nn.Module, shared: tuple[str, ...], width: int, cfg: dict[str, Any],
                    width_key: str) -> bool:
    """Shared-expert width derived from the routed width (no config key of its own holds it): trap (a)."""
    for name in shared:
        mlp = getattr(block, name)
        gate = getattr(mlp, "gate_proj", None)
        if gate is None:
            gate = getattr(mlp, "up_proj", None)
        if isinstance(gate, torch.nn.Parameter) and gate.dim() == 3:  # stacked shared experts [S, I, H] (Inkling)
            sw = int(gate.shape[1])
        elif isinstance(gate, torch.nn.Linear):
            sw = gate.out_features
        else:
            continue
        # only width-like keys count: a miniature's sliding_window or head count may equal the width by chance
        own_key = any(k != width_key and v == sw and _width_like(k) for k, v in cfg.items() if isinstance(v, int))
        if not own_key and sw % width == 0:
            return True
    return False


def _width_like(key: str) -> bool:
    """A config key that can hold an MLP width (intermediate / ffn sizes, a shared expert's own width)."""
    return any(w in key for w in ("intermediate", "ffn", "shared", "expert_dim", "mlp"))


@torch.no_grad()
def _probe_routing(router: torch.nn.Module, hidden: int, n: int) -> str:
    """Whether the weights the router hands to the experts are sigmoid- or softmax-shaped (ratios tell)."""
    x = torch.randn(64, hidden, generator=torch.Generator().manual_seed(0)).to(router.weight.dtype)
    try:
        out = router(x)
    except Exception:  # routers needing extra inputs: assume softmax, the common case
        return "softmax_topk"
    if not isinstance(out, tuple):
        return "softmax_topk"
    logits = next((t for t in out if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == n), None)
    index = next((t for t in out if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2), None)
    weights = next((t for t in out if isinstance(t, torch.Tensor) and t.is_floating_point() and index is not None
                    and t.shape == index.shape), None)
    if logits is None or index is None or weights is None or index.shape[-1] < 2:
        return "softmax_topk"
    logits = logits.reshape(-1, n).double()
    w = weights.reshape(index.shape).double()
    ratio = w / w.sum(-1, keepdim=True).clamp_min(1e-30)

    def close(p: torch.Tensor) -> bool:
        q = p.gather(1, index.long())
        return bool(torch.allclose(ratio, q / q.sum(-1, keepdim=True), atol=1e-4))

    has_bias = any("correction" in k for k, _ in router.named_buffers()) or any(
        "correction" in k for k, _ in router.named_parameters())
    if close(logits.sigmoid()):
        return "sigmoid_group_bias" if has_bias else "sigmoid_topk"
    return "softmax_topk"


def _tensor_names(folder: Any) -> list[str]:
    import json
    import struct

    names: list[str] = []
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            names += [k for k in json.loads(fh.read(n)) if k != "__metadata__"]
    return names


def _on_disk_experts(model: torch.nn.Module, experts_attr: str, layers_path: str = ""
                     ) -> tuple[str, str, tuple[str | None, str, str], tuple[str, ...]] | None:
    """How `save_pretrained` names one routed expert's linears: (layers path, block, (gate, up, down) names; gate
    None for non-gated experts; the layer prefixes of other per-expert stacks), or None when experts are saved
    fused. Found by saving the miniature, so renamings on save are included."""
    import tempfile
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            names = _tensor_names(Path(tmp))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    pattern = re.compile(rf"^(?P<layers>.+)\.(?P<i>\d+)\.(?P<block>(?:[\w.]+\.)?){re.escape(experts_attr)}"
                         rf"\.0\.(?P<lin>\w+)\.weight$")
    found = [m for m in map(pattern.match, names) if m]
    # a checkpoint with two MoE stacks (Qwen3-Omni: thinker and talker): the stack under the same top module
    ours = [m for m in found if m["layers"].split(".")[0] == layers_path.split(".")[0]]
    hits = [m for m in ours if m["layers"] == layers_path] or ours or found
    if not hits:
        return None
    linears = sorted({m["lin"] for m in hits})
    if len(linears) not in (2, 3):
        return None
    roles: dict[str, str] = {}
    for lin in linears:
        role = ("gate" if lin in ("w1", "gate_proj") or "gate" in lin else
                "up" if lin in ("w3", "up_proj") or "up" in lin else
                "down" if lin in ("w2", "down_proj") or "down" in lin else None)
        if role is None or role in roles:
            return None
        roles[role] = lin
    if "up" not in roles or "down" not in roles or ("gate" in roles) != (len(linears) == 3):
        return None
    others = tuple(sorted({m["layers"] for m in found} - {hits[0]["layers"]}))
    return hits[0]["layers"], hits[0]["block"].rstrip("."), (roles.get("gate"), roles["up"], roles["down"]), others
