"""The smallest layer walk heal needs: two activation streams (original and compressed), one layer at a time.

THIS FUNCTION IS THE SEAM. The layer-streaming engine (``moecompress.engine``) owns the real layer loop
(one layer resident, boundary activation caches on disk, devices, data-parallel reduction); when it lands,
`walk_two_streams` is replaced by that loop calling the same `on_layer(index, ref_layer, layer, data)`
callback. Everything heal computes lives in ``moecompress.heal.fit`` / ``select`` and never sees the walk.

Like GPTQ in ``passes.quantize`` (same capture mechanism, ``moecompress.calib.layers``), the compressed
stream is propagated through the *already healed* layers below, so each layer is fitted on the inputs it
will really see; the original stream provides the targets.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from moecompress.arch.adapter import MoELayer, adapter_for, decoder_layers, moe_layers
from moecompress.arch.discover import text_model
from moecompress.calib.layers import (
    BlockArgs,
    Call,
    StopForward,
    block_io,
    capture_layer_inputs,
    layer_output,
)
from moecompress.heal.fit import BlockData, check_family_healable

OnLayer = Callable[[int, MoELayer, MoELayer, BlockData], None]


def holdout_rows(n_rows: int, holdout: float) -> int:
    """Calibration sequences held out (the last ones): at least one, never all."""
    return min(max(1, math.ceil(n_rows * holdout)), max(n_rows - 1, 1))


def _run_block_layer(layer: torch.nn.Module, block: torch.nn.Module, hidden: list[torch.Tensor],
                     kwargs: list[dict[str, Any]]):
    """Run one decoder layer over every batch; returns (block inputs, block outputs, layer outputs)."""
    with block_io(block) as (ins, outs), torch.no_grad():
        nxt = [layer_output(layer(h, **kwargs[b])) for b, h in enumerate(hidden)]
    return ins, outs, nxt


def _block_inputs(layer: torch.nn.Module, block: torch.nn.Module, hidden: list[torch.Tensor],
                  kwargs: list[dict[str, Any]]) -> tuple[list[torch.Tensor], list[Call]]:
    """The block's inputs (and the rest of its call) over every batch, each forward stopped where the block would
    start: the block is about to be healed, so its outputs here would be thrown away (the healed layer is run
    afterwards)."""
    calls: list[Call] = []
    with block_io(block, stop=True, calls=calls) as (ins, _), torch.no_grad():
        for b, h in enumerate(hidden):
            with contextlib.suppress(StopForward):
                layer(h, **kwargs[b])
    if len(ins) != len(hidden):
        raise RuntimeError("heal: the MoE block was not reached in a decoder layer's forward")
    return ins, calls


def real_tokens(parts: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """Per-batch [B, L, H] tensors flattened to the real (unpadded) tokens, [N, H]."""
    return torch.cat([p.reshape(-1, p.shape[-1])[m.to(p.device)] for p, m in zip(parts, masks, strict=True)])


def held_out(batches: list[tuple[torch.Tensor, torch.Tensor]], holdout: float
             ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Which real tokens belong to held-out sequences (the last ones, ``holdout_rows``), [N] bool, and each batch's
    held-out row indices."""
    n_rows = sum(int(ids.shape[0]) for ids, _ in batches)
    first_held = n_rows - holdout_rows(n_rows, holdout)
    parts, rows_held, row = [], [], 0
    for ids, mask in batches:
        rows = torch.arange(row, row + ids.shape[0])
        rows_held.append(torch.nonzero(rows >= first_held).flatten())
        parts.append((rows[:, None].expand_as(mask) >= first_held).reshape(-1)[mask.reshape(-1).bool()])
        row += ids.shape[0]
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)), rows_held


def walk_two_streams(ref_model: torch.nn.Module, model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                     on_layer: OnLayer, *, holdout: float, progress: Callable[[], None] | None = None) -> None:
    """Feed `on_layer` every MoE layer's BlockData, bottom up; `on_layer` may change that layer of `model`
    in place (heal, or select + prune) before its outputs are propagated to the next layer."""
    adapter = adapter_for(model)
    check_family_healable(adapter.model_type)
    ref_moe = {ly.index: ly for ly in moe_layers(ref_model, adapter)}
    cmp_moe = {ly.index: ly for ly in moe_layers(model, adapter)}
    masks = [m.reshape(-1).bool() for _, m in batches]
    held, _ = held_out(batches, holdout)
    previous = [getattr(m.config, "_experts_implementation", None) for m in (ref_model, model)]
    for m in (ref_model, model):  # on CPU the per-expert loop beats grouped_mm at these sizes, and it is exact
        m.set_experts_implementation("eager")
    from moecompress.engine.loop import layers_chain

    chained = all(layers_chain(m, *batches[0]) for m in (ref_model, model))
    walk = _walk if chained else _walk_by_prefix
    try:
        walk(ref_model, model, batches, on_layer, ref_moe, cmp_moe, masks, held, progress)
    finally:
        for m, prev in zip((ref_model, model), previous, strict=True):
            if prev is not None:
                m.set_experts_implementation(prev)


