"""What serving engines (vLLM) accept, checked from config.json before any weight loads.

vLLM loads fewer experts as a plain config change when every MoE layer has the same count; expert parallelism
needs the count divisible by the EP size; group-limited routers need `n_routed_experts % n_group == 0`; the fused
MoE kernels (Marlin / compressed-tensors paths) want expert widths that are multiples of 64 and quantized
experts with 4 or 8 bits, symmetric, group size -1/32/64/128 that divides the widths. These are warnings by
default (a checkpoint for transformers alone need not obey them) and errors with `--target vllm`, raised
before anything loads.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel

from moecompress.arch.adapter import MoEAdapter
from moecompress.errors import UserError

Target = Literal["transformers", "vllm"]
VLLM_BITS = (4, 8)
VLLM_GROUP_SIZES = (-1, 32, 64, 128)
VLLM_WIDTH_MULTIPLE = 64


class Finding(BaseModel):
    """One serving check: its name, whether it passes and a sentence saying why (with the fix when it fails)."""

    check: str
    ok: bool
    message: str


def serving_findings(cfg: Any, adapter: MoEAdapter, before: dict[str, Any], after: dict[str, Any],
                     ep_size: int | None = None, tp_size: int | None = None) -> list[Finding]:
    """Serving checks for one pass going from config `before` to config `after`.

    `tp_size`: tensor parallelism splits every expert's width into `tp_size` shards, so the width must divide
    by it (and, quantized, each shard by the group size)."""
    out: list[Finding] = []
    e_before, e_after = adapter.num_experts(before), adapter.num_experts(after)
    groups = adapter.num_groups(after)
    if groups > 1:
        ok = e_after % groups == 0
        out.append(Finding(check="n_group", ok=ok, message=f"{e_after} experts over n_group={groups} routing groups"
                           + ("" if ok else f": not divisible; keep a multiple of {groups}")))
    if ep_size:
        ok = e_after % ep_size == 0
        near = _nearest_multiple(e_after, ep_size, below=e_before)
        fix = "" if ok else (f"; keep {near} experts instead" if near else
                             f"; no count below {e_before} does, use a smaller --ep-size")
        out.append(Finding(check="ep_size", ok=ok, message=f"{e_after} experts "
                           f"{'divide' if ok else 'do not divide'} by --ep-size {ep_size}{fix}"))
    w_before, w_after = adapter.expert_width(before), adapter.expert_width(after)
    if w_after != w_before or getattr(cfg, "name", "") == "prune_atomic":
        ok = w_after % VLLM_WIDTH_MULTIPLE == 0
        out.append(Finding(check="expert_width", ok=ok, message=f"expert width {w_after}"
                           + (f" is a multiple of {VLLM_WIDTH_MULTIPLE}" if ok else
                              f" is not a multiple of {VLLM_WIDTH_MULTIPLE} (vLLM fused MoE kernels); set "
                              f"width_multiple: {VLLM_WIDTH_MULTIPLE} (→ {_round_to(w_after, VLLM_WIDTH_MULTIPLE)})")))
    if tp_size and tp_size > 1:
        ok = w_after % tp_size == 0
        out.append(Finding(check="tp_size", ok=ok, message=f"expert width {w_after} "
                           + (f"splits into {tp_size} shards of {w_after // tp_size}" if ok else
                              f"does not split into --tp-size {tp_size} equal shards; keep a width divisible by "
                              f"{tp_size}")))
        gs = int(getattr(cfg, "group_size", 0) or 0) if getattr(cfg, "name", "") == "quantize" else 0
        if ok and gs > 0 and (w_after // tp_size) % gs:
            out.append(Finding(check="tp_size", ok=False, message=f"each --tp-size {tp_size} shard is "
                               f"{w_after // tp_size} wide, not a multiple of group size {gs}; choose a group size "
                               "that divides it"))
    if getattr(cfg, "name", "") == "quantize":
        bits, gs = int(cfg.bits), int(cfg.group_size)
        ok = bits in VLLM_BITS
        out.append(Finding(check="quant_bits", ok=ok, message=f"{bits}-bit weights"
                           + ("" if ok else f": vLLM's compressed-tensors MoE kernels take {VLLM_BITS}; use --bits 4")))
        if cfg.bits_budget is not None:
            widest = max(cfg.candidate_bits)
            ok = widest in VLLM_BITS
            out.append(Finding(check="quant_bits", ok=ok, message=f"mixed precision is stored at the widest width "
                               f"({widest} bits)" + ("" if ok else "; vLLM needs 4 or 8")))
        ok = gs in VLLM_GROUP_SIZES
        out.append(Finding(check="group_size", ok=ok, message=f"group size {gs}"
                           + ("" if ok else f": vLLM's MoE kernels take {VLLM_GROUP_SIZES}; use --group-size 128")))
        if gs > 0:
            hidden = int(after.get("hidden_size") or 0)
            bad = [f"{what} {n}" for what, n in (("hidden size", hidden), ("expert width", w_after)) if n % gs]
            out.append(Finding(check="group_divides_width", ok=not bad, message=f"group size {gs} divides hidden "
                               f"size and expert width" if not bad else f"group size {gs} does not divide "
                               f"{', '.join(bad)}; choose a group size that does"))
    return out


def enforce(findings: list[Finding], target: Target | None, *, where: str = "", console: Any = None) -> None:
    """With --target vllm a failed check is an error (before anything loads); otherwise a printed warning."""
    failed = [f for f in findings if not f.ok]
    if not failed:
        return
    prefix = f"{where}: " if where else ""
    if target == "vllm":
        raise UserError(prefix + "not servable by vLLM: " + "; ".join(f.message for f in failed)
                        + " (drop --target vllm to write it anyway)")
    if console is not None:
        for f in failed:
            console.print(f"[yellow]serving warning:[/] {prefix}{f.message} (an error with --target vllm)")


def _round_to(n: int, m: int) -> int:
    return max(m, int(round(n / m)) * m)


def _nearest_multiple(n: int, m: int, below: int) -> int | None:
    """The multiple of m nearest to n that is a reduction (0 < k < below), or None."""
    candidates = [k for k in ((n // m) * m, (n // m + 1) * m) if 0 < k < below]
    return min(candidates, key=lambda k: abs(k - n)) if candidates else None
