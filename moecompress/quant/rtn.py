"""Symmetric per-group integer quantization: the grid every method here shares, and round-to-nearest (RTN).

The grid is the one compressed-tensors stores as ``pack-quantized`` (symmetric, no zero point): integer
codes ``q`` in ``[-2^(b-1), 2^(b-1) - 1]`` and one scale per (row, group of ``group_size`` input columns);
the weight is ``q * scale``. The scale maps a group's largest magnitude to ``qmax + 0.5`` so all ``2^b``
codes are used and every element is within ``scale / 2`` of its code. Scales are rounded to their storage
dtype *before* the codes are chosen, so what we keep in memory is bit-for-bit what a reload computes.
"""

from __future__ import annotations

import torch

from moecompress.errors import UserError

# Bit widths whose codes compressed-tensors' pack-quantized format packs into int32 and transformers 5.23
# unpacks exactly (each one proven by a reload test). vLLM's int kernels serve only 4 and 8.
SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)


class QuantResult:
    """One quantized 2-D weight: integer codes, per-group scales and the weight they stand for.

    ``dequant`` equals what a compressed-tensors loader rebuilds from (qweight, scale); put it into the
    in-memory model so evaluation and the written checkpoint agree exactly. Once it is in the model,
    ``release()`` drops the held copy (a layer's worth of weights until the layer is written); ``dequant``
    then recomputes it from the codes, with the same arithmetic.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int,
                 dequant: torch.Tensor) -> None:
        self.qweight = qweight  # int8 [out, in], values in [qmin(bits), qmax(bits)]
        self.scale = scale  # [out, n_groups], storage dtype
        self.bits = bits
        self.group_size = group_size  # -1: one group per row (per-channel)
        self.dtype = dequant.dtype  # of the original weight
        self._dequant: torch.Tensor | None = dequant

    @property
    def dequant(self) -> torch.Tensor:
        """[out, in] in the original weight's dtype."""
        if self._dequant is not None:
            return self._dequant
        return dequantize(self.qweight, self.scale, self.group_size, self.dtype)

    def release(self) -> None:
        self._dequant = None

    @property
    def n_groups(self) -> int:
        return int(self.scale.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.qweight.shape[0]), int(self.qweight.shape[1]))


def qrange(bits: int) -> tuple[int, int]:
    """Smallest and largest integer code of a signed ``bits``-bit grid."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def check_scheme(bits: int, group_size: int, in_features: int | None = None) -> int:
    """Validate (bits, group_size) for a weight with ``in_features`` columns; returns the effective group size."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise UserError(
            f"bits={bits!r} is not supported; choose one of {list(SUPPORTED_BITS)} (symmetric integer weights "
            "that compressed-tensors' pack-quantized format stores and vanilla transformers reloads; "
            "vLLM serves 4 and 8)"
        )
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise UserError(
            f"group_size={group_size!r} is invalid; use a positive number of input columns per scale "
            "(128 is the safe default) or -1 for one scale per output row"
        )
    if in_features is None:
        return group_size
    if group_size == -1:
        return in_features
    if in_features % group_size:
        divisors = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        hint = f"e.g. {divisors}" if divisors else "or -1 (per-channel)"
        raise UserError(
            f"group_size={group_size} does not divide the weight's {in_features} input columns; "
            f"pick a group size that divides {in_features} ({hint})"
        )
    return group_size


def _check_weight(w: torch.Tensor) -> None:
    if w.dim() != 2:
        raise UserError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise UserError(f"expected a floating-point weight, got {w.dtype}")


def scales_for(w: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """Symmetric scales for groups laid out on the last axis of ``w`` (any leading shape), in float32.

    The scale is rounded through ``scale_dtype`` (what is stored); all-zero groups get scale 1 (codes 0).
    """
    qmax = (1 << (bits - 1)) - 1
    absmax = w.abs().amax(dim=-1).float()
    scale = (absmax / (qmax + 0.5)).to(scale_dtype).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of ``w`` on the grid ``scale * [qmin, qmax]`` (scale broadcast against ``w``), as float."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(w.float() / scale), qmin, qmax)


def dequantize(
    qweight: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``q * scale`` computed exactly as compressed-tensors does on load (in the scale's dtype, then cast)."""
    out, in_features = qweight.shape
    g = in_features if group_size == -1 else group_size
    w = qweight.to(scale.dtype).reshape(out, in_features // g, g) * scale.unsqueeze(-1)
    w = w.reshape(out, in_features)
    return w if dtype is None else w.to(dtype)


def quantize_rtn(
    w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype | None = None
) -> QuantResult:
    """Round-to-nearest quantization of ``w [out, in]``: the baseline every calibrated method must beat.

    ``scale_dtype`` (default: ``w``'s dtype) is the dtype the scales are stored in.
    """
    _check_weight(w)
    out, in_features = w.shape
    g = check_scheme(bits, group_size, in_features)
    sdt = scale_dtype or w.dtype
    wg = w.detach().float().reshape(out, in_features // g, g)
    scale = scales_for(wg, bits, sdt)  # [out, n_groups]
    q = quantize_codes(wg, scale.unsqueeze(-1), bits).reshape(out, in_features).to(torch.int8)
    scale = scale.to(sdt)
    return QuantResult(q, scale, bits, group_size, dequantize(q, scale, group_size, w.dtype))