def _walk(ref_model, model, batches, on_layer, ref_moe, cmp_moe, masks, held, progress) -> None:  # noqa: ANN001
    h_ref, kw_ref = capture_layer_inputs(ref_model, batches, run_layers=False)
    if _same_embeddings(ref_model, model):  # structural passes never touch embeddings: one capture serves both
        h_cmp, kw_cmp = list(h_ref), kw_ref
    else:
        h_cmp, kw_cmp = capture_layer_inputs(model, batches, run_layers=False)
    for i, (lr, lc) in enumerate(zip(decoder_layers(ref_model), decoder_layers(model), strict=True)):
        if i in cmp_moe:
            x_ref, y_ref, h_ref = _run_block_layer(lr, ref_moe[i].block, h_ref, kw_ref[i])
            x_cmp, calls = _block_inputs(lc, cmp_moe[i].block, h_cmp, kw_cmp[i])
            data = BlockData(x=real_tokens(x_cmp, masks), x_ref=real_tokens(x_ref, masks),
                             y=real_tokens(y_ref, masks).double(), held=held,
                             call=BlockArgs.from_calls(calls, x_cmp, masks))
            on_layer(i, ref_moe[i], cmp_moe[i], data)
        else:
            with torch.no_grad():
                h_ref = [layer_output(lr(h, **kw_ref[i][b])) for b, h in enumerate(h_ref)]
        with torch.no_grad():
            h_cmp = [layer_output(lc(h, **kw_cmp[i][b])) for b, h in enumerate(h_cmp)]
        if progress is not None:
            progress()


def _walk_by_prefix(ref_model, model, batches, on_layer, ref_moe, cmp_moe, masks, held, progress) -> None:  # noqa: ANN001
    """The walk for families whose decoder layers hand the next layer more than hidden states (glm_moe_dsa's indexer
    top-k, ZAYA's router state): each MoE layer's inputs come from the models' own forwards, stopped at that
    layer's block. The layers below are already healed in place, so errors propagate as in ``_walk``; the price is
    a forward up to each MoE layer (quadratic in depth), paid only by these families."""
    def advance_to(end: int) -> None:  # the progress bar counts decoder layers
        for _ in range(done, end):
            if progress is not None:
                progress()

    done = 0
    recorded = _record_all_blocks(ref_model, ref_moe, batches, masks)
    for i in sorted(cmp_moe):
        if recorded is not None:
            x_ref, y_ref = recorded.pop(i)
        else:
            x_ref, y_ref, _ = _forward_to_block(ref_model, ref_moe[i].block, batches, outputs=True)
        x_cmp, _, calls = _forward_to_block(model, cmp_moe[i].block, batches, outputs=False)
        data = BlockData(x=real_tokens(x_cmp, masks), x_ref=real_tokens(x_ref, masks),
                         y=real_tokens(y_ref, masks).double(), held=held, call=BlockArgs.from_calls(calls, x_cmp, masks))
        on_layer(i, ref_moe[i], cmp_moe[i], data)
        advance_to(i + 1)
        done = i + 1
    advance_to(len(decoder_layers(model)))


_RECORD_ALL_BYTES = 2 << 30


@torch.no_grad()
def _record_all_blocks(model: torch.nn.Module, moe: dict[int, MoELayer], batches: list[tuple[torch.Tensor, torch.Tensor]],
                       masks: list[torch.Tensor]) -> dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] | None:
    """Every MoE block's inputs and outputs from one forward per batch, when they fit in `_RECORD_ALL_BYTES`
    (the original model's side of ``_walk_by_prefix`` in one pass instead of one per layer); else None."""
    tokens = sum(int(m.numel()) for m in masks)
    hidden = int(next(iter(moe.values())).router.weight.shape[-1]) if moe else 0
    item = next(model.parameters()).element_size()
    if 2 * tokens * hidden * item * len(moe) > _RECORD_ALL_BYTES:
        return None
    with contextlib.ExitStack() as stack:
        io = {i: stack.enter_context(block_io(ly.block)) for i, ly in moe.items()}
        for ids, mask in batches:
            text_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)
    return {i: (ins, outs) for i, (ins, outs) in io.items()}


@torch.no_grad()
def _forward_to_block(model: torch.nn.Module, block: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                      *, outputs: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Call]]:
    """A block's inputs (and, with `outputs`, its outputs) over every batch from the model's own forward, each
    stopped once the block has been reached (or has run)."""
    calls: list[Call] = []

    def stop(*_: Any) -> None:
        raise StopForward

    with block_io(block, stop=not outputs, calls=calls) as (ins, outs):
        handle = block.register_forward_hook(stop) if outputs else None  # after block_io's: the output is recorded
        try:
            for ids, mask in batches:
                with contextlib.suppress(StopForward):
                    text_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            if handle is not None:
                handle.remove()
    if len(ins) != len(batches):
        raise RuntimeError("heal: the MoE block was not reached in the model's forward")
    return ins, outs, calls


def _same_embeddings(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same embedding weights and the same config apart from expert count/width: the layer-0 inputs and every
    layer's keyword arguments (positions, masks) are then identical."""
    ea, eb = text_model(a).get_input_embeddings().weight, text_model(b).get_input_embeddings().weight
    if ea.shape != eb.shape or not bool(torch.equal(ea, eb)):
        return False
    adapter = adapter_for(b)
    skip = {*adapter.count_keys, adapter.width_key, "_name_or_path", "transformers_version"}
    ca, cb = a.config.to_dict(), b.config.to_dict()
    return {k: v for k, v in ca.items() if k not in skip} == {k: v for k, v in cb.items() if k not in skip}
