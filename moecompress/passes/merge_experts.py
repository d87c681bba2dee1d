"""Pass `merge_experts`: merge groups of experts into one each, so the checkpoint really shrinks.

Public merging code (M-SMoE, HC-SMoE, REAP's baselines) keeps every router row and points several rows at
one merged weight: same file size, and a layout vanilla transformers cannot express. Here each group
becomes one expert in its anchor's slot, the router gets one row per group, and ``surgery.merge_into``
drops the other slots — the result has fewer experts in the config and reloads in vanilla transformers.

Steps per layer: group (msmoe | hc | kmeans | ream) → align each member's neurons to the anchor (Hungarian)
→ merge (freq | saliency | subspace) → router rows (dominant | average | refit) → surgery.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from moecompress.arch.adapter import MoEAdapter, MoELayer, moe_layers
from moecompress.arch.experts import ExpertView, ExpertWeights
from moecompress.calib.layers import BlockArgs
from moecompress.calib.stats import LayerStats
from moecompress.errors import UserError
from moecompress.heal.spec import HealOption
from moecompress.passes import criteria
from moecompress.passes import merging as M
from moecompress.passes.base import (
    ExpertCountConfig,
    LayerwisePass,
    PassContext,
    moe_layer_at,
    register_layerwise,
)
from moecompress.surgery import check_expert_count, keep_coupled, merge_into, sync_config

Method = Literal["msmoe", "hc", "kmeans", "ream"]
MergeRule = Literal["freq", "saliency", "subspace"]
RouterRule = Literal["dominant", "average", "refit"]

_SIGMOID_ROUTING = ("sigmoid_group_bias", "sigmoid_topk", "sigmoid_input_scale")
_LOGIT_BIAS = "bias"  # a router vector named `bias` is added to the logits (gpt-oss); others only steer choice


class MergeExpertsConfig(ExpertCountConfig):
    """Merge a share of routed experts per layer into the remaining ones (same count in every layer)."""

    name: ClassVar[str] = "merge_experts"
    # defaults: the best variant on the reference model at 25% and 50% removed (bench/merge_bench.py)
    method: Method = Field("ream", description="grouping: msmoe | hc | kmeans | ream")
    merge: MergeRule = Field("saliency", description="merge rule: freq | saliency | subspace")
    router: RouterRule = Field("refit", description="router row of a merged expert: dominant | average | refit")
    rank: int | None = Field(None, ge=1, description="subspace: rank of the shared basis per weight matrix")
    energy: float | None = Field(None, gt=0, le=1, description="subspace: keep singular values holding this energy")
    align: M.AlignMode = Field("both", description="neuron alignment before averaging: activation | weight | both | none")
    features: Literal["mean", "tokens"] = Field(
        "mean", description="hc/kmeans expert features: mean output over sampled tokens (HC-SMoE) or all per-token outputs")
    feature_tokens: int = Field(512, ge=16, description="sampled tokens used for expert-output features and alignment")
    group_size: int | None = Field(None, ge=2, description="ream: most experts one dominant may absorb (incl. itself)")
    refit_ridge: float = Field(1e-3, ge=0, description="refit: ridge strength towards the averaged rows")
    seed: int = 0
    heal: HealOption = Field(None, description="after merging, fit the merged experts and router to the original "
                             "layer outputs (true, or a mapping of heal settings)")

    @model_validator(mode="after")
    def _consistent(self) -> MergeExpertsConfig:
        if self.merge != "subspace" and (self.rank is not None or self.energy is not None):
            raise ValueError("rank/energy only apply to merge='subspace'")
        if self.rank is not None and self.energy is not None:
            raise ValueError("give rank or energy, not both")
        return self

    def check(self, adapter: MoEAdapter, hf_config: dict[str, Any]) -> None:
        super().check(adapter, hf_config)
        e = adapter.num_experts(hf_config)
        n_keep = self.n_keep(e)
        if self.group_size is not None:
            per_block = e // adapter.num_groups(hf_config)
            need = math.ceil(per_block / (n_keep // adapter.num_groups(hf_config)))
            if self.group_size < need:
                raise UserError(f"merge_experts: group_size {self.group_size} cannot hold {per_block} experts in "
                                f"{n_keep // adapter.num_groups(hf_config)} groups per routing block; use ≥ {need}")


def prob_kind(adapter: MoEAdapter) -> M.ProbKind:
    """Which probability the router's logits stand for (how merged probabilities add up)."""
    return "sigmoid" if adapter.routing in _SIGMOID_ROUTING else "softmax"


