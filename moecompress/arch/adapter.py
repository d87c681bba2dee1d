"""Per-family MoE adapters, declared as data.

Each adapter says where the MoE block, router, fused experts and shared experts live inside a decoder
layer, how the fused expert tensors are laid out, which router vectors are indexed by expert, and which
config keys hold the expert count, top-k, expert width and routing groups. Everything that changes
structure (``moecompress.surgery``) and everything that observes routing (``moecompress.calib``) reads
these records instead of branching on the model class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from moecompress.errors import UserError

Layout = Literal["concat", "interleaved_transposed", "concat_transposed", "interleaved"]
Routing = Literal[
    "softmax_topk",  # softmax over all experts -> top-k (renormalised when `renorm_key` is true / `always_renorm`)
    "softmax_topk_scaled",  # DeepSeek-V2: softmax -> top-k -> x routed_scaling_factor
    "topk_softmax",  # top-k on logits, softmax over the k chosen (gpt-oss, Granite)
    "sigmoid_group_bias",  # DeepSeek-V3 family: sigmoid + correction bias chooses, group-limited
    "sigmoid_topk",  # sigmoid scores -> top-k, no correction bias (derived families)
    "sparsemixer",  # PhiMoE
    "sigmoid_input_scale",  # Llama4: sigmoid of the chosen logit scales the expert input, experts run densely
]


# Every config key families use for the routed-expert count; a checkpoint may carry several (older readers look
# for one, transformers for another), and all of them must agree after pruning.
EXPERT_COUNT_ALIASES = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts",
                        "num_routed_experts", "n_experts", "moe_num_routed_experts", "num_moe_experts",
                        "ffn_num_experts")


class RouterVector(BaseModel):
    """A router tensor indexed by expert that must be sliced in lockstep with the router rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str  # attribute path relative to the router module
    axis: int = 0


