"""Layer-by-layer forward: the hidden states entering layer 0, then one decoder layer at a time.

GPTQ (``passes.quantize``) and heal (``moecompress.heal``) both walk a model this way so that what a layer
sees is what the already-processed layers below it produce (error propagation).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch

from moecompress.arch.adapter import decoder_layers
from moecompress.arch.discover import text_model


class StopForward(Exception):
    """Raised by a hook to end a forward early (everything needed has been recorded)."""


@contextlib.contextmanager
def block_io(block: torch.nn.Module, *, stop: bool = False) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Record `block`'s inputs and outputs over the forwards run inside (one entry per call). With `stop`, each
    forward ends where the block would start (``StopForward`` after its input is recorded; no outputs): for a
    block about to be changed, whose outputs now would be thrown away."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []

    def pre(mod: Any, args: tuple, kw: dict) -> None:
        ins.append((args[0] if args else kw["hidden_states"]).detach())
        if stop:
            raise StopForward

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True)]
    if not stop:
        handles.append(block.register_forward_hook(
            lambda mod, args, out: outs.append((out[0] if isinstance(out, tuple) else out).detach())))
    try:
        yield ins, outs
    finally:
        for h in handles:
            h.remove()


def capture_layer_inputs(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                         run_layers: bool = True):
    """Hidden states entering layer 0 and each layer's keyword arguments (masks, positions), per batch.

    With `run_layers=False` the decoder layers are not computed (each passes its input through and the
    forward stops at the last layer's input): a walk that runs every layer itself needs only these, and
    the full forward would cost as much as the walk's own pass. If the model's layer loop does not accept
    a pass-through (the hidden state reaching a later layer is not layer 0's), it falls back to the full run.
    """
    if not run_layers:
        got = _capture_without_layers(model, batches)
        if got is not None:
            return got
    layers = decoder_layers(model)
    first: list[torch.Tensor] = []
    kwargs: dict[int, list[dict[str, Any]]] = defaultdict(list)

    def grab(i: int):
        def hook(mod, args, kw):  # noqa: ANN001
            if i == 0:
                first.append((args[0] if args else kw["hidden_states"]).detach())
            kwargs[i].append({k: v for k, v in kw.items() if k != "hidden_states"})
            return None
        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for ids, mask in batches:
                text_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return first, kwargs


def _capture_without_layers(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """`capture_layer_inputs` with every decoder layer an identity; None where the layer loop rejects that."""
    layers = decoder_layers(model)
    first: list[torch.Tensor] = []
    kwargs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    ok, entering = [True], [None]

    def grab(i: int):
        def hook(mod, args, kw):  # noqa: ANN001
            h = args[0] if args else kw["hidden_states"]
            if i == 0:
                entering[0] = h
                first.append(h.detach())
            elif h is not entering[0]:  # the loop did not hand the pass-through on unchanged
                ok[0] = False
                raise StopForward
            kwargs[i].append({k: v for k, v in kw.items() if k != "hidden_states"})
            if i == len(layers) - 1:
                raise StopForward  # nothing after the last layer's input is needed (final norm, head)
            return None
        return hook

    def identity(*args: Any, **kw: Any) -> torch.Tensor:
        return args[0] if args else kw["hidden_states"]

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for layer in layers:
        layer.forward = identity
    try:
        with torch.no_grad():
            for ids, mask in batches:
                try:
                    text_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)
                except StopForward:
                    pass
                if not ok[0]:
                    return None
    finally:
        for h in handles:
            h.remove()
        for layer in layers:
            layer.__dict__.pop("forward", None)
    if len(first) != len(batches) or any(len(v) != len(batches) for v in kwargs.values()):
        return None
    return first, kwargs


def layer_output(out: Any) -> torch.Tensor:
    """A decoder layer returns a tensor or a tuple whose first item is the hidden states."""
    return out[0] if isinstance(out, tuple) else out
