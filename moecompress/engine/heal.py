"""Heal inside the compress sweep: the engine's layer loop is the walk ``heal.walk`` describes.

Two calibration flows run beside the compress sweep, each an activation cache bounded like every other one: the
*original* flow goes through each decoder layer before the pass changes it (its MoE block's inputs and outputs
are the targets), the *compressed* flow goes through the layer after it was compressed and healed (error
propagation: each layer is fitted on the inputs the healed layers below really give it). Only one decoder layer
(plus a copy of its original MoE block) is in memory; the per-layer fit is ``heal.fit.heal_block``, the same
function the in-memory walk calls.

When the statistics sweep of the same run recorded the original blocks' inputs and outputs (``engine.targets``),
there is no original flow: the targets are read from that recording, one layer at a time. The compressed flow runs
each layer's attention once: the layer is run with its MoE block replaced by zeros (giving the block's inputs and
the residual stream), and after heal its outputs are the residual stream plus the healed block's output — checked
bitwise against the whole layer on the first batch, else every batch runs the whole layer.
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

from moecompress.calib.layers import BlockArgs, Call, StopForward, block_io
from moecompress.engine.loop import Flow, layer_output, run_layer, start_flow
from moecompress.engine.source import ModelSource
from moecompress.engine.targets import RecordedTargets
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
    original: Flow | None  # None: the statistics sweep recorded the original model's targets (`recorded`)
    compressed: Flow
    unhealed: Flow  # the held-out sequences through the compressed layers before heal (the unhealed model's KL)
    held: torch.Tensor  # [real tokens] bool: tokens of held-out sequences
    held_rows: list[torch.Tensor]  # per batch of the main flows: its rows that are held out
    recorded: RecordedTargets | None = None
    layers: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    _targets: tuple[Any, torch.Tensor, torch.Tensor, int] | None = None  # (original MoE view, x_ref, y_ref, experts)

    @classmethod
    def start(cls, source: ModelSource, batches: list[tuple[torch.Tensor, torch.Tensor]], spec: HealSpec,
              groups_of: GroupsOf, *, budget: int, spill_dir: Path | None,
              recorded: RecordedTargets | None = None) -> StreamedHeal:
        """`recorded`: the statistics sweep's recording of the original model on these batches, if it made one
        (then the original model is not run again)."""
        held, held_rows = held_out(batches, spec.holdout)
        held_batches = [(ids[r], mask[r]) for (ids, mask), r in zip(batches, held_rows, strict=True) if len(r)]
        recorded = recorded if recorded is not None and recorded.serves(batches) else None
        original = None if recorded else start_flow(source, batches, budget=budget // 3, spill_dir=spill_dir)
        compressed = start_flow(source, batches, budget=budget // 3, spill_dir=spill_dir)
        unhealed = start_flow(source, held_batches, budget=budget // 3, spill_dir=spill_dir)
        return cls(source=source, spec=spec, groups_of=groups_of, original=original, compressed=compressed,
                   unhealed=unhealed, held=held, held_rows=held_rows, recorded=recorded)

    def before_surgery(self, index: int, layer: torch.nn.Module) -> None:
        """The original MoE block's inputs and outputs at this layer: read from the statistics sweep's recording,
        else by running the original flow through the untouched layer."""
        t0 = time.perf_counter()
        moe = self.source.moe_layer(index)
        if moe is None:
            if self.original is not None:
                run_layer(self.original, index, layer)
        else:
            if self.original is None:
                x_ref, y_ref = self.recorded.layer(index)
            else:
                with block_io(moe.block) as (ins, outs):
                    run_layer(self.original, index, layer)
                x_ref, y_ref = self._flat(ins), self._flat(outs)
                del ins, outs
            # heal reads the original layer's router alone (its logits are the router fit's target): a copy of the
            # router and the original expert count, not of the whole block
            original_view = dataclasses.replace(
                moe, router=copy.deepcopy(moe.router),
                experts=SimpleNamespace(down_proj=torch.empty((moe.num_experts, 0), device="meta")))
            self._targets = (original_view, x_ref, y_ref.double(), moe.num_experts)
        self.seconds += time.perf_counter() - t0

    def after_surgery(self, index: int, layer: torch.nn.Module, info: dict[str, Any] | None) -> None:
        """Fit the compressed block to the original's outputs on the compressed flow's inputs, then propagate
        (residual stream + healed block output where that is the layer's output: attention runs once)."""
        t0 = time.perf_counter()
        run_layer(self.unhealed, index, layer)  # compressed, not yet healed
        moe = self.source.moe_layer(index)
        if moe is not None and self._targets is not None:
            original_view, x_ref, y_ref, n_before = self._targets
            self._targets = None
            ins, calls, residuals = _block_inputs(self.compressed, index, layer, moe.block)
            data = BlockData(x=self._flat(ins), x_ref=x_ref, y=y_ref, held=self.held,
                             call=BlockArgs.from_calls(calls, ins, self.compressed.masks()))
            self.layers[str(index)] = heal_block(original_view, moe, data, self.groups_of(index, info or {}, n_before),
                                                 self.spec)
            del original_view, data
            _propagate(self.compressed, index, layer, moe.block, ins, calls, residuals)
        else:
            run_layer(self.compressed, index, layer)
        self.seconds += time.perf_counter() - t0

    def _flat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return real_tokens(parts, self.compressed.masks())

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
            ids, mask = (t[rows] for t in self.compressed.batches[b])
            m = mask.bool()
            last = self.original.acts.get(b) if self.original is not None else self.recorded.last(b)
            ref = head_logits(self.source, (ids, mask), last[rows])[m]
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
        return heal_summary(self.spec, self.seconds, self.layers, engine="streamed",
                            original_targets="recorded by the statistics sweep" if self.recorded is not None
                            else "original layers run again")

    def close(self) -> None:
        for flow in (self.original, self.compressed, self.unhealed):
            if flow is not None:
                flow.close()


@torch.no_grad()
def _block_inputs(flow: Flow, index: int, layer: torch.nn.Module, block: torch.nn.Module
                  ) -> tuple[list[torch.Tensor], list[Call], list[torch.Tensor] | None]:
    """The MoE block's inputs for every batch (the cache stays), the rest of each block call's arguments, and what
    the layer outputs with the block's output replaced by zeros — the residual stream the healed block's output is added to (``_propagate``).

    The block itself is not run (it is about to be healed: its outputs now would be thrown away). A block that
    returns a tuple (gpt-oss: output, router scores) gets zeros in the first place and, after them, what it
    returns for one token. No residuals (None; each forward then stops where the block starts) when the layer
    cannot run on that, or when the flow lives on disk (the residuals, a boundary's worth, would be held in RAM).
    """
    first = flow.acts.get(0)
    args, kwargs = flow.layer_kwargs[0][index]
    probe_calls: list[Call] = []
    with block_io(block, stop=True, calls=probe_calls) as (probe, _), contextlib.suppress(StopForward):
        layer(first.to(flow.device), *args, **kwargs)
    if not probe:
        raise RuntimeError("heal: the MoE block was not reached in a decoder layer's forward")
    ins: list[torch.Tensor] = []
    calls: list[Call] = []
    residuals: list[torch.Tensor] | None = None if flow.acts.on_disk else []
    try:  # one token: the output's structure
        args, kwargs = _first_token(probe_calls[0], tuple(probe[0].shape[:-1]))
        one = block(probe[0][:, :1], *args, **kwargs) if residuals is not None else None
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError):
        residuals = None

    def zero_block(x: torch.Tensor, *a: Any, **k: Any) -> Any:
        ins.append(x.detach())
        calls.append((a, k))
        return (torch.zeros_like(x), *one[1:]) if isinstance(one, tuple) else torch.zeros_like(x)

    if residuals is not None:
        block.forward = zero_block
        try:
            for b in range(len(flow.acts)):
                args, kwargs = flow.layer_kwargs[b][index]
                residuals.append(layer_output(layer(flow.acts.get(b).to(flow.device), *args, **kwargs)))
        except (RuntimeError, ValueError, TypeError, IndexError):  # the layer reads more of the block's output
            ins.clear()
            calls.clear()
            residuals = None
        finally:
            del block.forward
    if residuals is None:
        with block_io(block, stop=True, calls=calls) as (ins, _):
            for b in range(len(flow.acts)):
                args, kwargs = flow.layer_kwargs[b][index]
                with contextlib.suppress(StopForward):
                    layer(flow.acts.get(b).to(flow.device), *args, **kwargs)
    if len(ins) != len(flow.acts):
        raise RuntimeError("heal: the MoE block was not reached in a decoder layer's forward")
    return ins, calls, residuals


