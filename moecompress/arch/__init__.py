"""Architecture knowledge as data: one adapter per model family, plus a uniform per-expert view."""

from moecompress.arch.adapter import (
    ADAPTERS,
    MoEAdapter,
    MoELayer,
    adapter_for,
    adapter_for_config_dict,
    moe_layers,
)
from moecompress.arch.experts import ExpertView, ExpertWeights

__all__ = [
    "ADAPTERS",
    "ExpertView",
    "ExpertWeights",
    "MoEAdapter",
    "MoELayer",
    "adapter_for",
    "adapter_for_config_dict",
    "moe_layers",
]
