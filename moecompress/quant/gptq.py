"""GPTQ with expert-aware Hessians: the calibrated quantizer behind the ``quantize`` pass.

GPTQ (Frantar et al., 2022) quantizes a weight one input column at a time and pushes each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's squared output
error, ``H = Σ_t x_t x_tᵀ``. For a routed expert the tokens are the ones routed to it; MoEQuant's
affinity-guided variant weighs each token by its gate weight for the expert (``H = Σ_t c_t x_t x_tᵀ``), so
tokens the expert barely contributes to matter less. Experts that saw no calibration token get an identity
Hessian (as in QMoE), which makes GPTQ reduce exactly to round-to-nearest.

Implementation notes (why it looks the way it does):
- the inverse Hessian is used through the upper Cholesky factor of ``H⁻¹`` (numerically stable form),
  obtained from one Cholesky of the order-reversed Hessian and one triangular inverse;
- ``gptq_quantize_batch`` runs the same column loop over a stack of matrices (all experts of a layer),
  each with its own Hessian;
- updates are lazy per block of columns, so the inner Python loop runs over the columns of one block and
  every operation in it is a vectorised row operation;
- group scales are computed from the error-updated weights when the loop reaches a group's first column
  (blocks and groups are aligned so the whole group is up to date at that moment);
- ``act_order`` (columns in order of decreasing ``H_ii``) uses *static* group scales taken from the original
  weights, so codes stay in the original column order and no ``g_idx`` permutation has to be stored —
  transformers' fused-expert loader cannot apply one;
- dead input columns (``H_ii = 0``: the feature never fired) keep their weights and are rounded to nearest
  rather than zeroed, because unseen inputs may still use them.
"""

from __future__ import annotations

from typing import Any

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

    Why the inputs are kept until they outweigh the sum: a routed expert often sees fewer calibration tokens
    than twice its input width, and then its inputs (in their own dtype) take less memory than the ``[in, in]``
    float32 sum — a layer of 32 experts held 256 MiB of sums for 64 MiB of inputs on the stream bench. The
    batches are kept as given and folded into the sum (one ``addmm`` each, in arrival order) when their bytes
    would pass the sum's or when the sum is read, so the result is bitwise the eager sum's.
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.in_features = int(in_features)
        self.dtype = dtype
        self.device = torch.device(device)
        self._sum: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._pending_bytes = 0
        self.n_tokens = 0
        self.weight_sum = 0.0

    @property
    def dense_bytes(self) -> int:
        return self.in_features * self.in_features * torch.empty((), dtype=self.dtype).element_size()

    @property
    def sum(self) -> torch.Tensor:
        """The unnormalised sum (folds in the inputs kept so far)."""
        self._fold()
        assert self._sum is not None
        return self._sum

    def _fold(self) -> None:
        """Add the kept inputs into the sum, one ``addmm`` per batch in arrival order (the eager arithmetic)."""
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=self.device)
        for x, w in self._pending:
            x = x.to(self._sum.dtype)
            if w is not None:
                keep = w > 0
                x = x[keep] * w[keep].sqrt().unsqueeze(1)
            self._sum.addmm_(x.T, x)
        self._pending, self._pending_bytes = [], 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add inputs ``x [..., in]`` with optional per-token weights ``weight [...]`` (must be ≥ 0)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs have {x.shape[-1]} features, accumulator expects {self.in_features}")
        x = x.detach().reshape(-1, self.in_features)
        w = None
        if weight is None:
            n, wsum = x.shape[0], float(x.shape[0])
        else:
            w = weight.detach().reshape(-1).to(self.dtype)
            if w.shape[0] != x.shape[0]:
                raise ValueError(f"{w.shape[0]} token weights for {x.shape[0]} tokens")
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise ValueError("token weights must be finite and non-negative")
            n, wsum = int((w > 0).sum()), float(w.sum())
        if n:
            self._pending.append((x, w))
            self._pending_bytes += x.numel() * x.element_size() + (w.numel() * w.element_size() if w is not None else 0)
            if self._pending_bytes > self.dense_bytes:
                self._fold()
        self.n_tokens += n
        self.weight_sum += wsum

    def release(self) -> None:
        """Free the sum and kept inputs once the Hessian is used (a layer's experts hold one each)."""
        self._pending, self._pending_bytes = [], 0
        self._sum = torch.empty(0, 0, dtype=self.dtype, device=self.device)

    def hessian(self) -> torch.Tensor:
        """Weighted mean of ``x xᵀ``; all zeros when no token was seen (GPTQ then falls back to identity)."""
        if self.weight_sum <= 0:
            return torch.zeros_like(self.sum)
        return self.sum / self.weight_sum