class CoupledExperts(BaseModel):
    """A second routed expert set in every decoder layer, outside the MoE block, sized by the same config key
    (JetMoE's attention experts, read from num_local_experts like the MLP experts). A vanilla config cannot hold
    two counts, so whatever changes the MLP expert count cuts this set to the same count (``surgery.keep_coupled``),
    ranked by its own router's calibration statistics (``coupled_freq`` / ``coupled_mass``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str  # from the decoder layer to the module holding the set ("self_attention.experts")
    router: str  # from `path` to the router's linear [E, H] ("router.layer"); its parent returns the grouped routing
    tensors: tuple[str, ...]  # from `path`: per-expert tensors, expert axis first
    label: str = "attention experts"


class MoEAdapter(BaseModel):
    """Where a family keeps its MoE pieces and which config keys describe them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_type: str
    block_attr: str = "mlp"  # decoder-layer attribute holding the MoE block
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_attrs: tuple[str, ...] = ()  # shared-expert submodules of the block
    layout: Layout = "concat"
    has_expert_bias: bool = False
    router_vectors: tuple[RouterVector, ...] = ()
    block_vectors: tuple[RouterVector, ...] = ()  # per-expert tensors kept on the block itself (AFMoE expert_bias)
    routing: Routing = "softmax_topk"
    renorm_key: str | None = None  # config key saying whether top-k weights are renormalised
    always_renorm: bool = False
    count_keys: tuple[str, ...]  # every config key holding the routed-expert count (all are rewritten)
    topk_key: str = "num_experts_per_tok"
    width_key: str  # config key of the routed-expert intermediate width
    shared_width_coupled: bool = False  # shared expert width is derived from width_key (trap a)
    group_key: str | None = None  # number of routing groups (group-limited routers)
    topk_group_key: str | None = None
    # How save_pretrained names one routed expert's linears on disk (per-expert layout); None when the
    # family's checkpoints keep experts fused (then per-linear quantization formats cannot describe them).
    checkpoint_block: str | None = None  # defaults to block_attr
    # (gate, up, down); gate is None for non-gated experts (up/down only)
    checkpoint_expert_linears: tuple[str | None, str, str] | None = ("gate_proj", "up_proj", "down_proj")
    notes: str = ""
    # Where the decoder layers holding the MoE blocks live, and where their config is (multimodal
    # checkpoints nest the language model: "model.language_model.layers", "text_config").
    layers_path: str = "model.layers"
    checkpoint_layers_path: str | None = None  # on-disk prefix of the decoder layers, when it differs
    text_config_key: str | None = None
    has_gate: bool = True  # False: experts are up/down only (act(up x)), e.g. Nemotron-H's relu²
    # Router rows past the routed experts' in the reference miniature (Inkling: shared-expert gates, LongCat-Flash:
    # zero-computation experts, ZAYA: a skip class). They come last, are never pruned or merged and stay in place;
    # the live count is read per layer from the shapes (router rows − experts), and its config key is left as is.
    router_extra_rows: int = 0
    # Integer tables of expert ids, relative to the block (DeepSeek-V4's hash-routed layers: tid2eid [vocab, top-k]
    # picks each token's experts by its id). Pruning and merging rewrite them onto the kept experts' positions.
    expert_id_tables: tuple[str, ...] = ()
    # On-disk layer prefixes of routed experts outside the compressed stack (Qwen3-Omni's talker, dots3_note's
    # vision tower): carried unchanged, but transformers loads quantized experts only if all of them are quantized.
    other_expert_stacks: tuple[str, ...] = ()
    coupled: CoupledExperts | None = None  # another expert set sized by count_keys (JetMoE's attention experts)
    # The width key holds one width per expert set (ERNIE-4.5-VL: moe_intermediate_size = [text, vision]); this
    # set's width is entry `width_index` (None: the key holds one int).
    width_index: int | None = None
    # Other routed-expert sets of the same block, counted by the same config key (ERNIE-4.5-VL's vision_moe next to
    # text_moe; paths relative to the block, each holding a router and experts under the leaf names of
    # router_attr / experts_attr). Calibration never routes to them; surgery takes them to the same count.
    paired_sets: tuple[str, ...] = ()
    derived: bool = False  # True when introspection of the modeling code produced this adapter

    @property
    def sigmoid_scores(self) -> bool:
        """Whether router probabilities are per-expert sigmoids (not a softmax over experts)."""
        return self.routing in ("sigmoid_group_bias", "sigmoid_topk", "sigmoid_input_scale")

    @property
    def family(self) -> str:
        return self.model_type

    def expert_checkpoint_name(self, layer: int, expert: int, proj: str) -> str:
        """Checkpoint module name of one routed expert's `gate`/`up`/`down` linear (per-expert layout)."""
        if self.checkpoint_expert_linears is None:
            raise UserError(f"{self.model_type} checkpoints store routed experts fused; they have no per-expert linears")
        linear = dict(zip(("gate", "up", "down"), self.checkpoint_expert_linears, strict=True))[proj]
        if linear is None:
            raise UserError(f"{self.model_type} experts are not gated: they have no {proj} linear")
        block = self.checkpoint_block or self.block_attr
        return _join(self.checkpoint_layers_path or self.layers_path, str(layer), block, self.experts_attr, str(expert),
                     linear)

    # ---- nested (multimodal) configs ------------------------------------------------------------
    def text_config(self, config: Any) -> Any:
        """The (sub-)config that holds the language model's MoE keys."""
        if self.text_config_key:  # a dotted path for doubly nested ones (Qwen3-Omni: "thinker_config.text_config")
            sub = config
            for part in self.text_config_key.split("."):
                sub = _raw_get(sub, part) if sub is not None else None
            if sub is not None:
                return sub
        return config

    def with_counts(self, config: dict[str, Any], n: int) -> dict[str, Any]:
        """A copy of a config.json dict with every expert-count alias set to `n` (nested configs included)."""
        import copy

        out = copy.deepcopy(config)
        text = self.text_config(out)
        old = self.num_experts(config)
        for key in EXPERT_COUNT_ALIASES:  # aliases this checkpoint carries besides the family's own keys
            if key not in self.count_keys and text.get(key) == old and old != n:
                text[key] = n
        for key in self.count_keys:
            text[key] = n
        return out

    def set_counts(self, config: Any, n: int) -> None:
        """Set the expert count on a config object under the family's keys and any alias it carries."""
        text = self.text_config(config)
        old = self.num_experts(config)
        for key in EXPERT_COUNT_ALIASES:
            if key not in self.count_keys and getattr(text, key, None) == old and old != n:
                setattr(text, key, n)
        for key in self.count_keys:
            setattr(text, key, n)

    def set_config_value(self, config: Any, key: str, value: Any) -> None:
        """Set `key` on the config object that holds the MoE keys."""
        setattr(self.text_config(config), key, value)

    # ---- reading the config -------------------------------------------------------------------
    def num_experts(self, config: Any) -> int:
        for key in self.count_keys:
            value = _get(self.text_config(config), key)
            if value is not None:
                return int(value)
        raise UserError(f"config has none of {self.count_keys}: cannot tell how many experts it has")

    def top_k(self, config: Any) -> int:
        value = _get(self.text_config(config), self.topk_key)
        if value is None:
            raise UserError(f"config lacks {self.topk_key!r}: cannot tell how many experts each token uses")
        return int(value)

    def expert_width(self, config: Any) -> int:
        value = _get(self.text_config(config), self.width_key)
        return int(value[self.width_index] if self.width_index is not None else value)

    def set_width(self, config: Any, width: int) -> None:
        """Set this set's expert width on a config (object or dict); a per-set list keeps the other entries."""
        text = self.text_config(config)
        value: Any = width
        if self.width_index is not None:
            value = list(_get(text, self.width_key))
            value[self.width_index] = width
        if isinstance(text, dict):
            text[self.width_key] = value
        else:
            setattr(text, self.width_key, value)

    def num_groups(self, config: Any) -> int:
        if self.group_key is None:
            return 1
        value = _get(self.text_config(config), self.group_key)
        return int(value) if value else 1

    def groups_per_token(self, config: Any) -> int:
        value = _get(self.text_config(config), self.topk_group_key) if self.topk_group_key else None
        return int(value) if value else 1

    def renormalises(self, config: Any) -> bool:
        if self.always_renorm:
            return True
        return bool(_get(self.text_config(config), self.renorm_key)) if self.renorm_key else False


