"""Pass `prune_atomic`: remove intermediate neurons ("atomic experts") of routed experts.

An atomic expert is neuron k of expert i: row k of gate/up, column k of down. Criteria (higher = keep):

- ``heapr``: ``E[a_k²] · w_kᵀ M w_k`` — a second-order (Fisher) estimate of the loss increase when the
  neuron is removed, from one backward pass (``moecompress.calib.gradients``, projected form, no H×H).
- ``camera``: ``‖w_k‖² · E[(g·a_k)²]`` — first-order output energy, from the forward statistics only.
- ``magnitude``: ``‖gate_k‖·‖up_k‖·‖down_k‖`` (no data); ``random``: baseline.

Layouts: ``uniform`` keeps every expert's own top neurons at one width for the whole model (what vanilla
transformers can load); ``masked`` writes a selection as zeros in same-shape tensors, so a *globally* ranked,
non-uniform selection can be measured. Both always report what the global ranking would keep per expert.
Expert pruning (``expert_ratio``/``expert_keep``) can run first in the same pass: one checkpoint, one report.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from moecompress.arch.adapter import MoEAdapter, MoELayer, decoder_layers, moe_layers
from moecompress.arch.experts import ExpertView
from moecompress.calib.gradients import (
    GradStats,
    LayerGrad,
    batch_key,
    collect_grad_sharded,
    collect_gradient_stats,
)
from moecompress.calib.stats import LayerStats, Stats
from moecompress.dist import world
from moecompress.errors import UserError
from moecompress.heal.spec import HealOption
from moecompress.passes.base import (
    LayerwisePass,
    MTPChoice,
    PassConfig,
    PassContext,
    moe_layer_at,
    register_layerwise,
)
from moecompress.passes.prune_experts import Criterion as ExpertCriterion
from moecompress.passes.prune_experts import PruneExpertsConfig, prune_experts
from moecompress.surgery import mask_neurons, shrink_neurons, sync_config

AtomicCriterion = Literal["heapr", "camera", "magnitude", "random"]
ATOMIC_CRITERIA: tuple[str, ...] = ("heapr", "camera", "magnitude", "random")


class PruneAtomicConfig(PassConfig):
    """Remove a share of the routed experts' intermediate neurons, ranked by an atomic-expert criterion."""

    name: ClassVar[str] = "prune_atomic"
    neuron_ratio: float = Field(gt=0, lt=1, description="share of atomic experts (expert neurons) to remove")
    criterion: AtomicCriterion = "heapr"
    layout: Literal["uniform", "masked"] = "uniform"
    ranking: Literal["per_expert", "global"] | None = Field(
        None, description="per_expert: each expert keeps its own top neurons (same width everywhere); global: one "
        "ranking over the whole model (uneven widths, masked layout only). Default: per_expert for uniform, "
        "global for masked.")
    frequency_weighted: bool = Field(
        True, description="global ranking compares expected loss per calibration token (rarely routed experts "
        "matter less); False compares per routed token.")
    expert_ratio: float | None = Field(None, gt=0, lt=1, description="first remove this share of whole experts")
    expert_keep: int | None = Field(None, ge=1, description="first keep this many experts per layer")
    expert_criterion: ExpertCriterion = "reap"
    batch_size: int = Field(4, ge=1, description="sequences per forward+backward (heapr); memory, not results")
    checkpoint_layers: bool = Field(True, description="recompute layers in backward: autograd holds one layer")
    width_multiple: int = Field(8, ge=1, description="round the kept width to a multiple of this: transformers' "
                                "default grouped_mm experts kernel needs rows of 16 bytes (8 bf16 / 4 fp32 values)")
    seed: int = 0
    mtp: MTPChoice = "keep"
    heal: HealOption = Field(None, description="after pruning, fit the kept experts and router to the original "
                             "layer outputs (true, or a mapping of heal settings)")

    @model_validator(mode="after")
    def _consistent(self) -> PruneAtomicConfig:
        if self.expert_ratio is not None and self.expert_keep is not None:
            raise ValueError("give at most one of expert_ratio or expert_keep")
        if self.layout == "uniform" and self.ranking == "global":
            raise ValueError("a global ranking gives experts different widths, which vanilla transformers cannot "
                             "load; use layout: masked to measure it, or ranking: per_expert")
        return self

    @property
    def effective_ranking(self) -> str:
        return self.ranking or ("per_expert" if self.layout == "uniform" else "global")

    def expert_config(self) -> PruneExpertsConfig | None:
        if self.expert_ratio is None and self.expert_keep is None:
            return None
        return PruneExpertsConfig(ratio=self.expert_ratio, keep=self.expert_keep, criterion=self.expert_criterion,
                                  seed=self.seed)

    def new_width(self, width: int) -> int:
        """Kept neurons per expert: the requested share, rounded to `width_multiple` (at least one multiple)."""
        m = self.width_multiple
        kept = int(round(width * (1 - self.neuron_ratio) / m)) * m
        return min(max(kept, m), width)

    def check(self, adapter: MoEAdapter, hf_config: dict[str, Any]) -> None:
        width = adapter.expert_width(hf_config)
        m = self.width_multiple
        if self.new_width(width) >= width:
            if width <= m:
                raise UserError(f"prune_atomic: experts are {width} neurons wide, not more than width_multiple={m}; "
                                f"set width_multiple below {width} (grouped_mm needs 16-byte rows: 4 fp32 values)")
            raise UserError(f"prune_atomic: neuron ratio {self.neuron_ratio} of {width} neurons rounds to no "
                            f"reduction at width_multiple={m}; use a neuron ratio ≥ {m / 2 / width:.4g}")
        if self.criterion == "heapr" and adapter.routing == "sigmoid_input_scale":
            raise UserError(f"prune_atomic: heapr needs gradients at each routed expert's output, which "
                            f"{adapter.model_type} does not expose (experts run densely on gate-scaled inputs); "
                            "use --criterion camera or magnitude")
        if self.layout == "uniform" and adapter.width_key == "intermediate_size":
            from moecompress.arch.layers import layer_pattern

            if any(kind.endswith("/dense") for kind in layer_pattern(hf_config).layers):
                raise UserError(f"prune_atomic: {adapter.model_type} sizes its dense MLP layers and its routed "
                                "experts with one key (intermediate_size), so narrower experts would not reload; "
                                "use --layout masked")
        sub = self.expert_config()
        if sub is not None:
            sub.check(adapter, hf_config)

    def planned_config(self, adapter: MoEAdapter, hf_config: dict[str, Any]) -> dict[str, Any]:
        sub = self.expert_config()
        cfg = sub.planned_config(adapter, hf_config) if sub is not None else dict(hf_config)
        if self.layout == "uniform":
            cfg = json.loads(json.dumps(cfg))  # the width may sit in a nested text_config: change a copy
            adapter.set_width(cfg, self.new_width(adapter.expert_width(hf_config)))
        return cfg


