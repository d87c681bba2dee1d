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

import re
from collections import defaultdict
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, field_validator

from moecompress.arch.adapter import MoEAdapter, decoder_layers, moe_layers
from moecompress.arch.experts import ExpertView
from moecompress.calib.collect import _ACTIVE, TAP_IMPLEMENTATION, stored_expert_forward
from moecompress.calib.layers import capture_layer_inputs as _capture_layer_inputs
from moecompress.calib.layers import layer_output as _layer_out
from moecompress.errors import UserError
from moecompress.passes.base import PassConfig, PassContext, register_pass
from moecompress.quant.gptq import HessianAccumulator, gptq_quantize_batch, output_error
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
        hidden, width = int(hf_config["hidden_size"]), adapter.expert_width(hf_config)
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

    def observe_experts(self, hidden, out, tok, eid, w, y, act) -> None:  # noqa: ANN001 - tap protocol
        keep = self.mask[tok] if self.mask is not None else torch.ones_like(tok, dtype=torch.bool)
        self.routed += torch.bincount(eid[keep], minlength=len(self.x)).cpu()
        if self.balance:
            real = hidden if self.mask is None else hidden[self.mask]
            probs = None if self.probs is None else (self.probs if self.mask is None else self.probs[self.mask])
            for e in range(len(self.x)):
                c = probs[:, e] if (self.affinity and probs is not None) else None
                self.x[e].add(real, c)
                _, a = stored_expert_forward(self.experts, e, real.to(self.experts.gate_up_proj.dtype))
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


def _quantize_stack(ws: torch.Tensor, hs: list[torch.Tensor | None], bits: int, group_size: int,
                    cfg: QuantizeConfig) -> list[QuantResult]:
    """RTN or GPTQ (batched over the stack) of weights ws [E, out, in], each with its own input Hessian."""
    if cfg.method == "rtn":
        return [quantize_rtn(w, bits, group_size) for w in ws]
    return gptq_quantize_batch(ws, hs, bits, group_size, damp=cfg.damp, act_order=cfg.act_order)


@register_pass(QuantizeConfig)
def quantize(ctx: PassContext) -> dict[str, Any]:
    cfg: QuantizeConfig = ctx.config  # type: ignore[assignment]
    model, adapter = ctx.model, ctx.adapter
    calib = ctx.get_calibration()
    batches = list(calib.batches(8))
    masks = [m.reshape(-1).bool() for _, m in batches]
    ignore = [re.compile(p) for p in cfg.ignore]
    moe_by_index = {ly.index: ly for ly in moe_layers(model, adapter)}
    sigmoid = adapter.routing in ("sigmoid_group_bias", "sigmoid_input_scale")
    hidden_states, layer_kwargs = _capture_layer_inputs(model, batches)
    module_names = {id(m): n for n, m in model.named_modules()}
    quantized: dict[str, QuantResult] = {}
    per_expert_bits: dict[str, list[int]] = {}
    token_counts: dict[str, list[int]] = {}
    errors: dict[str, float] = {}
    per_channel: list[str] = []
    current_mask = [masks[0]]  # real-token mask of the batch in flight, read by the dense-linear hooks
    previous = getattr(model.config, "_experts_implementation", None)
    model.set_experts_implementation(TAP_IMPLEMENTATION)
    from rich.progress import Progress

    try:
        with Progress(console=ctx.console, disable=ctx.console is None, transient=True) as prog:
            task = prog.add_task("quantizing layers", total=len(decoder_layers(model)))
            for i, layer in enumerate(decoder_layers(model)):
                moe = moe_by_index.get(i)
                dense = _dense_targets(layer, cfg, module_names, ignore)
                acc: dict[str, HessianAccumulator] = {}
                hooks = []
                for name, lin in dense:
                    acc[name] = HessianAccumulator(lin.in_features)
                    hooks.append(lin.register_forward_pre_hook(
                        lambda m, a, h=acc[name]: h.add(a[0].reshape(-1, a[0].shape[-1])[current_mask[0]])))
                tap = None
                if moe is not None:
                    w = ExpertView(moe).get_all()
                    tap = ExpertHessians(moe.experts, moe.num_experts, w.gate.shape[2], w.width, balance=cfg.balance,
                                         affinity=cfg.affinity, sigmoid=sigmoid)
                    _ACTIVE[id(moe.experts)] = tap
                    logits_pos = 1 if adapter.routing == "sigmoid_input_scale" else 0
                    hooks.append(moe.router.register_forward_hook(
                        lambda m, a, o, tap=tap, pos=logits_pos: tap.observe_router(o[pos] if isinstance(o, tuple) else o)))
                try:
                    with torch.no_grad():
                        for b, h in enumerate(hidden_states):
                            current_mask[0] = masks[b]
                            if tap is not None:
                                tap.mask = masks[b]
                            layer(h, **layer_kwargs[i][b])
                finally:
                    for hk in hooks:
                        hk.remove()
                    if moe is not None:
                        _ACTIVE.pop(id(moe.experts), None)
                for name, lin in dense:
                    # a dense linear whose width the group size does not divide gets one scale per row
                    gs = cfg.group_size if cfg.group_size == -1 or lin.in_features % cfg.group_size == 0 else -1
                    if gs != cfg.group_size:
                        per_channel.append(name)
                    h = acc[name].hessian()
                    res = _quantize_stack(lin.weight.detach()[None], [h], cfg.bits, gs, cfg)[0]
                    errors[name] = output_error(lin.weight.detach(), res.dequant, h)
                    with torch.no_grad():
                        lin.weight.copy_(res.dequant)
                    quantized[name] = res
                if moe is not None:
                    assert tap is not None
                    per_expert_bits[str(i)] = _quantize_experts(moe, tap, cfg, adapter, quantized, errors)
                    token_counts[str(i)] = tap.routed.tolist()
                with torch.no_grad():  # propagate: the next layer sees this layer's quantized outputs
                    hidden_states = [_layer_out(layer(h, **layer_kwargs[i][b])) for b, h in enumerate(hidden_states)]
                prog.advance(task)
    finally:
        if previous is not None:
            model.set_experts_implementation(previous)

    from moecompress.quant.format import save_quantized

    mixed = cfg.bits_budget is not None
    info: dict[str, Any] = {}

    def save_fn(tmp) -> None:  # noqa: ANN001
        written = save_quantized(model, tmp, quantized, ignore=None, pad_mixed_experts=mixed,
                                 allow_mixed_dense=bool(per_channel))
        info.update(written.to_dict())

    ctx.extras["save_fn"] = save_fn
    all_bits = [b for bits in per_expert_bits.values() for b in bits]
    return {
        "summary": f"{cfg.method.upper()} W{cfg.bits if not mixed else f'{sum(all_bits) / len(all_bits):.2f}avg'} "
                   f"g{cfg.group_size} on {len(quantized)} linears",
        "method": cfg.method,
        "quantized_modules": len(quantized),
        "expert_bits": per_expert_bits,
        "expert_tokens": token_counts,
        "mean_output_error": _mean_by_kind(errors),
        "per_channel_fallback": per_channel,
        "format": info,
    }


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


