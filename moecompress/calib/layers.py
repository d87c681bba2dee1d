"""Layer-by-layer forward: the hidden states entering layer 0, then one decoder layer at a time.

GPTQ (``passes.quantize``) and heal (``moecompress.heal``) both walk a model this way so that what a layer
sees is what the already-processed layers below it produce (error propagation).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from moecompress.arch.adapter import decoder_layers
from moecompress.arch.discover import text_model


class StopForward(Exception):
    """Raised by a hook to end a forward early (everything needed has been recorded)."""


Call = tuple[tuple, dict[str, Any]]  # a block call's arguments besides its hidden states: (args, kwargs)


def split_call(args: tuple, kw: dict[str, Any]) -> tuple[torch.Tensor, Call]:
    """(hidden states, the rest of the call) of a module's forward arguments."""
    if args:
        return args[0], (tuple(args[1:]), dict(kw))
    rest = dict(kw)
    return rest.pop("hidden_states"), ((), rest)


@contextlib.contextmanager
def block_io(block: torch.nn.Module, *, stop: bool = False, calls: list[Call] | None = None
             ) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Record `block`'s inputs and outputs over the forwards run inside (one entry per call), and into `calls` the
    rest of each call's arguments. With `stop`, each forward ends where the block would start (``StopForward``
    after its input is recorded; no outputs): for a block about to be changed, whose outputs now would be thrown
    away."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []

    def pre(mod: Any, args: tuple, kw: dict) -> None:
        hidden, rest = split_call(args, kw)
        ins.append(hidden.detach())
        if calls is not None:
            calls.append(rest)
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


@dataclass
class BlockArgs:
    """A MoE block's call arguments besides its hidden states, over the real tokens a ``BlockData`` holds: those
    given per token (DeepSeek-V4's token ids for its hash-routed layers, ZAYA's router state from the layer
    below) as [N, ...] rows aligned with the block inputs, the others as the first call passed them. Empty for
    most families, whose blocks take hidden states alone."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    per_token: frozenset[int | str] = frozenset()  # positions / names holding [N, ...] rows

    @classmethod
    def from_calls(cls, calls: list[Call], hidden: list[torch.Tensor], masks: list[torch.Tensor]) -> BlockArgs:
        """Flatten the calls of several batches (`hidden`: each call's block input, `masks`: each batch's real
        tokens, flat) the way ``heal.walk.real_tokens`` flattens the inputs."""
        if not calls or not any(a or k for a, k in calls):
            return cls()
        lead = [tuple(h.shape[:-1]) for h in hidden]

        def tokenwise(values: list[Any]) -> bool:
            return all(isinstance(v, torch.Tensor) and tuple(v.shape[: len(s)]) == s for v, s in zip(values, lead,
                                                                                                   strict=True))

        def flat(values: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([v.reshape(m.numel(), *v.shape[len(s):])[m.to(v.device)]
                              for v, s, m in zip(values, lead, masks, strict=True)])

        per: set[int | str] = set()
        args = []
        for i in range(len(calls[0][0])):
            values = [a[i] for a, _ in calls]
            if tokenwise(values):
                per.add(i)
            args.append(flat(values) if i in per else values[0])
        kwargs = {}
        for k in calls[0][1]:
            values = [kw[k] for _, kw in calls]
            if tokenwise(values):
                per.add(k)
            kwargs[k] = flat(values) if k in per else values[0]
        return cls(tuple(args), kwargs, frozenset(per))

    def rows(self, sel: torch.Tensor | None) -> BlockArgs:
        """The arguments of a subset of the tokens (`sel`: a mask or indices over N; None: all)."""
        if sel is None or not self.per_token:
            return self
        args = tuple(a[sel] if i in self.per_token else a for i, a in enumerate(self.args))
        kwargs = {k: v[sel] if k in self.per_token else v for k, v in self.kwargs.items()}
        return BlockArgs(args, kwargs, self.per_token)

    def batched(self) -> Call:
        """The arguments for a call on one batch row holding the tokens (``block(x[None], *args, **kwargs)``)."""
        args = tuple(a[None] if i in self.per_token else a for i, a in enumerate(self.args))
        return args, {k: v[None] if k in self.per_token else v for k, v in self.kwargs.items()}


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