# ---- scores (pure decisions on statistics) -------------------------------------------------------------
def heapr_scores(lg: LayerGrad, frequency_weighted: bool = True) -> torch.Tensor:
    """[E, I]: E_routed[a²] · wᵀMw, M averaged per calibration token (or per routed token)."""
    freq = lg.freq.clamp_min(1)[:, None]
    denom = max(lg.n_tokens, 1) if frequency_weighted else freq
    return (lg.act_sq / freq) * (lg.proj_sq / denom)


def heapr_scores_explicit(lg: LayerGrad, down: torch.Tensor, frequency_weighted: bool = True) -> torch.Tensor:
    """Same score from the explicit M (``explicit_layers``): diag(Wᵀ M W) per expert; `down` is [E, H, I]."""
    if lg.m_sum is None:
        raise UserError("explicit HEAPr scores need M: collect with explicit_layers including this layer")
    d = down.double()
    quad = torch.einsum("ehi,ehg,egi->ei", d, lg.m_sum, d)
    freq = lg.freq.clamp_min(1)[:, None]
    denom = max(lg.n_tokens, 1) if frequency_weighted else freq
    return (lg.act_sq / freq) * (quad / denom)


def camera_scores(ls: LayerStats, down: torch.Tensor, frequency_weighted: bool = True) -> torch.Tensor:
    """[E, I]: ‖w_k‖² · E[(g a_k)²] — energy each neuron puts into the gated output (no backward)."""
    denom = max(ls.n_tokens, 1) if frequency_weighted else ls.sums["freq"].clamp_min(1)[:, None]
    return down.double().pow(2).sum(1) * ls.sums["act_sq_gated"] / denom


