"""HEAPr gradient statistics, streamed: a forward sweep stores every layer boundary, a backward sweep from the top
recomputes one decoder layer at a time and hands its input gradient to the layer below.

This is the checkpointed backward of ``calib.gradients.collect_gradient_stats`` with the checkpoints on disk
instead of in the autograd graph: the same gradient taps (experts implementation + tensor hooks) observe each
layer while its backward runs, the same loss (summed next-token cross-entropy over real tokens) starts it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from moecompress.arch.adapter import decoder_layers
from moecompress.arch.discover import text_model
from moecompress.calib.gradients import GRAD_IMPLEMENTATION, GradStats, gradient_taps, next_token_loss
from moecompress.engine.loop import ActivationCache, layer_output, run_layer, start_flow
from moecompress.engine.source import REST, ModelSource


def _freeze(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _head_grad(source: ModelSource, batch: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor
               ) -> tuple[torch.Tensor, float]:
    """dLoss/d(last boundary) through the model's own tail (final norm, head), and the loss."""
    model = source.model
    layers = decoder_layers(model)
    h = hidden.to(source.device).detach().requires_grad_(True)
    for i, layer in enumerate(layers):
        layer.forward = (lambda x, *a, **k: h) if i == 0 else (lambda x, *a, **k: x)
    try:
        ids, mask = (t.to(source.device) for t in batch)
        with torch.enable_grad():
            logits = text_model(model)(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = next_token_loss(logits, ids, mask)
            del logits
            loss.backward()
    finally:
        for layer in layers:
            del layer.forward
    return h.grad.detach(), float(loss.detach())


def stream_gradient_stats(source: ModelSource, batches: list[tuple[torch.Tensor, torch.Tensor]], *, budget: int,
                          spill_dir: Path | None = None, console: Any = None,
                          meta: dict[str, Any] | None = None) -> GradStats:
    """Per-layer HEAPr sums of `source` on `batches`, one decoder layer in memory at a time."""
    from moecompress.engine.run import sweep_progress

    t0 = time.perf_counter()
    n_layers = source.num_layers
    _freeze(source.materialise(REST))
    flow = start_flow(source, batches, budget=budget // (n_layers + 2), spill_dir=spill_dir)
    shapes = [tuple(flow.acts.get(b).shape) for b in range(len(flow.acts))]
    boundaries: list[ActivationCache] = []
    try:
        with sweep_progress(console, "gradients: forward sweep", n_layers) as advance:
            for i in range(n_layers):
                saved = ActivationCache(shapes, flow.acts.dtype, budget // (n_layers + 2), spill_dir)
                for b in range(len(flow.acts)):
                    saved.set(b, flow.acts.get(b))
                boundaries.append(saved)
                run_layer(flow, i, source.materialise(i))
                source.release(i)
                advance()
        grads = ActivationCache(shapes, flow.acts.dtype, budget // (n_layers + 2), spill_dir)
        total_loss, n_pred = 0.0, 0
        for b, batch in enumerate(flow.batches):
            g, loss = _head_grad(source, batch, flow.acts.get(b))
            grads.set(b, g)
            total_loss += loss
            n_pred += int((batch[1][:, 1:] * batch[1][:, :-1]).sum())
        masks = flow.masks()
        with gradient_taps(source.model, checkpoint_layers=False) as taps, \
                sweep_progress(console, "gradients: backward sweep", n_layers) as advance:
            for i in reversed(range(n_layers)):
                layer = source.materialise(i)
                _freeze(layer)
                for b in range(len(flow.acts)):
                    for tap in taps.values():
                        tap.mask = masks[b].to(flow.device)
                    args, kwargs = flow.layer_kwargs[b][i]
                    x = boundaries[i].get(b).to(flow.device).detach().requires_grad_(True)
                    with torch.enable_grad():
                        y = layer_output(layer(x, *args, **kwargs))
                        y.backward(grads.get(b).to(flow.device))
                    grads.set(b, x.grad)
                source.release(i)
                boundaries[i].close()
                advance()
            layers = {idx: tap.grad for idx, tap in taps.items()}
        if n_pred and not any(float(lg.freq.sum()) for lg in layers.values()):
            raise RuntimeError(f"{type(source.model).__name__} never called the {GRAD_IMPLEMENTATION!r} experts "
                               "implementation; its MoE block bypasses transformers' experts interface")
    finally:
        flow.close()
        for c in boundaries:
            c.close()
        if "grads" in locals():
            grads.close()
    info = dict(meta or {})
    info.update(collect_seconds=round(time.perf_counter() - t0, 3), mean_loss=total_loss / max(n_pred, 1),
                predicted_tokens=n_pred, engine="streamed")
    return GradStats(layers=layers, meta=info)
