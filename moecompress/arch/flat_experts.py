"""Experts stored other than as transformers' fused experts: a fused view for compression, the family's own
layout on disk.

DBRX keeps a layer's experts as three ``[E * I, H]`` parameters (``experts.mlp.w1`` gate, ``v1`` up, ``w2`` down
with the width first) and no expert axis. JetMoE's MLP block (``JetMoeMoE``) keeps them as two ParallelExperts,
``input_linear.weight [E, 2I, H]`` (gate rows first) and ``output_linear.weight [E, H, I]``, called as ``(tokens
grouped by expert, tokens per expert)`` after a router that returns that grouping. Everything in moecompress reads
fused experts (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) called as ``(hidden, top_k_index,
top_k_weights)``, so a model loaded for compression gets such experts swapped for a fused view: the same weights
with an expert axis, the same forward (JetMoE: its top-k gating returning top-k ids and weights instead of tokens
grouped by expert), and a state-dict hook that writes the family's tensor names back, so a saved checkpoint
is the family's own layout and reloads in vanilla transformers. Only the in-memory path does this: the
layer-streaming engine refuses these models.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS


def is_flat_experts(module: torch.nn.Module) -> bool:
    """An experts module holding flattened [E * I, H] gate / up / down matrices under ``mlp`` (DBRX)."""
    mlp = getattr(module, "mlp", None)
    return (mlp is not None and all(isinstance(getattr(mlp, n, None), torch.nn.Parameter) for n in ("w1", "v1", "w2"))
            and isinstance(getattr(module, "num_experts", None), int))


class FusedExpertsView(torch.nn.Module):
    """Fused experts with the call of transformers' experts ((hidden [..., H], top-k ids, top-k weights) → [..., H]);
    ``down(act(gate x) * up x)`` per expert. Dispatches on ``config._experts_implementation`` for moecompress' own
    implementations (the calibration tap), else computes like the original."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, act_fn: Any, config: Any) -> None:
        super().__init__()
        self.num_experts, self.hidden_size = int(down.shape[0]), int(down.shape[1])
        self.config = config
        self.act_fn = act_fn
        self.has_gate, self.has_bias, self.is_transposed = True, False, False
        self.is_concatenated = True  # marks a dispatching experts module (moecompress.calib.collect.dispatches)
        self.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
        self.down_proj = torch.nn.Parameter(down, requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        impl = getattr(self.config, "_experts_implementation", None)
        if impl is not None and impl.startswith("moecompress") and impl in ALL_EXPERTS_FUNCTIONS:
            out = ALL_EXPERTS_FUNCTIONS[impl](self, x, top_k_index, top_k_weights)
        else:
            out = self._eager(x, top_k_index, top_k_weights)
        return out.view(shape)

    def _eager(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        k = index.shape[-1]
        for e in index.unique().tolist():
            tok, slot = (index == e).nonzero(as_tuple=True)
            gate, up = (x[tok] @ self.gate_up_proj[e].T).chunk(2, dim=-1)
            y = (self.act_fn(gate) * up) @ self.down_proj[e].T
            out.index_add_(0, tok, (y * weights.reshape(-1, k)[tok, slot, None]).to(out.dtype))
        return out


class FusedFlatExperts(FusedExpertsView):
    """DBRX's flattened experts viewed fused; saved back as ``mlp.w1`` / ``mlp.v1`` / ``mlp.w2``."""

    def __init__(self, flat: torch.nn.Module, config: Any) -> None:
        mlp = flat.mlp
        e, h = int(flat.num_experts), int(flat.hidden_size)
        i = int(mlp.w1.shape[0]) // e
        w1, v1, w2 = (getattr(mlp, n).detach().view(e, i, h) for n in ("w1", "v1", "w2"))
        super().__init__(torch.cat([w1, v1], dim=1), w2.transpose(1, 2).contiguous(), mlp.activation_fn, config)
        self._register_state_dict_hook(_flatten_on_save)


def _flatten_on_save(module: FusedFlatExperts, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Write the family's own tensors: mlp.w1 / mlp.v1 / mlp.w2, each [E * I, H]."""
    gu = state_dict.pop(prefix + "gate_up_proj")
    down = state_dict.pop(prefix + "down_proj")
    e, two_i, h = gu.shape
    i = two_i // 2
    state_dict[prefix + "mlp.w1"] = gu[:, :i].reshape(e * i, h)
    state_dict[prefix + "mlp.v1"] = gu[:, i:].reshape(e * i, h)
    state_dict[prefix + "mlp.w2"] = down.transpose(1, 2).reshape(e * i, h)


def is_grouped_moe(module: torch.nn.Module) -> bool:
    """An MoE block whose experts are ParallelExperts called with per-expert token counts (JetMoE's MLP): gated
    ``input_linear [E, 2I, H]``, ``output_linear [E, H, I]``, a top-k router and an activation. JetMoE's attention
    experts (``JetMoeMoA``: no activation, ``input_linear [E, A, H]``) are not: they are a coupled set
    (``arch.discover.coupled_expert_set``)."""
    wi = getattr(getattr(module, "input_linear", None), "weight", None)
    wo = getattr(getattr(module, "output_linear", None), "weight", None)
    return (isinstance(wi, torch.nn.Parameter) and isinstance(wo, torch.nn.Parameter) and wi.dim() == wo.dim() == 3
            and wi.shape[0] == wo.shape[0] and wi.shape[1] == 2 * wo.shape[2] and wi.shape[2] == wo.shape[1]
            and isinstance(getattr(getattr(module, "router", None), "top_k", None), int)
            and callable(getattr(module, "activation", None)) and isinstance(getattr(module, "bias", None),
                                                                              torch.nn.Parameter))


class TopKSoftmaxRouter(torch.nn.Module):
    """JetMoE's top-k gating with the router call of transformers 5: ``x [T, H] → (logits [T, E] in float32,
    top-k weights [T, k] = softmax over the k largest logits, in x's dtype, top-k ids [T, k])``, the same arithmetic
    as ``JetMoeTopKGating`` without its grouping of tokens by expert. Owns the router rows as ``weight`` like every
    router moecompress slices; saved as ``router.layer.weight``."""

    def __init__(self, weight: torch.Tensor, top_k: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.top_k = top_k

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = torch.nn.functional.linear(hidden_states, self.weight).float()
        top, index = logits.topk(self.top_k, dim=-1)
        return logits, torch.softmax(top, dim=-1).type_as(hidden_states), index


class GroupedMoE(torch.nn.Module):
    """JetMoE's MLP block as compression sees it: its router (``TopKSoftmaxRouter``), the experts as a fused view,
    its output bias; saved as ``router.layer.weight`` / ``input_linear.weight`` / ``output_linear.weight``."""

    def __init__(self, block: torch.nn.Module, config: Any) -> None:
        super().__init__()
        self.router = TopKSoftmaxRouter(block.router.layer.weight.detach(), int(block.router.top_k))
        self.experts = FusedExpertsView(block.input_linear.weight.detach(), block.output_linear.weight.detach(),
                                        block.activation, config)
        self.bias = block.bias
        self._register_state_dict_hook(_grouped_on_save)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        _, weights, index = self.router(x)
        return (self.experts(x, index, weights) + self.bias).view(shape)


def _grouped_on_save(module: GroupedMoE, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Write JetMoE's own tensor names: router.layer.weight [E, H], input_linear.weight [E, 2I, H],
    output_linear.weight [E, H, I]."""
    state_dict[prefix + "router.layer.weight"] = state_dict.pop(prefix + "router.weight")
    state_dict[prefix + "input_linear.weight"] = state_dict.pop(prefix + "experts.gate_up_proj")
    state_dict[prefix + "output_linear.weight"] = state_dict.pop(prefix + "experts.down_proj")


def fuse_flat_experts(model: torch.nn.Module) -> int:
    """Swap every flattened experts module (DBRX) and grouped MoE block (JetMoE) of `model` for its fused view (in
    place); returns how many."""
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    swaps = [(name, mod) for name, mod in model.named_modules() if is_flat_experts(mod) or is_grouped_moe(mod)]
    for name, mod in swaps:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, FusedFlatExperts(mod, config) if is_flat_experts(mod) else GroupedMoE(mod, config))
    return len(swaps)


def has_flat_experts(model: torch.nn.Module) -> bool:
    """Whether `model` holds experts that only the in-memory path views fused (DBRX flattened, JetMoE grouped)."""
    return any(is_flat_experts(m) or is_grouped_moe(m) for m in model.modules())
