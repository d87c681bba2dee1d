"""Find routed experts in a live transformers model by what the modules are, not by family.

transformers 5 marks every fused experts class with ``@use_experts_implementation``, which gives its
instances ``has_gate`` / ``has_bias`` / ``is_transposed`` / ``is_concatenated`` and 3-D ``gate_up_proj`` (or
``up_proj``) / ``down_proj`` parameters. The block holding them owns the router: the sibling whose weight is
``[num_experts, hidden]``. Per-expert router tensors are whatever else in the router has an expert axis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from moecompress.errors import UserError

_LAYER_RE = re.compile(r"^(?P<layers>(?:.+\.)?layers)\.(?P<index>\d+)\.(?P<rest>.+)$")
# decoder layers named `blocks` (DBRX), tried only when no `layers` hold experts: vision towers name theirs
# `blocks` too, and some hold experts of their own (dots3_note)
_BLOCKS_RE = re.compile(r"^(?P<layers>(?:.+\.)?blocks)\.(?P<index>\d+)\.(?P<rest>.+)$")


def is_fused_experts(module: torch.nn.Module) -> bool:
    """A fused routed-experts module (one 3-D tensor per projection, expert axis first)."""
    gu = getattr(module, "gate_up_proj", None)
    if gu is None and getattr(module, "has_gate", True) is False:
        gu = getattr(module, "up_proj", None)
    down = getattr(module, "down_proj", None)
    # gate_up may hold more rows than down: LongCat-Flash allocates (never used) input rows for its
    # zero-computation experts too; the routed experts are the first down.shape[0]
    return (isinstance(gu, torch.nn.Parameter) and gu.dim() == 3 and isinstance(down, torch.nn.Parameter)
            and down.dim() == 3 and gu.shape[0] >= down.shape[0])


def experts_layout(module: torch.nn.Module) -> str:
    """The adapter layout name of a fused experts module, from the flags transformers sets on it."""
    transposed = bool(getattr(module, "is_transposed", False))
    concatenated = bool(getattr(module, "is_concatenated", True))
    if not transposed and concatenated:
        return "concat"
    if transposed and concatenated:
        return "concat_transposed"
    if transposed and not concatenated:
        return "interleaved_transposed"
    return "interleaved"


@dataclass
class FoundBlock:
    """One MoE block found in a model."""

    layers_path: str  # module path of the decoder-layer list ("model.layers", "model.language_model.layers")
    index: int  # decoder layer index
    block_attr: str  # path from the decoder layer to the block ("mlp", "feed_forward", "block_sparse_moe")
    experts_attr: str
    router_attr: str | None
    block: torch.nn.Module
    experts: torch.nn.Module
    router: torch.nn.Module | None

    @property
    def num_experts(self) -> int:
        return int(self.experts.down_proj.shape[0])

    @property
    def extra_router_rows(self) -> int:
        """Router rows after the routed experts' (shared-expert gates, zero-computation experts, a skip class)."""
        return int(self.router.weight.shape[0]) - self.num_experts if self.router is not None else 0


def _hidden_of(experts: torch.nn.Module) -> int:
    down = experts.down_proj
    # down maps width -> hidden: [E, H, I] (not transposed) or [E, I, H] (transposed)
    return int(down.shape[2] if getattr(experts, "is_transposed", False) else down.shape[1])


