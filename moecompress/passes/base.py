"""What a pass is: a validated config plus a function that changes a loaded model in memory.

The runner owns everything around it (loading, statistics cache, writing, evaluation, reports), so a pass
only decides and calls ``moecompress.surgery``. ``check`` runs on config.json alone, before any weight loads.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moecompress.arch.adapter import MoEAdapter
from moecompress.errors import UserError


class PassConfig(BaseModel):
    """Base of every pass config: frozen, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: ClassVar[str] = ""
    needs_stats: ClassVar[bool] = True

    def check(self, adapter: MoEAdapter, hf_config: dict[str, Any]) -> None:
        """Raise UserError (with the fix) if this pass cannot apply to a model with this config."""


class ExpertCountConfig(PassConfig):
    """Shared by passes that leave fewer experts per layer: exactly one of `ratio` / `keep`, checked up front."""

    ratio: float | None = Field(None, gt=0, lt=1, description="share of experts removed in every MoE layer")
    keep: int | None = Field(None, ge=1, description="experts left per layer (instead of ratio)")

    @model_validator(mode="after")
    def _one_size(self) -> ExpertCountConfig:
        if (self.ratio is None) == (self.keep is None):
            raise ValueError("give exactly one of ratio or keep")
        return self

    def n_keep(self, num_experts: int) -> int:
        if self.keep is not None:
            return self.keep
        assert self.ratio is not None
        return num_experts - int(math.floor(num_experts * self.ratio + 1e-9))

    def planned_config(self, adapter: MoEAdapter, hf_config: dict[str, Any]) -> dict[str, Any]:
        n = self.n_keep(adapter.num_experts(hf_config))
        return adapter.with_counts(hf_config, n)

    def check(self, adapter: MoEAdapter, hf_config: dict[str, Any]) -> None:
        from moecompress.surgery import check_expert_count

        e = adapter.num_experts(hf_config)
        n_keep = self.n_keep(e)
        try:
            check_expert_count(adapter, hf_config, n_keep)
        except UserError as exc:
            what = f"ratio {self.ratio} leaves {n_keep}" if self.ratio is not None else f"keep {n_keep}"
            raise UserError(f"{self.name}: {what} of {e} experts: {exc}") from None


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
