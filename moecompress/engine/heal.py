"""Heal inside the compress sweep: the engine's layer loop is the walk ``heal.walk`` describes.

Two calibration flows run beside the compress sweep, each an activation cache bounded like every other one: the
*original* flow goes through each decoder layer before the pass changes it (its MoE block's inputs and outputs
are the targets), the *compressed* flow goes through the layer after it was compressed and healed (error
propagation: each layer is fitted on the inputs the healed layers below really give it). Only one decoder layer
(plus a copy of its original MoE block) is in memory; the per-layer fit is ``heal.fit.heal_block``, the same
function the in-memory walk calls.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from moecompress.calib.layers import StopForward, block_io
from moecompress.engine.loop import Flow, run_layer, start_flow
from moecompress.engine.source import ModelSource
from moecompress.heal.fit import BlockData, heal_block, heal_summary
from moecompress.heal.spec import HealSpec
from moecompress.heal.walk import held_out, real_tokens
from moecompress.passes.merging import Group

# (layer index, the pass's report of that layer, experts before the pass) → which original experts each kept one
# stands for
GroupsOf = Callable[[int, dict[str, Any], int], list[Group]]


@dataclass
class StreamedHeal:
    """What the compress sweep calls around each layer's surgery when the pass asks for heal."""

    source: ModelSource
    spec: HealSpec
    groups_of: GroupsOf
    original: Flow
    compressed: Flow
    unhealed: Flow  # the held-out sequences through the compressed layers before heal (the unhealed model's KL)
    held: torch.Tensor  # [real tokens] bool: tokens of held-out sequences
    held_rows: list[torch.Tensor]  # per batch of the main flows: its rows that are held out
    layers: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    _targets: tuple[Any, torch.Tensor, torch.Tensor, int] | None = None  # (original MoE view, x_ref, y_ref, experts)

    @classmethod
    def start(cls, source: ModelSource, batches: list[tuple[torch.Tensor, torch.Tensor]], spec: HealSpec,
              groups_of: GroupsOf, *, budget: int, spill_dir: Path | None) -> StreamedHeal:
        held, held_rows = held_out(batches, spec.holdout)
        held_batches = [(ids[r], mask[r]) for (ids, mask), r in zip(batches, held_rows, strict=True) if len(r)]
        original = start_flow(source, batches, budget=budget // 3, spill_dir=spill_dir)
        compressed = start_flow(source, batches, budget=budget // 3, spill_dir=spill_dir)
        unhealed = start_flow(source, held_batches, budget=budget // 3, spill_dir=spill_dir)
        return cls(source=source, spec=spec, groups_of=groups_of, original=original, compressed=compressed,
                   unhealed=unhealed, held=held, held_rows=held_rows)

    def before_surgery(self, index: int, layer: torch.nn.Module) -> None:
        """Run the original flow through the untouched layer, keeping its MoE block's inputs and outputs."""
        t0 = time.perf_counter()
        moe = self.source.moe_layer(index)
        if moe is None:
            run_layer(self.original, index, layer)
        else:
            with block_io(moe.block) as (ins, outs):
                run_layer(self.original, index, layer)
            # heal reads the original layer's router alone (its logits are the router fit's target): a copy of the
            # router and the original expert count, not of the whole block
            original_view = dataclasses.replace(
                moe, router=copy.deepcopy(moe.router),
                experts=SimpleNamespace(down_proj=torch.empty((moe.num_experts, 0), device="meta")))
            self._targets = (original_view, self._flat(ins), self._flat(outs).double(), moe.num_experts)
        self.seconds += time.perf_counter() - t0

    def after_surgery(self, index: int, layer: torch.nn.Module, info: dict[str, Any] | None) -> None:
        """Fit the compressed block to the original's outputs on the compressed flow's inputs, then propagate."""
        t0 = time.perf_counter()
        run_layer(self.unhealed, index, layer)  # compressed, not yet healed
        moe = self.source.moe_layer(index)
        if moe is not None and self._targets is not None:
            original_view, x_ref, y_ref, n_before = self._targets
            self._targets = None
            x = self._flat(_block_inputs(self.compressed, index, layer, moe.block))
            data = BlockData(x=x, x_ref=x_ref, y=y_ref, held=self.held)
            self.layers[str(index)] = heal_block(original_view, moe, data, self.groups_of(index, info or {}, n_before),
                                                 self.spec)
            del original_view
        run_layer(self.compressed, index, layer)
        self.seconds += time.perf_counter() - t0

    def _flat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return real_tokens(parts, self.original.masks())

    @torch.no_grad()
    def calibration_kl(self) -> dict[str, Any]:
        """KL(original ‖ unhealed) and KL(original ‖ healed) of the next-token distributions on the held-out
        sequences' real tokens, from the three flows' last boundaries (call after the last layer)."""
        from moecompress.engine.loop import head_logits
        from moecompress.heal.run import kl_sum

        unhealed_totals = healed_totals = 0.0
        count, u = 0, 0
        for b, rows in enumerate(self.held_rows):
            if not len(rows):
                continue
            ids, mask = (t[rows] for t in self.original.batches[b])
            m = mask.bool()
            ref = head_logits(self.source, (ids, mask), self.original.acts.get(b)[rows])[m]
            healed = head_logits(self.source, (ids, mask), self.compressed.acts.get(b)[rows])[m]
            unhealed = head_logits(self.source, (ids, mask), self.unhealed.acts.get(u))[m]
            healed_totals += kl_sum(ref, healed)
            unhealed_totals += kl_sum(ref, unhealed)
            count += int(m.sum())
            u += 1
        return {"unhealed": round(unhealed_totals / max(count, 1), 6), "healed": round(healed_totals / max(count, 1), 6),
                "tokens": count}

    def report(self) -> dict[str, Any]:
        """The same summary ``heal.run.heal_model`` gives."""
        return heal_summary(self.spec, self.seconds, self.layers, engine="streamed")

    def close(self) -> None:
        for flow in (self.original, self.compressed, self.unhealed):
            flow.close()


@torch.no_grad()
def _block_inputs(flow: Flow, index: int, layer: torch.nn.Module, block: torch.nn.Module) -> list[torch.Tensor]:
    """The MoE block's inputs for every batch, each forward stopped where the block starts (the cache stays)."""
    with block_io(block, stop=True) as (ins, _):
        for b in range(len(flow.acts)):
            args, kwargs = flow.layer_kwargs[b][index]
            with contextlib.suppress(StopForward):
                layer(flow.acts.get(b).to(flow.device), *args, **kwargs)
    if len(ins) != len(flow.acts):
        raise RuntimeError("heal: the MoE block was not reached in a decoder layer's forward")
    return ins
