"""The only code that changes model structure.

Every operation keeps the three places that describe an MoE layer consistent: the tensors (router rows,
per-expert router vectors, fused expert weights), the integer attributes modules cache (``num_experts``
is used by ``grouped_mm``'s histogram; stale values silently corrupt routing), and the config that
``save_pretrained`` writes. Vanilla transformers holds one expert count and one expert width per config,
so multi-layer operations must leave every layer with the same numbers; ``sync_config`` checks that.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from moecompress.arch.adapter import MoEAdapter, MoELayer, moe_layers
from moecompress.arch.experts import ExpertView, ExpertWeights
from moecompress.errors import UserError

_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")
_WIDTH_ATTRS = ("intermediate_dim", "intermediate_size", "expert_dim")


# ---- guards (config only, so they run before any weight loads) ------------------------------------
def check_expert_count(adapter: MoEAdapter, config: Any, n_keep: int) -> None:
    """Refuse expert counts the family's router cannot route correctly."""
    n_total = adapter.num_experts(config)
    top_k = adapter.top_k(config)
    if n_keep >= n_total or n_keep < 1:
        raise UserError(f"keeping {n_keep} of {n_total} experts is not a reduction; choose 1 ≤ keep < {n_total}")
    if n_keep < top_k:
        max_ratio = 1 - top_k / n_total
        raise UserError(
            f"keeping {n_keep} experts leaves fewer than the {top_k} the router picks per token; "
            f"keep ≥ {top_k} experts (ratio ≤ {max_ratio:.4g})"
        )
    groups = adapter.num_groups(config)
    if groups > 1:
        if n_keep % groups:
            raise UserError(
                f"the router is group-limited with {groups} groups: the kept count must be a multiple of {groups} "
                f"so every group keeps the same number (got {n_keep})"
            )
        per_group = n_keep // groups
        topk_group = adapter.groups_per_token(config)
        if per_group < 2:
            raise UserError(f"group-limited routing needs ≥ 2 experts per group; {n_keep} over {groups} groups leaves {per_group}")
        if per_group * topk_group < top_k:
            raise UserError(
                f"{per_group} experts in each of the {topk_group} chosen groups cannot supply top-{top_k}; keep more experts"
            )


