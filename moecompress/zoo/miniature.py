"""Miniatures of real checkpoints: the same structure as a published ``config.json``, at toy sizes.

``shrink_config`` keeps what decides whether compression code is right — model_type, nesting
(``text_config``/``vision_config``…), the per-layer pattern (dense-first layers, layer types, hybrid
patterns, MoE frequency), shared experts, routing groups and their divisibility, multi-token-prediction
count, tied embeddings, dtype — and shrinks every size (widths, heads, expert count, depth, vocabulary).
It works by key *names* shared across families, so configs it has never seen shrink too; what it cannot
shrink it leaves alone (the model is then merely larger).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from moecompress.arch.adapter import EXPERT_COUNT_ALIASES
from moecompress.errors import UserError

VOCAB = 512  # model vocabulary; the tokenizer uses the first TOKENIZER_VOCAB ids
TOKENIZER_VOCAB = 320
HIDDEN = 64
HEAD_DIM = 16
HEADS = 4
DENSE_WIDTH = 64
EXPERT_WIDTH = 32
MAX_EXPERTS = 16
MAX_TOPK = 2

# Keys holding a routed-expert count / top-k / routing groups (read by name across families).
COUNT_KEYS = EXPERT_COUNT_ALIASES
TOPK_KEYS = ("num_experts_per_tok", "top_k_experts", "num_experts_per_token", "moe_k", "moe_topk", "moe_top_k", "top_k",
             "n_activated_experts", "num_selected_experts", "experts_per_token")
GROUP_KEYS = ("n_group", "num_expert_group", "moe_n_group", "n_expert_groups")
TOPK_GROUP_KEYS = ("topk_group", "moe_topk_group", "topk_groups")
SHARED_COUNT_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "shared_expert_count")
# Per-layer pattern keys whose values are indices or per-layer entries.
_PER_LAYER_LISTS = ("layer_types", "layers_block_type", "no_rope_layers", "layer_rope_theta", "moe_layers_enabled",
                    "num_attention_heads_per_layer", "sliding_window_layers", "attn_type_list", "block_types",
                    "hybrid_layer_pattern", "layers_type", "mlp_layer_types", "mlp_types", "moe_layer_freq",
                    "swa_layers", "full_attn_layers", "rope_layers", "layer_group_types")
_INDEX_LISTS = ("mlp_only_layers", "moe_layers", "full_attn_idxs", "linear_attn_idxs", "attn_layer_indices",
                "kv_source_layers", "ple_layer_ids", "dense_layers", "sliding_layers")
_PATTERN_STRINGS = ("hybrid_override_pattern", "layer_pattern", "block_pattern")
_PERIOD_KEYS = ("decoder_sparse_step", "interleave_moe_layer_step", "attn_layer_period", "full_attention_interval",
                "global_attn_every_n_layers", "sliding_window_pattern", "expert_layer_period", "moe_every_n_layers",
                "linear_attn_every", "full_attn_every", "layer_group_size", "n_layers_per_attn_res_block",
                "no_rope_layer_interval")
_OFFSET_KEYS = ("attn_layer_offset", "expert_layer_offset")
_DENSE_PREFIX_KEYS = ("first_k_dense_replace", "first_k_dense", "moe_layer_start_index", "num_dense_layers",
                      "n_dense_layers", "first_dense_layers")

# Size keys: name -> miniature value (applied when the key holds an int larger than the target).
_SIZES: dict[str, int] = {
    "hidden_size": HIDDEN, "d_model": HIDDEN, "n_embd": HIDDEN, "dim": HIDDEN, "embed_dim": HIDDEN,
    "intermediate_size": DENSE_WIDTH, "ffn_hidden_size": DENSE_WIDTH, "d_ff": DENSE_WIDTH,
    "dense_intermediate_size": DENSE_WIDTH, "intermediate_size_mlp": DENSE_WIDTH, "mlp_dim": DENSE_WIDTH,
    "moe_intermediate_size": EXPERT_WIDTH, "expert_intermediate_size": EXPERT_WIDTH, "moe_hidden_size": EXPERT_WIDTH,
    "expert_ffn_hidden_size": EXPERT_WIDTH, "moe_ffn_hidden_size": EXPERT_WIDTH, "expert_dim": EXPERT_WIDTH,
    "shared_expert_intermediate_size": EXPERT_WIDTH, "shared_intermediate_size": EXPERT_WIDTH,
    "shared_experts_intermediate_size": EXPERT_WIDTH, "moe_shared_expert_intermediate_size": EXPERT_WIDTH,
    "share_expert_dim": EXPERT_WIDTH,
    "head_dim": HEAD_DIM, "kv_channels": HEAD_DIM, "swa_head_dim": HEAD_DIM, "d_kv": HEAD_DIM,
    "global_head_dim": 2 * HEAD_DIM,
    "kv_lora_rank": 16, "q_lora_rank": 24, "o_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": HEAD_DIM, "qk_head_dim": 16, "index_head_dim": 16, "index_n_heads": 2,
    "indexer_head_dim": 16, "indexer_n_heads": 2,
    "linear_key_head_dim": HEAD_DIM, "linear_value_head_dim": HEAD_DIM, "linear_head_dim": HEAD_DIM,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_num_heads": 4,
    "mamba_head_dim": HEAD_DIM, "mamba_d_head": HEAD_DIM, "ssm_state_size": 16, "mamba_d_state": 16,
    "mamba_num_heads": 8, "mamba_n_heads": 8, "mamba_dt_rank": 8, "time_step_rank": 8,
    "router_hidden_size": HIDDEN, "hidden_size_per_layer_input": 16, "ple_embed_dim": 16, "gated_norm_rank": 8,
    "sliding_window": 32, "sliding_window_size": 32, "attention_chunk_size": 32, "window_size": 32,
    "hc_lowrank": 8, "loop_gate_rank": 8, "index_block_size": 16, "block_size": 16,
    # vision / audio towers
    "out_hidden_size": HIDDEN, "projector_hidden_size": HIDDEN, "text_hidden_size": HIDDEN,
    "vision_output_dim": HIDDEN, "projector_input_dim": HIDDEN, "projector_output_dim": HIDDEN,
    "projection_hidden_dim": HIDDEN, "projection_intermediate_size": HIDDEN, "output_dim": HIDDEN,
    "encoder_ffn_dim": DENSE_WIDTH, "downsample_hidden_size": 32, "adapter_out_dim": HIDDEN,
    "thinker_hidden_size": HIDDEN, "merged_hidden_size": HIDDEN,
}
_HEAD_KEYS = ("num_attention_heads", "n_heads", "num_heads", "encoder_attention_heads", "swa_num_attention_heads",
              "num_sliding_attention_heads")
_KV_HEAD_KEYS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "swa_num_key_value_heads",
                 "num_global_key_value_heads")
_DEPTH_KEYS = ("depth", "encoder_layers", "num_layers", "n_layers")  # towers: shrink to 2
_TOKEN_ID_SUFFIXES = ("_token_id", "_token_index", "_id")
_LAYER_COUNT_KEYS = ("num_hidden_layers",)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _per_layer(cfg: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Keys of `cfg` that describe the stack layer by layer (lists/strings of length n_layers)."""
    out = {}
    for k, v in cfg.items():
        if k in _INDEX_LISTS and isinstance(v, list) and all(_int(x) for x in v):
            continue
        if isinstance(k, str) and isinstance(v, (list, str)) and len(v) == n_layers and n_layers > 1 and (
                k in _PER_LAYER_LISTS or k in _PATTERN_STRINGS or "layer" in k or "pattern" in k):
            if isinstance(v, str) and " " in v:
                continue
            out[k] = v
    return out