def find_router(block: torch.nn.Module, experts: torch.nn.Module) -> tuple[str | None, torch.nn.Module | None]:
    """The block's submodule whose weight is [num_experts, hidden] (searched breadth-first, experts excluded).

    Latent MoEs (Muse Spark) project tokens to a narrower width before the experts while the router reads the
    full hidden state: when no [num_experts, expert hidden] weight exists, a single [num_experts, *] one is it.
    Some routers score more classes than there are routed experts (Inkling: the shared experts' gates;
    LongCat-Flash: zero-computation experts; ZAYA: a skip class): failing the above, a single weight of
    [num_experts + K, hidden] (or, failing that, [num_experts + K, *]) rows is the router, its first rows the
    routed experts'."""
    n = int(experts.down_proj.shape[0])
    hidden = _hidden_of(experts)
    queue: list[tuple[str, torch.nn.Module]] = [(k, m) for k, m in block.named_children() if m is not experts]
    other: list[tuple[str, torch.nn.Module]] = []
    wider: list[tuple[str, torch.nn.Module]] = []
    while queue:
        name, mod = queue.pop(0)
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and tuple(w.shape) == (n, hidden):
            return name, mod
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == n:
            other.append((name, mod))
        if isinstance(w, torch.Tensor) and w.dim() == 2 and n < w.shape[0] <= 2 * n:
            wider.append((name, mod))
        if name.count(".") < 2:
            queue.extend((f"{name}.{k}", m) for k, m in mod.named_children() if m is not experts)
    if len(other) == 1:
        return other[0]
    full = [(k, m) for k, m in wider if m.weight.shape[1] == hidden]
    if len(full) == 1:
        return full[0]
    return wider[0] if not full and len(wider) == 1 else (None, None)


def find_moe_blocks(model: torch.nn.Module) -> list[FoundBlock]:
    """Every fused-experts module under a ``…layers.<i>`` decoder layer, with its block and router."""
    found: list[FoundBlock] = []
    modules = dict(model.named_modules())
    fused = [name for name, mod in modules.items() if is_fused_experts(mod)]
    pattern = _LAYER_RE if any(_LAYER_RE.match(name) for name in fused) else _BLOCKS_RE
    for name in fused:
        mod = modules[name]
        m = pattern.match(name)
        if m is None:
            continue
        rest = m["rest"]
        # experts directly on the decoder layer (gemma-4): the layer is the block
        block_attr, experts_attr = rest.rsplit(".", 1) if "." in rest else ("", rest)
        block = modules[".".join(p for p in (m["layers"], m["index"], block_attr) if p)]
        router_attr, router = find_router(block, mod)
        found.append(FoundBlock(layers_path=m["layers"], index=int(m["index"]), block_attr=block_attr,
                                experts_attr=experts_attr, router_attr=router_attr, block=block, experts=mod,
                                router=router))
    return found


def router_vectors(router: torch.nn.Module, num_experts: int, extra: int = 0) -> list[tuple[str, int]]:
    """(path, axis) of every router tensor besides `weight` that has an expert axis (sliced in lockstep); with
    `extra` router rows past the experts, an axis of num_experts + extra counts too (its tail stays in place)."""
    out = []
    sizes = {num_experts, num_experts + extra}
    for name, t in list(router.named_parameters()) + list(router.named_buffers()):
        if name == "weight" or t.dim() == 0 or t.dim() > 2:
            continue
        axes = [i for i, s in enumerate(t.shape) if s in sizes]
        if len(axes) == 1:
            out.append((name, axes[0]))
    return out


def shared_children(block: torch.nn.Module, skip: set[str]) -> tuple[str, ...]:
    """Block children that are shared (always-on) experts: dense MLPs and their gates."""
    names = []
    for k, m in block.named_children():
        if k in skip:
            continue
        if "shared" in k or hasattr(m, "down_proj") and isinstance(m.down_proj, torch.nn.Linear):
            names.append(k)
    return tuple(names)


