"""Layer-by-layer forward: the hidden states entering layer 0, then one decoder layer at a time.

GPTQ (``passes.quantize``) and heal (``moecompress.heal``) both walk a model this way so that what a layer
sees is what the already-processed layers below it produce (error propagation).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from moecompress.arch.adapter import decoder_layers


def capture_layer_inputs(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """Hidden states entering layer 0 and each layer's keyword arguments (masks, positions), per batch."""
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
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return first, kwargs


def layer_output(out: Any) -> torch.Tensor:
    """A decoder layer returns a tensor or a tuple whose first item is the hidden states."""
    return out[0] if isinstance(out, tuple) else out
