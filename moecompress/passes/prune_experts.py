"""Pass `prune_experts`: drop whole experts, the same number in every MoE layer (vanilla-loadable)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from moecompress.arch.adapter import moe_layers
from moecompress.errors import UserError
from moecompress.heal.spec import HealOption, HealSpec
from moecompress.passes import criteria
from moecompress.passes.base import ExpertCountConfig, PassContext, register_pass
from moecompress.surgery import check_group_balance, keep_experts, sync_config

Criterion = Literal["frequency", "soft_frequency", "reap", "ean", "easy_ep", "naee", "random"]


class PruneExpertsConfig(ExpertCountConfig):
    """Remove a share of routed experts per layer, ranked by a criterion computed on calibration data."""

    name: ClassVar[str] = "prune_experts"
    criterion: Criterion = "reap"
    protect_super_experts: bool = False
    super_expert_factor: float = Field(10.0, gt=1)
    layers: list[int] | None = None
    seed: int = 0
    select: Literal["criterion", "reconstruct"] = Field(
        "criterion", description="criterion: keep the top-scoring experts; reconstruct: search the kept set per "
        "layer on the healed block-output error (seeded by the criterion's set; implies heal)")
    beam: int = Field(1, ge=1, description="select reconstruct: beam width of the backward elimination (1 = greedy)")
    heal: HealOption = Field(None, description="after pruning, fit the kept experts and router to the original "
                             "layer outputs (true, or a mapping of heal settings)")

    @model_validator(mode="before")
    @classmethod
    def _reconstruct_heals(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("select") == "reconstruct" and data.get("heal") in (None, True):
            data = {**data, "heal": HealSpec()}
        return data

    @property
    def needs_stats_for(self) -> bool:
        return self.criterion != "random"


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
    if cfg.select == "reconstruct":
        from moecompress.heal.run import calibration_batches, reconstruct_selection

        seeds = dict(kept)  # the criterion's own set competes with the search
        protect = {i: d["protected"] for i, d in ((int(k), v) for k, v in details.items()) if d["protected"]}
        chosen, search = reconstruct_selection(model, calibration_batches(ctx.get_calibration()), n_keep, groups,
                                               cfg.heal or HealSpec(), cfg.beam, seeds, protect)
        for idx, keep in chosen.items():
            check_group_balance(adapter, model.config, e, keep)
            details[str(idx)]["reconstruct"] = search[str(idx)]
            kept[idx] = keep
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

