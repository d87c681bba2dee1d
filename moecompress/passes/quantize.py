"""Pass `quantize`: expert-aware GPTQ (or RTN) of routed experts into compressed-tensors `pack-quantized`.

Layer by layer, with quantized outputs propagated: the inputs of decoder layer i are produced by the
already-quantized layers before it. Per expert, the Hessian H = Σ c·x xᵀ is accumulated over the tokens
routed to it (c = 1, or its gate affinity with ``affinity``); with ``balance`` every calibration token goes
through every expert for accumulation (weighted by the router's probability when ``affinity`` is on), so
rarely-routed experts still get a well-conditioned Hessian. Router, embeddings, lm_head and norms stay in
high precision; attention and shared experts only when asked.

Mixed precision (``bits_budget``) allocates a width per expert by a small integer program (MC-MoE style:
importance from frequency x gate mass, error from the measured GPTQ/RTN output error). transformers loads
routed experts with one scheme per model (``moecompress.quant.format``), so mixed experts are stored at the
widest chosen width: exact on reload, but the byte saving needs a runtime that reads per-expert schemes.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from moecompress.arch.adapter import MoEAdapter
from moecompress.arch.experts import ExpertView, ExpertWeights
from moecompress.calib.collect import (
    _ACTIVE,
    TAP_IMPLEMENTATION,
    experts_implementation,
    set_experts_implementation,
    stored_expert_forward,
)
from moecompress.dist import world
from moecompress.errors import UserError
from moecompress.passes.base import (
    LayerwisePass,
    MTPChoice,
    PassConfig,
    PassContext,
    moe_layer_at,
    register_layerwise,
)
from moecompress.quant.gptq import HessianAccumulator, gptq_quantize_batch, output_error, reduce_accumulators
from moecompress.quant.rtn import SUPPORTED_BITS, QuantResult, check_scheme, quantize_rtn

_ATTN_LINEAR = re.compile(r"(self_attn|linear_attn|attention)\.[a-z_]+$")
_SHARED_LINEAR = re.compile(r"shared_experts?\.(gate_proj|up_proj|down_proj)$")


class QuantizeConfig(PassConfig):
    """Weight-only symmetric integer quantization of routed experts (optionally attention and shared experts)."""

    name: ClassVar[str] = "quantize"
    bits: int = 4
    group_size: int = Field(128, description="columns per scale; -1 = one scale per output row")
    method: Literal["gptq", "rtn"] = "gptq"
    balance: bool = False
    affinity: bool = False
    damp: float = Field(0.01, ge=0)
    act_order: bool = False
    attention: bool = False
    shared: bool = False
    ignore: list[str] = Field(default_factory=list, description="regexes of module names kept in high precision")
    bits_budget: float | None = Field(None, gt=1, le=8)
    candidate_bits: list[int] = Field(default_factory=lambda: [2, 3, 4])
    mtp: MTPChoice = "keep"

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)} (vLLM serves 4 and 8)")
        return v

    def check(self, adapter: MoEAdapter, hf_config: dict[str, Any]) -> None:
        if hf_config.get("quantization_config"):
            raise UserError("quantize: the checkpoint is already quantized; start from a float checkpoint")
        if adapter.checkpoint_expert_linears is None:
            raise UserError(f"quantize: {adapter.model_type} checkpoints store routed experts fused, which the "
                            "compressed-tensors per-linear format cannot describe; supported families store per-expert "
                            "linears (qwen*_moe, mixtral, deepseek_v2/v3, olmoe, phimoe, glm4_moe, dots1, ernie4_5_moe)")
        if adapter.other_expert_stacks:
            raise UserError(f"quantize: {adapter.model_type} checkpoints hold routed experts outside the language "
                            f"model ({', '.join(adapter.other_expert_stacks)}), which moecompress carries unchanged; "
                            "transformers loads quantized experts only if every routed expert is quantized")
        merged = load_time_merges_outside_experts(hf_config)
        if merged:
            raise UserError(f"quantize: {adapter.model_type} checkpoints convert {merged[0]} at load (outside the "
                            "routed experts); transformers' compressed-tensors loader sends those float tensors "
                            "through its dequantize step, which drops them, so a quantized checkpoint would not reload")
        hidden = int(adapter.text_config(hf_config)["hidden_size"])
        width = adapter.expert_width(hf_config)
        for what, n in (("hidden size", hidden), ("expert width", width)):
            try:
                check_scheme(self.bits, self.group_size, n)
            except UserError as exc:
                raise UserError(f"quantize: {what} {n}: {exc}") from None
        if self.bits_budget is not None:
            lo, hi = min(self.candidate_bits), max(self.candidate_bits)
            if not lo <= self.bits_budget <= hi:
                raise UserError(f"quantize: bits_budget {self.bits_budget} must lie within candidate_bits [{lo}, {hi}]")
            for b in self.candidate_bits:
                check_scheme(b, self.group_size, min(hidden, width))


def load_time_merges_outside_experts(hf_config: dict[str, Any]) -> list[str]:
    """Checkpoint tensors outside the routed experts that transformers converts while loading (kimi_linear and
    bailing_hybrid join q/k/v conv1d kernels, unlimited_ocr splits qkv): compressed-tensors' loader routes them
    through its dequantize step, which yields nothing for tensors stored in float, so the reload fails."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    from moecompress.arch.skeleton import meta_model

    try:
        model = meta_model(hf_config)
    except UserError:
        return []
    out = []
    for conv in get_model_conversion_mapping(model):
        sources = list(getattr(conv, "_original_source_patterns", []) or [])
        # transformers rewrites (adds its dequantize step to) exactly the converters whose sources all end in .weight
        if (isinstance(conv, WeightConverter) and sources and all(s.endswith(".weight") for s in sources)
                and not any("expert" in s for s in sources)):
            out.append(" + ".join(s.replace("\\", "") for s in sources))
    return out