def _get(config: Any, key: str) -> Any:
    """Read `key` from a config (object or dict), looking into the nested text config when the top level lacks it."""
    value = _raw_get(config, key)
    if value is None:
        sub = _raw_get(config, "text_config")
        if sub is not None:
            value = _raw_get(sub, key)
    return value


def _join(*parts: str) -> str:
    """A dotted module path from parts, skipping empty ones (a block that is the decoder layer itself)."""
    return ".".join(p for p in parts if p)


def _raw_get(config: Any, key: str) -> Any:
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


_DS_VECTORS = (RouterVector(path="e_score_correction_bias"),)

ADAPTERS: dict[str, MoEAdapter] = {
    a.model_type: a
    for a in [
        MoEAdapter(model_type="mixtral", count_keys=("num_local_experts",), width_key="intermediate_size",
                   always_renorm=True, checkpoint_block="block_sparse_moe", checkpoint_expert_linears=("w1", "w3", "w2")),
        MoEAdapter(model_type="qwen2_moe", count_keys=("num_experts",), width_key="moe_intermediate_size",
                   shared_attrs=("shared_expert", "shared_expert_gate"), renorm_key="norm_topk_prob"),
        MoEAdapter(model_type="qwen3_moe", count_keys=("num_experts", "num_local_experts"),
                   width_key="moe_intermediate_size", renorm_key="norm_topk_prob"),
        MoEAdapter(model_type="olmoe", count_keys=("num_experts",), width_key="intermediate_size",
                   renorm_key="norm_topk_prob"),
        MoEAdapter(model_type="deepseek_v2", count_keys=("n_routed_experts",), width_key="moe_intermediate_size",
                   shared_attrs=("shared_experts",), shared_width_coupled=True, routing="softmax_topk_scaled",
                   group_key="n_group", topk_group_key="topk_group"),
        MoEAdapter(model_type="deepseek_v3", count_keys=("n_routed_experts",), width_key="moe_intermediate_size",
                   shared_attrs=("shared_experts",), shared_width_coupled=True, routing="sigmoid_group_bias",
                   router_vectors=_DS_VECTORS, renorm_key="norm_topk_prob", group_key="n_group",
                   topk_group_key="topk_group"),
        MoEAdapter(model_type="gpt_oss", router_attr="router", count_keys=("num_local_experts",),
                   width_key="intermediate_size", layout="interleaved_transposed", has_expert_bias=True,
                   router_vectors=(RouterVector(path="bias"),), routing="topk_softmax", checkpoint_expert_linears=None,
                   notes="clamped SwiGLU; gate/up interleaved along the last axis"),
        MoEAdapter(model_type="phimoe", router_attr="router", count_keys=("num_local_experts",),
                   width_key="intermediate_size", routing="sparsemixer", checkpoint_block="block_sparse_moe",
                   checkpoint_expert_linears=("w1", "w3", "w2")),
        MoEAdapter(model_type="granitemoe", block_attr="block_sparse_moe", router_attr="router",
                   count_keys=("num_local_experts",), width_key="intermediate_size", routing="topk_softmax",
                   checkpoint_expert_linears=None),
        MoEAdapter(model_type="glm4_moe", count_keys=("n_routed_experts",), width_key="moe_intermediate_size",
                   shared_attrs=("shared_experts",), shared_width_coupled=True, routing="sigmoid_group_bias",
                   router_vectors=_DS_VECTORS, renorm_key="norm_topk_prob", group_key="n_group",
                   topk_group_key="topk_group"),
        MoEAdapter(model_type="dots1", count_keys=("n_routed_experts",), width_key="moe_intermediate_size",
                   shared_attrs=("shared_experts",), shared_width_coupled=True, routing="sigmoid_group_bias",
                   router_vectors=_DS_VECTORS, renorm_key="norm_topk_prob", group_key="n_group",
                   topk_group_key="topk_group"),
        MoEAdapter(model_type="ernie4_5_moe", count_keys=("moe_num_experts",), topk_key="moe_k",
                   width_key="moe_intermediate_size", shared_attrs=("shared_experts",),
                   shared_width_coupled=True, always_renorm=True,
                   router_vectors=(RouterVector(path="moe_statics.e_score_correction_bias", axis=1),)),
        MoEAdapter(model_type="qwen3_next", count_keys=("num_experts",), width_key="moe_intermediate_size",
                   shared_attrs=("shared_expert", "shared_expert_gate"), renorm_key="norm_topk_prob"),
        MoEAdapter(model_type="llama4_text", block_attr="feed_forward", router_attr="router",
                   count_keys=("num_local_experts",), width_key="intermediate_size", shared_attrs=("shared_expert",),
                   shared_width_coupled=True, layout="concat_transposed", routing="sigmoid_input_scale",
                   checkpoint_expert_linears=None, notes="experts run densely on sigmoid-scaled inputs"),
    ]
}


