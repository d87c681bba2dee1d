"""A model's structure from config.json alone: transformers builds it on the meta device, we read its shapes.

Why meta: transformers already knows every family's layer stack (dense-first layers, hybrid mixers, shared
experts, multimodal towers, which parameters tie); building the model on ``torch.device("meta")`` costs no
memory and under a second even for trillion-parameter configs, and its parameter count *is* transformers' own
count. So nothing here restates a family: routed experts are found by what they are (a module holding 3-D
parameters whose first axis is its ``num_experts``), the router as its sibling that scores those experts, and
the language model as the module that holds the decoder layers with experts. Families without a moecompress
adapter are described all the same.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from moecompress.arch.discover import text_model
from moecompress.errors import UserError

GROUPS = ("routed_experts", "shared_experts", "router", "attention", "dense_mlp", "embeddings", "other", "non_text")
_TOPK_KEYS = ("num_experts_per_tok", "top_k_experts", "moe_k", "moe_topk", "moe_top_k", "experts_per_token",
              "num_selected_experts")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def text_config_dict(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: the nested `text_config` of multimodal checkpoints, else the config."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def config_dtype(config: dict[str, Any]) -> torch.dtype | None:
    """The dtype config.json says the float tensors are stored in, or None when it names none."""
    for c in (config, text_config_dict(config)):
        name = c.get("dtype") or c.get("torch_dtype")
        if isinstance(name, str) and name.removeprefix("torch.") in _DTYPES:
            return _DTYPES[name.removeprefix("torch.")]
    return None


def hf_config(config: dict[str, Any]) -> Any:
    """transformers' config object for a config.json dict (no download, no remote code)."""
    import transformers

    model_type = config.get("model_type")
    if not model_type:
        raise UserError("config.json has no model_type; is it a transformers checkpoint?")
    if model_type not in transformers.CONFIG_MAPPING:
        raise UserError(f"model_type {model_type!r} is unknown to the installed transformers "
                        f"{transformers.__version__}; upgrade transformers or check the checkpoint's config.json")
    clean = {k: v for k, v in config.items() if k not in ("auto_map",)}
    try:
        return transformers.CONFIG_MAPPING[model_type].from_dict(clean)
    except Exception as exc:  # a config the class rejects (wrong types, inconsistent sizes)
        raise UserError(f"transformers cannot build a {model_type} config from config.json: {exc}") from None


def _model_class(config: dict[str, Any], cfg: Any) -> Any:
    """The class named in `architectures` if transformers has it, else the Auto mapping for the config."""
    import transformers

    for name in config.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    autos = ["AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModelForMultimodalLM", "AutoModel"]
    if isinstance(config.get("text_config"), dict):  # a multimodal checkpoint: its whole class first (Llama-4)
        autos = autos[1:3] + autos[:1] + autos[3:]
    for auto in autos:
        if not hasattr(transformers, auto):
            continue
        mapping = getattr(transformers, auto)._model_mapping
        try:
            return mapping[type(cfg)]
        except KeyError:
            continue
    raise UserError(f"transformers {transformers.__version__} has no model class for {config.get('model_type')!r}")


