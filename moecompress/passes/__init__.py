"""Compression passes. Importing this package registers every built-in pass."""

from moecompress.passes.base import PASSES, PassConfig, PassContext, get_pass, register_pass

_BUILTIN = ("prune_experts", "merge_experts", "prune_atomic", "quantize", "heal")


def load_builtin_passes() -> None:
    """Import the built-in pass modules (each registers itself); missing optional ones are skipped."""
    from importlib import import_module

    for name in _BUILTIN:
        try:
            import_module(f"moecompress.passes.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"moecompress.passes.{name}":
                raise


__all__ = ["PASSES", "PassConfig", "PassContext", "get_pass", "load_builtin_passes", "register_pass"]
