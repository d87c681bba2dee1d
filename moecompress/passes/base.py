"""What a pass is: a validated config plus a function that changes a loaded model in memory.

The runner owns everything around it (loading, statistics cache, writing, evaluation, reports), so a pass
only decides and calls ``moecompress.surgery``. ``check`` runs on config.json alone, before any weight loads.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from moecompress.arch.adapter import MoEAdapter
from moecompress.errors import UserError


class PassConfig(BaseModel):
    """Base of every pass config: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: ClassVar[str] = ""
    needs_stats: ClassVar[bool] = True

    def check(self, adapter: MoEAdapter, hf_config: dict[str, Any]) -> None:
        """Raise UserError (with the fix) if this pass cannot apply to a model with this config."""


@dataclass
class PassContext:
    """Everything a pass may use; statistics and calibration are produced lazily by the runner."""

    model: Any
    tokenizer: Any
    adapter: MoEAdapter
    config: PassConfig
    get_stats: Callable[[], Any]
    get_calibration: Callable[[], Any]
    console: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


PassFn = Callable[[PassContext], dict[str, Any]]


@dataclass
class RegisteredPass:
    config_cls: type[PassConfig]
    fn: PassFn


PASSES: dict[str, RegisteredPass] = {}


def register_pass(config_cls: type[PassConfig]) -> Callable[[PassFn], PassFn]:
    def deco(fn: PassFn) -> PassFn:
        PASSES[config_cls.name] = RegisteredPass(config_cls=config_cls, fn=fn)
        return fn

    return deco


def get_pass(name: str) -> RegisteredPass:
    from moecompress.passes import load_builtin_passes

    load_builtin_passes()
    if name not in PASSES:
        close = difflib.get_close_matches(name, list(PASSES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown pass {name!r}{hint} Known passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]