class ExpertHessians:
    """Experts-implementation tap that accumulates per-expert input Hessians of gate/up (x) and down (act)."""

    def __init__(self, experts: torch.nn.Module, num_experts: int, hidden: int, width: int, *, balance: bool,
                 affinity: bool, sigmoid: bool) -> None:
        self.experts = experts
        self.x = [HessianAccumulator(hidden) for _ in range(num_experts)]
        self.a = [HessianAccumulator(width) for _ in range(num_experts)]
        self.routed = torch.zeros(num_experts, dtype=torch.long)
        self.balance, self.affinity, self.sigmoid = balance, affinity, sigmoid
        self.mask: torch.Tensor | None = None
        self.probs: torch.Tensor | None = None
        self.stats = type("W", (), {"width": width})()  # what tap_experts_forward reads

    def observe_router(self, logits: torch.Tensor) -> None:
        lg = logits.reshape(-1, logits.shape[-1]).float()
        self.probs = lg.sigmoid() if self.sigmoid else lg.softmax(-1)

    def observe_extra(self, tok: torch.Tensor) -> None:
        """Zero-computation experts (LongCat-Flash) have no weights to quantize: nothing to accumulate."""

    def observe_experts(self, hidden, out, tok, eid, w, y, act) -> None:  # noqa: ANN001 - tap protocol
        keep = self.mask[tok] if self.mask is not None else torch.ones_like(tok, dtype=torch.bool)
        self.routed += torch.bincount(eid[keep], minlength=len(self.x)).cpu()
        if self.balance:
            # one copy shared by every expert's accumulator (they keep their inputs until folded)
            real = hidden.clone() if self.mask is None else hidden[self.mask]
            probs = None if self.probs is None else (self.probs if self.mask is None else self.probs[self.mask])
            for e in range(len(self.x)):
                c = probs[:, e] if (self.affinity and probs is not None) else None
                self.x[e].add(real, c)
                _, a = stored_expert_forward(self.experts, e, real.to(self.experts.down_proj.dtype))
                self.a[e].add(a, c)
            return
        tok, eid, w, act = tok[keep], eid[keep], w[keep], act[keep]
        counts = torch.bincount(eid, minlength=len(self.x)).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n:
                c = w[start : start + n].float().clamp_min(0) if self.affinity else None
                self.x[e].add(hidden[tok[start : start + n]], c)
                self.a[e].add(act[start : start + n], c)
            start += n


