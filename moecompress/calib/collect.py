"""One streaming pass over calibration tokens that computes the model's normal output *and* every routing
statistic (design §3: a custom experts implementation, so there is no second forward).

The tap replaces the experts forward with an equivalent per-expert computation over the tokens routed to
each expert (batched: one matmul per expert, never a loop over tokens) and, while a collection is active,
accumulates the sums in ``LayerStats``. Gate weights are the ones the family's router hands to the experts,
i.e. already renormalised / scaled / bias-chosen exactly as the model applies them. Padding is masked.
"""

from __future__ import annotations

import contextlib
import math
import time
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

try:  # transformers' grouped matmul helper (private; the per-expert loop below is the fallback)
    from transformers.integrations.moe import _grouped_linear
except ImportError:  # pragma: no cover - depends on the transformers version
    _grouped_linear = None

from moecompress.arch.adapter import MoELayer, decoder_layers, moe_layers
from moecompress.arch.discover import text_model
from moecompress.arch.experts import ExpertView
from moecompress.calib.stats import COUPLED_FIELDS, LayerStats, Stats, reduce_stats

TAP_IMPLEMENTATION = "moecompress_tap"
_ACTIVE: dict[int, LayerTap] = {}


def input_projection(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused projection applied to the expert input, and its bias: gate_up (gated experts) or up."""
    name = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    return getattr(module, name), (getattr(module, name + "_bias") if getattr(module, "has_bias", False) else None)


def gated_activation(module: torch.nn.Module, gu: torch.Tensor) -> torch.Tensor:
    """The family's own gating of gate/up pre-activations (gpt-oss: clamped, interleaved SwiGLU); non-gated
    experts apply the activation to the up projection, as transformers does."""
    if not getattr(module, "has_gate", True):
        return module.act_fn(gu)
    apply_gate = getattr(module, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(gu)
    g, u = gu.chunk(2, dim=-1)
    return module.act_fn(g) * u


def stored_expert_forward(module: torch.nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert `e` of a fused experts module on x [S, H] in the module's own storage layout.

    Returns (output [S, H], intermediate activation [S, I]). Same arithmetic as the library's eager path.
    A layer read in expert chunks (``engine.chunks``) loads expert `e` alone for the call.
    """
    chunks = module.__dict__.get("expert_chunks")
    if chunks is not None:
        with chunks.holding(module, e, e + 1):
            return _stored_expert_forward(module, 0, x)
    return _stored_expert_forward(module, e, x)


def _stored_expert_forward(module: torch.nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    transposed = bool(getattr(module, "is_transposed", False))
    in_w, in_b = input_projection(module)
    gu_w = in_w[e]
    gu = x @ gu_w if transposed else x @ gu_w.T
    if in_b is not None:
        gu = gu + in_b[e]
    act = gated_activation(module, gu)
    d_w = module.down_proj[e]
    y = act @ d_w if transposed else act @ d_w.T
    if getattr(module, "has_bias", False):
        y = y + module.down_proj_bias[e]
    return post_expert_norm(module, y), act


def post_expert_norm(module: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The norm some families apply to each expert's output before weighting (transformers' has_post_expert_norm)."""
    return module.post_expert_norm(y) if getattr(module, "has_post_expert_norm", False) else y


def _grouped_expert_outputs(module: torch.nn.Module, x_sorted: torch.Tensor, eid_sorted: torch.Tensor,
                            counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All routed (token, expert) pairs at once, grouped by expert: (outputs [S, H], activations [S, I]).

    Uses the same grouped matmul as transformers' default implementation, so collecting statistics costs
    about what a plain forward costs; falls back to one matmul per expert where grouped matmul is missing.
    A layer read in expert chunks (``engine.chunks``) computes the same rows one chunk of experts at a time.
    """
    chunks = module.__dict__.get("expert_chunks")
    if chunks is not None:
        from moecompress.engine.chunks import chunked_expert_outputs

        return chunked_expert_outputs(module, chunks, x_sorted, eid_sorted, counts, _grouped_outputs)
    return _grouped_outputs(module, x_sorted, eid_sorted, counts)


def bucketed_counts(counts: torch.Tensor) -> torch.Tensor:
    """Each group's row count rounded up to one of ~8 sizes per octave (at least a multiple of 16).

    On CPU, oneDNN builds and keeps a reduced-precision matmul kernel per row count it meets; with routing,
    every layer brings new counts, so memory grew ~30 MiB per layer of a calibration sweep and never came back.
    Rounding up bounds the distinct counts (≈ 8 per power of two) at ≤ 12.5% extra rows (measured: flat memory,
    same speed). Empty groups stay empty.
    """
    c = counts.clamp_min(1).to(torch.float64)
    step = torch.exp2((torch.floor(torch.log2(c)) - 3).clamp_min(4)).to(counts.dtype)
    return (counts + step - 1) // step * step


def _padded_rows(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def _grouped_outputs(module: torch.nn.Module, x_sorted: torch.Tensor, eid_sorted: torch.Tensor,
                     counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _grouped_linear is not None and _padded_rows(x_sorted) and x_sorted.shape[0]:
        padded = bucketed_counts(counts)
        starts, pstarts = counts.cumsum(0) - counts, padded.cumsum(0) - padded
        dest = torch.arange(x_sorted.shape[0]) - starts[eid_sorted] + pstarts[eid_sorted]
        x_pad = x_sorted.new_zeros(int(padded.sum()), x_sorted.shape[1])
        x_pad[dest] = x_sorted
        eid_pad = torch.repeat_interleave(torch.arange(counts.shape[0]), padded)
        y, act = _grouped_rows(module, x_pad, eid_pad, padded)
        return y[dest], act[dest]
    return _grouped_rows(module, x_sorted, eid_sorted, counts)


def _grouped_rows(module: torch.nn.Module, x_sorted: torch.Tensor, eid_sorted: torch.Tensor,
                  counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    transposed = bool(getattr(module, "is_transposed", False))
    has_bias = bool(getattr(module, "has_bias", False))
    if _grouped_linear is not None:
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        in_w, in_b = input_projection(module)
        in_w = in_w[: counts.shape[0]]  # LongCat keeps input rows for its zero-computation experts too
        gu = _grouped_linear(x_sorted, in_w, offsets, bias=in_b[eid_sorted] if has_bias else None,
                             is_transposed=transposed)
        act = gated_activation(module, gu)
        y = _grouped_linear(act, module.down_proj, offsets,
                            bias=module.down_proj_bias[eid_sorted] if has_bias else None, is_transposed=transposed)
        return post_expert_norm(module, y), act
    ys, acts, start = [], [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            y, act = _stored_expert_forward(module, e, x_sorted[start : start + n])
            ys.append(y)
            acts.append(act)
        start += n
    return torch.cat(ys), torch.cat(acts)


def zero_computation_pairs(module: torch.nn.Module, hidden_states: torch.Tensor, flat_e: torch.Tensor,
                           flat_w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Split the (token, slot) pairs of an experts call: (pairs routed to real experts, the output so far, token ids
    of the other pairs or None). Expert ids past the routed experts are zero-computation experts (LongCat-Flash):
    identities, so the output starts as their weighted inputs (differentiably, for the gradient tap)."""
    n = int(module.down_proj.shape[0])
    routed = flat_e < n
    out = torch.zeros_like(hidden_states)
    if bool(routed.all()):
        return routed.nonzero().squeeze(1), out, None
    if getattr(module, "identity_expert", None) is None:
        raise ValueError(f"the router chose expert ids ≥ {n}, but {type(module).__name__} has only {n} experts")
    extra = (~routed).nonzero().squeeze(1)
    tok = extra // k
    out = out.index_add(0, tok, (hidden_states[tok] * flat_w[extra, None]).to(out.dtype))
    return routed.nonzero().squeeze(1), out, tok


def tap_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward that also feeds the active statistics tap of this module (if any)."""
    k = top_k_index.shape[-1]
    flat_e = top_k_index.reshape(-1)
    flat_w = top_k_weights.reshape(-1)
    pairs, out, extra_tok = zero_computation_pairs(self, hidden_states, flat_e, flat_w, k)
    if extra_tok is not None and _ACTIVE.get(id(self)) is not None:
        _ACTIVE[id(self)].observe_extra(extra_tok)
    n = int(self.down_proj.shape[0])
    flat_e, flat_w = flat_e[pairs], flat_w[pairs]
    eid_sorted, order = torch.sort(flat_e, stable=True)
    counts = torch.bincount(flat_e, minlength=n)
    tok_sorted = pairs[order] // k
    y_sorted, act_sorted = _grouped_expert_outputs(self, hidden_states[tok_sorted], eid_sorted, counts)
    w_sorted = flat_w[order].to(y_sorted.dtype)
    out.index_add_(0, tok_sorted, y_sorted * w_sorted[:, None])
    tap = _ACTIVE.get(id(self))
    if tap is not None:
        tap.observe_experts(hidden_states, out, tok_sorted, eid_sorted, w_sorted, y_sorted, act_sorted)
    return out


ALL_EXPERTS_FUNCTIONS.register(TAP_IMPLEMENTATION, tap_experts_forward)


PADDED_IMPLEMENTATION = "moecompress_padded"


def padded_grouped_mm_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' ``grouped_mm`` experts forward with each expert's rows padded to a bucketed count.

    The engine runs every layer of every sweep through this (``engine.source.ModelSource``): with the plain
    forward oneDNN kept a bf16 kernel per row count routing produced, ~35 MiB per layer of a GPTQ sweep that
    never came back (bench/README.md). Same sort, gather, gating, weighting and float32 sum over the top-k as
    ``grouped_mm_experts_forward``; padded rows are zeros whose outputs are dropped, so outputs are bitwise
    those of ``grouped_mm`` (tested). Anything the padding does not cover (not CPU bf16/fp16, expert parallel,
    ids past the routed experts) runs transformers' own forward.
    """
    from transformers.integrations.moe import grouped_mm_experts_forward

    n = int(self.num_experts)
    if (not _padded_rows(hidden_states) or _grouped_linear is None or getattr(self, "_is_expert_parallel", False)
            or bool((top_k_index >= n).any())):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    k = top_k_index.shape[-1]
    tokens, hidden = hidden_states.shape
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    weights = top_k_weights.reshape(-1)[perm]
    counts = torch.bincount(expert_ids, minlength=n)
    y, _ = _grouped_outputs(self, hidden_states[perm // k], expert_ids, counts)
    weighted = y * weights.unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
    return weighted[inverse].view(tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(PADDED_IMPLEMENTATION, padded_grouped_mm_forward)


def pad_expert_rows(model: torch.nn.Module) -> None:
    """Run `model`'s experts through ``padded_grouped_mm_forward`` when they would run ``grouped_mm`` (the
    default a plain ``from_pretrained`` gives); other implementations are left as they are."""
    if experts_implementation(model) == "grouped_mm":
        set_experts_implementation(model, PADDED_IMPLEMENTATION)


class LayerTap:
    """Accumulates statistics for one MoE layer during collection."""

    def __init__(self, layer: MoELayer, sample_every: int, sample_cap: int) -> None:
        _, hidden, width = ExpertView(layer).dims()
        self.layer = layer
        self.stats = LayerStats(num_experts=layer.num_experts, hidden=hidden, width=width)
        if layer.adapter.coupled is not None:  # one config key sizes both sets: as many coupled experts as routed
            for name in COUPLED_FIELDS:
                self.stats.sums[name] = torch.zeros(layer.num_experts, dtype=torch.float64)
        self.mask: torch.Tensor | None = None  # [T] bool, real tokens of the current batch
        self.sample_every = sample_every
        self.sample_cap = sample_cap
        self._seen_real = 0
        self._samples: list[torch.Tensor] = []
        self._sampled = 0

    # block input: sample real tokens for later decisions (NAEE, merging, router refit)
    def observe_block_input(self, hidden: torch.Tensor) -> None:
        x = hidden.reshape(-1, hidden.shape[-1])
        if self.mask is not None:
            x = x[self.mask]
        n = x.shape[0]
        positions = torch.arange(self._seen_real, self._seen_real + n)
        pick = (positions % self.sample_every) == 0
        self._seen_real += n
        if self._sampled < self.sample_cap and bool(pick.any()):
            # kept in the activations' dtype (exact; half the bytes of float32 in a bf16 model: the samples of
            # every layer stay in memory until the compress sweep ends); readers convert
            chosen = x[pick][: self.sample_cap - self._sampled].detach().cpu()
            self._samples.append(chosen)
            self._sampled += chosen.shape[0]

    def observe_router(self, logits: torch.Tensor) -> None:
        s = self.stats.sums
        # the routed experts' columns: routers with extra classes (shared gates, zero experts, skip) score them last
        logits = logits.reshape(-1, logits.shape[-1])[:, : self.stats.num_experts].detach().double()
        if self.mask is not None:
            logits = logits[self.mask]
        s["logit_sum"] += logits.sum(0).cpu()
        s["prob_sum"] += logits.softmax(-1).sum(0).cpu()
        s["logit_gram"] += (logits.T @ logits).cpu()
        self.stats.n_tokens += logits.shape[0]

    def observe_coupled(self, out: tuple) -> None:
        """Routing of the layer's coupled expert set (JetMoE's attention experts) by its own router: per expert,
        real tokens routed (``coupled_freq``) and the gate weight they carried (``coupled_mass``)."""
        from moecompress.arch.discover import grouped_pairs

        tok, eid, w = grouped_pairs(out)
        if self.mask is not None:
            keep = self.mask[tok]
            eid, w = eid[keep], w[keep]
        s = self.stats.sums
        for name, values in (("coupled_freq", torch.ones_like(w, dtype=torch.float64)), ("coupled_mass", w.double())):
            s[name] += torch.zeros(s[name].shape[0], dtype=torch.float64, device=w.device).index_add_(
                0, eid, values).cpu()

    def observe_extra(self, tok: torch.Tensor) -> None:
        """Count picks of zero-computation experts (token ids `tok`, one per pick): no expert's statistics."""
        self.stats.extra_picks += int(self.mask[tok].sum()) if self.mask is not None else int(tok.numel())

    def observe_experts(self, hidden: torch.Tensor, out: torch.Tensor, tok: torch.Tensor, eid: torch.Tensor,
                        w: torch.Tensor, y: torch.Tensor, act: torch.Tensor) -> None:
        """Per-batch sums in float32 (vectorised over all routed pairs), accumulated in float64."""
        s = self.stats.sums
        e_count = self.stats.num_experts
        if self.mask is not None:
            keep = self.mask[tok]
            tok, eid, w, y, act = tok[keep], eid[keep], w[keep], y[keep], act[keep]
        if self.layer.extra_rows:  # ZAYA masks a pick of its skip class onto expert 0 with weight 0: no expert's
            skipped = w == 0
            if bool(skipped.any()):
                self.stats.extra_picks += int(skipped.sum())
                tok, eid, w, y, act = tok[~skipped], eid[~skipped], w[~skipped], y[~skipped], act[~skipped]
        y, w, act = y.detach().float(), w.detach().float(), act.detach().float()
        norm = y.norm(dim=-1)
        # EASY-EP token weight: how much the routed output turns the hidden state
        h = hidden.detach().float()
        cos = torch.nn.functional.cosine_similarity(h, h + out.detach().float(), dim=-1)
        tok_weight = (1 - cos).clamp_min(0)[tok]
        gate_norm = w * norm
        per_pair = torch.stack([torch.ones_like(w), w, gate_norm, w.abs() * norm, gate_norm * tok_weight], dim=1)
        sums = torch.zeros(e_count, 5, dtype=torch.float32, device=y.device).index_add_(0, eid, per_pair)
        sums = sums.double().cpu()
        for j, name in enumerate(("freq", "soft_freq", "reap_sum", "ean", "easy_ep")):
            s[name] += sums[:, j]
        s["out_sum"] += torch.zeros(e_count, y.shape[1], device=y.device).index_add_(0, eid, y).double().cpu()
        a2 = act * act
        s["act_sq"] += torch.zeros(e_count, a2.shape[1], device=y.device).index_add_(0, eid, a2).double().cpu()
        s["act_sq_gated"] += torch.zeros(e_count, a2.shape[1], device=y.device).index_add_(
            0, eid, a2 * (w * w)[:, None]).double().cpu()
        if y.shape[0]:
            peak = torch.zeros(e_count, dtype=torch.float32, device=y.device).scatter_reduce(
                0, eid, y.abs().amax(dim=-1), reduce="amax", include_self=True)
            s["max_act"] = torch.maximum(s["max_act"], peak.double().cpu())

    def finish(self) -> LayerStats:
        if self._samples:
            self.stats.sample = torch.cat(self._samples)
        return self.stats

    def take(self) -> LayerStats:
        """`finish`, and let go of the statistics and the last block input, so a streamed sweep can write a
        finished layer out and free it while later layers are collected; observing afterwards is an error."""
        stats = self.finish()
        del self.stats
        self._samples = []
        self.__dict__.pop("_block_in", None)
        return stats


class Llama4Tap(LayerTap):
    """Llama4 runs every expert densely on sigmoid-scaled inputs; statistics come from the routed slots."""

    def __init__(self, layer: MoELayer, sample_every: int, sample_cap: int) -> None:
        super().__init__(layer, sample_every, sample_cap)
        self._logits: torch.Tensor | None = None

    def observe_router(self, logits: torch.Tensor) -> None:
        self._logits = logits.detach()
        super().observe_router(logits)

    def take(self) -> LayerStats:
        self._logits = None
        return super().take()

    def observe_dense(self, routed_in: torch.Tensor, routed_out: torch.Tensor, block_in: torch.Tensor) -> None:
        assert self._logits is not None
        logits = self._logits.reshape(-1, self._logits.shape[-1])
        t, e = logits.shape
        k = int(self.layer.block.top_k)
        top = logits.topk(k, dim=-1)
        tok = torch.arange(t).repeat_interleave(k)
        eid = top.indices.reshape(-1)
        w = torch.ones_like(eid, dtype=routed_out.dtype)  # the gate already scaled the input
        xin = routed_in.reshape(e, t, -1)[eid, tok]
        ys, acts = [], []
        order = torch.argsort(eid, stable=True)
        eid, tok, xin = eid[order], tok[order], xin[order]
        counts = torch.bincount(eid, minlength=e).tolist()
        start = 0
        for ex, n in enumerate(counts):
            if n:
                y, a = _llama4_expert(self.layer.experts, ex, xin[start : start + n])
                ys.append(y)
                acts.append(a)
            start += n
        out = routed_out.reshape(e, t, -1).sum(0)
        self.observe_experts(block_in.reshape(t, -1), out, tok, eid, w, torch.cat(ys), torch.cat(acts))


def _llama4_expert(module: torch.nn.Module, e: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gu = x @ module.gate_up_proj[e]
    g, u = gu.chunk(2, dim=-1)
    act = module.act_fn(g) * u
    return act @ module.down_proj[e], act


def experts_implementation(model: torch.nn.Module) -> str | None:
    """The experts implementation the model's routed experts run with now (multimodal models keep it on the
    language model's config, not the top-level one), so a collection can put it back."""
    for layer in moe_layers(model):
        impl = getattr(getattr(layer.experts, "config", None), "_experts_implementation", None)
        if impl is not None:
            return impl
    return getattr(model.config, "_experts_implementation", None)


def set_experts_implementation(model: torch.nn.Module, impl: str) -> None:
    """Route every MoE layer's experts through `impl`. The experts dispatch on their own config, so setting it
    there works for every family, including multimodal wrappers that refuse ``model.set_experts_implementation``."""
    try:
        model.set_experts_implementation(impl)
    except (ValueError, AttributeError):
        pass
    for layer in moe_layers(model):
        cfg = getattr(layer.experts, "config", None)
        if cfg is not None:
            cfg._experts_implementation = impl
        _route_own_forward(layer.experts, impl)


def dispatches(experts: torch.nn.Module) -> bool:
    """Whether an experts module's class carries ``@use_experts_implementation`` (its forward dispatches on the
    config's ``_experts_implementation``); a few families (Step-3.7) define a plain forward with the same call."""
    return "is_concatenated" in vars(experts)


def _route_own_forward(experts: torch.nn.Module, impl: str | None) -> None:
    """Experts whose class does not dispatch get moecompress' implementations as an instance forward (same
    ``(hidden_states, top_k_index, top_k_weights)`` call); any other implementation gives back their own."""
    if dispatches(experts):
        return
    fn = ALL_EXPERTS_FUNCTIONS[impl] if impl and impl.startswith("moecompress") and impl in ALL_EXPERTS_FUNCTIONS \
        else None
    if fn is not None:
        experts.forward = types.MethodType(fn, experts)
    else:
        vars(experts).pop("forward", None)


@contextlib.contextmanager
def collecting(model: torch.nn.Module, sample_tokens: int, total_tokens: int, first_token: int = 0
               ) -> Iterator[dict[int, LayerTap]]:
    """Install taps on every MoE layer (and the tap experts implementation); restore everything on exit.

    `first_token`: real tokens of the calibration set before these batches (a data-parallel rank's share), so
    token samples are taken at the same global positions as in one process."""
    layers = moe_layers(model)
    every = max(1, math.ceil(total_tokens / max(sample_tokens, 1)))
    llama4 = layers[0].adapter.routing == "sigmoid_input_scale"
    taps: dict[int, LayerTap] = {}
    handles: list[Any] = []
    previous = experts_implementation(model)
    if not llama4:
        set_experts_implementation(model, TAP_IMPLEMENTATION)
    logits_pos = 1 if llama4 else 0
    for layer in layers:
        tap = (Llama4Tap if llama4 else LayerTap)(layer, every, sample_tokens)
        tap._seen_real = first_token
        taps[layer.index] = tap
        _ACTIVE[id(layer.experts)] = tap
        handles.append(layer.block.register_forward_pre_hook(
            lambda mod, args, kwargs, tap=tap: _pre_block(tap, args, kwargs), with_kwargs=True))
        handles.append(layer.router.register_forward_hook(
            lambda mod, args, out, tap=tap: tap.observe_router(out[logits_pos] if isinstance(out, tuple) else out)))
        handles += _router_fallback_hooks(layer, tap)
        if layer.adapter.coupled is not None:  # JetMoE's attention experts: ranked by their own router's choices
            spec = layer.adapter.coupled
            stack = decoder_layers(model, layer.adapter)
            router = stack[layer.index].get_submodule(f"{spec.path}.{spec.router.rpartition('.')[0]}")
            handles.append(router.register_forward_hook(lambda mod, args, out, tap=tap: tap.observe_coupled(out)))
        if llama4:
            handles.append(layer.experts.register_forward_hook(
                lambda mod, args, out, tap=tap: tap.observe_dense(args[0], out, tap._block_in)))
    try:
        yield taps
    finally:
        release_taps(model, layers, handles, None if llama4 else previous, _ACTIVE)


def _router_fallback_hooks(layer: MoELayer, tap: LayerTap) -> list[Any]:
    """Routers that read their linear's weight without calling it (LongCat-Flash: ``F.linear(x, classifier.weight)``)
    never fire the hook on the linear: the logits then come from the enclosing router module's output (the
    floating tensor as wide as the router's rows)."""
    root_name = layer.adapter.router_attr.split(".")[0]
    root = layer.block.get_submodule(root_name) if root_name else None
    if root is None or root is layer.router:
        return []
    rows = int(layer.router.weight.shape[0])
    seen = {"n": 0}
    hook = layer.router.register_forward_hook(lambda mod, args, out: seen.__setitem__("n", seen["n"] + 1))

    def before(mod: torch.nn.Module, args: tuple) -> None:
        seen["n"] = 0

    def after(mod: torch.nn.Module, args: tuple, out: Any) -> None:
        if seen["n"]:
            return
        parts = out if isinstance(out, tuple) else (out,)
        logits = next((t for t in parts if isinstance(t, torch.Tensor) and t.is_floating_point()
                       and t.dim() >= 2 and t.shape[-1] == rows), None)
        if logits is not None:
            tap.observe_router(logits)

    return [hook, root.register_forward_pre_hook(before), root.register_forward_hook(after)]


def release_taps(model: torch.nn.Module, layers: list[MoELayer], handles: list[Any], previous: str | None,
                 active: dict[int, Any]) -> None:
    """Undo a collection: remove hooks, forget the layers' taps in `active`, restore the experts implementation."""
    for h in handles:
        h.remove()
    for layer in layers:
        active.pop(id(layer.experts), None)
        _route_own_forward(layer.experts, previous)
    if previous is not None:
        set_experts_implementation(model, previous)


def _pre_block(tap: LayerTap, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else kwargs["hidden_states"]
    tap._block_in = hidden.reshape(-1, hidden.shape[-1])  # type: ignore[attr-defined]
    tap.observe_block_input(hidden)


def collect_stats(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    total_tokens: int,
    sample_tokens: int = 2048,
    progress: Any = None,
    meta: dict[str, Any] | None = None,
    first_token: int = 0,
) -> Stats:
    """Run the calibration batches once and return statistics for every MoE layer.

    `batches` yields (input_ids [B, L], attention_mask [B, L]); `progress(n_done_tokens)` is called per batch.
    """
    t0 = time.perf_counter()
    with torch.inference_mode(), collecting(model, sample_tokens, total_tokens, first_token) as taps:
        for input_ids, attention_mask in batches:
            mask = attention_mask.reshape(-1).bool()
            for tap in taps.values():
                tap.mask = mask
            text_model(model)(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                  use_cache=False)
            if progress is not None:
                progress(int(mask.sum()))
        layers = {idx: tap.finish() for idx, tap in taps.items()}
    info = dict(meta or {})
    info["collect_seconds"] = round(time.perf_counter() - t0, 3)
    return Stats(layers=layers, meta=info)


def collect_sharded(collect: Callable[[list[tuple[torch.Tensor, torch.Tensor]], int], Stats],
                    batches: Sequence[tuple[torch.Tensor, torch.Tensor]], sample_tokens: int) -> Stats:
    """Statistics of `batches` in a data-parallel run: this rank collects its share with
    ``collect(own_batches, first_token)``, the shares are reduced (``reduce_stats``); identity on one process."""
    from moecompress.dist import world

    w = world()
    own, first = w.shard_batches(batches, "statistics")
    return reduce_stats(collect(own, first), w, sample_tokens)