def _unsupported(model_type: str | None) -> UserError:
    from moecompress.arch.families import unsupported_reason

    reason = unsupported_reason(model_type) if model_type else None
    what = f"model_type {model_type!r}" if model_type else "a config without model_type"
    if reason:
        return UserError(f"{what} is not supported: {reason}")
    from moecompress.arch.families import routed_expert_model_types

    known = sorted(set(ADAPTERS) | {t for t in routed_expert_model_types() if unsupported_reason(t) is None})
    return UserError(f"{what} is not a supported Mixture-of-Experts family (its transformers modeling code has no "
                     f"routed experts). Supported: {', '.join(known)}.")


def adapter_for_model_type(model_type: str | None) -> MoEAdapter:
    """The adapter of a model_type: declared (the 14 long-standing families) or derived from transformers."""
    if model_type in ADAPTERS:
        return ADAPTERS[model_type]
    from moecompress.arch.families import derived_adapter

    adapter = derived_adapter(model_type) if model_type else None
    if adapter is None:
        raise _unsupported(model_type)
    return adapter


def adapter_for_config_dict(config: dict[str, Any]) -> MoEAdapter:
    """Pick the adapter from a raw config.json dict, before any weight loads."""
    model_type = config.get("model_type")
    adapter = adapter_for_model_type(model_type)
    if not any(_get(adapter.text_config(config), k) for k in adapter.count_keys):
        raise UserError(f"{model_type} config has no routed experts ({'/'.join(adapter.count_keys)} unset)")
    return adapter


