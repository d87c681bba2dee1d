"""GPTQ with expert-aware Hessians: the calibrated quantizer behind the ``quantize`` pass.

GPTQ (Frantar et al., 2022) quantizes a weight one input column at a time and pushes each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's squared output
error, ``H = Σ_t x_t x_tᵀ``. For a routed expert the tokens are the ones routed to it; MoEQuant's
affinity-guided variant weighs each token by its gate weight for the expert (``H = Σ_t c_t x_t x_tᵀ``), so
tokens the expert barely contributes to matter less. Experts that saw no calibration token get an identity
Hessian (as in QMoE), which makes GPTQ reduce exactly to round-to-nearest.

Implementation notes (why it looks the way it does):
- the inverse Hessian is used through the upper Cholesky factor of ``H⁻¹`` (numerically stable form);
- updates are lazy per block of columns, so the inner Python loop runs over the columns of one block and
  every operation in it is a vectorised row operation;
- group scales are computed from the error-updated weights when the loop reaches a group's first column
  (blocks are aligned to groups so the whole group is up to date at that moment);
- ``act_order`` (columns in order of decreasing ``H_ii``) uses *static* group scales taken from the original
  weights, so codes stay in the original column order and no ``g_idx`` permutation has to be stored —
  transformers' fused-expert loader cannot apply one;
- dead input columns (``H_ii = 0``: the feature never fired) keep their weights and are rounded to nearest
  rather than zeroed, because unseen inputs may still use them.
"""

from __future__ import annotations

import torch

from moecompress.errors import UserError
from moecompress.quant.rtn import (
    QuantResult,
    _check_weight,
    check_scheme,
    dequantize,
    qrange,
    scales_for,
)


class HessianAccumulator:
    """Streaming ``Σ_t w_t x_t x_tᵀ`` over the inputs of one linear map (e.g. one expert's gate/up or down).

    Per-token weights (gate affinities) are optional; tokens with weight 0 are not counted. The sum is kept
    unnormalised; :meth:`hessian` returns the weighted mean, whose scale GPTQ does not care about.
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.in_features = int(in_features)
        self.sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n_tokens = 0
        self.weight_sum = 0.0

    @torch.no_grad()
    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add inputs ``x [..., in]`` with optional per-token weights ``weight [...]`` (must be ≥ 0)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs have {x.shape[-1]} features, accumulator expects {self.in_features}")
        x = x.reshape(-1, self.in_features).to(self.sum.dtype)
        if weight is None:
            n, wsum = x.shape[0], float(x.shape[0])
        else:
            w = weight.reshape(-1).to(self.sum.dtype)
            if w.shape[0] != x.shape[0]:
                raise ValueError(f"{w.shape[0]} token weights for {x.shape[0]} tokens")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError("token weights must be finite and non-negative")
            keep = w > 0
            x = x[keep] * w[keep].sqrt().unsqueeze(1)
            n, wsum = int(keep.sum()), float(w.sum())
        if n:
            self.sum.addmm_(x.T, x)
        self.n_tokens += n
        self.weight_sum += wsum

    def hessian(self) -> torch.Tensor:
        """Weighted mean of ``x xᵀ``; all zeros when no token was seen (GPTQ then falls back to identity)."""
        if self.weight_sum <= 0:
            return torch.zeros_like(self.sum)
        return self.sum / self.weight_sum


def _inverse_cholesky(
    h: torch.Tensor | None, n: int, damp: float, act_order: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Upper Cholesky factor of the damped inverse Hessian, in act-order when asked, and that order."""
    if h is None:
        h = torch.zeros(n, n, dtype=torch.float64)
    if h.shape != (n, n):
        raise ValueError(f"Hessian has shape {tuple(h.shape)}, expected ({n}, {n})")
    h = h.detach().to(torch.float64).clone()
    if not bool(torch.isfinite(h).all()):
        raise ValueError("Hessian has non-finite entries")
    diag = h.diagonal()
    live = diag > 0
    if not bool(live.any()):
        h = torch.eye(n, dtype=torch.float64)  # no calibration token: identity Hessian, GPTQ == RTN
    else:
        # Dead columns: give them a typical curvature so damping keeps its scale; no error flows in or out.
        diag[~live] = diag[live].mean()
    perm = None
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        h = h[perm][:, perm]
    mean_diag = h.diagonal().mean()
    eye = torch.eye(n, dtype=torch.float64)
    d = damp
    # float32 factorisations are 2x faster and enough for a damped Hessian; float64 is the fallback.
    for dtype in (torch.float32, torch.float64, torch.float64, torch.float64, torch.float64, torch.float64):
        chol, info = torch.linalg.cholesky_ex((h + d * mean_diag * eye).to(dtype))
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return u, perm
        if dtype == torch.float64:
            d = max(d * 10, 1e-4)
    raise UserError(
        f"the calibration Hessian is not positive definite even with damping {d:g}; "
        "raise `damp` or check the calibration inputs for NaN/inf"
    )


@torch.no_grad()
def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor | HessianAccumulator | None,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> QuantResult:
    """Quantize ``w [out, in]`` with GPTQ given the input Hessian ``h [in, in]`` (None or all-zero: identity).

    ``damp`` is relative to the mean Hessian diagonal. ``scale_dtype`` (default ``w.dtype``) is the stored
    scale dtype; errors are fed back from the values a reload will actually compute.
    """
    _check_weight(w)
    out, n = w.shape
    g = check_scheme(bits, group_size, n)
    if not damp >= 0:
        raise UserError(f"damp={damp} must be ≥ 0 (0.01 is typical; QMoE uses 0.1)")
    if block_size <= 0:
        raise UserError(f"block_size={block_size} must be positive")
    sdt = scale_dtype or w.dtype
    if isinstance(h, HessianAccumulator):
        h = h.hessian()
    u, perm = _inverse_cholesky(h, n, damp, act_order)
    u = u.to(torch.float32)

    qmin, qmax = qrange(bits)
    wf = w.detach().float().clone()
    grouped = g < n
    static = act_order or not grouped  # per-channel scales or act-order: scales from the original weights
    if static:
        scale_all = scales_for(wf.reshape(out, n // g, g), bits, sdt)  # [out, n_groups]
    else:
        scale_all = torch.empty(out, n // g)
    if perm is not None:
        wf = wf[:, perm]
    col_group = (perm if perm is not None else torch.arange(n)) // g
    if grouped and not act_order:
        block_size = max(g, (block_size // g) * g)  # a group never straddles two blocks

    codes = torch.empty(out, n)
    cur_scale = None
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = wf[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if static:
                s = scale_all[:, col_group[c]]
            else:
                if c % g == 0:
                    cur_scale = scales_for(w1[:, i : i + g], bits, sdt)
                    scale_all[:, c // g] = cur_scale
                s = cur_scale
            col = w1[:, i]
            q = torch.clamp(torch.round(col / s), qmin, qmax)
            codes[:, c] = q
            dq = (q * s).to(sdt).to(w.dtype).float()  # the value a reload will hold
            e = (col - dq) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        wf[:, i2:] -= err1 @ u[i1:i2, i2:]

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    qw = codes.to(torch.int8)
    scale = scale_all.to(sdt)
    return QuantResult(qw, scale, bits, group_size, dequantize(qw, scale, group_size, w.dtype))


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None = None) -> float:
    """``tr((W-Ŵ) H (W-Ŵ)ᵀ)`` — the mean squared output error over the calibration inputs (Frobenius if H is None)."""
    d = (w.float() - w_hat.float()).double()
    if h is None:
        return float((d * d).sum())
    return float(((d @ h.double()) * d).sum())