def _miniature_depth(cfg: dict[str, Any], n_layers: int) -> int:
    """Fewest layers that keep every kind of layer the real stack has, in the same order of appearance."""
    dense = max([int(cfg[k]) for k in _DENSE_PREFIX_KEYS if _int(cfg.get(k))] + [0])
    dense = min(dense, 1)
    need = dense + 2
    for k in _PERIOD_KEYS:
        p = cfg.get(k)
        if _int(p) and 1 < p <= n_layers:
            need = max(need, dense + p + int(cfg.get(_OFFSET_KEYS[0], 0) or 0) % p + 1)
    for k in _OFFSET_KEYS:
        if _int(cfg.get(k)):
            need = max(need, int(cfg[k]) + 2)
    per_layer = _per_layer(cfg, n_layers)
    for v in per_layer.values():
        seq = list(v)
        kinds = {json.dumps(x) for x in seq}
        n = 1
        while {json.dumps(x) for x in seq[:n]} != kinds:
            n += 1
        # a periodic pattern: include its first full period so ratios are kept
        need = max(need, n)
    if _int(cfg.get("loop_layer_index_end")):  # looped stacks: layers before, inside and after the loop
        need = max(need, int(cfg["loop_layer_index_end"]) + 1)
    # other lists with one entry per layer under names we do not know (a tower's patch_sizes/depths pyramid):
    # keep every layer rather than cut a list the config validates against the depth
    if n_layers > 2 and any(isinstance(v, list) and len(v) == n_layers and k not in per_layer and k not in _INDEX_LISTS
                            for k, v in cfg.items()):
        need = n_layers
    for k in _INDEX_LISTS:
        v = cfg.get(k)
        if isinstance(v, list) and v and all(_int(x) for x in v):
            first = min(v)
            need = max(need, min(first + 2, n_layers))
            missing = sorted(set(range(n_layers)) - set(v))
            if missing:
                need = max(need, min(missing[0] + 1, n_layers), first + 1)
    return max(1, min(n_layers, need))