def router_logits(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Raw router logits [N, E] on block inputs (the additive router bias included where the family has one)."""
    w = layer.routed_router_weight.detach().double()  # extra router rows (shared gates, skip class) left out
    z = x.double() @ w.T
    bias = getattr(layer.router, _LOGIT_BIAS, None)
    if any(v.path == _LOGIT_BIAS for v in layer.adapter.router_vectors) and bias is not None:
        z = z + bias.detach().double()[: layer.num_experts]
    return z


def plan_groups(cfg: MergeExpertsConfig, ls: LayerStats, n_keep: int, n_groups: int,
                outputs: torch.Tensor | None) -> list[M.Group]:
    """The grouping method on one layer's statistics (and expert outputs on the sampled inputs)."""
    freq = ls.sums["freq"].double()
    if cfg.method == "msmoe":
        return M.group_msmoe(freq, ls.logit_similarity, n_keep, n_groups)
    assert outputs is not None
    features = outputs.mean(1) if cfg.features == "mean" else outputs.reshape(outputs.shape[0], -1)
    if cfg.method == "hc":
        return M.group_hc(features, freq, n_keep, n_groups)
    if cfg.method == "kmeans":
        return M.group_kmeans(features, freq, n_keep, n_groups, seed=cfg.seed)
    # REAM: how alike two experts act on the same tokens (per-token outputs) and how alike the router treats them
    token_sim = M.cosine_matrix(outputs.reshape(outputs.shape[0], -1))
    similarity = 0.5 * (token_sim + ls.logit_similarity.double())
    return M.group_ream(ls.reap.double(), similarity, n_keep, n_groups, cfg.group_size)


def merge_groups(cfg: MergeExpertsConfig, w: ExpertWeights, groups: list[M.Group], ls: LayerStats,
                 acts: torch.Tensor | None) -> tuple[ExpertWeights | None, list[int], list[dict[str, Any]]]:
    """Align and merge each group's members; returns the merged experts of the groups with more than one member
    (stacked), those groups' positions, and per-group details. A group of one is its anchor as is (averaging
    one member with coefficient 1 is the identity), so it is neither computed nor copied."""
    freq = ls.sums["freq"].double()
    weight_src = ls.sums["reap_sum"].double() if cfg.merge == "saliency" else freq
    merged: list[ExpertWeights] = []
    replaced: list[int] = []
    info: list[dict[str, Any]] = []
    for j, g in enumerate(groups):
        coef = M.normalise(weight_src[g.members])
        entry: dict[str, Any] = {"members": g.members, "coef": [round(float(c), 4) for c in coef]}
        info.append(entry)
        if len(g.members) == 1:
            continue
        anchor = w.select(g.anchor)
        members = [anchor]
        for m in g.members[1:]:
            perm = M.align_permutation(anchor, w.select(m), acts[g.anchor] if acts is not None else None,
                                       acts[m] if acts is not None else None, cfg.align)
            members.append(M.permute_neurons(w.select(m), perm))
        stacked = M.stack(members)
        if cfg.merge == "subspace":
            one, ranks = M.merge_subspace(stacked, coef, cfg.rank, cfg.energy)
            entry["ranks"] = ranks
        else:
            one = M.merge_average(stacked, coef)
        merged.append(one)
        replaced.append(j)
    return (M.stack(merged) if merged else None), replaced, info


def router_for(cfg: MergeExpertsConfig, layer: MoELayer, groups: list[M.Group], ls: LayerStats,
               sample: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """Router rows [n, H] and router vectors for the merged experts, under the chosen rule."""
    weight = layer.routed_router_weight.detach()
    freq = ls.sums["freq"].double()
    coef = [M.normalise(freq[g.members]) for g in groups]
    anchors = [g.anchor for g in groups]
    vec_coef = None if cfg.router == "dominant" else coef
    vectors: dict[str, torch.Tensor] = {}
    for vec in layer.adapter.router_vectors:
        owner = layer.router
        for part in vec.path.split("."):
            owner = getattr(owner, part, None)
            if owner is None:
                break
        if isinstance(owner, torch.Tensor):
            vectors[vec.path] = M.vector_merge(owner.detach(), vec.axis, groups, vec_coef)
    info: dict[str, Any] = {}
    if cfg.router == "dominant":
        return weight[anchors].clone(), vectors, info
    rows = M.router_average(weight, groups, coef)
    if cfg.router == "average":
        return rows, vectors, info
    if sample is None or sample.shape[0] == 0:
        raise UserError("router='refit' needs sampled layer inputs; recollect statistics with sample_tokens > 0 "
                        "or use --router average")
    kind = prob_kind(layer.adapter)
    x = sample.double()
    avg_bias = vectors.get(_LOGIT_BIAS)
    new_rows, new_bias, targets = M.refit_to_groups(x, router_logits(layer, x), groups, rows, kind, cfg.refit_ridge,
                                                    init_bias=avg_bias)
    if new_bias is not None:
        vectors[_LOGIT_BIAS] = new_bias

    def logits(r: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return x @ r.double().T + (b.double() if b is not None else 0)

    info["refit_rel_error"] = round(_target_error(logits(new_rows, new_bias), targets, kind), 5)
    info["average_rel_error"] = round(_target_error(logits(rows, avg_bias), targets, kind), 5)
    return new_rows, vectors, info


def _target_error(fitted: torch.Tensor, targets: torch.Tensor, kind: str) -> float:
    if kind == "softmax":  # only differences between groups matter
        fitted = fitted - fitted.mean(1, keepdim=True)
        targets = targets - targets.mean(1, keepdim=True)
    return float((fitted - targets).pow(2).sum() / targets.pow(2).sum().clamp_min(1e-30))


@torch.no_grad()
def block_output(layer: MoELayer, x: torch.Tensor, call: BlockArgs | None = None) -> torch.Tensor:
    """The MoE block's output on tokens x [N, H] (shared experts included); `call`: the block's other arguments
    for these tokens, where it takes any (token ids of hash-routed layers, state from the layer below)."""
    if layer.hash_routed and (call is None or not call.per_token):
        raise UserError(f"layer {layer.index} of {layer.adapter.model_type} routes by token id (a hash table), so its "
                        "output on sampled hidden states is undefined; reconstruction-based steps cannot run on it")
    dtype = layer.experts.down_proj.dtype  # the block's dtype (DeepSeek-V3 keeps its router in float32)
    if not layer.adapter.block_attr:  # the decoder layer is the block (gemma-4): routed output alone
        from moecompress.arch.discover import routed_output

        router = layer.block.get_submodule(layer.adapter.router_attr.split(".")[0])
        return routed_output(router, layer.experts, x.to(dtype)).reshape(x.shape[0], -1).double()
    args, kwargs = call.batched() if call is not None else ((), {})
    out = layer.block(x.to(dtype)[None], *args, **kwargs)
    if isinstance(out, tuple):
        out = out[0]
    return out.reshape(x.shape[0], -1).double()


@torch.no_grad()
def expert_inputs(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """What the routed experts receive for block inputs x [N, H]: x itself, or (latent MoEs such as Muse Spark,
    whose block projects tokens to a narrower width first) the experts' call argument while the block runs on x."""
    from moecompress.arch.discover import _hidden_of

    if _hidden_of(layer.experts) == x.shape[-1]:
        return x
    seen: list[torch.Tensor] = []
    hook = layer.experts.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        block_output(layer, x)
    finally:
        hook.remove()
    return seen[0].reshape(x.shape[0], -1).to(x.dtype)


def _plan(ctx: PassContext) -> dict[str, Any]:
    cfg: MergeExpertsConfig = ctx.config  # type: ignore[assignment]
    layers = moe_layers(ctx.model, ctx.adapter)
    e = layers[0].num_experts
    n_keep = cfg.n_keep(e)
    check_expert_count(ctx.adapter, ctx.model.config, n_keep)
    return {"experts": e, "n_keep": n_keep, "n_groups": ctx.adapter.num_groups(ctx.model.config),
            "stats": ctx.get_stats()}


def _apply_layer(ctx: PassContext, plan: dict[str, Any], index: int, decoder_layer: Any) -> dict[str, Any] | None:
    """Group this layer's experts, merge each group into its anchor and give the router the merged rows (and cut a
    coupled expert set, JetMoE's attention experts, to the same count by its own routing statistics)."""
    cfg: MergeExpertsConfig = ctx.config  # type: ignore[assignment]
    layer = moe_layer_at(ctx, index)
    if layer is None:
        return None
    adapter, n_keep, n_groups = ctx.adapter, plan["n_keep"], plan["n_groups"]
    needs_sample = cfg.method != "msmoe" or cfg.router == "refit" or cfg.align == "activation"
    ls = plan["stats"].layers[layer.index]
    sample = ls.sample
    if needs_sample and (sample is None or sample.shape[0] == 0):
        raise UserError(f"merge method {cfg.method!r} / router {cfg.router!r} / align {cfg.align!r} needs "
                        "sampled layer inputs; recollect statistics with sample_tokens > 0")
    if sample is not None:
        sample = sample.float().to(layer.router.weight.device)  # stored in the activations' dtype
    x_feat = sample[: cfg.feature_tokens] if sample is not None and sample.shape[0] else None
    w = ExpertView(layer).get_all(copy=False)  # views: merging reads a few experts, surgery replaces the tensors
    outputs = acts = None
    if x_feat is not None and (cfg.method != "msmoe" or cfg.align in ("activation", "both")):
        outputs, acts = M.expert_outputs(layer.experts, adapter.layout, w, expert_inputs(layer, x_feat))
    # hash-routed layers (DeepSeek-V4) choose experts by token id, which sampled hidden states do not carry
    before = block_output(layer, x_feat) if x_feat is not None and not layer.hash_routed else None
    groups = plan_groups(cfg, ls, n_keep, n_groups, outputs)
    merged, replaced, group_info = merge_groups(cfg, w, groups, ls,
                                                acts if cfg.align in ("activation", "both") else None)
    rows, vectors, router_info = router_for(cfg, layer, groups, ls, sample)
    del w
    merge_into(layer, [g.anchor for g in groups], merged, rows, vectors, replaced)
    info: dict[str, Any] = {"groups": group_info, **router_info}
    if adapter.coupled is not None:  # attention experts: pruned by their own router's gate mass, never merged
        coupled, info["attention_experts"] = criteria.coupled_keep(ls, n_keep)
        keep_coupled(decoder_layer, adapter, coupled)
    if before is not None:
        after = block_output(layer, x_feat)
        info["block_rel_error"] = round(float((after - before).pow(2).sum() / before.pow(2).sum().clamp_min(1e-30)), 5)
    return info


def _finish(ctx: PassContext, plan: dict[str, Any], per_layer: dict[int, dict[str, Any]]) -> dict[str, Any]:
    cfg: MergeExpertsConfig = ctx.config  # type: ignore[assignment]
    sync_config(ctx.model, ctx.adapter)
    e, n_keep = plan["experts"], plan["n_keep"]
    details = {str(i): info for i, info in per_layer.items()}
    errors = [d["block_rel_error"] for d in details.values() if "block_rel_error" in d]
    summary = (f"merged {e}→{n_keep} experts per layer ({cfg.method}, {cfg.merge}, router {cfg.router})"
               + (f"; mean block output rel. error {sum(errors) / len(errors):.4f}" if errors else ""))
    coupled = ({"coupled": criteria.coupled_summary(ctx.adapter.coupled.label, e, n_keep)}
               if ctx.adapter.coupled is not None else {})
    return {
        **coupled, "summary": summary + (f"; {coupled['coupled']}" if coupled else ""),
        "experts_before": e,
        "experts_after": n_keep,
        "method": cfg.method,
        "merge": cfg.merge,
        "router": cfg.router,
        "layers": details,
    }


MERGE_EXPERTS = LayerwisePass(plan=_plan, apply_layer=_apply_layer, finish=_finish)  # heal: engine/heal.py
merge_experts = register_layerwise(MergeExpertsConfig, MERGE_EXPERTS)
