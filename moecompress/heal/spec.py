"""Heal settings: what a heal fits and how hard. Kept import-light so pass configs can embed it."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


class HealSpec(BaseModel):
    """What heal fits and how hard (the science of a heal; recipe `heal:` or the `heal` step)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    router: bool = Field(True, description="(a) least-squares router rows on the kept experts")
    down: bool = Field(True, description="(b) ridge least squares of the kept experts' down projections")
    steps: int = Field(0, ge=0, description="(c) fp32 Adam steps on experts + router (0 = closed form only)")
    router_ridge: float = Field(1e-3, ge=0, description="(a) ridge towards the current rows, relative to the Gram diagonal")
    ridge: float = Field(1e-2, ge=0, description="(b) ridge towards the current down projection, relative")
    sweeps: int = Field(2, ge=1, description="(b) passes over the experts (each can only lower the fitted MSE)")
    lr: float = Field(1e-3, gt=0, description="(c) Adam learning rate")
    batch_tokens: int = Field(2048, ge=16, description="(c) tokens per Adam step")
    eval_every: int = Field(10, ge=1, description="(c) steps between held-out checks")
    patience: int = Field(3, ge=1, description="(c) held-out checks without improvement before stopping")
    holdout: float = Field(0.1, gt=0, lt=0.5, description="share of calibration sequences held out (early stopping, "
                           "honest errors, calibration KL)")
    revert_worse: bool = Field(True, description="undo a step that raises the held-out block error")
    seed: int = 0
    auto: bool = Field(False, description="heal was not asked for (the CLI's default for prune and merge): where "
                       "it cannot run here (family, expert-chunked layers, no calibration data), the pass runs "
                       "without it and the report says why, instead of stopping")


def _as_spec(v: Any) -> Any:
    """`heal: true` → default heal, `heal: false` → none, a mapping → those settings."""
    if v is True:
        return HealSpec()
    if v is False:
        return None
    return v


HealOption = Annotated[HealSpec | None, BeforeValidator(_as_spec)]
