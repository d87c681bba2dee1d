"""What a pass is: a validated config plus a function that changes a loaded model in memory.

The runner owns everything around it (loading, statistics cache, writing, evaluation, reports), so a pass
only decides and calls ``moecompress.surgery``. ``check`` runs on config.json alone, before any weight loads.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moecompress.arch.adapter import MoEAdapter
from moecompress.errors import UserError

# The option of every pass that writes weights: what happens to the multi-token-prediction layers the checkpoint
# ships (moecompress.io.mtp). keep: compressed consistently (same expert count/width as config.json) or copied;
# drop: removed, their count set to 0.
MTPChoice = Annotated[Literal["keep", "drop"], Field(
    description="multi-token-prediction layers: keep (reduced to the same expert count and width as the decoder, "
    "or copied unchanged; quantize keeps them in high precision) | drop (removed, count set to 0)")]


class PassConfig(BaseModel):
    """Base of every pass config: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: ClassVar[str] = ""
    needs_stats: ClassVar[bool] = True

    def check(self, adapter: MoEAdapter, hf_config: dict[str, Any]) -> None:
        """Raise UserError (with the fix) if this pass cannot apply to a model with this config."""


class ExpertCountConfig(PassConfig):
    """Shared by passes that leave fewer experts per layer: exactly one of `ratio` / `keep`, checked up front."""

    ratio: float | None = Field(None, gt=0, lt=1, description="share of experts removed in every MoE layer")
    keep: int | None = Field(None, ge=1, description="experts left per layer (instead of ratio)")
    mtp: MTPChoice = "keep"

    @model_validator(mode="after")
    def _one_size(self) -> ExpertCountConfig:
        if (self.ratio is None) == (self.keep is None):
            raise ValueError("give exactly one of ratio or keep")
        return self

    def n_keep(self, num_experts: int) -> int:
        if self.keep is not None:
            return self.keep
        assert self.ratio is not None
        return num_experts - int(math.floor(num_experts * self.ratio + 1e-9))

    def planned_config(self, adapter: MoEAdapter, hf_config: dict[str, Any]) -> dict[str, Any]:
        n = self.n_keep(adapter.num_experts(hf_config))
        return adapter.with_counts(hf_config, n)

    def check(self, adapter: MoEAdapter, hf_config: dict[str, Any]) -> None:
        from moecompress.surgery import check_expert_count

        e = adapter.num_experts(hf_config)
        n_keep = self.n_keep(e)
        try:
            check_expert_count(adapter, hf_config, n_keep)
        except UserError as exc:
            what = f"ratio {self.ratio} leaves {n_keep}" if self.ratio is not None else f"keep {n_keep}"
            raise UserError(f"{self.name}: {what} of {e} experts: {exc}") from None


@dataclass
class PassContext:
    """Everything a pass may use; statistics and calibration are produced lazily by the runner."""

    model: Any
    tokenizer: Any
    adapter: MoEAdapter
    config: PassConfig
    get_stats: Callable[[], Any]
    get_calibration: Callable[[], Any]
    console: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    # The engine streams these; None means "the model is in memory": iterate it / run the in-memory collector.
    layer_visitor: Callable[[Callable[[int, Any], Any], bool], dict[int, Any]] | None = None
    get_grad_stats: Callable[[int], Any] | None = None  # batch size → HEAPr gradient statistics

    def for_each_layer(self, fn: Callable[[int, Any], Any], weights: bool = True) -> dict[int, Any]:
        """{index: fn(index, decoder_layer)} over every decoder layer, its weights in memory when `weights`."""
        if self.layer_visitor is not None:
            return self.layer_visitor(fn, weights)
        from moecompress.arch.adapter import decoder_layers

        return {i: fn(i, layer) for i, layer in enumerate(decoder_layers(self.model))}


PassFn = Callable[[PassContext], dict[str, Any]]


