"""Second-order statistics for atomic-expert pruning (HEAPr), from one backward pass over calibration data.

HEAPr scores neuron k of expert i by ``E[a_k²] · w_kᵀ M w_k`` with ``w_k`` column k of ``down_proj`` and
``M = E[g gᵀ]`` the mean outer product of the loss gradient ``g`` at the expert's output. Because
``w_kᵀ M w_k = E[(gᵀ w_k)²]``, each gradient is projected onto ``down_proj``'s columns the moment autograd
delivers it, so a layer only ever holds an ``[E, I]`` accumulator: the ``E × H × H`` matrices (tens of GB
over a large model when kept for every layer) are never formed. ``explicit_layers`` forms them anyway, one
chosen layer at a time, to check the projection.

Mechanics: a custom experts implementation (same arithmetic as the statistics tap) registers a tensor hook
on each MoE block's routed output; the hook receives ``dL/d out`` and, for every (token, expert) pair, the
gradient at the expert's own output is ``gate_weight · dL/d out`` (the gate scales the expert before the
sum). The loss is the summed next-token cross-entropy over real tokens (padding masked), so a token's
gradient does not depend on how the calibration set was batched. No parameter gradients are allocated:
weights are frozen and the graph starts at the embedding output. With ``checkpoint_layers`` each decoder
layer is recomputed during backward, so autograd keeps one layer's activations plus the layer boundaries;
partial sums taken during a recompute are discarded (only hooks on the original graph ever fire).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from moecompress.arch.adapter import MoELayer, decoder_layers, moe_layers
from moecompress.arch.discover import text_model
from moecompress.calib.collect import (
    experts_implementation,
    release_taps,
    set_experts_implementation,
    stored_expert_forward,
    zero_computation_pairs,
)
from moecompress.calib.stats import bundle_exists, load_bundle, save_bundle
from moecompress.errors import UserError

GRAD_IMPLEMENTATION = "moecompress_grad"
_ACTIVE: dict[int, _LayerGradTap] = {}


# ---- the statistics -----------------------------------------------------------------------------------
@dataclass
class SharedGrad:
    """Sums for one dense shared-expert MLP (it sees every real token)."""

    act_sq: torch.Tensor  # [I_s] Σ a²
    proj_sq: torch.Tensor  # [I_s] Σ (gᵀ w_k)²


@dataclass
class LayerGrad:
    """Per-layer sums over real calibration tokens; scores are derived from these (see prune_atomic)."""

    freq: torch.Tensor  # [E] routed (token, slot) pairs
    act_sq: torch.Tensor  # [E, I] Σ a²  over routed tokens
    proj_sq: torch.Tensor  # [E, I] Σ (g_tᵀ w_k)²  over routed tokens, g_t = gate · dL/d out_t
    n_tokens: int = 0
    m_sum: torch.Tensor | None = None  # [E, H, H] Σ g gᵀ (explicit layers only)
    shared: dict[str, SharedGrad] = field(default_factory=dict)

    def state_bytes(self) -> int:
        tensors = [self.freq, self.act_sq, self.proj_sq, *([self.m_sum] if self.m_sum is not None else [])]
        tensors += [t for s in self.shared.values() for t in (s.act_sq, s.proj_sq)]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class GradStats:
    """Gradient statistics of every MoE layer of one model under one calibration set."""

    layers: dict[int, LayerGrad]
    meta: dict[str, Any] = field(default_factory=dict)

    def state_bytes(self) -> int:
        return sum(lg.state_bytes() for lg in self.layers.values())

    def save(self, path: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        info: dict[str, Any] = {}
        for idx, lg in self.layers.items():
            for name in ("freq", "act_sq", "proj_sq", "m_sum"):
                t = getattr(lg, name)
                if t is not None:
                    tensors[f"{idx}.{name}"] = t
            for sname, sg in lg.shared.items():
                tensors[f"{idx}.shared.{sname}.act_sq"] = sg.act_sq
                tensors[f"{idx}.shared.{sname}.proj_sq"] = sg.proj_sq
            info[str(idx)] = {"n_tokens": lg.n_tokens, "shared": sorted(lg.shared)}
        save_bundle(path, "grad", tensors, {"meta": self.meta, "layers": info})

    @classmethod
    def load(cls, path: Path) -> GradStats:
        info, t = load_bundle(path, "grad", "gradient statistics")
        layers = {}
        for key, li in info["layers"].items():
            shared = {s: SharedGrad(t[f"{key}.shared.{s}.act_sq"], t[f"{key}.shared.{s}.proj_sq"]) for s in li["shared"]}
            layers[int(key)] = LayerGrad(freq=t[f"{key}.freq"], act_sq=t[f"{key}.act_sq"], proj_sq=t[f"{key}.proj_sq"],
                                         n_tokens=li["n_tokens"], m_sum=t.get(f"{key}.m_sum"), shared=shared)
        return cls(layers=layers, meta=info.get("meta", {}))

    @staticmethod
    def exists(path: Path) -> bool:
        return bundle_exists(path, "grad")


# ---- the experts implementation --------------------------------------------------------------------------
def grad_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Per-expert batched forward (differentiable) that hands routing and activations to the active tap."""
    k = top_k_index.shape[-1]
    pairs, out, _ = zero_computation_pairs(self, hidden_states, top_k_index.reshape(-1), top_k_weights.reshape(-1), k)
    flat_e = top_k_index.reshape(-1)[pairs]
    order = torch.argsort(flat_e, stable=True)
    counts = torch.bincount(flat_e, minlength=int(self.down_proj.shape[0])).tolist()
    tok = pairs[order] // k
    x = hidden_states[tok]
    ys, acts = [], []
    start = 0
    for e, n in enumerate(counts):
        if n:
            y, a = stored_expert_forward(self, e, x[start : start + n])
            ys.append(y)
            acts.append(a)
        start += n
    y_sorted = torch.cat(ys)
    w_sorted = top_k_weights.reshape(-1)[pairs][order].to(y_sorted.dtype)
    out = out.index_add(0, tok, y_sorted * w_sorted[:, None])
    tap = _ACTIVE.get(id(self))
    if tap is not None:
        tap.on_forward(out, tok, flat_e[order], w_sorted, torch.cat(acts))
    return out


