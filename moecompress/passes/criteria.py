"""Expert-importance criteria: pure decisions on collected statistics (plus the layer itself for NAEE).

Every function returns the indices of experts to keep in one layer, sorted ascending.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from moecompress.arch.adapter import MoELayer
from moecompress.calib.collect import stored_expert_forward
from moecompress.calib.stats import LayerStats
from moecompress.errors import UserError

SCORE_CRITERIA = ("frequency", "soft_frequency", "reap", "ean", "easy_ep")
CRITERIA = (*SCORE_CRITERIA, "naee", "random")


def expert_scores(stats: LayerStats, criterion: str) -> torch.Tensor:
    """Higher = more important."""
    table = {
        "frequency": lambda: stats.sums["freq"],
        "soft_frequency": lambda: stats.sums["soft_freq"],
        "reap": lambda: stats.reap,
        "ean": lambda: stats.sums["ean"],
        "easy_ep": lambda: stats.sums["easy_ep"],
    }
    if criterion not in table:
        raise UserError(f"criterion {criterion!r} has no per-expert score; scored criteria: {', '.join(table)}")
    return table[criterion]().double()


def super_experts(stats: LayerStats, factor: float) -> list[int]:
    """Experts whose peak output magnitude is `factor`x the layer's median peak (massive-activation carriers)."""
    peak = stats.sums["max_act"]
    med = float(peak.median())
    if med <= 0:
        return []
    return [int(i) for i in torch.nonzero(peak > factor * med).flatten()]


def select_by_score(scores: torch.Tensor, n_keep: int, groups: int = 1, protect: list[int] | None = None) -> list[int]:
    """Keep the `n_keep` best experts; with routing groups, the same number from each group."""
    scores = scores.clone().double()
    for p in protect or []:
        scores[p] = math.inf
    e = scores.numel()
    if groups <= 1:
        return sorted(int(i) for i in torch.topk(scores, n_keep, sorted=True).indices)
    size, per = e // groups, n_keep // groups
    kept: list[int] = []
    for g in range(groups):
        block = scores[g * size : (g + 1) * size]
        kept += [g * size + int(i) for i in torch.topk(block, per).indices]
    return sorted(kept)


def coupled_keep(stats: LayerStats | None, n_keep: int) -> tuple[list[int], dict[str, Any]]:
    """The coupled set's kept experts (JetMoE's attention experts), whatever the MLP criterion: the `n_keep` their
    own router gave the most gate weight on the calibration tokens (ties: more tokens routed, then the lower
    index), in index order; and the numbers the report shows."""
    if stats is None or "coupled_mass" not in stats.sums:
        raise UserError("the statistics hold no routing of the attention experts (collected before they were "
                        "observed); delete the statistics cache and rerun")
    mass, freq = stats.sums["coupled_mass"].double(), stats.sums["coupled_freq"].double()
    order = sorted(range(mass.numel()), key=lambda e: (-float(mass[e]), -float(freq[e]), e))
    keep = sorted(order[:n_keep])
    removed = float(mass[order[n_keep:]].sum() / mass.sum().clamp_min(1e-30))
    return keep, {"kept": keep, "removed_gate_mass": round(removed, 5),
                  "gate_mass": [round(float(v), 6) for v in mass], "tokens": [int(v) for v in freq]}


def coupled_summary(label: str, before: int, after: int) -> str:
    """The report's line for a coupled set cut with the MLP experts."""
    return (f"{label} reduced too: one config key sizes both the MLP and the {label}, so every layer's {label} "
            f"were also cut {before}→{after}, keeping those their own router gave the most gate weight on the "
            "calibration tokens (ties: more tokens routed); pruned, never merged")


def random_keep(num_experts: int, n_keep: int, groups: int, seed: int, layer_index: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 100_003 + layer_index)
    return select_by_score(torch.rand(num_experts, generator=gen, dtype=torch.float64), n_keep, groups)


# ---- NAEE: choose the subset that best reconstructs the layer output ----------------------------------
class RoutedReconstruction:
    """Reconstruction error of the routed output when only a subset of experts stays.

    Expert outputs on the sampled block inputs are computed once ([E, N, H]); each candidate subset then
    costs one router call on a sliced router (so every family's own routing rule is honoured) and a gather.
    """

    def __init__(self, layer: MoELayer, sample: torch.Tensor, max_tokens: int = 1024) -> None:
        from moecompress.surgery import sliced_router

        if layer.adapter.routing == "sigmoid_input_scale":
            raise UserError("naee needs routed-output reconstruction; llama4_text scales expert inputs — use reap")
        self.layer = layer
        self._sliced_router = sliced_router
        dtype = layer.experts.down_proj.dtype
        self.x = sample[:max_tokens].to(dtype)
        from moecompress.passes.merge_experts import expert_inputs

        with torch.no_grad():
            xe = expert_inputs(layer, self.x)  # latent MoEs: the projected tokens the experts see
            self.y = torch.stack([stored_expert_forward(layer.experts, e, xe)[0]
                                  for e in range(layer.num_experts)]).double()  # [E, N, H]
        self.full = self._routed(list(range(layer.num_experts)))

    @torch.no_grad()
    def _routed(self, keep: list[int]) -> torch.Tensor:
        router = self._sliced_router(self.layer, keep)
        out = router(self.x)
        weights, index = out[1].double(), out[2]
        orig = torch.as_tensor(keep)[index]  # [N, k] original expert ids
        n = torch.arange(self.x.shape[0])[:, None]
        return (self.y[orig, n] * weights[..., None]).sum(1)

    def error(self, keep: list[int]) -> float:
        return float(((self._routed(keep) - self.full) ** 2).sum() / self.full.pow(2).sum().clamp_min(1e-30))


def naee_keep(layer: MoELayer, stats: LayerStats, n_keep: int, groups: int = 1, exhaustive_limit: int = 2000,
              protect: list[int] | None = None) -> tuple[list[int], dict[str, Any]]:
    """Exhaustive over subsets when there are few, else greedy backward elimination."""
    if stats.sample is None or stats.sample.shape[0] == 0:
        raise UserError("naee needs sampled layer inputs; recollect statistics with sample_tokens > 0")
    e = layer.num_experts
    rec = RoutedReconstruction(layer, stats.sample)
    protect = protect or []

    def valid(keep: list[int]) -> bool:
        if any(p not in keep for p in protect):
            return False
        if groups <= 1:
            return True
        size = e // groups
        counts = torch.bincount(torch.as_tensor(keep) // size, minlength=groups)
        return bool((counts == n_keep // groups).all())

    n_subsets = math.comb(e, n_keep)
    if n_subsets <= exhaustive_limit:
        best, best_err = None, math.inf
        for combo in itertools.combinations(range(e), n_keep):
            keep = list(combo)
            if not valid(keep):
                continue
            err = rec.error(keep)
            if err < best_err:
                best, best_err = keep, err
        assert best is not None
        return best, {"search": "exhaustive", "subsets": n_subsets, "error": best_err}
    keep = list(range(e))
    size = e // groups if groups > 1 else e
    while len(keep) > n_keep:
        best_drop, best_err = None, math.inf
        for cand in keep:
            if cand in protect:
                continue
            if groups > 1:
                same = sum(1 for k in keep if k // size == cand // size)
                if same <= n_keep // groups:
                    continue
            trial = [k for k in keep if k != cand]
            err = rec.error(trial)
            if err < best_err:
                best_drop, best_err = cand, err
        assert best_drop is not None
        keep.remove(best_drop)
    return keep, {"search": "greedy", "subsets": n_subsets, "error": rec.error(keep)}