def meta_model(config: dict[str, Any], *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model of `config` with every tensor on the meta device (no memory, no weights)."""
    import transformers

    cfg = hf_config(config)
    cls = _model_class(config, cfg)
    dtype = dtype or config_dtype(config) or torch.bfloat16  # unnamed: what published MoE checkpoints store
    level = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            model = cls._from_config(cfg, dtype=dtype)
        from moecompress.arch.flat_experts import fuse_flat_experts

        fuse_flat_experts(model)  # DBRX: counted as the fused experts moecompress compresses (same sizes)
        return model
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"transformers could not build {cls.__name__} from config.json: {str(exc)[:300]}") from None
    finally:
        transformers.utils.logging.set_verbosity(level)


@dataclass
class LayerInfo:
    """One decoder layer as the config builds it."""

    index: int
    mixer: str  # full_attention | sliding_attention | linear_attention | mamba | ...
    ffn: str  # moe | dense | moe+dense | none
    experts: int = 0
    top_k: int = 0
    routed_params: int = 0
    expert_width: int = 0
    # routed parameters of the layer's other expert sets, which a text token never reaches (ERNIE-4.5-VL's vision
    # experts); the first set is the one text tokens use
    other_set_params: int = 0


@dataclass
class Skeleton:
    """Parameters of a meta model sorted into groups, plus the MoE layer structure."""

    total_params: int
    groups: dict[str, int]
    parts: dict[str, int]  # language_model vs each non-text component (vision tower, projector, ...)
    layers: list[LayerInfo]
    param_group: dict[str, str]  # parameter name -> group
    lm_prefix: str
    routing_groups: int = 1
    topk_groups: int = 1
    input_embedding_params: int = 0  # the language model's token-embedding table
    output_head_params: int = 0  # the LM head when not tied to the embedding
    notes: list[str] = field(default_factory=list)

    @property
    def moe_layers(self) -> list[LayerInfo]:
        return [ly for ly in self.layers if ly.experts]

    @property
    def active_params(self) -> int:
        """Parameters one token uses: every language-model parameter except the routed experts it is not sent to."""
        lm = self.parts.get("language_model", self.total_params)
        routed = sum(ly.routed_params for ly in self.layers)
        used = sum((ly.routed_params - ly.other_set_params) * ly.top_k / ly.experts for ly in self.layers
                   if ly.experts)
        return int(round(lm - routed + used))

    @property
    def active_conventions(self) -> dict[str, int]:
        """Active parameters under the conventions model cards use: with everything (Qwen, Mistral, Meta), without
        the token-embedding table (a lookup, not a matmul: OpenAI, DeepSeek), without embedding and head."""
        a = self.active_params
        return {"all": a, "no_embedding": a - self.input_embedding_params,
                "no_embedding_no_head": a - self.input_embedding_params - self.output_head_params}


def _is_experts(module: torch.nn.Module) -> bool:
    from moecompress.arch.discover import is_fused_experts

    if is_fused_experts(module):  # LongCat keeps extra gate/up rows (zero-computation experts) and no num_experts
        return True
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int) or n < 1:
        return False
    three_d = [p for p in module.parameters(recurse=False) if p.ndim == 3]
    return bool(three_d) and all(p.shape[0] == n for p in three_d)


def _top_k(router: torch.nn.Module | None, text_cfg: Any) -> int:
    value = getattr(router, "top_k", None) if router is not None else None
    if isinstance(value, int) and value > 0:
        return value
    # the text config, then its sub-configs (DBRX keeps moe_top_k in ffn_config)
    subs = [getattr(text_cfg, name, None) for name in getattr(text_cfg, "sub_configs", {}) or {}]
    for cfg in (text_cfg, *subs):
        for key in _TOPK_KEYS:
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return 0


def _mixer(layer: torch.nn.Module, index: int, text_cfg: Any) -> str:
    types = getattr(text_cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and index < len(types):
        return str(types[index])
    names = {n for n, _ in layer.named_children()}
    for name, label in (("self_attn", "attention"), ("self_attention", "attention"),
                        ("linear_attn", "linear_attention"), ("mamba", "mamba"),
                        ("mixer", "mixer"), ("attention", "attention"), ("norm_attn_norm", "attention")):
        if name in names:
            return label
    return "?"


def attention_like(name: str) -> bool:
    return bool(re.search(r"(attn|attention|mixer|mamba|linear_attn)\.", name + "."))


def analyse(model: torch.nn.Module, config: dict[str, Any] | None = None) -> Skeleton:
    """Sort every parameter of `model` into a group and describe its decoder layers (works on meta models)."""
    text_cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    experts = {name: mod for name, mod in model.named_modules() if name.endswith("experts") and _is_experts(mod)}
    if not experts:
        raise UserError(f"{type(model).__name__} has no routed experts: not a Mixture-of-Experts model")
    # decoder layers: the ModuleList whose items hold the experts
    m = re.match(r"(.*\.(?:layers|blocks))\.(\d+)\.", next(iter(experts)) + ".")  # DBRX: transformer.blocks
    if m is None:
        raise UserError(f"cannot locate decoder layers around {next(iter(experts))}")
    layers_prefix = m.group(1)
    lm_prefix = layers_prefix.rsplit(".", 1)[0]  # e.g. "model" or "model.language_model"
    layers_mod = model.get_submodule(layers_prefix)

    block_of = {name.rsplit(".", 1)[0]: (name, mod) for name, mod in experts.items()}
    router_names: dict[str, torch.nn.Module] = {}
    shared_names: set[str] = set()
    # a block holding several expert sets, each in a sub-block of its own (ERNIE-4.5-VL: mlp.text_moe, mlp.vision_moe):
    # the shared experts are the parent's children
    parents = [b.rsplit(".", 1)[0] for b in block_of]
    scan = [(b, e) for b, e in block_of.items()] + [
        (p, (None, next(e for b, e in block_of.items() if b.startswith(p + "."))[1]))
        for p in dict.fromkeys(parents) if parents.count(p) > 1]
    for block_name, (exp_name, exp) in scan:
        block = model.get_submodule(block_name)
        for child, mod in block.named_children():
            full = f"{block_name}.{child}"
            if full == exp_name or full in block_of:
                continue
            if "shared" in child:
                shared_names.add(full)
            elif child in ("gate", "router") or any(
                p.ndim == 2 and p.shape[0] == exp.down_proj.shape[0] for p in mod.parameters()
            ):
                router_names[full] = mod

    embed_names = {n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Embedding)}
    out_emb = text_model(model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None:
        embed_names |= {n for n, mod in model.named_modules() if mod is out_emb}

    def under(name: str, prefixes: set[str] | dict[str, Any]) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    lm_parts = (lm_prefix + ".",)
    head = {n for n, mod in model.named_modules() if out_emb is not None and mod is out_emb}
    groups: dict[str, int] = defaultdict(int)
    parts: dict[str, int] = defaultdict(int)
    param_group: dict[str, str] = {}
    for name, p in model.named_parameters():
        n = p.numel()
        in_lm = name.startswith(lm_parts) or under(name, head) or lm_prefix == ""
        if not in_lm:
            part = _component(name, lm_prefix)
            parts[part] += n
            group = "non_text"
        else:
            parts["language_model"] += n
            if under(name, {e for e in experts}):
                group = "routed_experts"
            elif under(name, shared_names):
                group = "shared_experts"
            elif under(name, router_names):
                group = "router"
            elif under(name, embed_names):
                group = "embeddings"
            elif name.rsplit(".", 1)[0] in block_of and p.ndim == 1:  # an MoE block's own bias (JetMoE's output bias)
                group = "other"
            elif attention_like(name):
                group = "attention"
            elif re.search(r"\.(mlp|feed_forward|ffn)\.", name + "."):
                group = "dense_mlp"
            else:
                group = "other"
        groups[group] += n
        param_group[name] = group

    layers: list[LayerInfo] = []
    for i, layer in enumerate(layers_mod):
        prefix = f"{layers_prefix}.{i}"
        exp_here = [(n, e) for n, e in experts.items() if n.startswith(prefix + ".")]
        dense = any(param_group.get(f"{prefix}.{n}") == "dense_mlp" for n, _ in layer.named_parameters())
        info = LayerInfo(index=i, mixer=_mixer(layer, i, text_cfg), ffn="none")
        if exp_here:
            name, e = exp_here[0]
            router = next((r for rn, r in router_names.items() if rn.startswith(name.rsplit(".", 1)[0] + ".")), None)
            info.experts = int(e.down_proj.shape[0])
            info.top_k = _top_k(router, text_cfg)
            info.routed_params = sum(p.numel() for _, e2 in exp_here for p in e2.parameters())
            info.other_set_params = sum(p.numel() for _, e2 in exp_here[1:] for p in e2.parameters())
            down = getattr(e, "down_proj", None)
            info.expert_width = _expert_width(e, down)
            info.ffn = "moe+dense" if dense else "moe"
        elif dense:
            info.ffn = "dense"
        layers.append(info)
    if any(ly.experts and not ly.top_k for ly in layers):
        raise UserError("cannot tell how many experts each token uses (no top-k in the router or config)")

    router = next(iter(router_names.values()), None)
    n_group = getattr(router, "n_group", None) or getattr(text_cfg, "n_group", None) or 1
    topk_group = getattr(router, "topk_group", None) or getattr(text_cfg, "topk_group", None) or 1
    total = sum(p.numel() for p in model.parameters())
    in_emb = text_model(model).get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    in_ids = {id(p) for p in in_emb.parameters()} if in_emb is not None else set()
    emb_params = sum(p.numel() for p in in_emb.parameters()) if in_emb is not None else 0
    head_params = sum(p.numel() for p in out_emb.parameters() if id(p) not in in_ids) if out_emb is not None else 0
    return Skeleton(input_embedding_params=emb_params, output_head_params=head_params,total_params=total, groups={g: groups.get(g, 0) for g in GROUPS}, parts=dict(parts),
                    layers=layers, param_group=param_group, lm_prefix=lm_prefix,
                    routing_groups=int(n_group), topk_groups=int(topk_group))


def _component(name: str, lm_prefix: str) -> str:
    """Name of a non-text component: the first path element that differs from the language model's path."""
    lm = lm_prefix.split(".")
    parts = name.split(".")
    for i, seg in enumerate(parts):
        if i >= len(lm) or seg != lm[i]:
            return seg
    return parts[0]


def _expert_width(experts: torch.nn.Module, down: torch.Tensor | None) -> int:
    """Intermediate width of one expert from the fused down projection ([E, H, I] or transposed [E, I, H])."""
    if down is None or down.ndim != 3:
        return 0
    up = getattr(experts, "gate_up_proj", None)
    if up is None:
        up = getattr(experts, "up_proj", None)
    if up is not None and up.ndim == 3:
        # the hidden size is the axis gate_up and down share; the width is down's other axis
        h_candidates = set(up.shape[1:]) & set(down.shape[1:])
        if len(h_candidates) == 1:
            h = h_candidates.pop()
            other = [s for s in down.shape[1:] if s != h]
            return int(other[0]) if other else int(h)
    return int(down.shape[-1])


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def numel(shape: tuple[int, ...] | list[int]) -> int:
    return int(math.prod(shape))