def magnitude_scores(layer: MoELayer) -> torch.Tensor:
    w = ExpertView(layer).get_all()
    gate = w.gate.double().norm(dim=2) if w.gate is not None else 1.0
    return gate * w.up.double().norm(dim=2) * w.down.double().norm(dim=1)


def random_scores(shape: tuple[int, ...], seed: int, key: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 100_003 + key)
    return torch.rand(shape, generator=gen, dtype=torch.float64)


def _mlp_magnitude(mlp: torch.nn.Module) -> torch.Tensor:
    return (mlp.gate_proj.weight.detach().double().norm(dim=1) * mlp.up_proj.weight.detach().double().norm(dim=1)
            * mlp.down_proj.weight.detach().double().norm(dim=0))


# ---- selections ---------------------------------------------------------------------------------------
def _top_mask(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool mask of the n_keep highest scores of a 1-D tensor (ties: lower index wins, deterministic)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:n_keep]
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order] = True
    return mask


def per_expert_selection(scores: torch.Tensor, new_width: int) -> torch.Tensor:
    """[E, I] bool: each expert keeps its own `new_width` best neurons."""
    return torch.stack([_top_mask(row, new_width) for row in scores])


def global_selection(scores: dict[int, torch.Tensor], n_keep: int) -> dict[int, torch.Tensor]:
    """One ranking over every (layer, expert, neuron); keeps the `n_keep` best, widths come out uneven."""
    keys = sorted(scores)
    flat = torch.cat([scores[k].reshape(-1) for k in keys])
    mask = _top_mask(flat, n_keep)
    out, start = {}, 0
    for k in keys:
        n = scores[k].numel()
        out[k] = mask[start : start + n].reshape(scores[k].shape)
        start += n
    return out


