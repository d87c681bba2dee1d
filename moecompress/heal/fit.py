"""Heal one MoE block: fit the compressed block to the original block's outputs. Pure per-layer functions.

Inputs are a `BlockData`: the compressed model's block inputs `x` at this layer (tokens × hidden, real
tokens only), the original block's outputs `y` on the original model's inputs (the target), the original
inputs `x_ref` (router targets) and a held-out token mask. Nothing here walks layers or knows about files:
the walk (``moecompress.heal.walk``) or the layer-streaming engine feeds these functions one layer at a time.

Steps, each optional and measured: (a) ``fit_router`` — least-squares router rows on the kept experts;
(b) ``fit_down`` — closed-form ridge least squares of each kept expert's down projection on the tokens
routed to it; (c) ``fit_adam`` — a short fp32 Adam run on experts + router against block-output MSE,
early-stopped on the held-out tokens. `heal_block` runs them in order and reverts any step that makes the
held-out block error worse, so a layer is never left worse than it came in (on that measure).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch

from moecompress.arch.adapter import MoEAdapter, MoELayer
from moecompress.arch.discover import router_choice
from moecompress.arch.experts import ExpertView, ExpertWeights, apply_expert, expert_activation
from moecompress.calib.layers import BlockArgs, Call, StopForward, block_io
from moecompress.errors import UserError
from moecompress.heal.spec import HealSpec
from moecompress.passes import merging as M
from moecompress.passes.merge_experts import block_output, prob_kind, router_logits
from moecompress.surgery import overwrite_block_tensors, set_router_rows

_LOGIT_BIAS = "bias"


@dataclass
class BlockData:
    """One layer's tokens: compressed inputs, original inputs, original outputs (target), held-out mask."""

    x: torch.Tensor  # [N, H]
    x_ref: torch.Tensor  # [N, H]
    y: torch.Tensor  # [N, H] float64
    held: torch.Tensor  # [N] bool
    call: BlockArgs = field(default_factory=BlockArgs)  # the block's other arguments for the `x` tokens

    @property
    def fit(self) -> torch.Tensor:
        return ~self.held

    def output(self, layer: MoELayer, sel: torch.Tensor | None = None) -> torch.Tensor:
        """The live block's output on the compressed inputs (of the tokens `sel` picks; all when None)."""
        return block_output(layer, self.x if sel is None else self.x[sel], self.call.rows(sel))