ALL_EXPERTS_FUNCTIONS.register(GRAD_IMPLEMENTATION, grad_experts_forward)


class _LayerGradTap:
    """Accumulates one layer's sums; partial sums are committed only when the gradient arrives."""

    def __init__(self, layer: MoELayer, explicit: bool) -> None:
        experts = layer.experts
        e = layer.num_experts
        transposed = bool(getattr(experts, "is_transposed", False))
        width = experts.down_proj.shape[1] if transposed else experts.down_proj.shape[2]
        hidden = experts.down_proj.shape[2] if transposed else experts.down_proj.shape[1]
        self.layer = layer
        self.transposed = transposed
        self.mask: torch.Tensor | None = None
        f64 = torch.float64
        self.grad = LayerGrad(freq=torch.zeros(e, dtype=f64), act_sq=torch.zeros(e, width, dtype=f64),
                              proj_sq=torch.zeros(e, width, dtype=f64),
                              m_sum=torch.zeros(e, hidden, hidden, dtype=f64) if explicit else None)

    def _down(self, e: int) -> torch.Tensor:
        """Expert e's down projection as [H, I] (columns = w_k)."""
        w = self.layer.experts.down_proj[e].detach()
        return (w.T if self.transposed else w).double()

    def on_forward(self, out: torch.Tensor, tok: torch.Tensor, eid: torch.Tensor, w: torch.Tensor,
                   act: torch.Tensor) -> None:
        if not out.requires_grad:
            return
        if self.mask is not None:
            keep = self.mask[tok]
            tok, eid, w, act = tok[keep], eid[keep], w[keep], act[keep]
        e_count = self.grad.freq.numel()
        idx = eid.detach().cpu()
        a64 = act.detach().double()
        pending = {
            "freq": torch.bincount(idx, minlength=e_count).double(),
            "act_sq": torch.zeros_like(self.grad.act_sq).index_add_(0, idx, (a64 * a64).cpu()),
            "n_tokens": int(self.mask.sum()) if self.mask is not None else out.shape[0],
        }
        routing = (tok.detach(), idx, w.detach().double())
        out.register_hook(functools.partial(self._on_grad, pending, routing))

    def _on_grad(self, pending: dict[str, Any], routing: tuple[torch.Tensor, ...], grad: torch.Tensor) -> None:
        tok, idx, w = routing
        g = grad.detach().double()[tok] * w[:, None]  # gradient at each routed expert's output
        counts = torch.bincount(idx, minlength=self.grad.freq.numel()).tolist()
        proj_sq = torch.zeros_like(self.grad.proj_sq)
        start = 0
        for e, n in enumerate(counts):
            if n:
                ge = g[start : start + n]
                proj_sq[e] = (ge @ self._down(e)).pow(2).sum(0).cpu()
                if self.grad.m_sum is not None:
                    self.grad.m_sum[e] += (ge.T @ ge).cpu()
            start += n
        self.grad.proj_sq += proj_sq
        self.grad.freq += pending["freq"]
        self.grad.act_sq += pending["act_sq"]
        self.grad.n_tokens += pending["n_tokens"]