@dataclass
class LayerwisePass:
    """The engine's contract for a pass: global decisions first, then surgery on one decoder layer at a time.

    ``plan(ctx)`` decides whatever needs every layer (from statistics; weights are not available).
    ``apply_layer(ctx, plan, index, decoder_layer)`` decides and applies surgery to that layer only, with its
    weights in memory, and returns the layer's report entry (or None for layers it leaves alone).
    ``finish(ctx, plan, per_layer)`` updates the config and builds the pass report. The pass never sees
    shards, devices or memory budgets; the in-memory path (``run_layerwise``) calls the same functions.

    Passes that observe calibration activations layer by layer (GPTQ) also give ``calibration(ctx, plan)`` (the
    batches), ``observe(ctx, plan, index, decoder_layer)`` (a context manager active while every batch runs
    through the layer before ``apply_layer``; it yields a per-batch callback ``(b) -> None``) and
    ``propagate=True`` when the next layer must see this layer's *compressed* outputs. Passes that store tensors
    differently from ``save_pretrained`` give ``emit(ctx, plan, index, on_disk)`` (rewrite one layer's on-disk
    tensors) and ``config_update(ctx, plan, shapes)`` (keys added to config.json, from the written shapes).
    """

    plan: Callable[[PassContext], Any]
    apply_layer: Callable[[PassContext, Any, int, Any], dict[str, Any] | None]
    finish: Callable[[PassContext, Any, dict[int, dict[str, Any]]], dict[str, Any]]
    calibration: Callable[[PassContext, Any], list[Any]] | None = None
    observe: Callable[[PassContext, Any, int, Any], Any] | None = None
    propagate: bool = False
    emit: Callable[[PassContext, Any, int, dict[str, Any]], dict[str, Any]] | None = None
    config_update: Callable[[PassContext, Any, dict[str, list[int]]], dict[str, Any]] | None = None
    streams: Callable[[Any], bool] = lambda cfg: True  # False: this config needs the whole model in memory
    # True: apply_layer only selects experts (surgery.keep_experts) and reads weights through stored_expert_forward,
    # so a layer larger than the budget can run with its experts read in chunks (engine/chunks.py)
    chunks: Callable[[Any], bool] = lambda cfg: False


def observe_and_apply(lp: LayerwisePass, ctx: PassContext, plan: Any, index: int, layer: Any, flow: Any,
                      around_apply: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext) -> Any:
    """One layer of a pass: observe the calibration flow (if any), apply, propagate. Shared by both paths.
    `around_apply`: a context for the apply step alone (the engine's allocation rule for rewriting weights)."""
    from moecompress.engine.loop import run_layer

    if flow is not None and lp.observe is not None:
        with lp.observe(ctx, plan, index, layer) as before_batch:
            run_layer(flow, index, layer, before_batch=before_batch, update=not lp.propagate)
    with around_apply():
        info = lp.apply_layer(ctx, plan, index, layer)
    if flow is not None and (lp.propagate or lp.observe is None):
        run_layer(flow, index, layer)
    return info


def run_layerwise(lp: LayerwisePass, ctx: PassContext) -> dict[str, Any]:
    """A layerwise pass on a model already in memory: the same plan/observe/apply/finish the engine streams."""
    from types import SimpleNamespace

    from moecompress.arch.adapter import decoder_layers
    from moecompress.engine.loop import start_flow

    plan = lp.plan(ctx)
    flow = None
    if lp.calibration is not None:
        model = ctx.model
        flow = start_flow(SimpleNamespace(model=model, device=model.device, dtype=model.dtype),
                          lp.calibration(ctx, plan), budget=1 << 62)
    per_layer: dict[int, dict[str, Any]] = {}
    try:
        for i, layer in enumerate(decoder_layers(ctx.model)):
            info = observe_and_apply(lp, ctx, plan, i, layer, flow)
            if info is not None:
                per_layer[i] = info
    finally:
        if flow is not None:
            flow.close()
    return lp.finish(ctx, plan, per_layer)


@dataclass
class RegisteredPass:
    config_cls: type[PassConfig]
    fn: PassFn
    layerwise: LayerwisePass | None = None


PASSES: dict[str, RegisteredPass] = {}


def register_pass(config_cls: type[PassConfig]) -> Callable[[PassFn], PassFn]:
    def deco(fn: PassFn) -> PassFn:
        PASSES[config_cls.name] = RegisteredPass(config_cls=config_cls, fn=fn)
        return fn

    return deco


def register_layerwise(config_cls: type[PassConfig], lp: LayerwisePass) -> PassFn:
    """Register a pass by its layerwise form; its in-memory function is ``run_layerwise`` over the same parts."""

    def fn(ctx: PassContext) -> dict[str, Any]:
        return run_layerwise(lp, ctx)

    fn.__name__ = config_cls.name
    PASSES[config_cls.name] = RegisteredPass(config_cls=config_cls, fn=fn, layerwise=lp)
    return fn


def moe_layer_at(ctx: PassContext, index: int) -> Any:
    """The MoE view of decoder layer `index`, or None for a dense layer."""
    from moecompress.arch.adapter import moe_layers

    return next((ly for ly in moe_layers(ctx.model, ctx.adapter) if ly.index == index), None)


def get_pass(name: str) -> RegisteredPass:
    from moecompress.passes import load_builtin_passes

    load_builtin_passes()
    if name not in PASSES:
        close = difflib.get_close_matches(name, list(PASSES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown pass {name!r}{hint} Known passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]
