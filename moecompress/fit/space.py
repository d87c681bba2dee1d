"""Enumerate: the plans that meet a size, built from the existing pass configs and sized by `plan`'s accounting.

A plan is four choices: experts kept per layer (uniform), expert width after HEAPr neuron pruning (uniform
layout: the masked layout writes full-size tensors and saves nothing, so it never helps meet a size), weight
bits of the routed experts (stored float, 8 or 4; one width for every expert — mixed precision is stored at
its widest width today, so it saves no bytes either) and heal on or off. Each plan is a list of pass configs
(`PruneExpertsConfig` / `PruneAtomicConfig`, then `QuantizeConfig`); `moecompress.plan.plan_passes` checks it
against the config, runs the serving checks and counts its bytes exactly as `plan` and `inspect` do.

Only plans on the size frontier are kept: for every (width, bits) the most experts that still fit, and of
those only the ones no other plan beats on every axis at once (more or as many experts, as wide, as many
bits), because removing more than the size needs only adds damage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moecompress.arch.adapter import MoEAdapter
from moecompress.errors import UserError
from moecompress.heal.spec import HealSpec
from moecompress.passes.base import PassConfig
from moecompress.serving import VLLM_WIDTH_MULTIPLE, Finding

GROUP_SIZES = (128, 64, 32)  # preferred quantization group sizes (vLLM's), largest first; -1 when none divides
HARD_CHECKS = ("ep_size", "tp_size", "n_group")  # what fit always obeys; --target vllm adds every check
MAX_WIDTHS = 12  # width grid points per model (evenly spaced multiples), keeps the search cheap on wide experts


@dataclass(frozen=True)
class Choice:
    """One point of the search space, before it is sized."""

    keep: int
    width: int
    bits: int | None  # None: experts stay at the stored float dtype
    heal: bool


@dataclass
class Candidate:
    """A sized plan: its choice, the pass configs that build it, bytes as written and serving findings."""

    choice: Choice
    passes: list[PassConfig]
    bytes: int
    experts: int
    width: int
    findings: list[Finding] = field(default_factory=list)
    predicted: float | None = None
    parts: dict[str, float] = field(default_factory=dict)
    measured_kl: float | None = None

    @property
    def label(self) -> str:
        c = self.choice
        parts = []
        if c.keep < self.experts:
            parts.append(f"experts {c.keep}/{self.experts}")
        if c.width < self.width:
            parts.append(f"width {c.width}/{self.width}")
        parts.append(f"W{c.bits}" if c.bits else "float")
        if c.heal:
            parts.append("heal")
        return " · ".join(parts)


@dataclass
class SearchSpace:
    """The knobs of the enumeration (the CLI's options)."""

    bits: tuple[int, ...] = (8, 4)
    heal: bool = True
    criterion: str = "reap"
    neuron_criterion: str = "heapr"
    width_multiple: int = 8
    ep_size: int | None = None
    tp_size: int | None = None
    target: str | None = None


def group_size_for(hidden: int, width: int, tp_size: int | None = None) -> int:
    """The largest preferred group size dividing the hidden size and every expert-width shard, else -1."""
    shard = width // (tp_size or 1)
    return next((g for g in GROUP_SIZES if hidden % g == 0 and width % g == 0 and shard % g == 0), -1)


def build_passes(choice: Choice, experts: int, width: int, hidden: int, space: SearchSpace) -> list[PassConfig]:
    """The pass configs of a choice: one structural pass (experts and/or neurons, healed or not), then quantize."""
    from moecompress.passes.prune_atomic import PruneAtomicConfig
    from moecompress.passes.prune_experts import PruneExpertsConfig
    from moecompress.passes.quantize import QuantizeConfig

    heal = HealSpec() if choice.heal else None
    out: list[PassConfig] = []
    if choice.width < width:
        out.append(PruneAtomicConfig(neuron_ratio=round(1 - choice.width / width, 6), criterion=space.neuron_criterion,
                                     width_multiple=space.width_multiple, heal=heal,
                                     expert_keep=choice.keep if choice.keep < experts else None,
                                     expert_criterion=space.criterion))
    elif choice.keep < experts:
        out.append(PruneExpertsConfig(keep=choice.keep, criterion=space.criterion, heal=heal))
    if choice.bits:
        out.append(QuantizeConfig(bits=choice.bits, group_size=group_size_for(hidden, choice.width, space.tp_size)))
    return out


def keep_counts(adapter: MoEAdapter, config: dict[str, Any], space: SearchSpace) -> list[int]:
    """Expert counts a plan may keep, ascending: the family's router accepts them and they divide by --ep-size."""
    from moecompress.surgery import check_expert_count

    e = adapter.num_experts(config)
    out = []
    for k in range(1, e):
        try:
            check_expert_count(adapter, config, k)
        except UserError:
            continue
        if space.ep_size and k % space.ep_size:
            continue
        out.append(k)
    return out + [e]


def widths(width: int, space: SearchSpace) -> list[int]:
    """Expert widths a plan may keep, ascending: multiples of the kernel width multiple (at most MAX_WIDTHS)."""
    m = VLLM_WIDTH_MULTIPLE if space.target == "vllm" else space.width_multiple
    if space.tp_size:
        m = m * space.tp_size // math.gcd(m, space.tp_size)
    grid = list(range(m, width, m))
    if len(grid) > MAX_WIDTHS:
        step = len(grid) / MAX_WIDTHS
        grid = sorted({grid[min(len(grid) - 1, int(round((i + 1) * step)) - 1)] for i in range(MAX_WIDTHS)})
    return grid + [width]


class Sizer:
    """Bytes and serving findings of a choice, via `plan_passes` (memoised: heal does not change bytes)."""

    def __init__(self, config: dict[str, Any], adapter: MoEAdapter, space: SearchSpace, header: HeaderModel) -> None:
        self.config, self.adapter, self.space, self.header = config, adapter, space, header
        self.experts = adapter.num_experts(config)
        self.width = adapter.expert_width(config)
        self.hidden = int(adapter.text_config(config)["hidden_size"])
        self._memo: dict[tuple[int, int, int | None], tuple[int, list[Finding]] | None] = {}

    def passes(self, choice: Choice) -> list[PassConfig]:
        return build_passes(choice, self.experts, self.width, self.hidden, self.space)

    def size(self, keep: int, width: int, bits: int | None) -> tuple[int, list[Finding]] | None:
        """(bytes as written, findings), or None when the plan is refused (a check or a hard serving constraint)."""
        key = (keep, width, bits)
        if key not in self._memo:
            self._memo[key] = self._size(Choice(keep, width, bits, heal=False))
        return self._memo[key]

    def _size(self, choice: Choice) -> tuple[int, list[Finding]] | None:
        from moecompress.plan import plan_passes

        passes = self.passes(choice)
        if not passes:
            return self.header.input_bytes, []
        try:
            plan = plan_passes(self.config, passes, ep_size=self.space.ep_size, tp_size=self.space.tp_size)
        except UserError:
            return None
        findings = [f for step in plan.steps for f in step.findings]
        if any(not f.ok and (self.space.target == "vllm" or f.check in HARD_CHECKS) for f in findings):
            return None
        data = plan.steps[-1].after.bytes
        return data + self.header.estimate(choice, self.experts), findings


@dataclass
class HeaderModel:
    """safetensors headers (tensor names, dtypes, shapes as JSON) are bytes on disk too; on small models they
    are several percent. Measured per tensor on the input and scaled by the tensors a plan writes (a quantized
    linear writes three: packed values, scales, shape)."""

    input_bytes: int
    per_tensor: float
    tensors: int
    expert_tensors: int

    def estimate(self, choice: Choice, experts: int) -> int:
        kept = self.expert_tensors * choice.keep / max(experts, 1)
        n = (self.tensors - self.expert_tensors) + kept * (3 if choice.bits else 1)
        per = self.per_tensor * (1.25 if choice.bits else 1.0)  # longer names (weight_packed) and shape tensors
        return int(math.ceil(n * per))


def header_model(model_dir: Any, planned_input_bytes: int) -> HeaderModel:
    """Header bytes and tensor counts of the input's safetensors files."""
    import json
    import struct
    from pathlib import Path

    from moecompress.io.checkpoint import checkpoint_bytes
    from moecompress.quant.format import is_routed_expert_key

    total_header, names = 0, []
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        total_header += 8 + n
        names += [k for k in header if k != "__metadata__"]
    actual = checkpoint_bytes(Path(model_dir))
    per = max(total_header, actual - planned_input_bytes) / max(len(names), 1)
    experts = sum(1 for k in names if is_routed_expert_key(k.rsplit(".", 1)[0]))
    return HeaderModel(input_bytes=actual, per_tensor=per, tensors=len(names), expert_tensors=experts)


def enumerate_candidates(sizer: Sizer, target_bytes: int) -> list[Candidate]:
    """Every frontier plan that meets `target_bytes`: per (width, bits), the most experts that fit."""
    space = sizer.space
    ks = keep_counts(sizer.adapter, sizer.config, space)
    out: list[Candidate] = []
    for bits in (None, *sorted(set(space.bits), reverse=True)):
        for w in widths(sizer.width, space):
            best = _largest_fitting(ks, lambda k, w=w, bits=bits: sizer.size(k, w, bits), target_bytes)
            if best is None:
                continue
            keep, (nbytes, findings) = best
            structural = keep < sizer.experts or w < sizer.width
            for heal in ((False, True) if structural and space.heal else (False,)):
                choice = Choice(keep, w, bits, heal)
                out.append(Candidate(choice=choice, passes=sizer.passes(choice), bytes=nbytes,
                                     experts=sizer.experts, width=sizer.width, findings=findings))
    return [c for c in out if not any(dominates(o.choice, c.choice, sizer.experts, sizer.width) for o in out)]


def dominates(a: Choice, b: Choice, experts: int, width: int) -> bool:
    """`a` keeps at least as much as `b` on every axis (experts, width, bits; float beats any bits), is another
    plan, and heals alike or removes nothing heal could repair: `b` only removes more than the size needs."""
    def bits(c: Choice) -> int:
        return c.bits or 1 << 10

    intact = a.keep == experts and a.width == width
    return (a != b and (a.heal == b.heal or intact) and a.keep >= b.keep and a.width >= b.width
            and bits(a) >= bits(b))


def _largest_fitting(ks: list[int], size: Any, target: int) -> tuple[int, tuple[int, list[Finding]]] | None:
    """The largest k (ascending list) whose plan fits: bytes grow with k, so bisect. Counts the router refuses
    or --ep-size does not divide are already out of `ks`; a plan refused otherwise (widths, bits) is refused at
    every k and counts as not fitting."""
    lo, hi, best = 0, len(ks) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        sized = size(ks[mid])
        if sized is not None and sized[0] <= target:
            best, lo = (ks[mid], sized), mid + 1
        else:
            hi = mid - 1
    return best


def smallest_plan(sizer: Sizer) -> tuple[int, str] | None:
    """The fewest bytes any plan reaches (for the message when a target is out of reach)."""
    space = sizer.space
    ks = keep_counts(sizer.adapter, sizer.config, space)
    best: tuple[int, str] | None = None
    for bits in (None, *space.bits):
        for w in widths(sizer.width, space)[:1]:
            for k in ks:
                sized = sizer.size(k, w, bits)
                if sized is not None:
                    label = Candidate(Choice(k, w, bits, False), [], sized[0], sizer.experts, sizer.width).label
                    if best is None or sized[0] < best[0]:
                        best = (sized[0], label)
                    break
    return best