class _SharedGradTap:
    """Same sums for a dense shared MLP (hooks on its down_proj: input = activation, output gradient)."""

    def __init__(self, layer_tap: _LayerGradTap, name: str, mlp: torch.nn.Module) -> None:
        self.layer_tap = layer_tap
        self.name = name
        self.down = mlp.down_proj
        width = self.down.weight.shape[1]
        self.sums = SharedGrad(act_sq=torch.zeros(width, dtype=torch.float64),
                               proj_sq=torch.zeros(width, dtype=torch.float64))

    def hook(self, module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not out.requires_grad:
            return
        a = args[0].detach().reshape(-1, args[0].shape[-1])
        mask = self.layer_tap.mask
        if mask is not None and mask.numel() == a.shape[0]:
            a = a[mask]
        else:
            mask = None
        pending = (a.double().pow(2).sum(0).cpu(),)
        out.register_hook(functools.partial(self._on_grad, pending, mask))

    def _on_grad(self, pending: tuple[torch.Tensor], mask: torch.Tensor | None, grad: torch.Tensor) -> None:
        g = grad.detach().reshape(-1, grad.shape[-1]).double()
        if mask is not None:
            g = g[mask]
        self.sums.proj_sq += (g @ self.down.weight.detach().double()).pow(2).sum(0).cpu()
        self.sums.act_sq += pending[0]


@contextlib.contextmanager
def _frozen_with_input_grad(model: torch.nn.Module) -> Iterator[None]:
    """Freeze every weight (no .grad buffers) and start the graph at the embedding output instead."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    emb = text_model(model).get_input_embeddings()
    handle = emb.register_forward_hook(lambda mod, args, out: out.detach().requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _layer_checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[bool]:
    """Recompute each decoder layer during backward (non-reentrant checkpoint), without model.train().

    transformers checkpoints a layer when the *layer's own* ``training`` flag is set; children (attention
    dropout, routers) keep their eval behaviour because only the layer module's flag is touched.
    """
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [ly for ly in decoder_layers(model) if isinstance(ly, GradientCheckpointingLayer)] if enabled else []
    saved = [(ly, ly.gradient_checkpointing, ly.__dict__.get("_gradient_checkpointing_func"), ly.training)
             for ly in layers]
    for ly in layers:
        ly.gradient_checkpointing = True
        ly._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
        ly.training = True
    try:
        yield bool(layers)
    finally:
        for ly, flag, fn, training in saved:
            ly.gradient_checkpointing = flag
            if fn is None:
                ly.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                ly._gradient_checkpointing_func = fn
            ly.training = training


@contextlib.contextmanager
def gradient_taps(model: torch.nn.Module, explicit_layers: Iterable[int] = (),
                  checkpoint_layers: bool = True) -> Iterator[dict[int, _LayerGradTap]]:
    """Install the gradient experts implementation and taps on every MoE layer; restore on exit."""
    layers = moe_layers(model)
    adapter = layers[0].adapter
    if adapter.routing == "sigmoid_input_scale":
        raise UserError("heapr needs the gradient at each routed expert's output; llama4_text runs experts densely "
                        "on gate-scaled inputs — use --criterion camera or magnitude for this family")
    explicit = set(explicit_layers)
    previous = experts_implementation(model)
    taps: dict[int, _LayerGradTap] = {}
    handles: list[Any] = []
    for layer in layers:
        tap = _LayerGradTap(layer, layer.index in explicit)
        taps[layer.index] = tap
        _ACTIVE[id(layer.experts)] = tap
        if adapter.shared_width_coupled:
            for name, mlp in layer.shared():
                if isinstance(getattr(mlp, "down_proj", None), torch.nn.Linear):
                    st = _SharedGradTap(tap, name, mlp)
                    tap.grad.shared[name] = st.sums
                    handles.append(mlp.down_proj.register_forward_hook(st.hook))
    set_experts_implementation(model, GRAD_IMPLEMENTATION)
    try:
        with _frozen_with_input_grad(model), _layer_checkpointing(model, checkpoint_layers):
            yield taps
    finally:
        release_taps(model, layers, handles, previous, _ACTIVE)


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of each real token predicting the next real token (padding masked)."""
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, input_ids[:, 1:, None].to(lp.device))[..., 0]
    return (nll * valid.to(nll.device)).sum()