def shared_selection(layer: MoELayer, width: int, new_width: int, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kept neurons of coupled shared experts: the width `shrink_neurons` requires, best `scores` first."""
    out: dict[str, torch.Tensor] = {}
    if not layer.adapter.shared_width_coupled:
        return out
    for name, mlp in layer.shared():
        if not hasattr(mlp, "gate_proj") or name not in scores:
            continue
        target = new_width * (mlp.gate_proj.weight.shape[0] // width)
        out[name] = torch.nonzero(_top_mask(scores[name], target)).flatten()
    return out


# ---- statistics ---------------------------------------------------------------------------------------
def gradient_stats(ctx: PassContext, cfg: PruneAtomicConfig, *, cacheable: bool) -> GradStats:
    """HEAPr statistics for the in-memory model; cached on disk when the model is an unmodified checkpoint."""
    from moecompress.eval import checkpoint_fingerprint as model_fingerprint
    from moecompress.io.locations import default_cache_root

    calib = ctx.get_calibration()
    cache_dir = None
    src = Path(str(getattr(ctx.model.config, "_name_or_path", "") or ""))
    if cacheable and (src / "config.json").is_file():
        key = f"{model_fingerprint(src)}-{batch_key(calib.input_ids, calib.attention_mask)}"
        cache_dir = default_cache_root() / "grad" / key
        if world().all_true(GradStats.exists(cache_dir)):  # every rank takes the same branch
            if ctx.console:
                ctx.console.print(f"[dim]gradient statistics: cache hit {cache_dir}[/]")
            gs = GradStats.load(cache_dir)
            gs.meta["cache"] = "hit"
            return gs
    if ctx.get_grad_stats is not None:  # the engine: forward sweep + streamed backward, one layer at a time
        gs = ctx.get_grad_stats(cfg.batch_size)
        gs.meta["tokens"] = calib.n_tokens
    else:
        gs = collect_grad_sharded(lambda own: collect_gradient_stats(
            ctx.model, own, checkpoint_layers=cfg.checkpoint_layers, meta={"tokens": calib.n_tokens}),
            calib.batches(cfg.batch_size))
    if cache_dir is not None and world().is_main:
        gs.save(cache_dir)
    gs.meta["cache"] = "miss" if cache_dir is not None else "off"
    if ctx.console:
        ctx.console.print(f"gradient statistics: {calib.n_tokens:,} tokens in {gs.meta['collect_seconds']:.1f}s "
                          f"(state {gs.state_bytes() / 2**20:.2f} MiB)")
    return gs


def _fresh_stats(ctx: PassContext) -> Stats:
    """Forward statistics of the in-memory model (after expert pruning the cached ones describe other routing)."""
    from moecompress.calib.collect import collect_sharded, collect_stats

    calib = ctx.get_calibration()
    return collect_sharded(lambda own, first: collect_stats(ctx.model, own, total_tokens=calib.n_tokens,
                                                            sample_tokens=0, first_token=first),
                           calib.forward_batches(), 0)


def layer_scores(cfg: PruneAtomicConfig, layer: MoELayer, grad: GradStats | None, stats: Stats | None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Neuron scores [E, I] of one MoE layer and of its coupled shared experts."""
    idx = layer.index
    if grad is not None:
        scores = heapr_scores(grad.layers[idx], cfg.frequency_weighted)
    elif stats is not None:
        scores = camera_scores(stats.layers[idx], ExpertView(layer).get_all().down, cfg.frequency_weighted)
    elif cfg.criterion == "magnitude":
        scores = magnitude_scores(layer)
    else:
        w = ExpertView(layer).get_all()
        scores = random_scores(tuple(w.up.shape[:2]), cfg.seed, idx)
    shared: dict[str, torch.Tensor] = {}
    for name, mlp in layer.shared():
        if not isinstance(getattr(mlp, "gate_proj", None), torch.nn.Linear):  # Inkling: stacked 3-D shared experts
            continue
        if grad is not None and name in grad.layers[idx].shared:
            sg, n = grad.layers[idx].shared[name], max(grad.layers[idx].n_tokens, 1)
            shared[name] = (sg.act_sq / n) * (sg.proj_sq / n)
        elif cfg.criterion == "random":
            shared[name] = random_scores((mlp.gate_proj.weight.shape[0],), cfg.seed, 10_000 + idx)
        else:  # camera has no shared-expert activations; weight magnitude stands in
            shared[name] = _mlp_magnitude(mlp)
    return scores, shared


def compute_scores(ctx: PassContext, cfg: PruneAtomicConfig, *, fresh: bool
                   ) -> tuple[dict[int, torch.Tensor], dict[int, dict[str, torch.Tensor]], dict[str, Any]]:
    """Per-layer neuron scores [E, I], coupled shared-expert neuron scores, and what was measured.

    Layers are visited through ``ctx.for_each_layer`` (streamed by the engine); weights are read only for the
    criteria that need them (camera, magnitude).
    """
    info: dict[str, Any] = {}
    grad = stats = None
    if cfg.criterion == "heapr":
        grad = gradient_stats(ctx, cfg, cacheable=not fresh)
        info["gradient_statistics"] = {**grad.meta, "state_bytes": grad.state_bytes()}
    elif cfg.criterion == "camera":
        stats = _fresh_stats(ctx) if fresh else ctx.get_stats()

    def visit(index: int, _layer: Any) -> Any:
        moe = moe_layer_at(ctx, index)
        return None if moe is None else layer_scores(cfg, moe, grad, stats)

    found = {i: r for i, r in ctx.for_each_layer(visit, cfg.criterion in ("camera", "magnitude")).items()
             if r is not None}
    return {i: r[0] for i, r in found.items()}, {i: r[1] for i, r in found.items()}, info


# ---- the pass -----------------------------------------------------------------------------------------
def _plan(ctx: PassContext) -> dict[str, Any]:
    """Expert pruning (optional, in memory), scores for every layer, and the global/per-expert selections."""
    cfg: PruneAtomicConfig = ctx.config  # type: ignore[assignment]
    model, adapter = ctx.model, ctx.adapter
    details: dict[str, Any] = {}
    sub = cfg.expert_config()
    if sub is not None:
        details["experts"] = prune_experts(dataclasses.replace(ctx, config=sub))
    layers = moe_layers(model, adapter)
    width = ExpertView(layers[0]).dims()[2]
    new_width = cfg.new_width(width)
    scores, shared_scores, info = compute_scores(ctx, cfg, fresh=sub is not None)
    n_keep_total = new_width * sum(ly.num_experts for ly in layers)
    global_keep = global_selection(scores, n_keep_total)
    per_expert = {idx: per_expert_selection(s, new_width) for idx, s in scores.items()}
    chosen = per_expert if cfg.effective_ranking == "per_expert" else global_keep
    return {"details": details, "width": width, "new_width": new_width, "scores": scores, "shared": shared_scores,
            "info": info, "n_keep_total": n_keep_total, "global": global_keep, "per_expert": per_expert,
            "chosen": chosen, "experts": sum(ly.num_experts for ly in layers)}


def _apply_layer(ctx: PassContext, plan: dict[str, Any], index: int, decoder_layer: Any) -> dict[str, Any] | None:
    cfg: PruneAtomicConfig = ctx.config  # type: ignore[assignment]
    layer = moe_layer_at(ctx, index)
    if layer is not None:
        shared_keep = shared_selection(layer, plan["width"], plan["new_width"], plan["shared"][index])
        if cfg.layout == "uniform":
            keep_idx = torch.stack([torch.nonzero(row).flatten() for row in plan["chosen"][index]])
            shrink_neurons(layer, keep_idx, shared_keep or None)
        else:
            mask_neurons(layer, plan["chosen"][index], shared_keep or None)
    return {"nonzero": sum(int(torch.count_nonzero(p)) for p in decoder_layer.parameters())}


def _finish(ctx: PassContext, plan: dict[str, Any], per_layer: dict[int, dict[str, Any]]) -> dict[str, Any]:
    cfg: PruneAtomicConfig = ctx.config  # type: ignore[assignment]
    model = ctx.model
    details, scores, global_keep = plan["details"], plan["scores"], plan["global"]
    width, new_width, n_keep_total = plan["width"], plan["new_width"], plan["n_keep_total"]
    synced = sync_config(model, ctx.adapter)
    inside = {id(p) for layer in decoder_layers(model) for p in layer.parameters()}
    rest = sum(int(torch.count_nonzero(p)) for p in model.parameters() if id(p) not in inside)
    agree = sum(int((global_keep[i] & plan["per_expert"][i]).sum()) for i in scores) / max(n_keep_total, 1)
    counts = {str(i): global_keep[i].sum(1).tolist() for i in sorted(scores)}
    all_counts = torch.cat([global_keep[i].sum(1) for i in scores]).double()
    details.update({
        "summary": f"{cfg.criterion} · {cfg.layout} ({cfg.effective_ranking}) · width {width}→{new_width}"
                   + (f" · experts {details['experts']['experts_before']}→{details['experts']['experts_after']}"
                      if "experts" in details else ""),
        "criterion": cfg.criterion,
        "layout": cfg.layout,
        "ranking": cfg.effective_ranking,
        "width_before": width,
        "width_after": new_width if cfg.layout == "uniform" else width,
        "neurons_kept_per_expert": new_width,
        "neurons_removed": plan["experts"] * (width - new_width),
        "config_after": synced,
        "nonzero_params": rest + sum(d["nonzero"] for d in per_layer.values()),
        "global_ranking": {
            "kept_per_expert": counts,
            "min": int(all_counts.min()), "median": float(all_counts.median()), "max": int(all_counts.max()),
            "dead_experts": int((all_counts == 0).sum()),
            "agreement_with_per_expert": round(agree, 4),
        },
        **plan["info"],
    })
    if cfg.layout == "masked":
        details["bytes_note"] = ("masked layout: removed neurons are written as zeros into full-size tensors, so this "
                                 "checkpoint saves NO bytes on disk or in serving memory; use layout uniform to shrink")
        details["summary"] += " · masked: saves no bytes"
    return details


PRUNE_ATOMIC = LayerwisePass(plan=_plan, apply_layer=_apply_layer, finish=_finish,
                             streams=lambda cfg: cfg.expert_config() is None)
prune_atomic = register_layerwise(PruneAtomicConfig, PRUNE_ATOMIC)