def check_group_balance(adapter: MoEAdapter, config: Any, n_total: int, keep: Sequence[int]) -> None:
    """Group-limited routers address experts by group = index // (E / n_group); each group must keep the same count."""
    groups = adapter.num_groups(config)
    if groups <= 1:
        return
    size = n_total // groups
    counts = torch.bincount(torch.as_tensor(list(keep)) // size, minlength=groups)
    if not bool((counts == counts[0]).all()):
        raise UserError(f"kept experts are unevenly spread over the {groups} routing groups: {counts.tolist()}")


# ---- tensors ----------------------------------------------------------------------------------------
def _resolve(module: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    *parents, leaf = path.split(".")
    for p in parents:
        module = getattr(module, p)
    return module, leaf


def _set_tensor(owner: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(owner, name)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, name, torch.nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        owner._buffers[name] = value.contiguous()


def _set_ints(modules: Sequence[torch.nn.Module], names: Sequence[str], old: int, new: int) -> None:
    for mod in modules:
        for name in names:
            if isinstance(getattr(mod, name, None), int) and getattr(mod, name) == old:
                setattr(mod, name, new)


# ints that count the router's classes (routed experts + extra rows) or the routed experts under another name
_TOTAL_ATTRS = (*_COUNT_ATTRS, "num_routed_experts", "total_experts", "num_router_classes", "n_total_experts")


def _set_counts(modules: Sequence[torch.nn.Module], old: int, new: int, extra: int) -> None:
    """Rewrite cached expert counts: `old` → `new`, and with `extra` router rows past the experts the class
    totals `old + extra` → `new + extra` too (each int read once, so the two rewrites cannot chain)."""
    names = _COUNT_ATTRS if not extra else _TOTAL_ATTRS
    for mod in modules:
        for name in names:
            value = getattr(mod, name, None)
            if not isinstance(value, int) or isinstance(value, bool):
                continue
            if value == old:
                setattr(mod, name, new)
            elif extra and value == old + extra:
                setattr(mod, name, new + extra)


def _with_tail(idx: torch.Tensor, size: int, n_old: int) -> torch.Tensor:
    """Indices selecting the kept experts along an axis of `size`: past the `n_old` routed experts the
    extra rows (shared-expert gates, zero-computation experts, skip class) all stay, in place, after them."""
    if size == n_old:
        return idx
    return torch.cat([idx, torch.arange(n_old, size, dtype=torch.long)])


def _select_rows(t: torch.Tensor, axis: int, idx: torch.Tensor, n_old: int) -> torch.Tensor:
    return t.detach().index_select(axis, _with_tail(idx, int(t.shape[axis]), n_old))


def keep_experts(layer: MoELayer, keep: Sequence[int]) -> None:
    """Keep only experts `keep` (in the given order) of one MoE layer: router rows, router vectors, weights, ints."""
    n_old = layer.num_experts
    idx = torch.as_tensor(list(keep), dtype=torch.long)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n_old or idx.unique().numel() != idx.numel():
        raise UserError(f"layer {layer.index}: invalid expert indices {list(keep)} for {n_old} experts")
    router = layer.router
    extra = layer.extra_rows
    rows_before = router.weight.detach()[:n_old].clone()
    _set_tensor(router, "weight", _select_rows(router.weight, 0, idx, n_old))
    for vec in layer.adapter.router_vectors:
        owner, leaf = _resolve(router, vec.path)
        t = getattr(owner, leaf, None)
        if t is not None:
            _set_tensor(owner, leaf, _select_rows(t, vec.axis, idx, n_old))
    for vec in layer.adapter.block_vectors:
        owner, leaf = _resolve(layer.block, vec.path)
        _set_tensor(owner, leaf, _select_rows(getattr(owner, leaf), vec.axis, idx, n_old))
    for path in layer.adapter.expert_id_tables:
        owner, leaf = _resolve(layer.block, path)
        table = getattr(owner, leaf, None)
        if table is not None:  # hash-routed layers only; top-k layers of the same model have none
            _set_tensor(owner, leaf, remap_expert_ids(table, idx, rows_before))
    ExpertView(layer).select_experts(idx)
    chunks = layer.experts.__dict__.get("expert_chunks")
    if chunks is not None:  # experts read in chunks by the engine (weights on meta): keep their source ids
        chunks.select(idx.tolist())
    for other in layer.paired():  # the block's other expert sets share the count key: same count, own ranking
        keep_experts(other, paired_keep(other, len(idx)))
    _set_counts(list(layer.block.modules()), n_old, len(idx), extra)


def keep_coupled(decoder_layer: torch.nn.Module, adapter: MoEAdapter, keep: Sequence[int]) -> None:
    """Keep experts `keep` (in that order) of the layer's coupled expert set (JetMoE's attention experts, sized by
    the same config key as the MLP experts): router rows, per-expert tensors, cached counts. A no-op for families
    without one."""
    spec = adapter.coupled
    if spec is None:
        return
    module = decoder_layer.get_submodule(spec.path)
    router = module.get_submodule(spec.router)
    n_old = int(router.weight.shape[0])
    idx = torch.as_tensor(list(keep), dtype=torch.long)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n_old or idx.unique().numel() != idx.numel():
        raise UserError(f"{spec.label}: invalid expert indices {list(keep)} for {n_old} experts")
    _set_tensor(router, "weight", router.weight.detach()[idx])
    for path in spec.tensors:
        owner, leaf = _resolve(module, path)
        _set_tensor(owner, leaf, getattr(owner, leaf).detach()[idx])
    _set_counts(list(module.modules()), n_old, len(idx), 0)


def coupled_count(decoder_layer: torch.nn.Module, adapter: MoEAdapter) -> int | None:
    """Experts in the layer's coupled set now (None: the family has none)."""
    if adapter.coupled is None:
        return None
    return int(decoder_layer.get_submodule(f"{adapter.coupled.path}.{adapter.coupled.router}").weight.shape[0])


# How the experts of a paired set are chosen (recorded in the report and model card): text-only calibration routes
# no token to them, so no routing statistic ranks them.
PAIRED_CRITERION = ("data-free: router-row L2 norm × Frobenius norm of the expert's down projection × geometric "
                    "mean of its gate/up Frobenius norms (the score moecompress uses for MTP experts without "
                    "calibration); the highest-scoring are kept, in their original order")


def paired_sets_note(adapter: MoEAdapter, before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """The line the report, provenance and model card carry when a pass changes a model with paired expert sets."""
    if not adapter.paired_sets:
        return None
    sets = ", ".join(adapter.paired_sets)
    n0, n1 = adapter.num_experts(before), adapter.num_experts(after)
    if n1 != n0:
        return (f"the {sets} experts of every MoE layer were reduced too, {n0} → {n1} like the "
                f"{adapter.experts_attr.split('.')[0]} experts (one config key counts both sets); text-only "
                f"calibration routes no token to them, so they were ranked {PAIRED_CRITERION} (pruned, never "
                "merged); image/video quality was not measured")
    if adapter.expert_width(after) != adapter.expert_width(before):
        return (f"only the {adapter.experts_attr.split('.')[0]} experts (and the shared experts sized from them) were "
                f"narrowed; the {sets} experts keep their count and width")
    return None


def paired_keep(layer: MoELayer, n: int) -> list[int]:
    """The `n` experts a paired set (ERNIE-4.5-VL's vision experts) keeps when the compressed set goes to `n`: the
    best by the data-free PAIRED_CRITERION, in ascending order (the router's rows keep their relative order)."""
    from moecompress.io.mtp import expert_scores

    if n >= layer.num_experts:
        return list(range(layer.num_experts))
    return sorted(expert_scores(layer).topk(n).indices.tolist())


@torch.no_grad()
def remap_expert_ids(table: torch.Tensor, keep: torch.Tensor, router_rows: torch.Tensor,
                     chunk: int = 16384) -> torch.Tensor:
    """A hash-routing table (token id → its top-k expert ids, [vocab, k]) rewritten for keeping experts `keep`:
    kept experts get their new positions; a dropped expert's slot goes to the kept expert whose router row
    (`router_rows`, [E, H] before the change; after a merge, the merged rows) points most the same way, skipping
    kept experts the token already uses, so each token keeps k distinct experts."""
    n_old = int(router_rows.shape[0])
    if table.numel() and (int(table.min()) < 0 or int(table.max()) >= n_old):
        raise UserError(f"expert-id table holds ids outside 0..{n_old - 1}")
    keep = keep.long()
    new_pos = torch.full((n_old,), -1, dtype=torch.long)
    new_pos[keep] = torch.arange(keep.numel())
    unit = torch.nn.functional.normalize(router_rows.double(), dim=1)
    ranking = (unit @ unit[keep].T).argsort(dim=1, descending=True)  # [E_old, n_keep]: kept positions, best first
    out = new_pos[table.long()]
    for start in range(0, out.shape[0], chunk):
        rows = out[start:start + chunk]
        src = table[start:start + chunk].long()
        for j in range(rows.shape[1]):
            todo = (rows[:, j] < 0).nonzero().squeeze(1)
            if todo.numel() == 0:
                continue
            cands = ranking[src[todo, j]]  # [R, n_keep]
            taken = (cands[:, :, None] == rows[todo][:, None, :]).any(-1)
            rows[todo, j] = cands.gather(1, (~taken).int().argmax(1, keepdim=True)).squeeze(1)
    return out.to(table.dtype)


def replace_expert(layer: MoELayer, index: int, weights: ExpertWeights) -> None:
    """Overwrite one expert's weights (same width); used by merging."""
    ExpertView(layer).set(index, weights)


def set_router_rows(layer: MoELayer, weight: torch.Tensor, vectors: dict[str, torch.Tensor] | None = None) -> None:
    """Replace router rows (and optionally router vectors) after merging; shapes must already match, except that
    rows (vectors) for the routed experts alone keep the router's extra rows after them in place."""
    old = layer.router.weight.detach()
    if weight.shape[0] == layer.num_experts < old.shape[0]:
        weight = torch.cat([weight.to(old.dtype), old[layer.num_experts:]])
    _set_tensor(layer.router, "weight", weight.to(old.dtype))
    for path, value in (vectors or {}).items():
        owner, leaf = _resolve(layer.router, path)
        current = getattr(owner, leaf).detach()
        axis = next((v.axis for v in layer.adapter.router_vectors if v.path == path), 0)
        if value.shape[axis] == layer.num_experts < current.shape[axis]:
            value = torch.cat([value.to(current.dtype), current.narrow(axis, layer.num_experts,
                                                                       current.shape[axis] - layer.num_experts)], axis)
        _set_tensor(owner, leaf, value.to(current.dtype))


def grouped_mm_width_multiple(dtype: torch.dtype) -> int:
    """Smallest width step transformers' grouped_mm kernel accepts: rows of 16 bytes (8 bf16, 4 fp32 values).

    The step is taken for 2-byte dtypes even in fp32, because users commonly reload checkpoints in bf16.
    """
    return max(16 // max(torch.empty(0, dtype=dtype).element_size(), 1), 8)


def shrink_neurons(layer: MoELayer, keep_per_expert: torch.Tensor, shared_keep: dict[str, torch.Tensor] | None = None) -> None:
    """Keep intermediate neurons `keep_per_expert [E, I_new]` of each routed expert (one width for all).

    When the family couples the shared-expert width to the routed width (trap a), the shared expert must
    shrink too: pass its kept neurons in `shared_keep` (name -> indices), else the largest-norm ones are kept.
    """
    view = ExpertView(layer)
    w = view.get_all()
    n_exp, width = w.num_experts, w.width
    if keep_per_expert.dim() != 2 or keep_per_expert.shape[0] != n_exp:
        raise UserError(f"layer {layer.index}: keep_per_expert must be [E={n_exp}, I_new]")
    new_width = int(keep_per_expert.shape[1])
    if not 0 < new_width <= width:
        raise UserError(f"layer {layer.index}: new width {new_width} must be in 1..{width}")
    multiple = grouped_mm_width_multiple(w.dtype)
    if new_width % multiple:
        raise UserError(
            f"layer {layer.index}: expert width {new_width} is not a multiple of {multiple}; transformers' default "
            f"grouped_mm experts kernel needs 16-byte rows ({multiple} {w.dtype} values), so the checkpoint "
            "would load but crash on its first forward. Round the kept width to a multiple of "
            f"{multiple}")
    k = keep_per_expert.long()
    rows = torch.arange(n_exp)[:, None]
    new = ExpertWeights(
        gate=w.gate[rows, k] if w.gate is not None else None, up=w.up[rows, k], down=w.down.transpose(1, 2)[rows, k].transpose(1, 2),
        gate_bias=w.gate_bias[rows, k] if w.gate_bias is not None else None,
        up_bias=w.up_bias[rows, k] if w.up_bias is not None else None,
        down_bias=w.down_bias,
    )
    view.set_all(new)
    _set_ints([layer.experts], _WIDTH_ATTRS, width, new_width)
    if layer.adapter.shared_width_coupled:
        for name, mlp in layer.shared():
            if not hasattr(mlp, "gate_proj"):
                continue
            if not isinstance(mlp.gate_proj, torch.nn.Linear):  # stacked shared experts [S, I, H] (Inkling)
                shrink_stacked_mlp(mlp, new_width * (int(mlp.gate_proj.shape[1]) // width))
                continue
            old_shared = mlp.gate_proj.weight.shape[0]
            ratio = old_shared // width
            target = new_width * ratio
            keep = (shared_keep or {}).get(name)
            if keep is None:
                score = mlp.down_proj.weight.detach().norm(dim=0) * mlp.up_proj.weight.detach().norm(dim=1)
                keep = score.topk(target).indices.sort().values
            shrink_mlp(mlp, keep)


def shrink_stacked_mlp(mlp: torch.nn.Module, target: int) -> None:
    """Keep the `target` largest-norm intermediate neurons of each of S stacked gate/up/down experts (gate_proj and
    up_proj [S, I, H], down_proj [S, H, I] parameters; Inkling's shared experts), each expert its own."""
    gate, up, down = (getattr(mlp, n).detach() for n in ("gate_proj", "up_proj", "down_proj"))
    score = down.norm(dim=1) * up.norm(dim=2)  # [S, I]
    keep = score.topk(target, dim=1).indices.sort(dim=1).values
    rows = torch.arange(gate.shape[0])[:, None]
    for name, value in (("gate_proj", gate[rows, keep]), ("up_proj", up[rows, keep]),
                        ("down_proj", down.transpose(1, 2)[rows, keep].transpose(1, 2))):
        setattr(mlp, name, torch.nn.Parameter(value.contiguous(), requires_grad=False))


def shrink_mlp(mlp: torch.nn.Module, keep: torch.Tensor) -> None:
    """Keep intermediate neurons `keep` of a dense gate/up/down MLP (nn.Linear layout)."""
    keep = keep.long()
    old = mlp.gate_proj.weight.shape[0]
    for name in ("gate_proj", "up_proj"):
        lin = getattr(mlp, name)
        lin.weight = torch.nn.Parameter(lin.weight.detach()[keep].contiguous(), requires_grad=False)
        if lin.bias is not None:
            lin.bias = torch.nn.Parameter(lin.bias.detach()[keep].contiguous(), requires_grad=False)
        lin.out_features = len(keep)
    mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight.detach()[:, keep].contiguous(), requires_grad=False)
    mlp.down_proj.in_features = len(keep)
    _set_ints([mlp], ("intermediate_size",), old, len(keep))


# ---- config -----------------------------------------------------------------------------------------
def sync_config(model: torch.nn.Module, adapter: MoEAdapter | None = None) -> dict[str, int]:
    """Write the live expert count and width into the config (every alias key) and the top-level model ints.

    Raises if layers disagree: vanilla transformers can represent only one count and one width.
    """
    layers = moe_layers(model, adapter)
    adapter = layers[0].adapter
    counts = {layer.num_experts for layer in layers} | {p.num_experts for layer in layers for p in layer.paired()}
    widths = {ExpertView(layer).dims()[2] for layer in layers}
    if len(counts) != 1 or len(widths) != 1:
        raise UserError(
            f"MoE layers disagree (experts {sorted(counts)}, widths {sorted(widths)}); vanilla transformers needs "
            "one expert count and one expert width for the whole model"
        )
    n, width = counts.pop(), widths.pop()
    if adapter.coupled is not None:
        from moecompress.arch.adapter import decoder_layers

        stack = decoder_layers(model, adapter)
        other = {coupled_count(stack[layer.index], adapter) for layer in layers}
        if other != {n}:
            raise UserError(f"{adapter.model_type}: the {adapter.coupled.label} hold {sorted(other)} experts but the "
                            f"MLP experts {n}; one config key sizes both, so both must be cut to the same count")
    cfg = model.config
    old_n = adapter.num_experts(cfg)
    adapter.set_counts(cfg, n)
    adapter.set_width(cfg, width)
    _set_ints([model], _COUNT_ATTRS, old_n, n)
    return {"num_experts": n, "expert_width": width}


def keep_experts_everywhere(model: torch.nn.Module, keep: dict[int, Sequence[int]],
                            coupled: dict[int, Sequence[int]] | None = None) -> None:
    """Apply `keep_experts` to several layers (by decoder index), and `keep_coupled` with `coupled` (families with a
    coupled expert set), then sync the config."""
    layers = {layer.index: layer for layer in moe_layers(model)}
    missing = set(keep) - set(layers)
    if missing:
        raise UserError(f"layers {sorted(missing)} are not MoE layers; MoE layers: {sorted(layers)}")
    for idx, kept in keep.items():
        keep_experts(layers[idx], kept)
    if coupled:
        from moecompress.arch.adapter import decoder_layers

        adapter = next(iter(layers.values())).adapter
        stack = decoder_layers(model, adapter)
        for idx, kept in coupled.items():
            keep_coupled(stack[idx], adapter, kept)
    sync_config(model)


def sliced_router(layer: MoELayer, keep: Sequence[int]) -> torch.nn.Module:
    """A shallow copy of the layer's router that only knows experts `keep` (the original is untouched).

    Lets decisions evaluate a candidate subset with the family's own routing rule without copying experts.
    """
    import copy

    idx = torch.as_tensor(list(keep), dtype=torch.long)
    router = copy.copy(layer.router)
    router._parameters = dict(router._parameters)
    router._buffers = dict(router._buffers)
    router._modules = {k: copy.copy(v) for k, v in router._modules.items()}
    for sub in router._modules.values():
        sub._parameters = dict(sub._parameters)
        sub._buffers = dict(sub._buffers)
    n_old = layer.num_experts
    router._parameters["weight"] = torch.nn.Parameter(_select_rows(layer.router.weight, 0, idx, n_old),
                                                      requires_grad=False)
    for vec in layer.adapter.router_vectors:
        owner, leaf = _resolve(router, vec.path)
        t = getattr(owner, leaf, None)
        if t is not None:
            _set_tensor(owner, leaf, _select_rows(t, vec.axis, idx, n_old))
    _set_counts([router, *router._modules.values()], n_old, len(idx), layer.extra_rows)
    return router


@contextlib.contextmanager
def routed_as_subset(layer: MoELayer, keep: Sequence[int], weight: torch.Tensor | None = None) -> Iterator[None]:
    """Inside, the layer's block routes as if only experts `keep` were left — router rows (`weight` instead, when
    given: the full router weight, extra rows included), router and block vectors, cached expert counts — while its
    experts stay untouched; everything is put back on exit.

    Lets a search route candidate subsets with the family's own block (``heal.fit.routing``), for routers that
    need the block around them (a score bias kept on the block, another output layout), without copying experts.
    Token-id tables are not remapped: hash-routed layers are not for this."""
    n_old, extra = layer.num_experts, layer.extra_rows  # read before the router rows change
    idx = torch.as_tensor(list(keep), dtype=torch.long)
    swapped: list[tuple[torch.nn.Module, str, Any]] = []

    def swap(owner: torch.nn.Module, leaf: str, value: torch.Tensor) -> None:
        swapped.append((owner, leaf, getattr(owner, leaf)))
        _set_tensor(owner, leaf, value)

    experts = set(layer.experts.modules())
    modules = [m for m in layer.block.modules() if m not in experts]
    names = _COUNT_ATTRS if not extra else _TOTAL_ATTRS
    counts = [(m, a, getattr(m, a)) for m in modules for a in names if isinstance(getattr(m, a, None), int)]
    try:
        swap(layer.router, "weight", weight if weight is not None else _select_rows(layer.router.weight, 0, idx, n_old))
        for vec in layer.adapter.router_vectors:
            owner, leaf = _resolve(layer.router, vec.path)
            if getattr(owner, leaf, None) is not None:
                swap(owner, leaf, _select_rows(getattr(owner, leaf), vec.axis, idx, n_old))
        for vec in layer.adapter.block_vectors:
            owner, leaf = _resolve(layer.block, vec.path)
            swap(owner, leaf, _select_rows(getattr(owner, leaf), vec.axis, idx, n_old))
        _set_counts(modules, n_old, len(idx), extra)
        yield
    finally:
        for owner, leaf, value in reversed(swapped):
            if isinstance(value, torch.nn.Parameter):
                owner._parameters[leaf] = value
            else:
                owner._buffers[leaf] = value
        for m, a, v in counts:
            setattr(m, a, v)


def merge_into(layer: MoELayer, anchors: Sequence[int], merged: ExpertWeights | None, router_weight: torch.Tensor,
               vectors: dict[str, torch.Tensor] | None = None, replaced: Sequence[int] | None = None) -> None:
    """Replace expert `anchors[j]` by merged expert j (and its router row / vectors), then keep only the anchors.

    `merged` stacks one expert per entry of `replaced` (positions in `anchors`; default: every anchor; None when
    there are none) — a group of one is its anchor unchanged, so callers need not build it; `router_weight` is [n, H]; `vectors` maps a
    router-vector path to its values for the n merged experts (along the vector's expert axis).
    The merged experts end up in ascending anchor order, so group-limited routers keep their blocks.
    """
    idx = torch.as_tensor(list(anchors), dtype=torch.long)
    replaced = list(range(idx.numel())) if replaced is None else list(replaced)
    n_old = layer.num_experts
    if idx.numel() == 0 or idx.unique().numel() != idx.numel() or int(idx.min()) < 0 or int(idx.max()) >= n_old:
        raise UserError(f"layer {layer.index}: invalid merge anchors {list(anchors)} for {n_old} experts")
    n_merged = 0 if merged is None else merged.num_experts
    if n_merged != len(replaced) or router_weight.shape[0] != idx.numel():
        raise UserError(f"layer {layer.index}: {idx.numel()} anchors, {len(replaced)} to replace, but "
                        f"{n_merged} merged experts and {router_weight.shape[0]} router rows")
    weight = layer.router.weight.detach().clone()
    weight[idx] = router_weight.to(weight.dtype)
    new_vectors: dict[str, torch.Tensor] = {}
    axes = {vec.path: vec.axis for vec in layer.adapter.router_vectors}
    for path, value in (vectors or {}).items():
        if path not in axes:
            raise UserError(f"layer {layer.index}: {path!r} is not a router vector of {layer.adapter.model_type}")
        owner, leaf = _resolve(layer.router, path)
        old = getattr(owner, leaf).detach().clone()
        new_vectors[path] = old.index_copy(axes[path], idx, value.to(old.dtype))
    set_router_rows(layer, weight, new_vectors)
    order = idx.sort()
    keep_experts(layer, order.values.tolist())
    # the kept experts are the anchors; each replaced one is written into its slot of the (now smaller) fused
    # tensors in place: no copy of the layer
    slot = torch.empty_like(order.indices)
    slot[order.indices] = torch.arange(idx.numel())
    if merged is not None:
        ExpertView(layer).write([int(slot[j]) for j in replaced], merged)


def mask_neurons(layer: MoELayer, keep_mask: torch.Tensor, shared_keep: dict[str, torch.Tensor] | None = None) -> None:
    """Zero the routed-expert neurons where `keep_mask [E, I]` is False (gate/up rows, their biases, down columns).

    Shapes stay the same, so any per-expert neuron count loads in vanilla transformers; used to measure a
    non-uniform (globally ranked) selection that cannot be written as one expert width. A zeroed neuron
    contributes exactly 0 (act(0)·0 for SwiGLU, and for gpt-oss's clamped variant). Coupled shared
    experts keep only `shared_keep[name]` (the rest zeroed), mirroring what `shrink_neurons` would keep.
    """
    view = ExpertView(layer)
    w = view.get_all()
    if keep_mask.shape != w.up.shape[:2]:
        raise UserError(f"layer {layer.index}: keep_mask must be [E, I] = {list(w.up.shape[:2])}")
    m = keep_mask.to(w.dtype)
    view.set_all(ExpertWeights(
        gate=w.gate * m[..., None] if w.gate is not None else None, up=w.up * m[..., None], down=w.down * m[:, None, :],
        gate_bias=w.gate_bias * m if w.gate_bias is not None else None,
        up_bias=w.up_bias * m if w.up_bias is not None else None,
        down_bias=w.down_bias,
    ))
    for name, mlp in layer.shared():
        keep = (shared_keep or {}).get(name)
        if keep is None:
            continue
        sm = torch.zeros(mlp.gate_proj.weight.shape[0], dtype=mlp.gate_proj.weight.dtype)
        sm[keep.long()] = 1
        with torch.no_grad():
            for lin in (mlp.gate_proj, mlp.up_proj):
                lin.weight.mul_(sm[:, None])
                if lin.bias is not None:
                    lin.bias.mul_(sm)
            mlp.down_proj.weight.mul_(sm[None, :])


def overwrite_block_tensors(layer: MoELayer, tensors: dict[str, torch.Tensor]) -> None:
    """Copy new values into existing tensors of one MoE block (names relative to the block), same shapes only.

    Heal changes values, never structure: a shape change here is a bug, refused before anything is written.
    """
    params = dict(layer.block.named_parameters())
    for name, value in tensors.items():
        if name not in params:
            raise UserError(f"layer {layer.index}: the MoE block has no parameter {name!r}")
        if tuple(value.shape) != tuple(params[name].shape):
            raise UserError(f"layer {layer.index}: {name} would change shape {tuple(params[name].shape)} → "
                            f"{tuple(value.shape)}; heal must keep shapes")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