def collect_gradient_stats(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    explicit_layers: Iterable[int] = (),
    checkpoint_layers: bool = True,
    progress: Callable[[int], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> GradStats:
    """One forward + backward per batch of (input_ids [B, L], attention_mask [B, L]); returns per-layer sums."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    total_loss, n_pred = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), gradient_taps(model, explicit_layers, checkpoint_layers) as taps:
            for input_ids, attention_mask in batches:
                mask = attention_mask.reshape(-1).bool().to(device)
                for tap in taps.values():
                    tap.mask = mask
                ids, am = input_ids.to(device), attention_mask.to(device)
                logits = text_model(model)(input_ids=ids, attention_mask=am, use_cache=False).logits
                loss = next_token_loss(logits, ids, am)
                del logits
                loss.backward()
                total_loss += float(loss.detach())
                n_pred += int((am[:, 1:] * am[:, :-1]).sum())
                if progress is not None:
                    progress(int(mask.sum()))
            layers = {idx: tap.grad for idx, tap in taps.items()}
        if n_pred and not any(float(lg.freq.sum()) for lg in layers.values()):
            raise RuntimeError(f"{type(model).__name__} never called the {GRAD_IMPLEMENTATION!r} experts "
                               "implementation; its MoE block bypasses transformers' experts interface")
    finally:
        model.train(was_training)
    info = dict(meta or {})
    info.update(collect_seconds=round(time.perf_counter() - t0, 3), mean_loss=total_loss / max(n_pred, 1),
                predicted_tokens=n_pred)
    return GradStats(layers=layers, meta=info)


def reduce_grad_stats(gs: GradStats, world: Any) -> GradStats:
    """Gradient statistics of the whole calibration set from each rank's share (``moecompress.dist``): every
    sum and count adds (the loss is a sum over sequences, so each sequence's gradients are its rank's alone)."""
    if not world.distributed:
        return gs
    layers = [gs.layers[i] for i in sorted(gs.layers)]
    tensors: list[torch.Tensor] = []
    for lg in layers:
        tensors += [lg.freq, lg.act_sq, lg.proj_sq, *([lg.m_sum] if lg.m_sum is not None else [])]
        tensors += [t for name in sorted(lg.shared) for t in (lg.shared[name].act_sq, lg.shared[name].proj_sq)]
    counts = torch.tensor([lg.n_tokens for lg in layers], dtype=torch.float64)
    world.all_reduce_([*tensors, counts])
    for lg, n in zip(layers, counts.tolist(), strict=True):
        lg.n_tokens = int(n)
    parts = world.gather((gs.meta.get("mean_loss", 0.0) * gs.meta.get("predicted_tokens", 0),
                          gs.meta.get("predicted_tokens", 0), gs.meta.get("collect_seconds", 0.0)))
    n_pred = sum(p[1] for p in parts)
    gs.meta.update(mean_loss=sum(p[0] for p in parts) / max(n_pred, 1), predicted_tokens=n_pred,
                   collect_seconds=max(p[2] for p in parts), world_size=world.size)
    return gs


def collect_grad_sharded(collect: Callable[[list[tuple[torch.Tensor, torch.Tensor]]], GradStats],
                         batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> GradStats:
    """Gradient statistics in a data-parallel run: this rank's share of `batches`, reduced over ranks."""
    from moecompress.dist import world

    w = world()
    own, _ = w.shard_batches(list(batches), "gradients")
    return reduce_grad_stats(collect(own), w)


def batch_key(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> str:
    """Identity of the exact calibration tokens, for the gradient-statistics cache."""
    h = hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes())
    h.update(attention_mask.to(torch.int8).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
