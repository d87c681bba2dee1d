"""A uniform per-expert view over the fused expert tensors of any supported layout.

Canonical form (what every algorithm sees): ``gate [E, I, H]``, ``up [E, I, H]``, ``down [E, H, I]`` and
optional biases ``gate_bias [E, I]``, ``up_bias [E, I]``, ``down_bias [E, H]``, i.e. the weights of
``down(act(gate x) * up x)`` as ``nn.Linear`` would store them. Non-gated experts (Nemotron-H's
``down(relu²(up x))``, transformers' ``has_gate=False``) have ``gate = None``. The view converts to and from the
family's storage layout (concatenated, gpt-oss interleaved + transposed, Llama4 transposed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from moecompress.arch.adapter import MoELayer


@dataclass
class ExpertWeights:
    """Weights of one or many experts in canonical form (leading E axis optional)."""

    gate: torch.Tensor | None  # None: non-gated experts (act(up x))
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def select(self, index: torch.Tensor | list[int] | int) -> ExpertWeights:
        """Index the expert axis (or any leading index expression) of every tensor."""
        return ExpertWeights(**{k: (v[index] if v is not None else None) for k, v in self.__dict__.items()})

    def map(self, fn) -> ExpertWeights:
        return ExpertWeights(**{k: (fn(v) if v is not None else None) for k, v in self.__dict__.items()})

    @property
    def width(self) -> int:
        return int(self.up.shape[-2])

    @property
    def hidden(self) -> int:
        return int(self.up.shape[-1])

    @property
    def num_experts(self) -> int:
        """The leading expert axis (stacked weights)."""
        return int(self.up.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.up.dtype

    @property
    def projections(self) -> tuple[str, ...]:
        """The weight matrices this expert has: gate/up/down, or up/down when non-gated."""
        return ("gate", "up", "down") if self.gate is not None else ("up", "down")

    def clone(self) -> ExpertWeights:
        return self.map(lambda t: t.detach().clone())

    def with_(self, **kw: torch.Tensor | None) -> ExpertWeights:
        return replace(self, **kw)

    @staticmethod
    def only(**kw: torch.Tensor) -> ExpertWeights:
        """Weights carrying only the given projections (e.g. ``down=...``): what `ExpertView.write` should touch."""
        fields: dict[str, torch.Tensor | None] = {"gate": None, "up": None, "down": None, **kw}
        return ExpertWeights(**fields)  # type: ignore[arg-type]


class ExpertView:
    """Read and write a layer's routed experts in canonical form, whatever the storage layout."""

    def __init__(self, layer: MoELayer) -> None:
        self.layer = layer
        self.module = layer.experts
        self.layout = layer.adapter.layout

    @property
    def num_experts(self) -> int:
        return int(self.module.down_proj.shape[0])

    @property
    def gated(self) -> bool:
        return bool(getattr(self.module, "has_gate", True))

    def get_all(self, index: Sequence[int] | torch.Tensor | None = None, copy: bool = True) -> ExpertWeights:
        """Canonical weights of every expert, or of experts `index` (selected from the fused tensors first, so
        only those are copied). ``copy=False`` returns views of the live tensors (no memory; do not keep them
        past surgery that replaces the tensors)."""
        m = self.module
        pick = (lambda t: t) if index is None else (lambda t: t[torch.as_tensor(index, dtype=torch.long)])
        finish = (lambda t: t.contiguous()) if copy else (lambda t: t)
        if not self.gated:  # up [E, I, H] (or [E, H, I] transposed), down [E, H, I] (or [E, I, H])
            t = bool(getattr(m, "is_transposed", False))
            up, down = pick(m.up_proj.detach()), pick(m.down_proj.detach())
            w = ExpertWeights(gate=None, up=up.transpose(1, 2) if t else up, down=down.transpose(1, 2) if t else down)
            if self.layer.adapter.has_expert_bias:
                w.up_bias, w.down_bias = pick(m.up_proj_bias.detach()), pick(m.down_proj_bias.detach())
            return w.map(finish)
        down = m.down_proj.detach()
        gu = m.gate_up_proj.detach()[: down.shape[0]]  # rows past the routed experts (LongCat's zero-computation
        gu, down = pick(gu), pick(down)                 # experts) are not experts
        if self.layout == "concat":  # gate_up [E, 2I, H], down [E, H, I]
            i = gu.shape[1] // 2
            w = ExpertWeights(gate=gu[:, :i], up=gu[:, i:], down=down)
        elif self.layout == "concat_transposed":  # gate_up [E, H, 2I], down [E, I, H]
            i = gu.shape[2] // 2
            w = ExpertWeights(gate=gu[:, :, :i].transpose(1, 2), up=gu[:, :, i:].transpose(1, 2),
                              down=down.transpose(1, 2))
        else:  # interleaved_transposed: gate_up [E, H, 2I] with gate=[..., ::2], up=[..., 1::2]; down [E, I, H]
            w = ExpertWeights(gate=gu[:, :, ::2].transpose(1, 2), up=gu[:, :, 1::2].transpose(1, 2),
                              down=down.transpose(1, 2))
        if self.layer.adapter.has_expert_bias:
            gub = pick(m.gate_up_proj_bias.detach()[: m.down_proj.shape[0]])
            if self.layout == "interleaved_transposed":
                w.gate_bias, w.up_bias = gub[:, ::2], gub[:, 1::2]
            else:
                i = gub.shape[1] // 2
                w.gate_bias, w.up_bias = gub[:, :i], gub[:, i:]
            w.down_bias = pick(m.down_proj_bias.detach())
        return w.map(finish)

    def dims(self) -> tuple[int, int, int]:
        """(experts, hidden, width) read from the tensors' shapes, without copying any."""
        w = self.get_all(copy=False)
        return w.num_experts, w.hidden, w.width

    @torch.no_grad()
    def write(self, positions: Sequence[int], w: ExpertWeights) -> None:
        """Overwrite experts `positions` in place with canonical weights stacked in that order (same width):
        only those experts' slices of the fused tensors are written, nothing else is copied."""
        live = self.get_all(copy=False)  # views of the fused storage in canonical orientation
        for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
            src, dst = getattr(w, name), getattr(live, name)
            if src is None or dst is None:
                continue
            for j, e in enumerate(positions):
                dst[e].copy_(src[j])

    def get(self, e: int) -> ExpertWeights:
        return self.get_all(index=[e]).select(0)  # copies expert `e` only

    def set_all(self, w: ExpertWeights) -> None:
        """Replace every fused tensor (the expert count and width may change; module ints are not touched)."""
        m = self.module
        dtype, device = m.down_proj.dtype, m.down_proj.device
        if not self.gated:
            t = bool(getattr(m, "is_transposed", False))
            m.up_proj = _param(w.up.transpose(1, 2) if t else w.up, dtype, device)
            m.down_proj = _param(w.down.transpose(1, 2) if t else w.down, dtype, device)
            if self.layer.adapter.has_expert_bias:
                assert w.up_bias is not None and w.down_bias is not None
                m.up_proj_bias = _param(w.up_bias, dtype, device)
                m.down_proj_bias = _param(w.down_bias, dtype, device)
            return
        if self.layout == "concat":
            gu = torch.cat([w.gate, w.up], dim=1)
            down = w.down
        elif self.layout == "concat_transposed":
            gu = torch.cat([w.gate.transpose(1, 2), w.up.transpose(1, 2)], dim=2)
            down = w.down.transpose(1, 2)
        else:
            e, i, h = w.gate.shape
            gu = torch.stack([w.gate.transpose(1, 2), w.up.transpose(1, 2)], dim=3).reshape(e, h, 2 * i)
            down = w.down.transpose(1, 2)
        old_gu = m.gate_up_proj.detach()
        if old_gu.shape[0] > m.down_proj.shape[0]:  # unused input rows of zero-computation experts stay after them
            tail = old_gu[m.down_proj.shape[0]:]
            if tail.shape[1:] != gu.shape[1:]:  # a new width: the tail is never read, so it takes the new shape
                tail = tail.new_zeros((tail.shape[0], *gu.shape[1:]))
            gu = torch.cat([gu.to(tail.dtype), tail])
        m.gate_up_proj = _param(gu, dtype, device)
        m.down_proj = _param(down, dtype, device)
        if self.layer.adapter.has_expert_bias:
            assert w.gate_bias is not None and w.up_bias is not None and w.down_bias is not None
            if self.layout == "interleaved_transposed":
                gub = torch.stack([w.gate_bias, w.up_bias], dim=2).reshape(w.gate_bias.shape[0], -1)
            else:
                gub = torch.cat([w.gate_bias, w.up_bias], dim=1)
            m.gate_up_proj_bias = _param(gub, dtype, device)
            m.down_proj_bias = _param(w.down_bias, dtype, device)

    def select_experts(self, index: torch.Tensor) -> None:
        """Keep experts `index` (in that order): ``set_all(get_all().select(index))`` without the canonical round
        trip. The expert axis is first in every layout, so each fused tensor is indexed directly and replaced
        before the next is copied: a layer's surgery holds one tensor's copy, not split, selected and re-joined
        copies of all of them (the streamed engine's peak memory is set by such copies)."""
        m = self.module
        if self.gated and m.gate_up_proj.shape[0] != m.down_proj.shape[0]:  # zero-computation experts' rows stay
            self.set_all(self.get_all().select(index))
            return
        dtype, device = m.down_proj.dtype, m.down_proj.device
        names = ["gate_up_proj", "down_proj"] if self.gated else ["up_proj", "down_proj"]
        if self.layer.adapter.has_expert_bias:
            names += [f"{n}_bias" for n in names]
        for name in names:
            setattr(m, name, _param(getattr(m, name).detach()[index], dtype, device))

    def set(self, e: int, w: ExpertWeights) -> None:
        """Overwrite expert `e` in place with single-expert canonical weights of the same width."""
        self.write([e], w.map(lambda t: t[None]))

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Output of expert `e` alone on inputs x [T, H] (no routing weight), using the module's activation."""
        w = self.get(e)
        return apply_expert(self.module, self.layout, w, x)[0]