def adapter_for(model_or_config: Any) -> MoEAdapter:
    """Pick the adapter for an in-memory model or config object."""
    config = getattr(model_or_config, "config", model_or_config)
    return adapter_for_model_type(getattr(config, "model_type", None))


@dataclass
class MoELayer:
    """One MoE block located in a live model."""

    index: int  # decoder layer index
    block: torch.nn.Module
    router: torch.nn.Module
    experts: torch.nn.Module
    adapter: MoEAdapter

    @property
    def num_experts(self) -> int:
        """Routed experts: the experts module's rows (the router may score extra classes after them)."""
        return int(self.experts.down_proj.shape[0])

    @property
    def extra_rows(self) -> int:
        """Router rows after the routed experts' (kept in place by pruning and merging); 0 for most families."""
        return int(self.router.weight.shape[0]) - self.num_experts

    @property
    def hash_routed(self) -> bool:
        """Whether this layer picks experts by token id (a table of expert ids): it cannot run on hidden states alone."""
        for path in self.adapter.expert_id_tables:
            try:
                self.block.get_buffer(path)
            except AttributeError:
                continue
            return True
        return False

    @property
    def routed_router_weight(self) -> torch.Tensor:
        """The router rows of the routed experts, [E, H] (without any extra rows)."""
        return self.router.weight[: self.num_experts]

    @property
    def prefix(self) -> str:
        return _join(self.adapter.layers_path, str(self.index), self.adapter.block_attr)

    def shared(self) -> list[tuple[str, torch.nn.Module]]:
        return [(a, getattr(self.block, a)) for a in self.adapter.shared_attrs if getattr(self.block, a, None) is not None]

    def paired(self) -> list[MoELayer]:
        """The block's other expert sets (ERNIE-4.5-VL's vision experts), each as a layer of its own: its router and
        experts under the same leaf names, its router vectors at the same paths, no shared experts, no pairs."""
        if not self.adapter.paired_sets:
            return []
        lone = self.adapter.model_copy(update=dict(paired_sets=(), shared_attrs=(), block_vectors=(),
                                                   expert_id_tables=(), width_index=None))
        out = []
        for path in self.adapter.paired_sets:
            sub = self.block.get_submodule(path)
            out.append(MoELayer(index=self.index, block=sub,
                                router=sub.get_submodule(self.adapter.router_attr.rsplit(".", 1)[-1]),
                                experts=sub.get_submodule(self.adapter.experts_attr.rsplit(".", 1)[-1]), adapter=lone))
        return out


def decoder_layers(model: torch.nn.Module, adapter: MoEAdapter | None = None) -> torch.nn.ModuleList:
    """The decoder-layer list holding the MoE blocks (the language model's, in multimodal models)."""
    paths = [adapter.layers_path] if adapter is not None else []
    try:
        paths.append(adapter_for(model).layers_path)
    except UserError:
        pass
    for path in [*paths, "model.layers", "model.language_model.layers", "layers"]:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    from moecompress.arch.discover import decoder_layer_list

    layers = decoder_layer_list(model)
    if layers is None:
        raise UserError(f"{type(model).__name__} has no decoder layers that hold routed experts")
    return layers


def _sub(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def moe_layers(model: torch.nn.Module, adapter: MoEAdapter | None = None) -> list[MoELayer]:
    """Every decoder layer whose block holds routed experts (dense layers are skipped)."""
    adapter = adapter or adapter_for(model)
    found: list[MoELayer] = []
    from moecompress.arch.discover import is_fused_experts

    for i, layer in enumerate(decoder_layers(model, adapter)):
        block = _sub(layer, adapter.block_attr)
        experts = _sub(block, adapter.experts_attr) if block is not None else None
        router = _sub(block, adapter.router_attr) if block is not None else None
        if experts is None or router is None or not is_fused_experts(experts):
            continue
        found.append(MoELayer(index=i, block=block, router=router, experts=experts, adapter=adapter))
    if not found:
        raise UserError(f"{type(model).__name__} has no MoE layers that moecompress recognises")
    return found