def _first_token(call: Call, lead: tuple[int, ...]) -> Call:
    """A block call's other arguments cut to the first token where they are per token (leading dims `lead`,
    the block input's [B, S])."""
    def cut(v: Any) -> Any:
        return v[:, :1] if isinstance(v, torch.Tensor) and tuple(v.shape[: len(lead)]) == lead else v

    return tuple(map(cut, call[0])), {k: cut(v) for k, v in call[1].items()}


@torch.no_grad()
def _propagate(flow: Flow, index: int, layer: torch.nn.Module, block: torch.nn.Module, ins: list[torch.Tensor],
               calls: list[Call], residuals: list[torch.Tensor] | None) -> bool:
    """The healed layer's outputs into the flow: residual + healed block output, without running the layer's
    attention again — when the first batch shows that this is bitwise what the whole layer gives (the layer adds
    the block's output to the residual stream and nothing else); otherwise every batch runs the whole layer.
    Returns whether the shortcut served."""
    if residuals is None:
        run_layer(flow, index, layer)
        return False
    def added(b: int) -> torch.Tensor:  # Llama-4's block returns [tokens, H]: the layer reshapes it
        args, kwargs = calls[b]
        return residuals[b] + layer_output(block(ins[b], *args, **kwargs)).reshape(residuals[b].shape)

    args, kwargs = flow.layer_kwargs[0][index]
    whole = layer_output(layer(flow.acts.get(0).to(flow.device), *args, **kwargs))
    try:
        additive = torch.equal(whole, added(0))
    except RuntimeError:  # shapes that do not add up: not a residual stream plus the block's output
        additive = False
    if not additive:
        run_layer(flow, index, layer)
        return False
    flow.acts.set(0, whole)
    for b in range(1, len(flow.acts)):
        flow.acts.set(b, added(b))
    flow.position = index + 1
    return True
