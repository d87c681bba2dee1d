"""Predict: each plan's damage from per-layer quantities measured on the one statistics pass.

The statistics hold, per MoE layer, a sample of the block's input tokens; the original block's outputs on
them are the target. On those tokens, per layer:

- structural error: the relative block-output error of keeping the criterion's experts (REAP ranking from
  the statistics) at the plan's width (each kept expert keeps its neurons with the most gated output energy,
  `act_sq_gated · ‖down column‖²` from the same statistics — the forward stand-in for HEAPr's score), unhealed
  and healed in closed form. The heal module's `HealedReconstruction` computes both: it refits router rows
  and down projections on the fitted tokens and scores on its held-out ones (healed = the lower of the two,
  as heal reverts a fit that raises the held-out error).
- quantization error: the relative block-output error of round-to-nearest weights at the plan's bits and
  group size (GPTQ, which the plan runs, does better; the measurement step sees that).

Families heal cannot reconstruct (experts run densely on gate-scaled inputs: llama4_text) fall back to the
removed experts' routed mass plus the share of gated neuron energy the narrower experts drop.

A plan's predicted damage is the sum over layers of structural + quantization error (relative squared
error of the blocks' outputs); the routed probability mass the removed experts carried is reported beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from moecompress.arch.adapter import MoELayer, moe_layers
from moecompress.arch.experts import ExpertView
from moecompress.calib.stats import Stats
from moecompress.errors import UserError
from moecompress.fit.space import Candidate, group_size_for
from moecompress.heal.fit import BlockData, latent_experts, rel_error
from moecompress.heal.select import HealedReconstruction
from moecompress.heal.spec import HealSpec
from moecompress.passes import criteria
from moecompress.passes.merge_experts import block_output
from moecompress.quant.rtn import quantize_rtn

UNHEALED = HealSpec(router=False, down=False)
PREDICT_HEAL = HealSpec(sweeps=1)  # one pass over the experts: the ranking, not the last digit, is what matters
MAX_TOKENS = 1024  # sampled tokens per layer the predictor fits and scores on (every 10th held out)


class LayerProbe:
    """One MoE layer's sampled tokens, its original outputs, and the measured errors asked of it (memoised)."""

    def __init__(self, layer: MoELayer, stats: Stats, groups: int, criterion: str, heal: HealSpec) -> None:
        ls = stats.layers[layer.index]
        if ls.sample is None or ls.sample.shape[0] < 20:
            raise UserError(f"fit: the statistics hold {0 if ls.sample is None else ls.sample.shape[0]} sampled "
                            f"tokens for layer {layer.index}; predictions need at least 20: raise --calib-samples "
                            "or --calib-seqlen")
        pick = torch.linspace(0, ls.sample.shape[0] - 1, min(MAX_TOKENS, ls.sample.shape[0])).long()  # spread
        x = ls.sample[pick].to(layer.experts.down_proj.dtype)
        with torch.no_grad():
            y = block_output(layer, x)
        held = torch.arange(x.shape[0]) % 10 == 9
        self.layer, self.groups, self.heal = layer, groups, heal
        self.data = BlockData(x=x, x_ref=x, y=y, held=held)
        # families whose experts run densely on gate-scaled inputs cannot be reconstructed per routed expert:
        # their structural error falls back to routed mass and neuron energy removed (see `_energy_error`)
        self.rec = (HealedReconstruction(layer, self.data, heal, max_tokens=MAX_TOKENS)
                    if layer.adapter.routing != "sigmoid_input_scale" and not latent_experts(layer) else None)
        self.scores = (criteria.expert_scores(ls, criterion) if criterion != "random"
                       else torch.arange(layer.num_experts, 0, -1).double())
        self.soft = ls.sums["soft_freq"].double()
        w = ExpertView(layer).get_all()
        self.neuron_scores = ls.sums["act_sq_gated"].double() * w.down.double().pow(2).sum(1)  # [E, I]
        self._memo: dict[tuple[Any, ...], float] = {}
        self._masked: tuple[int, torch.Tensor] | None = None

    def keep(self, k: int) -> list[int]:
        if k >= self.layer.num_experts:
            return list(range(self.layer.num_experts))
        return sorted(criteria.select_by_score(self.scores, k, self.groups))

    def removed_mass(self, k: int) -> float:
        gone = sorted(set(range(self.layer.num_experts)) - set(self.keep(k)))
        return float(self.soft[gone].sum() / self.soft.sum().clamp_min(1e-30)) if gone else 0.0

    def structural(self, k: int, width: int, heal: bool) -> float:
        """Held-out relative block error of keeping k experts at `width` neurons, healed or not."""
        key = ("s", k, width, heal)
        if key in self._memo:
            return self._memo[key]
        keep = self.keep(k)
        full = self.neuron_scores.shape[-1]
        if k >= self.layer.num_experts and width >= full:
            return 0.0
        if self.rec is None:
            self._memo[key] = self._energy_error(keep, width)
            return self._memo[key]
        acts = self.rec.acts
        if width < full:  # zero the removed neurons' activations: the fit then works with the narrower experts
            self.rec.acts = self._narrowed(width)
        try:
            self.rec.spec = UNHEALED
            err = self.rec.error(keep)
            if heal:  # heal reverts a fit that raises the held-out error, so it never ends above unhealed
                self.rec.spec = self.heal
                err = min(err, self.rec.error(keep))
        finally:
            self.rec.acts, self.rec.spec = acts, self.heal
        self._memo[key] = err
        return err

    def _energy_error(self, keep: list[int], width: int) -> float:
        """Without a reconstruction: the routed mass of the removed experts plus, of the rest, the share of gated
        neuron energy the narrower experts drop (no heal estimate: such families cannot be healed)."""
        mass = self.removed_mass(len(keep))
        scores = self.neuron_scores[keep]
        kept = torch.sort(scores, dim=1, descending=True).values[:, :width].sum()
        return mass + (1 - mass) * float(1 - kept / scores.sum().clamp_min(1e-30))

    def _narrowed(self, width: int) -> torch.Tensor:
        """The activations with each expert's lowest-scoring neurons zeroed (the last width asked is kept)."""
        if self._masked is None or self._masked[0] != width:
            self._masked = None  # free the previous copy first
            order = torch.sort(self.neuron_scores, dim=1, descending=True, stable=True).indices[:, width:]
            mask = torch.ones_like(self.neuron_scores, dtype=torch.bool).scatter_(1, order, False)
            self._masked = (width, self.rec.acts * mask[:, None, :].to(self.rec.acts.dtype))
        return self._masked[1]

    def quantization(self, bits: int, group_size: int) -> float:
        """Held-out relative block error with every expert's weights rounded to `bits` (RTN)."""
        key = ("q", bits, group_size)
        if key in self._memo:
            return self._memo[key]
        view = ExpertView(self.layer)
        original = view.get_all()
        rounded = original.clone()
        for name in ("gate", "up", "down"):
            stack = getattr(rounded, name)
            for e in range(stack.shape[0]):
                gs = group_size if group_size == -1 or stack.shape[-1] % group_size == 0 else -1
                stack[e] = quantize_rtn(stack[e], bits, gs).dequant.to(stack.dtype)
        held = self.data.held
        try:
            view.set_all(rounded)
            with torch.no_grad():
                err = rel_error(block_output(self.layer, self.data.x[held]), self.data.y[held])
        finally:
            view.set_all(original)
        self._memo[key] = err
        return err


