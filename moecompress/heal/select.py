"""`--select reconstruct`: choose each layer's kept experts by the block-output error *after* heal.

Per-expert scores rank experts one at a time; at high removal what matters is how well the kept set, once
repaired, reproduces the block. NAEE searches subsets on the unhealed error; here every candidate subset is
healed in closed form first — (a) router least squares, (b) ridge down projections, on the fitted tokens —
and scored on the held-out tokens, so selection and repair optimise one objective. Greedy backward
elimination (beam width 1) or a beam; the seed criterion's own subset and every other score criterion's subset
compete too, so the search never returns a subset worse (on this objective) than any per-expert criterion.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from moecompress.arch.adapter import MoELayer
from moecompress.arch.experts import ExpertView, apply_expert
from moecompress.errors import UserError
from moecompress.heal.fit import (
    BlockData,
    ExpertTokens,
    check_healable,
    rel_error,
    router_reads_block_input,
    routing,
    solve_down,
)
from moecompress.heal.spec import HealSpec
from moecompress.passes import merging as M
from moecompress.passes.merge_experts import block_output, prob_kind, router_logits
from moecompress.surgery import routed_as_subset, sliced_router


class HealedReconstruction:
    """Held-out block error of an unpruned layer restricted to a subset and healed in closed form.

    Every expert's activation and output on the (capped) tokens is computed once; a candidate then costs
    one router least-squares solve, one routing call and one small ridge solve per kept expert.
    """

    def __init__(self, layer: MoELayer, data: BlockData, spec: HealSpec, max_tokens: int = 4096) -> None:
        check_healable(layer)
        if layer.hash_routed:
            raise UserError(f"--select reconstruct: layer {layer.index} of {layer.adapter.model_type} chooses experts "
                            "by token id (a hash table), so no subset of them can be searched; use --select criterion")
        self.layer, self.spec = layer, spec
        n = data.x.shape[0]
        if n > max_tokens:  # keep the fitted/held-out proportions
            gen = torch.Generator().manual_seed(spec.seed + layer.index)
            idx = torch.randperm(n, generator=gen)[:max_tokens].sort().values
        else:
            idx = torch.arange(n)
        self.x, self.x_ref, self.y, self.held = data.x[idx], data.x_ref[idx], data.y[idx].double(), data.held[idx]
        self.call = data.call.rows(idx)
        if not bool(self.held.any()) or bool(self.held.all()):
            self.held = torch.arange(self.x.shape[0]) % 10 == 9
        self.fit = ~self.held
        w = ExpertView(layer).get_all()
        self.w = w
        self.dtype = w.down.dtype
        xd = self.x.to(self.dtype)
        with torch.no_grad():
            outs, acts = zip(*(apply_expert(layer.experts, layer.adapter.layout, w.select(e), xd)
                               for e in range(w.num_experts)), strict=True)
            self.acts = torch.stack(acts).double()  # [E, N, I]
            full = block_output(layer, self.x, self.call)
            weights, index = routing(layer, xd, self.call)
            outs_all = torch.stack(outs).double()  # [E, N, H]
            routed = torch.zeros_like(full)
            for slot in range(index.shape[1]):
                routed += weights[:, slot, None].double() * outs_all[index[:, slot], torch.arange(xd.shape[0])]
        self.other = full - routed  # shared experts: unchanged by expert selection
        self.refit_router = spec.router and router_reads_block_input(layer, self.x, self.call)
        self.ref_logits = router_logits(layer, self.x_ref[self.fit])
        self.kind = prob_kind(layer.adapter)
        self.calls = 0

    @torch.no_grad()
    def error(self, keep: list[int]) -> float:
        self.calls += 1
        weight = None
        if self.refit_router:
            groups = [M.Group([k]) for k in keep]
            sliced = sliced_router(self.layer, keep).weight.detach()  # kept rows, then any extra classes' rows
            rows, _, _ = M.refit_to_groups(self.x[self.fit].double(), self.ref_logits, groups, sliced[: len(keep)],
                                           self.kind, self.spec.router_ridge)
            weight = torch.cat([rows.to(self.dtype), sliced[len(keep):]])
        with routed_as_subset(self.layer, keep, weight):  # the family's own block routes the candidate
            weights, index = routing(self.layer, self.x.to(self.dtype), self.call)
        parts = []
        for j, e in enumerate(keep):
            tok, slot = torch.nonzero(index == j, as_tuple=True)
            g = weights[tok, slot].double()[:, None]
            gb = g * self.w.down_bias[e].double() if self.w.down_bias is not None else None
            parts.append(ExpertTokens(tok=tok, act=g * self.acts[e, tok], gbias=gb))
        target = self.y - self.other
        down = [self.w.down[e] for e in keep]
        if self.spec.down:
            _, pred, _ = solve_down(parts, down, target, self.fit, self.spec.ridge, self.spec.sweeps)
        else:
            pred = torch.zeros_like(target)
            for p, d in zip(parts, down, strict=True):
                pred.index_add_(0, p.tok, p.act @ d.double().T + (p.gbias if p.gbias is not None else 0))
        return rel_error(pred, target, self.held)


def select_reconstruct(rec: HealedReconstruction, n_keep: int, n_groups: int = 1, beam: int = 1,
                       seed_keep: list[int] | None = None, protect: list[int] | None = None,
                       rivals: dict[str, list[int]] | None = None) -> tuple[list[int], dict[str, Any]]:
    """Backward elimination (beam search) of experts on the healed held-out block error; the seed's subset and
    every rival subset (other criteria's picks) compete with the search's, so the result is never worse on this
    objective than any of them."""
    t0 = time.perf_counter()
    e = rec.layer.num_experts
    protect = protect or []
    size = e // max(n_groups, 1)
    per_group = n_keep // max(n_groups, 1)
    cache: dict[tuple[int, ...], float] = {}

    def err(keep: tuple[int, ...]) -> float:
        if keep not in cache:
            cache[keep] = rec.error(list(keep))
        return cache[keep]

    frontier = [tuple(range(e))]
    while len(frontier[0]) > n_keep:
        cands: set[tuple[int, ...]] = set()
        for keep in frontier:
            for c in keep:
                if c in protect:
                    continue
                if n_groups > 1 and sum(1 for k in keep if k // size == c // size) <= per_group:
                    continue
                cands.add(tuple(k for k in keep if k != c))
        frontier = sorted(cands, key=lambda k: (err(k), k))[:beam]
    best = frontier[0]
    info: dict[str, Any] = {"search": "greedy" if beam == 1 else f"beam{beam}", "healed_error": round(err(best), 6)}
    if seed_keep is not None:
        seed = tuple(sorted(seed_keep))
        info["seed_keep"] = list(seed)
        info["seed_healed_error"] = round(err(seed), 6)
        if err(seed) < err(best):
            best = seed
            info["picked"] = "seed"
    for name, keep in (rivals or {}).items():
        cand = tuple(sorted(keep))
        info.setdefault("rival_healed_error", {})[name] = round(err(cand), 6)
        if err(cand) < err(best):
            best = cand
            info["picked"] = name
    info.update({"candidates": len(cache), "exhaustive_would_be": math.comb(e, n_keep),
                 "seconds": round(time.perf_counter() - t0, 2)})
    return list(best), info