def decoder_layer_list(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The decoder-layer list that holds the routed experts (text stack of multimodal models included)."""
    blocks = find_moe_blocks(model)
    if not blocks:
        return None
    return model.get_submodule(blocks[0].layers_path)


def router_choice(out: object, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top_k_index, top_k_weights) from whatever tuple a family's router returns."""
    parts = list(out) if isinstance(out, tuple) else [out]
    index = next((t for t in parts if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2),
                 None)
    if index is None:
        raise ValueError("router output holds no expert indices")
    weights = next((t for t in parts if isinstance(t, torch.Tensor) and t.is_floating_point()
                    and t.shape == index.shape), None)
    if weights is None:
        raise ValueError("router output holds no top-k weights")
    return index, weights


def grouped_pairs(out: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, expert ids, gates) of every routed pair from a router that returns them grouped by expert
    (JetMoE's top-k gating: slot ids sorted by expert, token ids, gates, tokens per expert, logits)."""
    if not (isinstance(out, tuple) and len(out) >= 4 and isinstance(out[3], (list, tuple))
            and isinstance(out[1], torch.Tensor) and isinstance(out[2], torch.Tensor)):
        raise UserError("the second expert set's router does not return (slots, tokens, gates, tokens per expert, …) "
                        "as JetMoE's does: its calibration statistics cannot be read")
    tokens, gates, sizes = out[1], out[2], out[3]
    sizes = torch.as_tensor(sizes, dtype=torch.long, device=tokens.device)
    return tokens, torch.repeat_interleave(torch.arange(sizes.numel(), device=tokens.device), sizes), gates


def coupled_expert_set(layer: torch.nn.Module, block_attr: str, n: int, hidden: int
                       ) -> tuple[str, str, tuple[str, ...]] | None:
    """Another routed expert set of a decoder layer, outside its MoE block, with the same number of experts
    (JetMoE's attention experts): (its path from the decoder layer, its router's linear [n, hidden] from there, its
    per-expert 3-D tensors [n, …] from there), or None. One router linear and the 3-D tensors under one module make
    a set; anything less is not one."""
    if not block_attr:
        return None
    outside = [(k, t) for k, t in layer.named_parameters() if not k.startswith(block_attr + ".")]
    routers = [k for k, t in outside if t.dim() == 2 and tuple(t.shape) == (n, hidden) and k.endswith(".weight")]
    stacks = [k for k, t in outside if t.dim() == 3 and t.shape[0] == n]
    if len(routers) != 1 or not stacks:
        return None
    parts = [k.split(".")[:-1] for k in (*routers, *stacks)]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if not common:
        return None
    path = ".".join(common)
    cut = len(path) + 1
    return path, routers[0][cut:].removesuffix(".weight"), tuple(k[cut:] for k in stacks)


def routed_output(router: torch.nn.Module, experts: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The routed experts' weighted output on tokens x [N, H], routed by the family's own router."""
    index, weights = router_choice(router(x), int(experts.down_proj.shape[0]))
    return experts(x, index, weights)


def text_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module to run text-only input through: the model itself, or, when a multimodal wrapper holds a complete
    causal LM whose head is the wrapper's own (Llama-4: ``language_model`` is a ``Llama4ForCausalLM``), that LM.

    For text-only input the wrapper only embeds the ids and calls that LM, so the logits are the same; and
    transformers 5.24's ``Llama4ForConditionalGeneration.forward`` fails building its output (it reads
    ``image_outputs`` from the LM's output), so calibration and verification go through the LM directly.
    A wrapper with no forward at all (Qwen3-Omni: a thinker LM and a speech talker) runs text through the child
    causal LM holding the first MoE stack (the thinker)."""
    if type(model).forward is torch.nn.Module.forward:  # a container without a forward (Qwen3-Omni: thinker, talker)
        blocks = find_moe_blocks(model)
        for name, child in model.named_children():  # the child causal LM that holds the first MoE stack
            if (blocks and blocks[0].layers_path.startswith(name + ".")
                    and callable(getattr(child, "get_output_embeddings", None))
                    and child.get_output_embeddings() is not None):
                return child
        return model
    lm = getattr(model, "language_model", None)
    if lm is None or lm is model or not callable(getattr(lm, "get_output_embeddings", None)):
        return model
    head = lm.get_output_embeddings()
    top = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    return lm if head is not None and head is top else model