def _shrink_loop(cfg: dict[str, Any]) -> None:
    """Looped stacks (Inkling-2-Loop) repeat layers start..end, both multiples of the attention-residual block:
    a block of at most 2 layers, one block before the loop, one inside it."""
    if not (_int(cfg.get("loop_layer_index_start")) and _int(cfg.get("loop_layer_index_end"))):
        return
    block = cfg.get("n_layers_per_attn_res_block")
    block = min(int(block), 2) if _int(block) and block > 0 else 1
    if _int(cfg.get("n_layers_per_attn_res_block")):
        cfg["n_layers_per_attn_res_block"] = block
    cfg["loop_layer_index_start"], cfg["loop_layer_index_end"] = block, 2 * block


def _shrink_layers(cfg: dict[str, Any]) -> None:
    n_layers = cfg.get("num_hidden_layers")
    if not _int(n_layers) or n_layers <= 0:
        return
    _shrink_loop(cfg)
    new = _miniature_depth(cfg, n_layers)
    per_layer = _per_layer(cfg, n_layers)
    for k, v in per_layer.items():
        cfg[k] = v[:new]
    for k in _INDEX_LISTS:
        v = cfg.get(k)
        if isinstance(v, list) and all(_int(x) for x in v):
            cfg[k] = [x for x in v if x < new]
    for k in _DENSE_PREFIX_KEYS:
        if _int(cfg.get(k)) and cfg[k] > 1:
            cfg[k] = 1
    if _int(cfg.get("moe_layer_end_index")) and cfg["moe_layer_end_index"] >= new:
        cfg["moe_layer_end_index"] = new - 1
    for k in ("max_window_layers", "loop_layer_index_end"):
        if _int(cfg.get(k)) and cfg[k] > new:
            cfg[k] = new
    for k, v in list(cfg.items()):  # per-layer override tables keyed by layer index (gemma-4 per_layer_config)
        if isinstance(v, dict) and v and all(str(x).isdigit() for x in v):
            cfg[k] = {x: y for x, y in v.items() if int(x) < new}
    cfg["num_hidden_layers"] = new


