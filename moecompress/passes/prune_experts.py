"""Pass `prune_experts`: drop whole experts, the same number in every MoE layer (vanilla-loadable)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from moecompress.arch.adapter import moe_layers
from moecompress.errors import UserError
from moecompress.heal.spec import HealOption, HealSpec
from moecompress.passes import criteria
from moecompress.passes.base import (
    ExpertCountConfig,
    LayerwisePass,
    PassContext,
    moe_layer_at,
    register_layerwise,
)
from moecompress.surgery import check_group_balance, keep_coupled, keep_experts, sync_config

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
        "layer on the healed block-output error (seeded by the criterion's set; implies heal), then that selection "
        "and every criterion's, each healed, compete on the held-out calibration KL, and layers swap in another "
        "candidate's set where that lowers it")
    beam: int = Field(1, ge=1, description="select reconstruct: beam width of the backward elimination (1 = greedy)")
    heal: HealOption = Field(None, description="after pruning, fit the kept experts and router to the original "
                             "layer outputs (true, or a mapping of heal settings)")

    @model_validator(mode="before")
    @classmethod
    def _reconstruct_heals(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("select") == "reconstruct":
            heal = data.get("heal")
            if heal in (None, True):
                data = {**data, "heal": HealSpec()}
            elif isinstance(heal, dict) and heal.get("auto"):  # the search heals: not a default it may drop
                data = {**data, "heal": {**heal, "auto": False}}
        return data

    @property
    def needs_stats_for(self) -> bool:
        return self.criterion != "random"


def _plan(ctx: PassContext) -> dict[str, Any]:
    """Checks that need every layer, and the statistics (streamed or cached) every layer's decision reads."""
    cfg: PruneExpertsConfig = ctx.config  # type: ignore[assignment]
    layers = moe_layers(ctx.model, ctx.adapter)
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
    # a coupled expert set (JetMoE's attention experts) is ranked by its own routing statistics, whatever criterion
    needs = cfg.criterion != "random" or cfg.protect_super_experts or ctx.adapter.coupled is not None
    stats = ctx.get_stats() if needs else None
    return {"experts": e, "n_keep": cfg.n_keep(e), "groups": ctx.adapter.num_groups(ctx.model.config), "stats": stats,
            "chosen": _reconstructed(ctx, cfg, layers, e, stats) if cfg.select == "reconstruct" else None}


def _criterion_keep(cfg: PruneExpertsConfig, layer: Any, e: int, n_keep: int, groups: int,
                    stats: Any) -> tuple[list[int], dict[str, Any]]:
    """The criterion's kept set for one layer, and what the report says about it."""
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
    return keep, info


# per-expert criteria whose kept sets compete with the reconstruct search in every layer
RIVAL_CRITERIA = ("reap", "ean", "easy_ep", "soft_frequency", "frequency")


def _reconstructed(ctx: PassContext, cfg: PruneExpertsConfig, layers: list[Any], e: int,
                   stats: Any) -> dict[int, tuple[list[int], dict[str, Any]]]:
    """`select: reconstruct`: every layer's kept set searched on the healed block-output error, seeded by the
    criterion's set (which competes with the search). Needs the whole model in memory (see `streams`)."""
    from moecompress.heal.run import calibration_batches, choose_whole_model, reconstruct_selection

    n_keep, groups = cfg.n_keep(e), ctx.adapter.num_groups(ctx.model.config)
    seeds, infos, rivals = {}, {}, {}
    for layer in layers:
        seeds[layer.index], infos[layer.index] = _criterion_keep(cfg, layer, e, n_keep, groups, stats)
        if stats is not None:  # every score criterion's subset competes with the search (cheap: sums already there)
            protect_i = infos[layer.index]["protected"]
            rivals[layer.index] = {
                c: criteria.select_by_score(criteria.expert_scores(stats.layers[layer.index], c), n_keep, groups,
                                            protect_i)
                for c in RIVAL_CRITERIA if c != cfg.criterion}
    protect = {i: info["protected"] for i, info in infos.items() if info["protected"]}
    batches = calibration_batches(ctx.get_calibration())
    spec = cfg.heal or HealSpec()
    chosen, search = reconstruct_selection(ctx.model, batches, n_keep, groups, spec, cfg.beam, seeds, protect,
                                           rivals=rivals)
    # the search and every criterion's whole selection, each healed, compete on the held-out calibration KL
    candidates = {"search": chosen, cfg.criterion: seeds}
    for c in RIVAL_CRITERIA:
        if c != cfg.criterion and all(c in rivals.get(i, {}) for i in chosen):
            candidates[c] = {i: rivals[i][c] for i in chosen}
    winner, final, measured = choose_whole_model(ctx.model, batches, candidates, spec)
    whole = {"winner": winner, **measured}
    return {i: (final[i], {**infos[i], "reconstruct": {**search[str(i)], "whole_model": whole}}) for i in chosen}


def _apply_layer(ctx: PassContext, plan: dict[str, Any], index: int, decoder_layer: Any) -> dict[str, Any] | None:
    """Rank this layer's experts by the criterion (or take the searched set) and keep `n_keep` of them."""
    cfg: PruneExpertsConfig = ctx.config  # type: ignore[assignment]
    layer = moe_layer_at(ctx, index)
    if layer is None:
        return None
    e, n_keep, groups, stats = plan["experts"], plan["n_keep"], plan["groups"], plan["stats"]
    if plan["chosen"] is not None:
        keep, info = plan["chosen"][layer.index]
    else:
        keep, info = _criterion_keep(cfg, layer, e, n_keep, groups, stats)
    check_group_balance(ctx.adapter, ctx.model.config, e, keep)
    keep_experts(layer, keep)
    info["kept"] = keep
    if ctx.adapter.coupled is not None:  # one count key sizes both sets: the coupled one is cut to the same count
        coupled, info["attention_experts"] = criteria.coupled_keep(plan["stats"].layers[layer.index], n_keep)
        keep_coupled(decoder_layer, ctx.adapter, coupled)
    return info


def _finish(ctx: PassContext, plan: dict[str, Any], per_layer: dict[int, dict[str, Any]]) -> dict[str, Any]:
    cfg: PruneExpertsConfig = ctx.config  # type: ignore[assignment]
    sync_config(ctx.model, ctx.adapter)
    kept = {str(i): info.pop("kept") for i, info in per_layer.items()}
    line = (criteria.coupled_summary(ctx.adapter.coupled.label, plan["experts"], plan["n_keep"])
            if ctx.adapter.coupled is not None else None)
    return {
        **({"coupled": line, "summary": line} if line else {}),
        "experts_before": plan["experts"],
        "experts_after": plan["n_keep"],
        "criterion": cfg.criterion,
        "kept": kept,
        "layers": {str(i): info for i, info in per_layer.items()},
    }


# the reconstruction search walks the original and a scratch copy side by side, in memory; heal runs inside the
# engine (engine/heal.py) and needs whole layers; every criterion alone only selects experts (NAEE reads expert
# outputs one expert at a time): chunkable
PRUNE_EXPERTS = LayerwisePass(plan=_plan, apply_layer=_apply_layer, finish=_finish,
                              streams=lambda cfg: cfg.select == "criterion",
                              chunks=lambda cfg: cfg.heal is None)
prune_experts = register_layerwise(PruneExpertsConfig, PRUNE_EXPERTS)