_PROJECTIONS = ("gate", "up", "down")


def _quantize_experts(moe: Any, tap: ExpertHessians, cfg: QuantizeConfig, adapter: MoEAdapter,
                      quantized: dict[str, QuantResult], errors: dict[str, float]) -> list[int]:
    """Quantize one layer's routed experts in place; returns the width chosen for each expert.

    With a bits budget every candidate width is quantized once, the MC-MoE allocation picks per expert from
    those measured errors, and the chosen results are used as they are (no second quantization).
    """
    import numpy as np

    view = ExpertView(moe)
    w = view.get_all()
    gate_h = [h.hessian() for h in tap.x]
    hessians = {"gate": gate_h, "up": gate_h, "down": [h.hessian() for h in tap.a]}
    cands = sorted(cfg.candidate_bits) if cfg.bits_budget is not None else [cfg.bits]
    results = {(p, b): _quantize_stack(getattr(w, p), hessians[p], b, cfg.group_size, cfg)
               for b in cands for p in _PROJECTIONS}
    err = {key: [output_error(getattr(w, key[0])[e], r.dequant, hessians[key[0]][e]) for e, r in enumerate(rs)]
           for key, rs in results.items()}
    if cfg.bits_budget is None:
        bits = [cfg.bits] * moe.num_experts
    else:
        from moecompress.quant.bits import allocate_bits, importance_scores

        table = np.array([[sum(err[(p, b)][e] for p in _PROJECTIONS) for b in cands] for e in range(moe.num_experts)])
        n_params = [3 * w.gate.shape[1] * w.gate.shape[2]] * moe.num_experts
        alloc = allocate_bits(importance_scores(tap.routed.double().numpy()), table, n_params, cands, cfg.bits_budget)
        bits = [int(b) for b in alloc.bits]
    new = w.clone()
    for p in _PROJECTIONS:
        for e, b in enumerate(bits):
            r = results[(p, b)][e]
            getattr(new, p)[e] = r.dequant
            name = adapter.expert_checkpoint_name(moe.index, e, p)
            quantized[name] = r
            errors[name] = err[(p, b)][e]
    view.set_all(new)
    return bits


def _mean_by_kind(errors: dict[str, float]) -> dict[str, float]:
    kinds: dict[str, list[float]] = defaultdict(list)
    for name, err in errors.items():
        kinds[name.rsplit(".", 1)[-1]].append(err)
    return {k: sum(v) / len(v) for k, v in kinds.items()}
