"""Mixed-precision bit allocation (MC-MoE style): a small integer program over units and candidate widths.

Choose one bit width ``b_u`` per unit ``u`` from the candidates to minimise ``Σ_u importance_u · error_u(b_u)``
subject to a parameter-weighted average-bits budget ``Σ_u n_u · cost(b_u) ≤ budget · Σ_u n_u`` (optionally
one budget per group, e.g. per layer as MC-MoE does). Importance comes from routing statistics (how often
and how strongly the router uses an expert), error from measured reconstruction error at each width.

The allocator is granularity-agnostic: a unit is whatever the caller makes it. What the checkpoint format
can store exactly is narrower (see :mod:`moecompress.quant.format`): all routed experts share one scheme, so a
per-expert allocation is stored padded to its widest width; units that really save bytes are "all routed
experts" and each dense linear.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moecompress.errors import UserError


@dataclass
class Allocation:
    """The chosen width per unit and what it costs."""

    bits: np.ndarray  # [U] chosen candidate bit width per unit
    choice: np.ndarray  # [U] index into the candidates
    objective: float  # Σ importance · error at the chosen widths
    average_bits: float  # parameter-weighted mean cost bits, over all units
    budget: float


def importance_scores(
    frequency: Sequence[float] | np.ndarray,
    gate_mass: Sequence[float] | np.ndarray | None = None,
    alpha: float = 1.0,
    beta: float = 1.0,
) -> np.ndarray:
    """MC-MoE importance ``φ^α · w^β`` (φ: routing frequency, w: mean or total gate weight), mean 1.

    Both inputs are normalised first so α and β trade them off on the same footing; an expert never
    routed to gets importance 0 (its error does not matter to the calibration distribution).
    """
    f = np.asarray(frequency, dtype=np.float64)
    if f.ndim != 1 or (f < 0).any() or not np.isfinite(f).all():
        raise UserError("frequency must be a 1-D array of finite, non-negative numbers")
    score = (f / (f.sum() or 1.0)) ** alpha
    if gate_mass is not None:
        w = np.asarray(gate_mass, dtype=np.float64)
        if w.shape != f.shape or (w < 0).any() or not np.isfinite(w).all():
            raise UserError("gate_mass must match frequency in shape and be finite, non-negative")
        score = score * (w / (w.sum() or 1.0)) ** beta
    mean = score.mean()
    return score / mean if mean > 0 else np.ones_like(score)


def allocate_bits(
    importance: Sequence[float] | np.ndarray,
    errors: Sequence[Sequence[float]] | np.ndarray,
    n_params: Sequence[float] | np.ndarray,
    candidates: Sequence[int],
    budget_bits: float,
    *,
    cost_bits: Sequence[float] | np.ndarray | None = None,
    groups: Sequence[int] | np.ndarray | None = None,
    time_limit: float = 60.0,
) -> Allocation:
    """Solve the allocation exactly with ``scipy.optimize.milp`` (HiGHS).

    ``errors[u, c]`` is unit ``u``'s error at ``candidates[c]``; ``cost_bits`` (``[C]`` or ``[U, C]``, default
    the candidates themselves) is what a width costs per parameter — pass ``b + 16 / group_size`` to count
    the scales. With ``groups`` the budget holds within every group separately.
    """
    from scipy import sparse
    from scipy.optimize import Bounds, LinearConstraint, milp

    imp = np.asarray(importance, dtype=np.float64)
    err = np.asarray(errors, dtype=np.float64)
    npar = np.asarray(n_params, dtype=np.float64)
    cand = np.asarray(list(candidates), dtype=np.float64)
    n_units, n_cand = len(imp), len(cand)
    if n_units == 0 or n_cand == 0:
        raise UserError("need at least one unit and one candidate bit width")
    if err.shape != (n_units, n_cand):
        raise UserError(f"errors must have shape (units, candidates) = ({n_units}, {n_cand}), got {err.shape}")
    if npar.shape != (n_units,) or (npar <= 0).any():
        raise UserError("n_params must give a positive parameter count per unit")
    for name, arr in (("importance", imp), ("errors", err)):
        if not np.isfinite(arr).all() or (arr < 0).any():
            raise UserError(f"{name} must be finite and non-negative")
    cost = cand if cost_bits is None else np.asarray(cost_bits, dtype=np.float64)
    cost = np.broadcast_to(cost, (n_units, n_cand)) if cost.ndim == 1 else cost
    if cost.shape != (n_units, n_cand):
        raise UserError(f"cost_bits must have shape ({n_cand},) or ({n_units}, {n_cand})")
    grp = np.zeros(n_units, dtype=np.int64) if groups is None else np.asarray(groups)
    if grp.shape != (n_units,):
        raise UserError("groups must give one group id per unit")

    # Feasibility first, with a message that says how to fix it.
    for gid in np.unique(grp):
        sel = grp == gid
        cheapest = float((npar[sel] * cost[sel].min(axis=1)).sum() / npar[sel].sum())
        if cheapest > budget_bits + 1e-9:
            where = "" if groups is None else f" in group {gid}"
            raise UserError(
                f"budget of {budget_bits:g} bits per parameter is below the cheapest allocation{where} "
                f"({cheapest:.3g} bits); raise the budget or add a smaller candidate width"
            )

    # x[u, c] flattened row-major; one-hot per unit, budget per group.
    c_obj = (imp[:, None] * err).ravel()
    one_hot = sparse.kron(sparse.eye(n_units, format="csr"), np.ones((1, n_cand)), format="csr")
    budget_rows, budget_ub = [], []
    for gid in np.unique(grp):
        sel = (grp == gid).astype(np.float64)
        budget_rows.append(((sel * npar)[:, None] * cost).ravel())
        budget_ub.append(budget_bits * float((sel * npar).sum()))
    constraints = [
        LinearConstraint(one_hot, 1, 1),
        LinearConstraint(np.array(budget_rows), -np.inf, np.array(budget_ub) * (1 + 1e-12)),
    ]
    res = milp(
        c_obj,
        constraints=constraints,
        integrality=np.ones_like(c_obj),
        bounds=Bounds(0, 1),
        options={"time_limit": time_limit},
    )
    if res.x is None:
        raise UserError(f"bit allocation found no solution: {res.message}")
    choice = np.asarray(res.x).reshape(n_units, n_cand).argmax(axis=1)
    chosen_cost = cost[np.arange(n_units), choice]
    return Allocation(
        bits=cand[choice].astype(np.int64),
        choice=choice,
        objective=float((imp * err[np.arange(n_units), choice]).sum()),
        average_bits=float((npar * chosen_cost).sum() / npar.sum()),
        budget=float(budget_bits),
    )


def error_table(
    weights: Sequence[torch.Tensor],
    candidates: Sequence[int],
    group_size: int,
    hessians: Sequence[torch.Tensor | None] | None = None,
    method: str = "rtn",
) -> np.ndarray:
    """``errors[u, c]``: output error ``tr(ΔW H ΔWᵀ)`` of unit ``u`` quantized at ``candidates[c]``.

    A unit is one weight here; sum rows yourself for units made of several (gate + up + down). Without a
    Hessian the error is the Frobenius norm² of ``ΔW``. ``method`` is ``"rtn"`` or ``"gptq"``.
    """
    from moecompress.quant.gptq import gptq_quantize, output_error
    from moecompress.quant.rtn import quantize_rtn

    if method not in ("rtn", "gptq"):
        raise UserError(f"method={method!r}; use 'rtn' or 'gptq'")
    hs = list(hessians) if hessians is not None else [None] * len(weights)
    if len(hs) != len(weights):
        raise UserError("give one Hessian (or None) per weight")
    table = np.zeros((len(weights), len(candidates)))
    for u, (w, h) in enumerate(zip(weights, hs, strict=True)):
        for c, b in enumerate(candidates):
            r = quantize_rtn(w, b, group_size) if method == "rtn" else gptq_quantize(w, h, b, group_size)
            table[u, c] = output_error(w, r.dequant, h)
    return table
