"""Pass `prune_experts`: drop whole experts, the same number in every MoE layer (vanilla-loadable)."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from moecompress.arch.adapter import MoEAdapter, moe_layers
from moecompress.errors import UserError
from moecompress.passes import criteria
from moecompress.passes.base import PassConfig, PassContext, register_pass
from moecompress.surgery import check_expert_count, check_group_balance, keep_experts, sync_config

Criterion = Literal["frequency", "soft_frequency", "reap", "ean", "easy_ep", "naee", "random"]


class PruneExpertsConfig(PassConfig):
    """Remove a share of routed experts per layer, ranked by a criterion computed on calibration data."""

    name: ClassVar[str] = "prune_experts"
    ratio: float | None = Field(None, gt=0, lt=1, description="share of experts to remove in every layer")
    keep: int | None = Field(None, ge=1, description="experts to keep per layer (instead of ratio)")
    criterion: Criterion = "reap"
    protect_super_experts: bool = False
    super_expert_factor: float = Field(10.0, gt=1)
    layers: list[int] | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _one_size(self) -> PruneExpertsConfig:
        if (self.ratio is None) == (self.keep is None):
            raise ValueError("give exactly one of ratio or keep")
        return self

    @property
    def needs_stats_for(self) -> bool:
        return self.criterion != "random"

    def n_keep(self, num_experts: int) -> int:
        if self.keep is not None:
            return self.keep
        assert self.ratio is not None
        return num_experts - int(math.floor(num_experts * self.ratio + 1e-9))

    def planned_config(self, adapter: MoEAdapter, hf_config: dict[str, Any]) -> dict[str, Any]:
        n = self.n_keep(adapter.num_experts(hf_config))
        return {**hf_config, **{k: n for k in adapter.count_keys}}

    def check(self, adapter: MoEAdapter, hf_config: dict[str, Any]) -> None:
        e = adapter.num_experts(hf_config)
        n_keep = self.n_keep(e)
        try:
            check_expert_count(adapter, hf_config, n_keep)
        except UserError as exc:
            what = f"ratio {self.ratio} leaves {n_keep}" if self.ratio is not None else f"keep {n_keep}"
            raise UserError(f"prune_experts: {what} of {e} experts: {exc}") from None


@register_pass(PruneExpertsConfig)
def prune_experts(ctx: PassContext) -> dict[str, Any]:
    cfg: PruneExpertsConfig = ctx.config  # type: ignore[assignment]
    model, adapter = ctx.model, ctx.adapter
    layers = moe_layers(model, adapter)
    if cfg.layers is not None:
        chosen = set(cfg.layers)
        unknown = chosen - {layer.index for layer in layers}
        if unknown:
            raise UserError(f"--layers {sorted(unknown)} are not MoE layers; MoE layers are {[ly.index for ly in layers]}")
        if chosen != {layer.index for layer in layers}:
            raise UserError(
                "pruning only some layers leaves different expert counts per layer, which vanilla transformers "
                "cannot load (one count per config). List every MoE layer, or drop --layers."
            )
    e = layers[0].num_experts
    n_keep = cfg.n_keep(e)
    groups = adapter.num_groups(model.config)
    stats = ctx.get_stats() if cfg.criterion != "random" or cfg.protect_super_experts else None
    kept: dict[int, list[int]] = {}
    details: dict[str, Any] = {}
    for layer in layers:
        protect = (criteria.super_experts(stats.layers[layer.index], cfg.super_expert_factor)
                   if cfg.protect_super_experts and stats is not None else [])
        if len(protect) > n_keep:
            raise UserError(f"layer {layer.index} has {len(protect)} super experts but only {n_keep} are kept")
        info: dict[str, Any] = {"protected": protect}
        if cfg.criterion == "random":
            keep = criteria.random_keep(e, n_keep, groups, cfg.seed, layer.index)
        elif cfg.criterion == "naee":
            keep, search = criteria.naee_keep(layer, stats.layers[layer.index], n_keep, groups, protect=protect)
            info.update(search)
        else:
            scores = criteria.expert_scores(stats.layers[layer.index], cfg.criterion)
            keep = criteria.select_by_score(scores, n_keep, groups, protect)
            info["scores"] = [round(float(s), 6) for s in scores]
        check_group_balance(adapter, model.config, e, keep)
        kept[layer.index] = keep
        details[str(layer.index)] = info
    for layer in layers:
        keep_experts(layer, kept[layer.index])
    sync_config(model, adapter)
    return {
        "experts_before": e,
        "experts_after": n_keep,
        "criterion": cfg.criterion,
        "kept": {str(k): v for k, v in kept.items()},
        "layers": details,
    }

