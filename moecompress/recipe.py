"""Recipes: the science of a compression run in YAML, validated before any weight loads.

```yaml
model: artifacts/reference
calibration: {source: artifacts/reference/data/train.jsonl, samples: 64, seqlen: 256}
eval: {tasks: [ref_ppl, ref_mc]}
passes:
  - pass: prune_experts
    ratio: 0.25
    criterion: reap
  - pass: quantize
    bits: 4
mtp: keep   # optional: multi-token-prediction layers for every pass (a pass's own `mtp:` wins)
```
Errors carry their location (``passes[1].ratio: Input should be less than 1``) and misspelt pass names get
a suggestion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moecompress.errors import UserError
from moecompress.passes.base import MTPChoice, PassConfig, get_pass


class Recipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    model: str | None = None
    calibration: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    mtp: MTPChoice | None = None  # default of every pass that has the option (moecompress.io.mtp)
    passes: list[Any] = Field(min_length=1)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_validation(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        where = _loc(tuple(err["loc"]))
        where = f"{prefix}.{where}" if prefix and where else (prefix or where)
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return "; ".join(lines)


def validated(cls: type[BaseModel], data: dict[str, Any], where: str = "") -> Any:
    """`cls(**data)`, with pydantic's errors turned into one located UserError (`where.field: message`)."""
    try:
        return cls(**data)
    except ValidationError as exc:
        raise UserError(format_validation(exc, where)) from None


def build_pass_config(raw: dict[str, Any], where: str) -> PassConfig:
    data = dict(raw)
    name = data.pop("pass")
    if not isinstance(name, str):
        raise UserError(f"{where}.pass: must be a pass name")
    try:
        registered = get_pass(name)
    except UserError as exc:
        raise UserError(f"{where}.pass: {exc}") from None
    return validated(registered.config_cls, data, where)


def build_calibration(raw: dict[str, Any] | None):
    from moecompress.calib.data import CalibSpec

    return None if raw is None else validated(CalibSpec, raw, "calibration")


def build_eval(raw: dict[str, Any] | None):
    from moecompress.eval import EvalSpec

    return None if raw is None else validated(EvalSpec, raw, "eval")


class ParsedRecipe(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    model: str | None
    calibration: Any
    eval: Any
    passes: list[PassConfig]
    text: str = ""


def parse_recipe(data: Any, text: str = "") -> ParsedRecipe:
    if not isinstance(data, dict):
        raise UserError("a recipe must be a YAML mapping with at least a 'passes:' list")
    try:
        recipe = Recipe(**data)
    except ValidationError as exc:
        raise UserError(format_validation(exc)) from None
    for i, p in enumerate(recipe.passes):
        if not isinstance(p, dict) or "pass" not in p:
            raise UserError(f"passes[{i}]: must be a mapping with a 'pass:' key naming the pass (e.g. pass: prune_experts)")
    raw = recipe.passes
    if recipe.mtp is not None:  # the recipe-wide MTP choice, for passes that write MTP layers
        raw = [{"mtp": recipe.mtp, **p} if p.get("pass") in _passes_with("mtp") else p for p in raw]
    passes = [build_pass_config(p, f"passes[{i}]") for i, p in enumerate(raw)]
    return ParsedRecipe(model=recipe.model, calibration=build_calibration(recipe.calibration),
                        eval=build_eval(recipe.eval), passes=passes, text=text)


def _passes_with(field: str) -> set[str]:
    """Names of the registered passes whose config has `field`."""
    from moecompress.passes import load_builtin_passes
    from moecompress.passes.base import PASSES

    load_builtin_passes()
    return {name for name, p in PASSES.items() if field in p.config_cls.model_fields}


def load_recipe(path: Path) -> ParsedRecipe:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_recipe(data, text)