def probes(model: torch.nn.Module, stats: Stats, criterion: str, heal: HealSpec | None = None) -> Iterator[LayerProbe]:
    """One probe per MoE layer, built as it is asked for (each holds its layer's expert activations on the
    sampled tokens, so only one lives at a time when consumed in a loop)."""
    from moecompress.arch.adapter import adapter_for

    adapter = adapter_for(model)
    groups = adapter.num_groups(model.config)
    for ly in moe_layers(model, adapter):
        yield LayerProbe(ly, stats, groups, criterion, heal or PREDICT_HEAL)


def layer_damage(candidate: Candidate, probe: LayerProbe, hidden: int) -> tuple[float, float, float]:
    """(structural error, quantization error, removed routed mass) of one plan in one layer."""
    c = candidate.choice
    quant = probe.quantization(c.bits, group_size_for(hidden, c.width)) if c.bits else 0.0
    return probe.structural(c.keep, c.width, c.heal), quant, probe.removed_mass(c.keep)


def predict_all(candidates: list[Candidate], model: torch.nn.Module, stats: Stats, criterion: str,
                hidden: int) -> None:
    """Predicted damage of every plan (sum over layers of relative block-output error), one layer at a time;
    fills `predicted` and `parts` of each candidate."""
    sums = [[0.0, 0.0, 0.0] for _ in candidates]
    n_layers = 0
    for probe in probes(model, stats, criterion):
        n_layers += 1
        for i in sorted(range(len(candidates)), key=lambda i: candidates[i].choice.width):  # one narrowing per width
            for j, v in enumerate(layer_damage(candidates[i], probe, hidden)):
                sums[i][j] += v
        del probe
    for (structural, quant, mass), c in zip(sums, candidates, strict=True):
        c.parts = {"structural": round(structural, 6), "quantization": round(quant, 6),
                   "removed_routed_mass": round(mass / max(n_layers, 1), 5)}
        c.predicted = structural + quant