def _solve_stack(ws: torch.Tensor, hs: list[torch.Tensor | None], bits: int, group_size: int,
                 cfg: QuantizeConfig) -> list[QuantResult]:
    """RTN or GPTQ (batched over the stack) of weights ws [E, out, in], each with its own input Hessian."""
    if cfg.method == "rtn":
        return [quantize_rtn(w, bits, group_size) for w in ws]
    return gptq_quantize_batch(ws, hs, bits, group_size, damp=cfg.damp, act_order=cfg.act_order)


def _solve_block(ws: torch.Tensor, hs: list[torch.Tensor], blk: range, bits: int, group_size: int,
                 cfg: QuantizeConfig) -> list[tuple[QuantResult, float]]:
    """(result, output error) of the weights ws[blk] (the error costs about as much as the solve)."""
    res = _solve_stack(ws[blk.start : blk.stop], hs[blk.start : blk.stop], bits, group_size, cfg)
    return [(r, output_error(ws[e], r.dequant, hs[e])) for e, r in zip(blk, res, strict=True)]


def _quantize_stack(ws: torch.Tensor, hs: list[torch.Tensor], bits: int, group_size: int,
                    cfg: QuantizeConfig) -> list[tuple[QuantResult, float]]:
    """``_solve_block`` of the whole stack, spread over data-parallel ranks: each rank solves a contiguous block
    of experts, every rank gets every result."""
    return world().spread(len(ws), lambda blk: _solve_block(ws, hs, blk, bits, group_size, cfg))


@dataclass
class QuantRecord:
    """What remains of a QuantResult once its packed tensors are written (enough for config and report)."""

    bits: int
    group_size: int
    shape: tuple[int, int]