def reduce_accumulators(accs: list[HessianAccumulator], world: Any) -> None:
    """Sum accumulators across data-parallel ranks (``moecompress.dist``), in place; each rank saw its own
    calibration batches, so the sums and counts add."""
    if not world.distributed or not accs:
        return
    counts = torch.tensor([[a.n_tokens, a.weight_sum] for a in accs], dtype=torch.float64)
    world.all_reduce_([*(a.sum for a in accs), counts])
    for a, (n, w) in zip(accs, counts.tolist(), strict=True):
        a.n_tokens, a.weight_sum = int(n), float(w)


def _inverse_cholesky(h: torch.Tensor, damp: float, act_order: bool, *, owned: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Upper Cholesky factors ``U`` (``H⁻¹ = UᵀU``) of the damped Hessians ``h [E, n, n]``, in act-order if asked.

    Computed without forming ``H⁻¹``: with ``J`` the order reversal, ``JHJ = LLᵀ`` gives ``H = RRᵀ`` for the
    upper-triangular ``R = JLJ``, hence ``U = R⁻¹ = J L⁻¹ J`` — one Cholesky and one triangular inverse.
    """
    n = h.shape[-1]
    # a stack built for this call (owned) is edited in place: one [E, n, n] copy less at the peak
    h = h.detach().to(torch.float32, copy=not owned)
    if not bool(torch.isfinite(h).all()):
        raise ValueError("Hessian has non-finite entries")
    eye = torch.eye(n)
    live = h.diagonal(dim1=-2, dim2=-1) > 0
    h[~live.any(-1)] = eye  # no calibration token: identity Hessian, GPTQ == RTN
    diag = h.diagonal(dim1=-2, dim2=-1)
    live = diag > 0
    # Dead columns get a typical curvature so damping keeps its scale; no error flows in or out of them.
    mean_live = (diag * live).sum(-1) / live.sum(-1)
    diag.copy_(torch.where(live, diag, mean_live.unsqueeze(-1)))
    perm = None
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)  # [E, n]
        h = h.gather(1, perm.unsqueeze(-1).expand(-1, -1, n)).gather(2, perm.unsqueeze(1).expand(-1, n, -1))
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1)  # [E]
    u = torch.empty_like(h)
    todo = torch.arange(h.shape[0])
    d = torch.full_like(mean_diag, float(damp))
    # float32 is enough for a damped Hessian; float64 with growing damping is the fallback for failures.
    for attempt in range(6):
        dtype = torch.float32 if attempt == 0 else torch.float64
        rows = h if todo.numel() == h.shape[0] else h[todo]  # no gathered copy when every matrix is left
        hd = (rows + (d[todo] * mean_diag[todo])[:, None, None] * eye).to(dtype).flip(-1, -2)
        del rows
        chol, info = torch.linalg.cholesky_ex(hd)
        ok = info == 0
        if bool(ok.any()):
            inv = torch.linalg.solve_triangular(chol[ok], eye.to(dtype), upper=False).flip(-1, -2)
            good = torch.isfinite(inv).flatten(1).all(-1)
            idx = torch.nonzero(ok).squeeze(1)
            u[todo[idx[good]]] = inv[good].float()
            ok[idx[~good]] = False
        todo = todo[~ok]
        if todo.numel() == 0:
            return u, perm
        if attempt:
            d[todo] = torch.clamp(d[todo] * 10, min=1e-4)
    raise UserError(
        f"the calibration Hessian is not positive definite even with damping {float(d.max()):g}; "
        "raise `damp` or check the calibration inputs for NaN/inf"
    )


def _stack_hessians(
    h: torch.Tensor | HessianAccumulator | None | list[torch.Tensor | HessianAccumulator | None],
    batch: int,
    n: int,
) -> torch.Tensor:
    items = h if isinstance(h, list | tuple) else ([h] if batch == 1 or h is None else None)
    if items is None:  # a stacked tensor [E, n, n]
        hs = h
    else:
        if len(items) == 1 and batch > 1:
            items = items * batch
        if len(items) != batch:
            raise ValueError(f"{len(items)} Hessians for {batch} weights")
        mats = []
        for it in items:
            if isinstance(it, HessianAccumulator):
                it = it.hessian()
            mats.append(torch.zeros(n, n) if it is None else it.detach().float())
        hs = torch.stack(mats)
    if hs.shape != (batch, n, n):
        raise ValueError(f"Hessians have shape {tuple(hs.shape)}, expected ({batch}, {n}, {n})")
    return hs


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
    if isinstance(h, torch.Tensor) and h.dim() != 2:
        raise ValueError(f"expected one Hessian [in, in], got shape {tuple(h.shape)}")
    return gptq_quantize_batch(
        w.unsqueeze(0), [h], bits, group_size, damp=damp, block_size=block_size, act_order=act_order,
        scale_dtype=scale_dtype,
    )[0]


@torch.no_grad()
def gptq_quantize_batch(
    w: torch.Tensor,
    h: torch.Tensor | list[torch.Tensor | HessianAccumulator | None] | None,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> list[QuantResult]:
    """GPTQ on a stack of same-shaped weights ``w [E, out, in]`` (e.g. one projection of all experts of a
    layer), each with its own Hessian (``[E, in, in]`` or a list; None entries: identity).

    One Python column loop serves all E matrices, so a layer of experts costs little more than one expert.
    """
    if w.dim() != 3:
        raise UserError(f"expected stacked weights [E, out, in], got shape {tuple(w.shape)}")
    _check_weight(w[0])
    batch, out, n = w.shape
    g = check_scheme(bits, group_size, n)
    if not damp >= 0:
        raise UserError(f"damp={damp} must be ≥ 0 (0.01 is typical; QMoE uses 0.1)")
    if block_size <= 0:
        raise UserError(f"block_size={block_size} must be positive")
    sdt = scale_dtype or w.dtype
    hs = _stack_hessians(h, batch, n)
    u, perm = _inverse_cholesky(hs, damp, act_order, owned=hs is not h)
    del hs

    qmin, qmax = qrange(bits)
    exact = sdt == torch.float32 and w.dtype == torch.float32
    wf = w.detach().float().clone()
    grouped = g < n
    static = act_order or not grouped  # per-channel scales or act-order: scales from the original weights
    n_groups = n // g
    if static:
        scale_all = scales_for(wf.reshape(batch, out, n_groups, g), bits, sdt)  # [E, out, n_groups]
    else:
        scale_all = torch.empty(batch, out, n_groups)
    if perm is not None:
        wf = wf.gather(2, perm.unsqueeze(1).expand(-1, out, -1))
        col_group = perm // g  # [E, n]: group of the c-th processed column
    if grouped and not act_order and g % block_size:
        # Group starts must be block starts (or lie inside a block) so a group's scale sees all updates so far.
        block_size = max(g, (block_size // g) * g)

    codes = torch.empty(batch, out, n, dtype=torch.int8)  # integral values in the int8 range: stored exactly
    cur_scale = torch.empty(batch, out)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1 = wf[:, :, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if perm is not None:
                s = scale_all.gather(2, col_group[:, c].view(batch, 1, 1).expand(-1, out, 1)).squeeze(2)
            elif static:
                s = scale_all[:, :, c // g]
            else:
                if c % g == 0:
                    # a group longer than the block starts at the block start: wf is up to date there
                    src = w1[:, :, i : i + g] if i + g <= i2 - i1 else wf[:, :, c : c + g]
                    cur_scale = scales_for(src, bits, sdt)
                    scale_all[:, :, c // g] = cur_scale
                s = cur_scale
            col = w1[:, :, i]
            q = torch.clamp(torch.round(col / s), qmin, qmax)
            codes[:, :, c] = q
            dq = q * s if exact else (q * s).to(sdt).to(w.dtype).float()  # the value a reload will hold
            e = (col - dq) / u1[:, i, i].unsqueeze(1)
            w1[:, :, i:] -= e.unsqueeze(2) * u1[:, i, i:].unsqueeze(1)
            err1[:, :, i] = e
        if i2 < n:
            wf[:, :, i2:] -= torch.bmm(err1, u[:, i1:i2, i2:])

    if perm is not None:
        codes = codes.gather(2, torch.argsort(perm, dim=-1).unsqueeze(1).expand(-1, out, -1))
    qw = codes.to(torch.int8)
    scale = scale_all.to(sdt)
    return [
        QuantResult(qw[e], scale[e], bits, group_size, dequantize(qw[e], scale[e], group_size, w.dtype))
        for e in range(batch)
    ]


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor | None = None) -> float:
    """``tr((W-Ŵ) H (W-Ŵ)ᵀ)`` — the mean squared output error over the calibration inputs (Frobenius if H is None)."""
    d = (w.float() - w_hat.float()).double()
    if h is None:
        return float((d * d).sum())
    return float(((d @ h.double()) * d).sum())
