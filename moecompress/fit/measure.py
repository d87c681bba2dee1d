"""Measure: run a plan's passes on a copy of the model in memory and score it by KL on held-out tokens.

The passes are the registered ones (`get_pass(name).fn`), with the same calibration batch and cached
statistics a recipe run of the plan sees, and heal runs through `after_pass` exactly as the runner calls it;
the model in memory then holds the weights the checkpoint will hold (quantized weights as their dequantized
values). Nothing is written. The held-out tokens come after the calibration sequences in the same source, so
no pass has seen them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch

from moecompress.calib.stats import Stats
from moecompress.fit.space import Candidate
from moecompress.heal.run import after_pass, calibration_kl
from moecompress.passes.base import PassContext, get_pass

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def apply_plan(model: torch.nn.Module, tokenizer: Any, candidate: Candidate, calib: Any,
               first_stats: Callable[[], Stats]) -> torch.nn.Module:
    """A copy of `model` with the candidate's passes applied in memory (the input model is not changed)."""
    from moecompress.arch.adapter import adapter_for
    from moecompress.calib.collect import collect_stats

    work = copy.deepcopy(model)
    for i, cfg in enumerate(candidate.passes):
        def fresh_stats(m: torch.nn.Module = work) -> Stats:  # a later pass sees the previous pass's model
            return collect_stats(m, list(calib.batches(8)), total_tokens=calib.n_tokens, sample_tokens=0)

        ctx = PassContext(model=work, tokenizer=tokenizer, adapter=adapter_for(work), config=cfg,
                          get_stats=first_stats if i == 0 else fresh_stats, get_calibration=lambda: calib)
        details = get_pass(cfg.name).fn(ctx)
        spec = getattr(cfg, "heal", None)
        if spec is not None:
            after_pass(work, lambda: model, calib, None, cfg.name, details, spec)
    return work


def measure(model: torch.nn.Module, tokenizer: Any, candidate: Candidate, calib: Any, held: Batches,
            first_stats: Callable[[], Stats]) -> float:
    """KL(original ‖ plan) per held-out token; stored on the candidate."""
    t0 = time.perf_counter()
    work = apply_plan(model, tokenizer, candidate, calib, first_stats)
    candidate.measured_kl = calibration_kl(model, work, held)
    candidate.parts["measure_seconds"] = round(time.perf_counter() - t0, 2)
    del work
    return candidate.measured_kl


def choose_to_measure(candidates: list[Candidate], n: int) -> list[Candidate]:
    """The `n` best predicted plans, one per kind first (which axes it uses), so a predictor that is biased
    against one axis still gets that axis measured; then the next best overall."""
    ranked = sorted(candidates, key=lambda c: (c.predicted if c.predicted is not None else float("inf"), c.bytes))
    picked: list[Candidate] = []
    seen: set[tuple[bool, bool, bool]] = set()
    for c in ranked:
        kind = (c.choice.keep < c.experts, c.choice.width < c.width, bool(c.choice.bits))
        if kind not in seen and len(picked) < n:
            picked.append(c)
            seen.add(kind)
    for c in ranked:
        if len(picked) >= n:
            break
        if c not in picked:
            picked.append(c)
    return sorted(picked, key=lambda c: ranked.index(c))


def choose(measured: list[Candidate]) -> Candidate:
    """The least measured damage; ties go to the smaller plan."""
    return min(measured, key=lambda c: (c.measured_kl, c.bytes))