def _calibration(ctx: PassContext, plan: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return plan["batches"]


def _plan(ctx: PassContext) -> dict[str, Any]:
    cfg: QuantizeConfig = ctx.config  # type: ignore[assignment]
    model, adapter = ctx.model, ctx.adapter
    batches, _ = world().shard_batches(list(ctx.get_calibration().batches(8)), "quantize")  # this rank's share
    previous = experts_implementation(model)
    return {
        "batches": batches,
        "masks": [m.reshape(-1).bool() for _, m in batches],
        "ignore": [re.compile(p) for p in cfg.ignore],
        "sigmoid": adapter.sigmoid_scores,
        "previous_impl": previous,
        "results": {},  # checkpoint module name → QuantResult (QuantRecord once written by the engine)
        "errors": {},
        "per_channel": [],
        "layer_state": {},  # the layer in flight: Hessian accumulators and taps
    }


@contextlib.contextmanager
def _observe(ctx: PassContext, plan: dict[str, Any], index: int, layer: torch.nn.Module) -> Iterator[Any]:
    """Accumulate input Hessians of this layer's target linears and routed experts over every batch."""
    cfg: QuantizeConfig = ctx.config  # type: ignore[assignment]
    adapter = ctx.adapter
    moe = moe_layer_at(ctx, index)
    prefix = _layer_prefix(ctx.model, layer)
    names = {id(m): prefix + n if n else prefix.rstrip(".") for n, m in layer.named_modules()}
    dense = _dense_targets(layer, cfg, names, plan["ignore"])
    masks = plan["masks"]
    current_mask = [masks[0]]
    acc: dict[str, HessianAccumulator] = {}
    hooks = []
    for name, lin in dense:
        acc[name] = HessianAccumulator(lin.in_features)
        hooks.append(lin.register_forward_pre_hook(
            lambda m, a, h=acc[name]: h.add(a[0].reshape(-1, a[0].shape[-1])[current_mask[0].to(a[0].device)])))
    tap = None
    # the tap implementation only while this layer observes: the probe and the propagated flow then run the
    # compressed layer with the experts implementation a reload uses (in bf16 the tap's index_add order differs)
    set_experts_implementation(ctx.model, TAP_IMPLEMENTATION)
    if moe is not None:
        w = ExpertView(moe).get_all()
        tap = ExpertHessians(moe.experts, moe.num_experts, w.hidden, w.width, balance=cfg.balance,
                             affinity=cfg.affinity, sigmoid=plan["sigmoid"])
        _ACTIVE[id(moe.experts)] = tap
        logits_pos = 1 if adapter.routing == "sigmoid_input_scale" else 0
        hooks.append(moe.router.register_forward_hook(
            lambda m, a, o, tap=tap, pos=logits_pos: tap.observe_router(o[pos] if isinstance(o, tuple) else o)))

    def before_batch(b: int) -> None:
        current_mask[0] = masks[b]
        if tap is not None:
            tap.mask = masks[b].to(moe.experts.down_proj.device)

    plan["layer_state"] = {"dense": dense, "acc": acc, "tap": tap, "moe": moe}
    try:
        yield before_batch
    finally:
        for hk in hooks:
            hk.remove()
        if moe is not None:
            _ACTIVE.pop(id(moe.experts), None)
        if plan["previous_impl"] is not None:
            set_experts_implementation(ctx.model, plan["previous_impl"])


def _apply_layer(ctx: PassContext, plan: dict[str, Any], index: int, layer: torch.nn.Module) -> dict[str, Any] | None:
    """GPTQ/RTN of this layer's targets from the Hessians just observed; weights become their dequantized values."""
    cfg: QuantizeConfig = ctx.config  # type: ignore[assignment]
    st = plan.pop("layer_state")
    plan["layer_state"] = {}
    quantized, errors = plan["results"], plan["errors"]
    tap = st["tap"]
    # each data-parallel rank observed its own batches: sum the Hessians before any solve reads them
    reduce_accumulators([*st["acc"].values(), *(tap.x + tap.a if tap is not None else [])], world())
    if tap is not None:
        world().all_reduce_([tap.routed])
    dense = st["dense"]
    # a dense linear whose width the group size does not divide gets one scale per row
    sizes = [cfg.group_size if cfg.group_size == -1 or lin.in_features % cfg.group_size == 0 else -1
             for _, lin in dense]
    hs = [st["acc"][name].hessian() for name, _ in dense]
    solved = world().spread(len(dense), lambda blk: [
        _solve_block(dense[j][1].weight.detach()[None], [hs[j]], range(1), cfg.bits, sizes[j], cfg)[0] for j in blk])
    for (name, lin), gs, (res, err) in zip(dense, sizes, solved, strict=True):
        if gs != cfg.group_size:
            plan["per_channel"].append(name)
        errors[name] = err
        with torch.no_grad():
            lin.weight.copy_(res.dequant)
        quantized[name] = res
    moe = st["moe"]
    if moe is None:
        return None
    bits = _quantize_experts(moe, st["tap"], cfg, ctx.adapter, quantized, errors)
    return {"bits": bits, "tokens": st["tap"].routed.tolist()}


def _emit(ctx: PassContext, plan: dict[str, Any], index: int, on_disk: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Replace this layer's quantized float weights by packed codes + scales (engine path)."""
    from moecompress.quant.format import packed_module_tensors

    cfg: QuantizeConfig = ctx.config  # type: ignore[assignment]
    out = dict(on_disk)
    for name, res in list(plan["results"].items()):
        if isinstance(res, QuantRecord) or f"{name}.weight" not in out:
            continue
        stored = max(cfg.candidate_bits) if cfg.bits_budget is not None and _is_expert(name) else res.bits
        out.update(packed_module_tensors(name, out.pop(f"{name}.weight"), res, stored))
        plan["results"][name] = QuantRecord(bits=res.bits, group_size=res.group_size, shape=res.shape)
    return out


def _is_expert(name: str) -> bool:
    from moecompress.quant.format import is_routed_expert_key

    return is_routed_expert_key(name)


def _config_update(ctx: PassContext, plan: dict[str, Any], shapes: dict[str, list[int]]) -> dict[str, Any]:
    from moecompress.quant.format import streamed_quantization_config

    cfg: QuantizeConfig = ctx.config  # type: ignore[assignment]
    return {"quantization_config": streamed_quantization_config(
        plan["results"], shapes, pad_mixed_experts=cfg.bits_budget is not None,
        allow_mixed_dense=bool(plan["per_channel"]), expert_container=max(cfg.candidate_bits)
        if cfg.bits_budget is not None else None)}


def _finish(ctx: PassContext, plan: dict[str, Any], per_layer: dict[int, dict[str, Any]]) -> dict[str, Any]:
    cfg: QuantizeConfig = ctx.config  # type: ignore[assignment]
    model = ctx.model
    if plan["previous_impl"] is not None:
        set_experts_implementation(model, plan["previous_impl"])
    from moecompress.quant.format import save_quantized

    mixed = cfg.bits_budget is not None
    info: dict[str, Any] = {}
    quantized = plan["results"]
    per_channel = plan["per_channel"]

    def save_fn(tmp) -> None:  # noqa: ANN001 - the in-memory path writes through save_pretrained
        written = save_quantized(model, tmp, quantized, ignore=None, pad_mixed_experts=mixed,
                                 allow_mixed_dense=bool(per_channel))
        info.update(written.to_dict())

    ctx.extras["save_fn"] = save_fn
    per_expert_bits = {str(i): d["bits"] for i, d in per_layer.items()}
    token_counts = {str(i): d["tokens"] for i, d in per_layer.items()}
    all_bits = [b for bits in per_expert_bits.values() for b in bits]
    return {
        "summary": f"{cfg.method.upper()} W{cfg.bits if not mixed else f'{sum(all_bits) / len(all_bits):.2f}avg'} "
                   f"g{cfg.group_size} on {len(quantized)} linears",
        "method": cfg.method,
        "quantized_modules": len(quantized),
        "expert_bits": per_expert_bits,
        "expert_tokens": token_counts,
        "mean_output_error": _mean_by_kind(plan["errors"]),
        "per_channel_fallback": per_channel,
        "format": info,
    }


def _layer_prefix(model: torch.nn.Module, layer: torch.nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is layer:
            return name + "."
    raise RuntimeError("decoder layer not found in the model")  # pragma: no cover


QUANTIZE = LayerwisePass(plan=_plan, apply_layer=_apply_layer, finish=_finish, calibration=_calibration,
                         observe=_observe, propagate=True, emit=_emit, config_update=_config_update)
quantize = register_layerwise(QuantizeConfig, QUANTIZE)


def _dense_targets(layer: torch.nn.Module, cfg: QuantizeConfig, names: dict[int, str],
                   ignore: list[re.Pattern[str]]) -> list[tuple[str, torch.nn.Linear]]:
    out = []
    for mod in layer.modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        name = names[id(mod)]
        wanted = (cfg.attention and _ATTN_LINEAR.search(name)) or (cfg.shared and _SHARED_LINEAR.search(name))
        if wanted and not any(p.search(name) for p in ignore):
            out.append((name, mod))
    return out


HESSIAN_GROUP_BYTES = 16 << 20  # float32 Hessian bytes of the experts GPTQ quantizes in one batched stack


def _quantize_experts(moe: Any, tap: ExpertHessians, cfg: QuantizeConfig, adapter: MoEAdapter,
                      quantized: dict[str, QuantResult], errors: dict[str, float]) -> list[int]:
    """Quantize one layer's routed experts in place; returns the width chosen for each expert.

    With a bits budget every candidate width is quantized once, the MC-MoE allocation picks per expert from
    those measured errors, and the chosen results are used as they are (no second quantization).
    """
    import numpy as np

    view = ExpertView(moe)
    w = view.get_all(copy=False)  # views of the live tensors: each group reads its experts' original weights
    cands = sorted(cfg.candidate_bits) if cfg.bits_budget is not None else [cfg.bits]
    fixed = cfg.bits_budget is None
    results: dict[tuple[str, int], list[QuantResult]] = {(p, b): [] for b in cands for p in w.projections}
    err: dict[tuple[str, int], list[float]] = {key: [] for key in results}
    # experts in groups whose float32 Hessians take about HESSIAN_GROUP_BYTES: GPTQ's per-stack temporaries
    # (stacked Hessians, their Cholesky factors and inverses, float32 weights and codes: ~10 Hessian-sized
    # tensors per expert) then scale with the group, not with the layer's expert count. Measured on the 20-layer
    # stream bench: under glibc's compute threshold 32 MiB stacks peaked at 1.31 GiB and 8 MiB ones at 1.44 GiB
    # (blocks under the 32 MiB threshold fragment the heap); the engine now runs the solves under its mmap rule
    # (every block ≥ 1 MiB from mmap, returned when freed), where 32 MiB peaks at 1.15 GiB and 16 MiB at 1.02 GiB.
    # Bitwise the same codes either way: each matrix of a stack is solved on its own.
    n = moe.num_experts
    per = max(1, HESSIAN_GROUP_BYTES // (4 * max(w.hidden, w.width) ** 2))
    for start in range(0, n, per):
        ids = range(start, min(n, start + per))
        gate_h = [tap.x[e].hessian() for e in ids]
        hessians = {"gate": gate_h, "up": gate_h, "down": [tap.a[e].hessian() for e in ids]}
        for b in cands:
            for p in w.projections:  # each group spread over data-parallel ranks (results and errors gathered)
                pairs = _quantize_stack(getattr(w, p)[ids.start : ids.stop], hessians[p], b, cfg.group_size, cfg)
                results[(p, b)] += [r for r, _ in pairs]
                err[(p, b)] += [e for _, e in pairs]
        if fixed:  # one width: the group's dequantized weights go into the layer now (only these experts' slices;
            # later groups read only their own), and the results keep codes and scales, not a second copy
            for p in w.projections:
                done = results[(p, cfg.bits)][ids.start : ids.stop]
                view.write(list(ids), ExpertWeights.only(**{p: torch.stack([r.dequant for r in done])}))
                for r in done:
                    r.release()
        for e in ids:  # these experts' sums are spent: free them before the next group's work
            tap.x[e].release()
            tap.a[e].release()
        del gate_h, hessians
    if cfg.bits_budget is None:
        bits = [cfg.bits] * moe.num_experts
    else:
        from moecompress.quant.bits import allocate_bits, importance_scores

        table = np.array([[sum(err[(p, b)][e] for p in w.projections) for b in cands]
                          for e in range(moe.num_experts)])
        n_params = [len(w.projections) * w.width * w.hidden] * moe.num_experts
        alloc = allocate_bits(importance_scores(tap.routed.double().numpy()), table, n_params, cands, cfg.bits_budget)
        bits = [int(b) for b in alloc.bits]
    for p in w.projections:
        for e, b in enumerate(bits):
            r = results[(p, b)][e]
            if not fixed:  # the allocation chose now: write the chosen width's weights
                view.write([e], ExpertWeights.only(**{p: r.dequant[None]}))
            r.release()
            name = adapter.expert_checkpoint_name(moe.index, e, p)
            quantized[name] = r
            errors[name] = err[(p, b)][e]
    _quantize_unused_rows(moe, cfg, adapter, quantized, max(bits))
    return bits


@torch.no_grad()
def _quantize_unused_rows(moe: Any, cfg: QuantizeConfig, adapter: MoEAdapter, quantized: dict[str, QuantResult],
                          bits: int) -> None:
    """LongCat-Flash allocates gate/up rows for its zero-computation experts too, and saves them as experts
    E…E+Z−1 (without a down projection). They are never computed, but transformers loads quantized experts only
    when every routed expert linear on disk is quantized: round them (RTN, no Hessian to use) at the widest bits."""
    gu = getattr(moe.experts, "gate_up_proj", None)
    n = moe.num_experts
    if gu is None or gu.shape[0] <= n:
        return
    if adapter.layout != "concat":
        raise UserError(f"quantize: {adapter.model_type} keeps extra gate/up rows in a {adapter.layout} layout")
    width = gu.shape[1] // 2
    for j in range(n, gu.shape[0]):
        for proj, rows in (("gate", slice(0, width)), ("up", slice(width, 2 * width))):
            r = quantize_rtn(gu[j, rows].detach(), bits, cfg.group_size)
            gu[j, rows] = r.dequant.to(gu.dtype)
            quantized[adapter.expert_checkpoint_name(moe.index, j, proj)] = r


def _mean_by_kind(errors: dict[str, float]) -> dict[str, float]:
    kinds: dict[str, list[float]] = defaultdict(list)
    for name, err in errors.items():
        kinds[name.rsplit(".", 1)[-1]].append(err)
    return {k: sum(v) / len(v) for k, v in kinds.items()}
