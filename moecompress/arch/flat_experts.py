"""Experts stored as flattened matrices (DBRX): a fused view for compression, the original layout on disk.

DBRX keeps a layer's experts as three ``[E * I, H]`` parameters (``experts.mlp.w1`` gate, ``v1`` up, ``w2`` down
with the width first) and no expert axis. Everything in moecompress reads fused experts (``gate_up_proj [E, 2I,
H]``, ``down_proj [E, H, I]``), so a model loaded for compression gets its flattened experts swapped for
``FusedFlatExperts``: the same weights with an expert axis, the same forward, and a state-dict hook that writes
``mlp.w1`` / ``mlp.v1`` / ``mlp.w2`` back, so a saved checkpoint is the family's own layout and reloads in
vanilla transformers. Only the in-memory path does this: the layer-streaming engine refuses these models.
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


class FusedFlatExperts(torch.nn.Module):
    """Fused experts with the call of the module they replace ((hidden [..., H], top-k ids, top-k weights) →
    [..., H]); ``down(act(gate x) * up x)`` per expert. Dispatches on ``config._experts_implementation`` for
    moecompress' own implementations (the calibration tap), else computes like the original."""

    def __init__(self, flat: torch.nn.Module, config: Any) -> None:
        super().__init__()
        mlp = flat.mlp
        e, h = int(flat.num_experts), int(flat.hidden_size)
        i = int(mlp.w1.shape[0]) // e
        self.num_experts, self.hidden_size = e, h
        self.config = config
        self.act_fn = mlp.activation_fn
        self.has_gate, self.has_bias, self.is_transposed = True, False, False
        self.is_concatenated = True  # marks a dispatching experts module (moecompress.calib.collect.dispatches)
        w1, v1, w2 = (getattr(mlp, n).detach().view(e, i, h) for n in ("w1", "v1", "w2"))
        self.gate_up_proj = torch.nn.Parameter(torch.cat([w1, v1], dim=1), requires_grad=False)
        self.down_proj = torch.nn.Parameter(w2.transpose(1, 2).contiguous(), requires_grad=False)
        self._register_state_dict_hook(_flatten_on_save)

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


def _flatten_on_save(module: FusedFlatExperts, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Write the family's own tensors: mlp.w1 / mlp.v1 / mlp.w2, each [E * I, H]."""
    gu = state_dict.pop(prefix + "gate_up_proj")
    down = state_dict.pop(prefix + "down_proj")
    e, two_i, h = gu.shape
    i = two_i // 2
    state_dict[prefix + "mlp.w1"] = gu[:, :i].reshape(e * i, h)
    state_dict[prefix + "mlp.v1"] = gu[:, i:].reshape(e * i, h)
    state_dict[prefix + "mlp.w2"] = down.transpose(1, 2).reshape(e * i, h)


def fuse_flat_experts(model: torch.nn.Module) -> int:
    """Swap every flattened experts module of `model` for its fused view (in place); returns how many."""
    swaps = [(name, mod) for name, mod in model.named_modules() if is_flat_experts(mod)]
    for name, mod in swaps:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        config = getattr(model.config, "get_text_config", lambda: model.config)()
        setattr(parent, leaf, FusedFlatExperts(mod, config))
    return len(swaps)


def has_flat_experts(model: torch.nn.Module) -> bool:
    return any(is_flat_experts(m) for m in model.modules())
