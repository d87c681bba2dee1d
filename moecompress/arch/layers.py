"""The layer pattern of a checkpoint from its config.json alone: what every decoder layer is.

The stack is built on the meta device (no memory, about a second even for 600B-parameter configs), so the
answer is what transformers' own modeling code builds for this config — dense-first layers, MoE frequency,
Mamba / linear-attention / convolution mixers, hybrid patterns — with no per-family rules here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from moecompress.arch.discover import is_fused_experts
from moecompress.errors import UserError

# Config keys counting multi-token-prediction layers (their weights ship in the checkpoint; transformers does
# not build them).
MTP_KEYS = ("num_nextn_predict_layers", "mtp_num_hidden_layers", "num_mtp_layers", "mtp_num_layers", "n_mtp_layers")

_MIXERS = (  # class-name fragments -> mixer kind, first match wins
    (("Mamba",), "mamba"),
    (("GatedDeltaNet", "DeltaNet", "LinearAttention", "Lightning", "DeltaAttention", "KimiDelta"), "linear-attention"),
    (("ShortConv",), "conv"),
    (("Attention", "Attn"), "attention"),
)


@dataclass
class LayerPattern:
    """What each decoder layer of a checkpoint is, plus the counts around them."""

    model_type: str
    family: str | None  # adapter family (None: not supported; see `unsupported`)
    unsupported: str | None
    layers: list[str] = field(default_factory=list)  # per layer "mixer/ffn", e.g. "attention/moe", "mamba/-"
    mtp_layers: int = 0
    total_params: int = 0  # as transformers counts them (MTP layers excluded: transformers does not build them)
    text_config_key: str | None = None

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, k in enumerate(self.layers) if k.endswith("/moe")]

    def summary(self) -> str:
        """Compact form: '3×attention/dense, 58×attention/moe' or '10×[3×linear-attention/moe, 1×attention/moe]'."""
        return summarize(self.layers) + (f" (+{self.mtp_layers} MTP)" if self.mtp_layers else "")


def summarize(layers: list[str]) -> str:
    """Shortest run-length form of per-layer labels, folding a repeating period (after up to 3 leading layers)
    into 'N×[…]': the layer-pattern text of both `layer_pattern(config)` and `inspect`."""
    best = _runs(layers)
    for start in range(0, min(4, len(layers))):
        for period in range(2, 9):
            body = layers[start:]
            reps = len(body) // period
            if reps < 2 or body != body[:period] * reps + body[: len(body) - period * reps]:
                continue
            tail = body[period * reps:]
            text = ", ".join(x for x in (_runs(layers[:start]), f"{reps}×[{_runs(body[:period])}]", _runs(tail)) if x)
            if len(text) < len(best):
                best = text
    return best


def _runs(kinds: list[str]) -> str:
    out: list[str] = []
    i = 0
    while i < len(kinds):
        j = i
        while j < len(kinds) and kinds[j] == kinds[i]:
            j += 1
        out.append(f"{j - i}×{kinds[i]}")
        i = j
    return ", ".join(out)


def _kind(layer: torch.nn.Module) -> str:
    mixer = "-"
    for mod in layer.children():
        cls = type(mod).__name__
        hit = next((kind for frags, kind in _MIXERS if any(f in cls for f in frags)), None)
        if hit is not None and not is_fused_experts(mod):
            mixer = hit
            break
    ffn = "-"
    for mod in layer.modules():
        if is_fused_experts(mod):
            ffn = "moe"
            break
    if ffn == "-" and any(isinstance(getattr(m, "down_proj", None), torch.nn.Linear) or
                          type(m).__name__.endswith(("MLP", "FeedForward")) for m in layer.modules()):
        ffn = "dense"
    return f"{mixer}/{ffn}"


def layer_pattern(config: dict[str, Any]) -> LayerPattern:
    """Family and per-layer kinds of a config.json dict (no weights read)."""
    from moecompress.arch.adapter import adapter_for_model_type
    from moecompress.arch.discover import decoder_layer_list
    from moecompress.zoo.miniature import _drop_quantization, config_object, model_class

    model_type = config.get("model_type")
    if not model_type:
        raise UserError("config.json has no model_type")
    family, reason = None, None
    try:
        family = adapter_for_model_type(model_type).model_type
    except UserError as exc:
        reason = str(exc)
    cfg_dict = copy.deepcopy(config)
    _drop_quantization(cfg_dict)  # the pattern does not depend on the storage format
    cfg = config_object(cfg_dict)
    try:
        with torch.device("meta"):
            model = model_class(cfg)._from_config(cfg)
        from moecompress.arch.flat_experts import fuse_flat_experts

        fuse_flat_experts(model)  # DBRX's flattened experts, as compression sees them
    except UserError:
        raise
    except Exception as exc:  # the config does not build in this transformers: say so in one line
        raise UserError(f"transformers cannot build {model_type} from this config: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from exc
    layers = decoder_layer_list(model)
    if layers is None:
        inner = getattr(model, "model", model)
        layers = getattr(getattr(inner, "language_model", inner), "layers", None) or []
    text_key = "text_config" if isinstance(config.get("text_config"), dict) else None
    text = config.get("text_config") if text_key else config
    mtp = next((int(text[k]) for k in MTP_KEYS if isinstance(text.get(k), int) and text[k] > 0), 0)
    return LayerPattern(model_type=model_type, family=family, unsupported=reason, layers=[_kind(ly) for ly in layers],
                        mtp_layers=mtp, total_params=sum(p.numel() for p in model.parameters()),
                        text_config_key=text_key)