def apply_expert(module: torch.nn.Module, layout: str, w: ExpertWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one canonical expert on x [T, H]; returns (output [T, H], intermediate activation [T, I])."""
    act = expert_activation(module, layout, w, x)
    out = act @ w.down.T
    if w.down_bias is not None:
        out = out + w.down_bias
    return _post_norm(module, out), act


def expert_activation(module: torch.nn.Module, layout: str, w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
    """One canonical expert's intermediate activation on x [T, H], [T, I] (what its down projection reads).

    The activation is the family's own (``module._apply_gate`` handles gpt-oss's clamped SwiGLU), fed
    with the gate/up pre-activations rebuilt in the module's storage order; non-gated experts apply
    ``act_fn`` to the up projection.
    """
    if w.gate is None:
        u = x @ w.up.T
        if w.up_bias is not None:
            u = u + w.up_bias
        return module.act_fn(u)
    g = x @ w.gate.T
    u = x @ w.up.T
    if w.gate_bias is not None:
        g = g + w.gate_bias
        u = u + w.up_bias
    if layout == "interleaved_transposed":
        gu = torch.stack([g, u], dim=-1).flatten(-2)
    else:
        gu = torch.cat([g, u], dim=-1)
    apply_gate = getattr(module, "_apply_gate", None)
    return apply_gate(gu) if apply_gate is not None else module.act_fn(g) * u


def _post_norm(module: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """transformers' has_post_expert_norm: a norm on each expert's output before the routing weight."""
    return module.post_expert_norm(y) if getattr(module, "has_post_expert_norm", False) else y


def _param(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.detach().to(device=device, dtype=dtype).contiguous(), requires_grad=False)