def _shrink_experts(cfg: dict[str, Any]) -> None:
    counts = [k for k in COUNT_KEYS if _int(cfg.get(k)) and cfg[k] > 1]
    if not counts:
        return
    old = int(cfg[counts[0]])
    groups_key = next((k for k in GROUP_KEYS if _int(cfg.get(k)) and cfg[k] > 1), None)
    groups = min(int(cfg[groups_key]), 4) if groups_key else 1
    new = min(old, MAX_EXPERTS) if old >= 4 else old
    if groups > 1:
        new = max(new // groups, 4) * groups  # ≥ 4 per group: still ≥ 2 per group after pruning half
        cfg[groups_key] = groups
        for k in TOPK_GROUP_KEYS:
            if _int(cfg.get(k)):
                cfg[k] = max(1, min(int(cfg[k]), groups // 2))
    for k in counts:
        if cfg[k] == old:
            cfg[k] = new
    for k in TOPK_KEYS:
        if _int(cfg.get(k)) and cfg[k] > 1:
            cfg[k] = min(int(cfg[k]), MAX_TOPK, max(1, new // 2))
    for k in SHARED_COUNT_KEYS:
        if _int(cfg.get(k)) and cfg[k] > 1:
            cfg[k] = 1
    if _int(cfg.get("zero_expert_num")) and cfg["zero_expert_num"] > 2:
        cfg["zero_expert_num"] = 2


def _shrink_heads(cfg: dict[str, Any]) -> None:
    # key/value heads equal to the query heads (MHA, MLA) stay equal: per-layer override entries included
    if "_orig_heads" not in cfg and _int(cfg.get("num_attention_heads")):
        cfg["_orig_heads"] = cfg["num_attention_heads"]
    for k in _HEAD_KEYS:
        v = cfg.get(k)
        if _int(v) and v > HEADS:
            cfg[k] = HEADS
    heads = cfg.get("num_attention_heads", HEADS)
    for k in _KV_HEAD_KEYS:
        v = cfg.get(k)
        if _int(v) and v > 2:
            old_heads = cfg.get("_orig_heads")
            cfg[k] = heads if old_heads is not None and v == old_heads else 2
    if isinstance(cfg.get("num_attention_heads_per_layer"), list):
        cfg["num_attention_heads_per_layer"] = [min(int(h), HEADS) for h in cfg["num_attention_heads_per_layer"]]
    cfg.pop("_orig_heads", None)


def _shrink_sizes(cfg: dict[str, Any]) -> None:
    old_hidden = cfg.get("hidden_size")
    for k, target in _SIZES.items():
        v = cfg.get(k)
        if _int(v) and v > target:
            cfg[k] = target
        elif isinstance(v, list) and v and all(map(_int, v)) and max(v) > target:
            # one width per expert set (ERNIE-4.5-VL moe_intermediate_size = [text, vision]): scaled together, in
            # steps of 8 (what grouped_mm needs), so unequal widths stay unequal
            cfg[k] = [max(8, -(-x * target // max(v) // 8) * 8) for x in v]
    for k in _DEPTH_KEYS:
        v = cfg.get(k)
        if _int(v) and v > 2:
            cfg[k] = 2
    # Sizes under family-specific prefixes (vt_hidden_size, mm_hidden_size, vt_num_hidden_layers …): by suffix.
    for k, v in list(cfg.items()):
        if not isinstance(k, str) or not _int(v) or k in _SIZES:
            continue
        if k.endswith("hidden_size") and v > HIDDEN:
            cfg[k] = HIDDEN
        elif k.endswith("intermediate_size") and v > DENSE_WIDTH:
            cfg[k] = EXPERT_WIDTH if ("expert" in k or "moe" in k) else DENSE_WIDTH
        elif k.endswith("num_attention_heads") and v > HEADS:
            cfg[k] = HEADS
        elif k.endswith("num_hidden_layers") and k != "num_hidden_layers" and v > 2:
            cfg[k] = 2
        elif k.endswith(("_in_dim", "_input_size", "_input_dim")) and _int(old_hidden) and v == old_hidden:
            cfg[k] = cfg["hidden_size"]  # an adapter reading this tower's hidden states (validators check equality)
    for k, v in list(cfg.items()):  # per-stage widths of a pyramid tower (Muse Spark audio hidden_sizes)
        if isinstance(k, str) and k.endswith("hidden_sizes") and isinstance(v, list) and v and all(map(_int, v)):
            cfg[k] = [min(x, HIDDEN) for x in v]
    if "head_dim" in cfg and cfg["head_dim"] is None and _int(cfg.get("hidden_size")) and _int(
            cfg.get("num_attention_heads")):
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg.pop("_head_is_rope", False):
        cfg["head_dim"] = cfg["qk_rope_head_dim"]  # MLA configs whose head_dim names the rotated part
    types = cfg.get("layer_types")
    if cfg.get("sliding_window", 0) is None and isinstance(types, list) and any("sliding" in str(t) for t in types):
        cfg["sliding_window"] = 32
    _shrink_rope(cfg)
    # MLA: the query/key head split must add up.
    if _int(cfg.get("qk_head_dim")) and _int(cfg.get("qk_nope_head_dim")) and _int(cfg.get("qk_rope_head_dim")):
        cfg["qk_head_dim"] = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    if isinstance(cfg.get("fullatt_block_indexes"), list):
        cfg["fullatt_block_indexes"] = [i for i in cfg["fullatt_block_indexes"] if i < cfg.get("depth", 2)] or [0]
    if isinstance(cfg.get("deepstack_visual_indexes"), list):
        cfg["deepstack_visual_indexes"] = [i for i in cfg["deepstack_visual_indexes"] if i < cfg.get("depth", 2)]


def _shrink_rope(cfg: dict[str, Any]) -> None:
    """Multimodal rotary sections (time/height/width) must add up to half the rotated head dimension."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = cfg.get(key)
        if not isinstance(rope, dict):
            continue
        inner = [rope] + [v for v in rope.values() if isinstance(v, dict)]
        for r in inner:
            sec = r.get("mrope_section")
            if not (isinstance(sec, list) and sec and all(_int(x) for x in sec)):
                continue
            head = cfg.get("qk_rope_head_dim") if _int(cfg.get("qk_rope_head_dim")) else cfg.get("head_dim", HEAD_DIM)
            factor = r.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0
            target = int(int(head or HEAD_DIM) * factor) // 2
            total = sum(sec)
            new = [max(1, x * target // total) for x in sec]
            new[0] += target - sum(new)
            if any(a == b and new[i] != new[j] for i, a in enumerate(sec) for j, b in enumerate(sec)):
                # equal sections must stay equal (ERNIE-4.5-VL interleaves height and width: [22, 22, 20]):
                # largest-remainder rounding does, where it leaves no section empty
                even = [x * target // total for x in sec]
                order = sorted(range(len(sec)), key=lambda i: -(sec[i] * target % total))
                for i in order[:target - sum(even)]:
                    even[i] += 1
                new = even if min(even) > 0 else new
            r["mrope_section"] = new


def _remap_token_ids(cfg: dict[str, Any], mapping: dict[int, int]) -> None:
    """Special token ids beyond the miniature vocabulary move to its top (distinct ids stay distinct)."""
    for k, v in list(cfg.items()):
        if not isinstance(k, str) or not k.endswith(_TOKEN_ID_SUFFIXES) or k.endswith(("layer_id", "group_id")):
            continue
        ids = v if isinstance(v, list) else [v]
        if not all(_int(x) for x in ids):
            continue
        new_ids = []
        for x in ids:
            if x >= VOCAB:
                if x not in mapping:
                    mapping[x] = VOCAB - 1 - len(mapping)
                x = mapping[x]
            new_ids.append(x)
        cfg[k] = new_ids if isinstance(v, list) else new_ids[0]


def _walk(cfg: dict[str, Any], mapping: dict[int, int], top: bool) -> None:
    if _int(cfg.get("num_attention_heads")):
        cfg["_orig_heads"] = cfg["num_attention_heads"]
    if _int(cfg.get("kv_lora_rank")) and _int(cfg.get("qk_rope_head_dim")) and (
            cfg.get("head_dim") in (None, cfg["qk_rope_head_dim"])):
        cfg["_head_is_rope"] = True
    _shrink_layers(cfg)
    _shrink_experts(cfg)
    _shrink_heads(cfg)
    _shrink_sizes(cfg)
    if _int(cfg.get("vocab_size")) and cfg["vocab_size"] > VOCAB:
        old_vocab = cfg["vocab_size"]
        cfg["vocab_size"] = VOCAB
        for k, v in cfg.items():  # the text vocabulary without padding (Inkling-2's unpadded_vocab_size)
            if isinstance(k, str) and k.endswith("vocab_size") and _int(v) and VOCAB < v <= old_vocab:
                cfg[k] = VOCAB
    _remap_token_ids(cfg, mapping)
    for k, v in cfg.items():
        if isinstance(k, str) and isinstance(v, dict) and v and k not in ("id2label", "label2id", "rope_parameters",
                                                                           "rope_scaling"):
            if all(str(x).isdigit() for x in v):  # per-layer overrides: shrink each entry's sizes
                for entry in v.values():
                    if isinstance(entry, dict):
                        _shrink_heads(entry)
                        _shrink_sizes(entry)
                continue
            _walk(v, mapping, top=False)
    # Towers feed the language model: their output width must match the (shrunk) text hidden size.
    if top:
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
        hidden = text.get("hidden_size", HIDDEN)
        for sub in ("vision_config", "audio_config", "vision_encoder_config"):
            if isinstance(cfg.get(sub), dict):
                for k in ("out_hidden_size", "output_dim", "projector_output_dim", "text_hidden_size", "adapter_out_dim"):
                    if _int(cfg[sub].get(k)):
                        cfg[sub][k] = hidden


def _fill_sub_configs(cfg: dict[str, Any]) -> None:
    """Sub-configs a (trimmed) config.json leaves out take the class defaults, which are full size: write them
    out so they shrink too."""
    from transformers import AutoConfig

    try:
        cls = type(AutoConfig.for_model(cfg["model_type"]))
    except (ValueError, KeyError):
        return
    for name, sub_cls in (getattr(cls, "sub_configs", None) or {}).items():
        if not hasattr(sub_cls, "to_dict") or (cfg.get(name) is not None and not isinstance(cfg.get(name), dict)):
            continue
        try:
            defaults = sub_cls().to_dict()
        except Exception:  # a sub-config that cannot be built alone stays as the class decides
            continue
        given = cfg.get(name) or {}
        if given.get("model_type") not in (None, defaults.get("model_type")):
            continue  # another family's config nested here: its own class fills its defaults
        # keys the class reads but the file does not set (remote-code files name them differently)
        if cfg.get(name) is None:
            cfg[name] = defaults
            continue
        sizes = {k: v for k, v in defaults.items() if _int(v) and k not in given
                 and k.endswith(("size", "_dim", "heads", "num_hidden_layers"))}
        cfg[name] = {**sizes, **given}


def _drop_quantization(cfg: dict[str, Any]) -> None:
    cfg.pop("quantization_config", None)
    for v in cfg.values():
        if isinstance(v, dict):
            _drop_quantization(v)


def shrink_config(config: dict[str, Any]) -> dict[str, Any]:
    """A miniature of a config.json dict (a new dict; the input is not modified)."""
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError("a miniature needs a config.json with a model_type")
    cfg = copy.deepcopy(config)
    _fill_sub_configs(cfg)
    _drop_quantization(cfg)  # miniatures are float; quantized sources are dequantized on load
    cfg.pop("_name_or_path", None)
    cfg.pop("auto_map", None)
    _walk(cfg, {}, top=True)
    return cfg


# ---- building ---------------------------------------------------------------------------------------
def config_object(config: dict[str, Any]):
    """A transformers config object from a config.json dict (nested sub-configs parsed by the class)."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    try:
        cls = type(AutoConfig.for_model(model_type))
    except (ValueError, KeyError) as exc:
        raise UserError(f"transformers {_tf_version()} does not know model_type {model_type!r}") from exc
    d = {k: v for k, v in config.items() if k not in ("transformers_version",)}
    decode = getattr(cls, "_decode_special_floats", None)  # config.json spells inf as {"__float__": "Infinity"}
    return cls.from_dict(decode(d) if decode is not None else d)


def model_class(config: Any):
    """The class that builds the whole checkpoint: `architectures[0]` if transformers has it, else the
    family's causal-LM (or image-text-to-text) class."""
    import transformers
    from transformers.models.auto import modeling_auto as ma

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    mt = config.model_type
    mappings = [ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                getattr(ma, "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", {})]
    if getattr(config, "text_config", None) is not None:  # a multimodal checkpoint: build it whole
        mappings = mappings[1:] + mappings[:1]
    for mapping in mappings:
        name = mapping.get(mt)
        if name and getattr(transformers, name, None) is not None:
            return getattr(transformers, name)
    raise UserError(f"transformers {_tf_version()} has no text-generating class for model_type {mt!r}")


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def build_miniature(config: dict[str, Any], *, seed: int = 0, dtype: torch.dtype | None = None,
                    shrink: bool = True):
    """A random-weight model with the structure of `config` (a config.json dict), shrunk unless told not to."""
    cfg_dict = shrink_config(config) if shrink else copy.deepcopy(config)
    cfg = config_object(cfg_dict)  # attention: the library default, as a reload picks it
    cls = model_class(cfg)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, dtype=dtype or torch.float32)
    from moecompress.zoo.tiny import give_signal

    give_signal(model)
    model.eval()
    from moecompress.arch.flat_experts import fuse_flat_experts

    fuse_flat_experts(model)  # as load_model does: DBRX's flattened experts as a fused view (saved flattened)
    return model


def write_miniature(config_file: Path, out: Path, *, seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """`moecompress zoo miniature`: write a random-weight miniature of `config_file` plus a tokenizer to `out`."""
    import shutil
    import tempfile

    from moecompress.io.checkpoint import write_checkpoint
    from moecompress.zoo.tiny import tiny_tokenizer
    from moecompress.zoo.tokenizer import save_tokenizer

    config_file = Path(config_file)
    if config_file.is_dir():
        config_file = config_file / "config.json"
    if not config_file.is_file():
        raise UserError(f"{config_file} is not a file; pass a config.json (or the folder holding it)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_file} is not valid JSON: {exc}") from exc
    dtype = _dtype_of(config)
    model = build_miniature(config, dtype=dtype)
    tok = tiny_tokenizer()
    # written like every checkpoint: atomically, then reloaded by the class in `architectures` and compared
    from moecompress.arch.families import unsupported_reason
    from moecompress.io.checkpoint import auto_class, read_config

    # families we compress are verified like every output (reload + logits); the others (kept buildable so
    # their structure can be studied) get a key-level reload check, as their forward may not run text-only
    logits_check = unsupported_reason(config.get("model_type")) is None
    from moecompress.io.mtp import add_miniature_mtp

    mtp: dict[str, int] = {}

    def add_mtp(folder: Path) -> None:  # MTP layers the config announces, in the family's real key layout
        mtp["tensors"] = add_miniature_mtp(folder, model, seed)

    write_checkpoint(model, tok, out, source=None, overwrite=overwrite, verify=logits_check, after_save=add_mtp,
                     pass_entry={"pass": "zoo.miniature", "config": {"source": str(config_file), "seed": seed}})
    if not logits_check:
        from moecompress.io.mtp import unexpected_mtp

        _, info = auto_class(read_config(out)).from_pretrained(out, output_loading_info=True)
        _, info["unexpected_keys"] = unexpected_mtp(read_config(out), info.get("unexpected_keys") or [])
        if any(info.values()):
            raise UserError(f"the miniature in {out} does not reload cleanly: { {k: v for k, v in info.items() if v} }")
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer class name every reader knows
        save_tokenizer(tok, Path(tmp))
        for name in ("tokenizer_config.json",):
            shutil.copy2(Path(tmp) / name, Path(out) / name)
    n_params = sum(p.numel() for p in model.parameters())
    return {"model_type": config.get("model_type"), "class": type(model).__name__, "params": n_params,
            "dtype": str(dtype).removeprefix("torch."), "out": str(out), "mtp_tensors": mtp.get("tensors", 0)}


def _dtype_of(config: dict[str, Any]) -> torch.dtype:
    """The checkpoint's float dtype (FP8 sources are dequantized to bfloat16)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    name = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    return table.get(str(name), torch.bfloat16 if name else torch.float32)


def n_layers_after(config: dict[str, Any]) -> int:
    """How many decoder layers the miniature of `config` has (for messages and tests)."""
    cfg = shrink_config(config)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    return int(text.get("num_hidden_layers", 0))


__all__ = ["build_miniature", "config_object", "model_class", "shrink_config", "write_miniature"]