def rel_error(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """‖pred − y‖² / ‖y‖² over the masked tokens."""
    if mask is not None:
        pred, y = pred[mask], y[mask]
    return float((pred.double() - y.double()).pow(2).sum() / y.double().pow(2).sum().clamp_min(1e-30))


def block_errors(layer: MoELayer, data: BlockData, fit: bool = True) -> dict[str, float]:
    """Relative block-output error of the live block on the held-out (and, if asked, the fitted) tokens."""
    out = {"held": rel_error(data.output(layer, data.held), data.y[data.held])}
    if fit:
        out["fit"] = rel_error(data.output(layer, data.fit), data.y[data.fit])
    return out


def adds_more_than_routed(layer: MoELayer) -> bool:
    """The block's output holds more than its routed experts' weighted sum: shared experts, or router classes
    after the routed experts (LongCat-Flash's zero-computation experts pass the token through)."""
    return bool(layer.shared()) or layer.extra_rows > 0


def other_output(layer: MoELayer, data: BlockData, routed: torch.Tensor) -> torch.Tensor:
    """What the block adds besides the routed experts; exactly zero when it adds nothing."""
    if not adds_more_than_routed(layer):
        return torch.zeros_like(routed)
    return data.output(layer) - routed


def latent_experts(layer: MoELayer) -> bool:
    """The block projects tokens to a narrower width before its experts (Muse Spark): block inputs are not the
    experts' inputs."""
    from moecompress.arch.discover import _hidden_of

    return _hidden_of(layer.experts) != int(layer.router.weight.shape[-1])


# Families heal cannot reconstruct block by block (found by running `prune --heal` on every real-config and
# default-config miniature, 4 Dec 2026). Routers of every layout, extra router arguments, token-id routing and router
# state from the layer below are read through the block itself (``routing``); what is left is named here, so heal
# stops with one message, not a traceback.
HEAL_UNSUPPORTED: dict[str, str] = {
    t: "its routed experts sit inside the decoder layer between norms (the router reads the residual stream, the "
       "experts a separately normalised copy, and their output is normalised again): there is no block output "
       "that is linear in the kept experts' down projections" for t in ("gemma4", "gemma4_text")
} | {
    "longcat_flash": "its zero-computation experts pass tokens through unchanged, and the block-output fit chases "
                     "those tokens: on its miniature, heal lowered every layer's block error yet raised the calibration "
                     "KL 70-fold, so it stays off for this family until it is measured on a trained LongCat"
}


def heal_blocked(model_type: str, routing_rule: str | None = None, layer: MoELayer | None = None) -> str | None:
    """Why heal cannot run on this family (None when it can): named families, gate-scaled dense experts, experts
    reading a latent projection (seen on a live layer). One answer for the explicit --heal (an error) and the
    default heal (skipped with this note)."""
    why = HEAL_UNSUPPORTED.get(model_type)
    if why is not None:
        return f"heal: not supported for {model_type} yet: {why}"
    if routing_rule == "sigmoid_input_scale":
        return (f"heal: {model_type} scales expert inputs by the gate and runs experts densely; routed-expert "
                "reconstruction does not apply to it")
    if layer is not None and latent_experts(layer):
        return (f"heal: {model_type} experts read a latent projection of the block input; refitting them from block "
                "inputs is not implemented")
    return None


def model_heal_blocked(model: torch.nn.Module, adapter: MoEAdapter) -> str | None:
    """`heal_blocked` for a live (or meta skeleton) model, seen on its first MoE layer."""
    from moecompress.arch.adapter import moe_layers

    first = next(iter(moe_layers(model, adapter)), None)
    return heal_blocked(adapter.model_type, adapter.routing, first)


def check_family_healable(model_type: str, routing_rule: str | None = None) -> None:
    """One clear message for a family heal does not support; its entry points (the engine's heal, the in-memory
    walk) call it before any layer runs."""
    why = heal_blocked(model_type, routing_rule)
    if why is not None:
        raise UserError(f"{why}; run without --heal")


def check_healable(layer: MoELayer) -> None:
    why = heal_blocked(layer.adapter.model_type, layer.adapter.routing, layer)
    if why is not None:
        raise UserError(why)


@torch.no_grad()
def routing(layer: MoELayer, x: torch.Tensor, call: BlockArgs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k weights [N, k], top-k expert ids [N, k]) as the block hands them to its experts: the block runs on x
    until its experts would start, so every family's router layout, extra router arguments (MiniMax-M2's and
    LFM2's score bias), token-id routing (DeepSeek-V4) and state from the layer below (ZAYA) are the block's
    own business. Expert ids past the routed experts (skip / zero-computation classes) are kept as given."""
    n = layer.num_experts
    if not layer.adapter.block_attr:  # the decoder layer is the block (gemma-4): its router alone
        router = layer.block.get_submodule(layer.adapter.router_attr.split(".")[0])
        index, weights = router_choice(router(x), n)
        return weights, index
    calls: list[Call] = []
    with block_io(layer.experts, stop=True, calls=calls), contextlib.suppress(StopForward):
        block_output(layer, x, call)
    if not calls:
        raise UserError(f"heal: layer {layer.index}'s block did not call its experts")
    args, kwargs = calls[0]
    index, weights = router_choice((*args, *kwargs.values()), n)
    return weights.reshape(x.shape[0], -1), index.reshape(x.shape[0], -1)


# ---- (a) router -------------------------------------------------------------------------------------
@torch.no_grad()
def router_reads_block_input(layer: MoELayer, x: torch.Tensor, call: BlockArgs | None = None) -> bool:
    """Whether the router's linear (whose rows (a) fits by least squares on block inputs) is applied to the block
    input itself: false where a router MLP or a norm comes first (ZAYA's router runs an MLP on the input and the
    layer below's router state), whose rows a least-squares fit on block inputs would get wrong. Seen on a few
    tokens of the block's own forward."""
    if not layer.adapter.block_attr:
        return False
    sample = x[:16].to(layer.experts.down_proj.dtype)
    with block_io(layer.router, stop=True) as (seen, _), contextlib.suppress(StopForward):
        block_output(layer, sample, call.rows(torch.arange(sample.shape[0])) if call is not None else None)
    if not seen or seen[0].numel() != sample.numel():
        return False
    return bool(torch.equal(seen[0].reshape(sample.shape).to(sample.dtype), sample))


def fit_router(ref_layer: MoELayer, layer: MoELayer, data: BlockData, groups: list[M.Group], ridge: float) -> dict[str, Any]:
    """Least-squares router rows: on the compressed inputs, each kept expert gets the probability its group
    (itself after pruning; its members after merging) had under the original router on the original inputs."""
    if len(groups) != layer.num_experts:
        raise UserError(f"layer {layer.index}: {len(groups)} expert groups for {layer.num_experts} experts")
    fit = data.fit
    kind = prob_kind(layer.adapter)
    ref_logits = router_logits(ref_layer, data.x_ref[fit])
    bias = getattr(layer.router, _LOGIT_BIAS, None)
    has_bias = any(v.path == _LOGIT_BIAS for v in layer.adapter.router_vectors) and bias is not None
    rows, new_bias, targets = M.refit_to_groups(data.x[fit].double(), ref_logits, groups,
                                                layer.routed_router_weight.detach(), kind, ridge,
                                                init_bias=bias.detach() if has_bias else None)
    set_router_rows(layer, rows, {_LOGIT_BIAS: new_bias} if new_bias is not None else None)
    return {}


# ---- (b) down projections ---------------------------------------------------------------------------
@dataclass
class ExpertTokens:
    """The tokens routed to one expert: their ids, gated activations g·a [T, I], gated down bias g·b [T, H]."""

    tok: torch.Tensor
    act: torch.Tensor
    gbias: torch.Tensor | None


class _Primal:
    """An expert fitted in weight space: the Cholesky factor of ``aᵀa + λI`` ([I, I]) and its float64 matrix."""

    def __init__(self, mw: torch.Tensor, chol: torch.Tensor) -> None:
        self.mw, self.chol = mw, chol
        self.w: torch.Tensor | None = None  # float64 [H, I] once updated


class _Dual:
    """An expert with fewer fitted tokens m than its width I, fitted in token space: ``(aᵀa + λI)⁻¹aᵀ =
    aᵀ(aaᵀ + λI)⁻¹``, so the factor is [m, m] and every update is ``aᵀZ`` for a [m, H] ``Z``; the updates are
    kept as their summed ``Z`` (the fitted matrix is the original plus ``aᵀZ``, formed once when read)."""

    def __init__(self, keep: torch.Tensor, a: torch.Tensor, chol: torch.Tensor) -> None:
        self.keep, self.a, self.chol = keep, a, chol
        self.z: torch.Tensor | None = None  # float64 [m, H]


def _dual_is_smaller(rows: int, width: int, item: int) -> bool:
    """Token space holds an [m, m] float64 factor, the m fitted rows (activations' dtype) and [m, H] float64
    coefficients; weight space an [I, I] factor and an [H, I] float64 matrix (H ≈ I)."""
    return rows * rows * 8 + rows * width * (item + 8) < 2 * width * width * 8


class DownMatrices(Sequence[torch.Tensor]):
    """The fitted down projections, float64 [H, I] each, formed when read (one at a time, not all at once)."""

    def __init__(self, down: list[torch.Tensor], fitted: dict[int, _Primal | _Dual]) -> None:
        self._down, self._fitted = down, fitted

    def __len__(self) -> int:
        return len(self._down)

    @overload
    def __getitem__(self, e: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, e: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, e: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(e, slice):
            return [self[i] for i in range(len(self))[e]]
        f = self._fitted.get(e)
        if isinstance(f, _Primal) and f.w is not None:
            return f.w
        base = self._down[e].double()
        if isinstance(f, _Dual) and f.z is not None:
            return base + (f.a.double().T @ f.z).T
        return base.clone() if base is self._down[e] else base


def solve_down(parts: list[ExpertTokens], down: list[torch.Tensor], target: torch.Tensor, fit: torch.Tensor,
               ridge: float, sweeps: int) -> tuple[DownMatrices, torch.Tensor, list[float]]:
    """Block coordinate descent on Σ_tokens ‖target − Σ_e (g·a_e) W_eᵀ − g·b_e‖² over the down projections.

    Each expert in turn gets the exact minimiser of that MSE plus λ‖W − W_current‖² (λ relative to its
    Gram diagonal), the others held fixed: so no update can raise the fitted MSE (it drops by at least
    λ‖ΔW‖²). Fitted on tokens where `fit` is true; the prediction is kept for all tokens.
    The token products run in the activations' dtype (float32 from `expert_tokens` by default: they are most
    of the work); Gram factors, solves, the MSE and the returned matrices are float64.
    An expert with fewer fitted tokens than its width is solved in token space (``_Dual``: the same minimiser,
    an [m, m] factor instead of [I, I]) — on the stream bench's 20-layer model this took heal's down fit from
    ~0.4 GiB to ~0.1 GiB per layer.
    Returns the new down matrices [H, I] (formed when read), the prediction [N, H] and the fitted MSE after each
    sweep (first entry: before).
    """
    dt = next((p.act.dtype for p in parts), target.dtype)
    target = target.to(dt)
    pred = torch.zeros_like(target)
    for p, d in zip(parts, down, strict=True):
        c = p.act @ d.to(dt).T  # the value of d.double().to(dt): every conversion here is exact or one rounding
        if p.gbias is not None:
            c = c + p.gbias
        pred.index_add_(0, p.tok, c)
    fit_w = fit.to(torch.float64)

    def mse() -> float:  # per-token sums in the products' dtype (a float64 copy of [N, H] cost 20% of (b))
        d = target - pred
        return float(d.mul_(d).sum(1).double() @ fit_w)

    history = [mse()]
    # Per expert, once, its factor. Weight space: L of aᵀa + λI (a: its fitted rows); the exact update solves
    # (aᵀa + λI) Wᵀ = aᵀ(target − (pred − a Wᵀ − g·b) − g·b) + λWᵀ (its own bias term cancels), whose right-hand
    # side is aᵀ(target − pred) + L(LᵀWᵀ): one product with the tokens per expert and sweep, no copy of the
    # fitted rows. Token space: L of aaᵀ + λI (λ from the same Gram diagonal, trace(aaᵀ)/I); the update is
    # ΔWᵀ = aᵀ (aaᵀ + λI)⁻¹ (target − pred) on the fitted rows.
    fitted: dict[int, _Primal | _Dual] = {}
    item = torch.empty((), dtype=dt).element_size()
    for e, p in enumerate(parts):
        m = fit[p.tok]
        if p.tok.numel() == 0 or not bool(m.any()):
            continue
        rows, width = int(m.sum()), p.act.shape[1]
        if _dual_is_smaller(rows, width, item):
            a = p.act[m]
            k = (a @ a.T).double()
            k.diagonal().add_(ridge * float(k.diagonal().sum() / width) + 1e-12)
            fitted[e] = _Dual(m, a, torch.linalg.cholesky(k))
            continue
        mw = m.to(dt)[:, None]
        gram = ((p.act * mw).T @ p.act).double()
        gram.diagonal().add_(ridge * float(gram.diagonal().mean()) + 1e-12)
        fitted[e] = _Primal(mw, torch.linalg.cholesky(gram))
    for _ in range(sweeps):
        for e, p in enumerate(parts):
            f = fitted.get(e)
            if isinstance(f, _Primal):
                w = f.w if f.w is not None else down[e].double()
                rhs = (((target[p.tok] - pred[p.tok]) * f.mw).T @ p.act).double()
                new = torch.cholesky_solve(rhs.T + f.chol @ (f.chol.T @ w.T), f.chol).T
                pred.index_add_(0, p.tok, p.act @ (new - w).to(dt).T)
                f.w = new
            elif isinstance(f, _Dual):
                tok = p.tok[f.keep]
                z = torch.cholesky_solve((target[tok] - pred[tok]).double(), f.chol)  # [m, H]
                delta = (f.a.double().T @ z).T  # [H, I]
                pred.index_add_(0, p.tok, p.act @ delta.to(dt).T)
                f.z = z if f.z is None else f.z + z
        history.append(mse())
    return DownMatrices(down, fitted), pred, history


@torch.no_grad()
def expert_tokens(layer: MoELayer, x: torch.Tensor, w: ExpertWeights | None = None, dtype: torch.dtype = torch.float32,
                  routed_output: bool = True, call: BlockArgs | None = None
                  ) -> tuple[list[ExpertTokens], torch.Tensor | None]:
    """Per kept expert, its routed tokens under the live router (gated activations in `dtype`: what the down fit
    multiplies); also, when `routed_output`, the routed output as the block has it (float64; else None, and no
    expert's output is computed)."""
    view = ExpertView(layer)
    w = w or view.get_all()
    xd = x.to(w.down.dtype)
    weights, index = routing(layer, xd, call)
    parts = []
    routed = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64) if routed_output else None
    for e in range(w.num_experts):
        tok, slot = torch.nonzero(index == e, as_tuple=True)
        g = weights[tok, slot][:, None]
        we = w.select(e)
        if routed is not None:
            out, act = apply_expert(layer.experts, layer.adapter.layout, we, xd[tok])
            routed.index_add_(0, tok, g.double() * out.double())  # a token reaches an expert once
        else:
            act = expert_activation(layer.experts, layer.adapter.layout, we, xd[tok])
        gb = (g.double() * w.down_bias[e].double()).to(dtype) if w.down_bias is not None else None
        parts.append(ExpertTokens(tok=tok, act=_gated(g, act, dtype), gbias=gb))
    return parts, routed


def _gated(g: torch.Tensor, act: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g·a rounded once to `dtype`. In float32 from float32-or-narrower factors, float32's own product is that
    rounding (the exact product fits a double, and IEEE multiplication rounds correctly): no float64 detour."""
    narrow = (torch.float32, torch.bfloat16, torch.float16)
    if dtype == torch.float32 and g.dtype in narrow and act.dtype in narrow:
        return g.float() * act.float()
    return (g.double() * act.double()).to(dtype)


def fit_down(layer: MoELayer, data: BlockData, ridge: float, sweeps: int) -> dict[str, Any]:
    """(b): ridge least squares of every kept expert's down projection, the router and gate/up fixed."""
    view = ExpertView(layer)
    w = view.get_all(copy=False)  # views: only the down projections are rewritten, in place
    more = adds_more_than_routed(layer)
    parts, routed = expert_tokens(layer, data.x, w, routed_output=more, call=data.call)
    target = data.y.double() - other_output(layer, data, routed) if more else data.y.double()
    new, _, history = solve_down(parts, list(w.down.unbind(0)), target.float(), data.fit, ridge, sweeps)
    # each float64 result formed, converted and written in place on its own (the same rounding as converting a
    # stack): neither a float64 stack nor a stack of the converted matrices (a layer's down projections) is held;
    # expert e's matrix reads only its own original rows, so writing it before forming e + 1 changes nothing
    for e in range(len(new)):
        view.write([e], ExpertWeights.only(down=new[e].to(w.down.dtype)[None]))
    del new
    norm = float(data.y[data.fit].double().pow(2).sum().clamp_min(1e-30))
    return {"fitted_rel_mse": [round(h / norm, 6) for h in history]}


# ---- (c) Adam ---------------------------------------------------------------------------------------
def trainable_names(layer: MoELayer) -> list[str]:
    """Block-relative names of the kept experts' tensors and the router rows (and logit bias)."""
    a = layer.adapter
    up = "gate_up_proj" if a.has_gate else "up_proj"
    names = [f"{a.router_attr}.weight", f"{a.experts_attr}.{up}", f"{a.experts_attr}.down_proj"]
    if a.has_expert_bias:
        names += [f"{a.experts_attr}.{up}_bias", f"{a.experts_attr}.down_proj_bias"]
    if any(v.path == _LOGIT_BIAS for v in a.router_vectors):
        names.append(f"{a.router_attr}.bias")
    params = dict(layer.block.named_parameters())
    return [n for n in names if n in params]


def fit_adam(layer: MoELayer, data: BlockData, steps: int, lr: float, batch_tokens: int, eval_every: int,
             patience: int, seed: int = 0) -> dict[str, Any]:
    """(c): fp32 Adam on experts + router against block-output MSE, early-stopped on the held-out tokens.

    The best held-out state is kept (the starting one if nothing improved).
    """
    from torch.func import functional_call

    block = layer.block
    dtype = layer.router.weight.dtype
    if dtype != torch.float32:
        block.float()
    names = trainable_names(layer)
    params = {n: p.detach().float().clone().requires_grad_(True) for n, p in block.named_parameters() if n in names}
    x_fit, y_fit = data.x[data.fit].float(), data.y[data.fit].float()
    x_held, y_held = data.x[data.held].float(), data.y[data.held].float()
    norm_fit = y_fit.pow(2).sum(1).mean().clamp_min(1e-30)
    norm_held = y_held.pow(2).sum().clamp_min(1e-30)
    opt = torch.optim.Adam(params.values(), lr=lr)
    gen = torch.Generator().manual_seed(seed * 7919 + layer.index)

    call_fit, call_held = data.call.rows(data.fit), data.call.rows(data.held)

    def run(p: dict[str, torch.Tensor], x: torch.Tensor, call: BlockArgs) -> torch.Tensor:
        args, kwargs = call.batched()
        out = functional_call(block, p, (x[None], *args), kwargs)
        return (out[0] if isinstance(out, tuple) else out).reshape(x.shape[0], -1)

    def held_error() -> float:
        with torch.no_grad():
            return float((run(params, x_held, call_held) - y_held).pow(2).sum() / norm_held)

    best = held_error()
    start = best
    best_state = {n: t.detach().clone() for n, t in params.items()}
    bad = 0
    done = 0
    t0 = time.perf_counter()
    try:
        for step in range(1, steps + 1):
            idx = torch.randint(0, x_fit.shape[0], (min(batch_tokens, x_fit.shape[0]),), generator=gen)
            loss = (run(params, x_fit[idx], call_fit.rows(idx)) - y_fit[idx]).pow(2).sum(1).mean() / norm_fit
            opt.zero_grad()
            loss.backward()
            opt.step()
            done = step
            if step % eval_every == 0 or step == steps:
                err = held_error()
                if err < best:
                    best, bad = err, 0
                    best_state = {n: t.detach().clone() for n, t in params.items()}
                else:
                    bad += 1
                    if bad >= patience:
                        break
    finally:
        if dtype != torch.float32:
            block.to(dtype)
    overwrite_block_tensors(layer, best_state)
    return {"steps_run": done, "held_rel_mse_start": round(start, 6), "held_rel_mse_best": round(best, 6),
            "seconds": round(time.perf_counter() - t0, 2)}


# ---- all steps --------------------------------------------------------------------------------------
def _snapshot(layer: MoELayer, step: str) -> dict[str, torch.Tensor]:
    """Copies of the tensors `step` may change (to undo it): the router's for (a), the down projections' for (b),
    every trainable one for (c) — not the whole block, whose gate/up copies would double a layer in memory."""
    names = trainable_names(layer)
    if step == "router":
        names = [n for n in names if n.startswith(layer.adapter.router_attr + ".")]
    elif step == "down":
        names = [n for n in names if ".down_proj" in n]
    keep = set(names)
    return {n: p.detach().clone() for n, p in layer.block.named_parameters() if n in keep}


def heal_block(ref_layer: MoELayer, layer: MoELayer, data: BlockData, groups: list[M.Group], spec: HealSpec
               ) -> dict[str, Any]:
    """(a) → (b) → (c) on one block, each measured on fitted and held-out tokens; a step that raises the
    held-out error is undone when `spec.revert_worse`."""
    check_healable(layer)
    report: dict[str, Any] = {"start": block_errors(layer, data, fit=False)}
    current = report["start"]["held"]
    steps = []
    if spec.router and not router_reads_block_input(layer, data.x, data.call):
        report["router"] = {"skipped": "the router's linear reads a transformed block input (a router MLP or norm "
                                       "first): its rows are not fitted on block inputs"}
    elif spec.router:
        steps.append(("router", lambda: fit_router(ref_layer, layer, data, groups, spec.router_ridge)))
    if spec.down:
        steps.append(("down", lambda: fit_down(layer, data, spec.ridge, spec.sweeps)))
    if spec.steps:
        steps.append(("adam", lambda: fit_adam(layer, data, spec.steps, spec.lr, spec.batch_tokens, spec.eval_every,
                                               spec.patience, spec.seed)))
    for name, fn in steps:
        before = _snapshot(layer, name)
        t0 = time.perf_counter()
        info = fn()
        seconds = time.perf_counter() - t0
        errs = block_errors(layer, data, fit=False)
        entry: dict[str, Any] = {"seconds": round(seconds, 3), **info, **{k: round(v, 6) for k, v in errs.items()}}
        if spec.revert_worse and errs["held"] > current * (1 + 1e-9):
            overwrite_block_tensors(layer, before)
            entry["reverted"] = True
        else:
            current = errs["held"]
        report[name] = entry
    report["start"] = {k: round(v, 6) for k, v in report["start"].items()}
    report["end_held"] = round(current, 6)
    return report


def heal_summary(spec: HealSpec, seconds: float, layers: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The report of a whole heal from `heal_block`'s per-layer reports (the in-memory walk's and the engine's)."""
    out: dict[str, Any] = {"spec": spec.model_dump(), "seconds": round(seconds, 2), **extra, "layers": layers}
    start = [v["start"]["held"] for v in layers.values()]
    end = [v["end_held"] for v in layers.values()]
    if start:
        out["mean_block_rel_error_held"] = {"before": round(sum(start) / len(start), 6),
                                            "after": round(sum(end) / len(end), 6)}
    return out
