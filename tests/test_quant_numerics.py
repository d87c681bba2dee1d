"""Quantization numerics: the integer grid, RTN, GPTQ, Hessian accumulation and bit allocation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moecompress.errors import UserError
from moecompress.quant import (
    HessianAccumulator,
    allocate_bits,
    dequantize,
    gptq_quantize,
    importance_scores,
    output_error,
    quantize_rtn,
)
from moecompress.quant.bits import error_table


def _correlated(n_tokens: int, n_in: int, rank: int = 12, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features (low rank + a little noise), where GPTQ should shine."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(rank, n_in, generator=g)
    return torch.randn(n_tokens, rank, generator=g) @ mix + 0.05 * torch.randn(n_tokens, n_in, generator=g)


@pytest.mark.parametrize(("bits", "group_size"), [(2, 8), (3, 16), (4, 32), (4, -1), (8, 64)])
def test_rtn_error_within_half_a_step(bits, group_size):
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(bits)) * 0.1
    w[3, :] = 0.0  # all-zero rows/groups must not divide by zero
    res = quantize_rtn(w, bits, group_size)
    g = 128 if group_size == -1 else group_size
    assert res.qweight.dtype == torch.int8 and res.scale.shape == (24, 128 // g)
    assert int(res.qweight.min()) >= -(2 ** (bits - 1)) and int(res.qweight.max()) <= 2 ** (bits - 1) - 1
    step = res.scale.repeat_interleave(g, dim=1)
    assert bool(((res.dequant - w).abs() <= step / 2 + 1e-7).all())
    assert torch.equal(res.dequant[3], torch.zeros(128))
    assert torch.equal(res.dequant, dequantize(res.qweight, res.scale, group_size))


def test_rtn_known_values():
    w = torch.tensor([[1.0, -2.0, 0.4, 7.5, -7.5, 0.0, 3.2, -0.6]])
    res = quantize_rtn(w, 4, 4)
    # scale = absmax / 7.5 per group of 4 = 1: all 16 codes in use, +7.5 clamps to 7, -7.5 reaches -8
    assert res.scale.tolist() == [[1.0, 1.0]]
    assert res.qweight.tolist() == [[1, -2, 0, 7, -8, 0, 3, -1]]


def test_dequant_matches_compressed_tensors():
    """Our in-memory dequant is bit-identical to what compressed-tensors rebuilds from the packed checkpoint."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(3), dtype=torch.float32).to(torch.bfloat16)
    for bits, gs in [(3, 32), (4, -1)]:
        res = quantize_rtn(w, bits, gs)
        strategy = dict(strategy="channel") if gs == -1 else dict(strategy="group", group_size=gs)
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=bits, symmetric=True, **strategy))
        sd = {"weight_packed": pack_to_int32(res.qweight, bits), "weight_scale": res.scale,
              "weight_shape": torch.tensor(list(w.shape))}
        out = PackedQuantizationCompressor.decompress(sd, scheme)["weight"].to(w.dtype)
        assert torch.equal(out, res.dequant)


@pytest.mark.parametrize("bad", [1, 9, 16, 4.0, True, "4"])
def test_bad_bits(bad):
    w = torch.randn(4, 32)
    with pytest.raises(UserError, match="bits"):
        quantize_rtn(w, bad, 32)
    with pytest.raises(UserError, match="bits"):
        gptq_quantize(w, None, bad, 32)


@pytest.mark.parametrize("bad", [0, -2, 48, 7])
def test_bad_group_size(bad):
    w = torch.randn(4, 64)
    with pytest.raises(UserError, match="group_size"):
        quantize_rtn(w, 4, bad)
    with pytest.raises(UserError, match="group_size"):
        gptq_quantize(w, None, 4, bad)


def test_weighted_hessian_equals_manual_sum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g)
    c = torch.rand(50, generator=g)
    c[::5] = 0.0  # tokens not routed to this expert
    acc = HessianAccumulator(8, dtype=torch.float64)
    acc.add(x[:20], c[:20])
    acc.add(x[20:].reshape(3, 10, 8), c[20:].reshape(3, 10))  # any leading shape
    manual = sum(ci * torch.outer(xi, xi) for xi, ci in zip(x.double(), c.double(), strict=True))
    assert torch.allclose(acc.sum, manual)
    assert acc.n_tokens == 40 and acc.weight_sum == pytest.approx(float(c.sum()))
    assert torch.allclose(acc.hessian(), manual / c.sum())
    plain = HessianAccumulator(8, dtype=torch.float64)
    plain.add(x)
    assert plain.n_tokens == 50 and torch.allclose(plain.sum, x.double().T @ x.double())
    with pytest.raises(ValueError):
        plain.add(x, -c)


def test_accumulator_keeps_inputs_until_they_outweigh_the_sum_and_equals_the_eager_sum():
    """Inputs are held (less memory than the [in, in] sum when few tokens are routed) and folded in arrival
    order with the same arithmetic as one addmm per add: the sum is bitwise the eager one."""
    g = torch.Generator().manual_seed(3)
    n = 16
    batches = [(torch.randn(rows, n, generator=g).to(torch.bfloat16), torch.rand(rows, generator=g))
               for rows in (5, 3, 40, 7)]
    acc = HessianAccumulator(n)
    eager = torch.zeros(n, n)
    for i, (x, c) in enumerate(batches):
        acc.add(x, c if i % 2 else None)
        xf = x.float()
        if i % 2:
            keep = c > 0
            xf = xf[keep] * c[keep].sqrt().unsqueeze(1)
        eager.addmm_(xf.T, xf)
        if i == 0:  # 5 bf16 rows of 16 (+ nothing) are 160 bytes < the 1 KiB float32 sum: still held
            assert acc._sum is None and acc._pending
        if i == 2:  # 40 rows more: past the sum's bytes, folded
            assert not acc._pending
    assert torch.equal(acc.sum, eager)
    assert acc.n_tokens == sum(x.shape[0] for x, _ in batches)
    acc.release()
    assert acc.sum.numel() == 0


def test_zero_tokens_falls_back_to_identity_hessian():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    rtn = quantize_rtn(w, 3, 16)
    for h in (None, HessianAccumulator(64), torch.zeros(64, 64)):
        res = gptq_quantize(w, h, 3, 16)
        assert torch.equal(res.qweight, rtn.qweight) and torch.equal(res.scale, rtn.scale)


def test_gptq_beats_rtn_on_correlated_inputs():
    x = _correlated(1024, 128)
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    acc = HessianAccumulator(128)
    acc.add(x)
    ref = x @ w.T
    errs = {}
    for bits, gs in [(4, 32), (3, -1), (2, 16)]:
        rtn = quantize_rtn(w, bits, gs)
        gptq = gptq_quantize(w, acc, bits, gs, block_size=32)
        gptq_ao = gptq_quantize(w, acc, bits, gs, act_order=True)
        e = {k: float((ref - x @ r.dequant.T).norm() / ref.norm()) for k, r in
             (("rtn", rtn), ("gptq", gptq), ("gptq_act_order", gptq_ao))}
        errs[(bits, gs)] = e
        assert e["gptq"] < 0.5 * e["rtn"] and e["gptq_act_order"] < 0.5 * e["rtn"]
        # the Hessian form of the error agrees with the direct one
        assert output_error(w, gptq.dequant, acc.sum) == pytest.approx(float((ref - x @ gptq.dequant.T).norm() ** 2), rel=1e-3)


def test_gptq_dead_columns_and_weighted_tokens():
    x = _correlated(256, 64)
    x[:, :5] = 0.0  # features that never fire
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(4))
    acc = HessianAccumulator(64)
    acc.add(x, torch.rand(256, generator=torch.Generator().manual_seed(5)))
    res = gptq_quantize(w, acc, 4, 16)
    assert torch.isfinite(res.dequant).all()
    step = res.scale.repeat_interleave(16, dim=1)
    # dead columns are rounded, not zeroed (and receive no error feedback from the first group's live columns)
    assert bool(((res.dequant[:, :5] - w[:, :5]).abs() <= step[:, :5]).all())
    assert res.dequant[:, :5].abs().sum() > 0


def test_gptq_bf16_scales_are_stored_dtype():
    x = _correlated(256, 64)
    w = (torch.randn(8, 64, generator=torch.Generator().manual_seed(6)) * 0.02).to(torch.bfloat16)
    acc = HessianAccumulator(64)
    acc.add(x)
    res = gptq_quantize(w, acc, 4, 32)
    assert res.scale.dtype == torch.bfloat16 and res.dequant.dtype == torch.bfloat16
    assert torch.equal(res.dequant, dequantize(res.qweight, res.scale, 32, torch.bfloat16))


def test_allocation_respects_budget_and_importance():
    cand = [2, 3, 4]
    # identical error curves; units 0 and 1 are much more important than the rest
    err = np.tile([8.0, 3.0, 1.0], (6, 1))
    imp = np.array([10.0, 10.0, 1.0, 1.0, 1.0, 1.0])
    npar = np.full(6, 1000.0)
    alloc = allocate_bits(imp, err, npar, cand, budget_bits=3.0)
    assert alloc.average_bits <= 3.0 + 1e-9
    assert alloc.bits[0] == alloc.bits[1] == 4
    assert alloc.bits[:2].min() >= alloc.bits[2:].max()
    # generous and tight budgets
    assert (allocate_bits(imp, err, npar, cand, 4.0).bits == 4).all()
    assert (allocate_bits(imp, err, npar, cand, 2.0).bits == 2).all()
    # budget per group (e.g. per layer): each half must average ≤ 3 bits on its own
    per = allocate_bits(imp, err, npar, cand, 3.0, groups=[0, 0, 0, 1, 1, 1])
    for sel in (slice(0, 3), slice(3, 6)):
        assert per.bits[sel].mean() <= 3.0 + 1e-9
    # parameter count weights the budget: a big unit at 4 bits costs more
    big = allocate_bits([1.0, 1.0], [[8, 3, 1], [8, 3, 1]], [3000.0, 1000.0], cand, 2.5)
    assert big.bits.tolist() == [2, 4]


def test_allocation_errors():
    with pytest.raises(UserError, match="budget"):
        allocate_bits([1.0], [[3.0, 1.0]], [10.0], [3, 4], budget_bits=2.5)
    with pytest.raises(UserError, match="shape"):
        allocate_bits([1.0, 1.0], [[3.0, 1.0]], [10.0, 10.0], [3, 4], budget_bits=4)
    # scale overhead counted through cost_bits: 4-bit g32 with fp16 scales costs 4.5 bits
    a = allocate_bits([1.0], [[3.0, 1.0]], [10.0], [3, 4], budget_bits=4.2, cost_bits=[3.5, 4.5])
    assert a.bits.tolist() == [3]


def test_importance_and_error_table():
    imp = importance_scores([10, 0, 30], gate_mass=[5, 0, 5])
    assert imp.mean() == pytest.approx(1.0) and imp[1] == 0 and imp[2] > imp[0]
    ws = [torch.randn(8, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    table = error_table(ws, [2, 4, 8], group_size=16)
    assert table.shape == (3, 3) and (np.diff(table, axis=1) < 0).all()  # more bits, less error


@pytest.mark.parametrize(("group_size", "act_order"), [(16, False), (64, False), (-1, False), (16, True)])
def test_gptq_block_size_changes_speed_not_result(group_size, act_order):
    """Lazy block updates are exact: any block size gives the same codes (groups larger or smaller than blocks)."""
    x = _correlated(512, 128, seed=7)
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(8)) * 0.1
    acc = HessianAccumulator(128)
    acc.add(x)
    ref = gptq_quantize(w, acc, 3, group_size, block_size=128, act_order=act_order)
    for b in (8, 32, 48):
        res = gptq_quantize(w, acc, 3, group_size, block_size=b, act_order=act_order)
        assert (res.qweight != ref.qweight).float().mean() < 0.002  # float32 reassociation may flip a tie
        assert torch.allclose(res.scale, ref.scale, rtol=1e-5)


def test_gptq_batch_equals_one_by_one():
    from moecompress.quant.gptq import gptq_quantize_batch

    w = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(9))
    hs = [HessianAccumulator(64) for _ in range(3)]
    hs[0].add(_correlated(300, 64, seed=1))
    hs[2].add(_correlated(300, 64, seed=2), torch.rand(300, generator=torch.Generator().manual_seed(3)))
    for act_order in (False, True):
        batch = gptq_quantize_batch(w, hs, 3, 16, act_order=act_order, block_size=32)
        for e in range(3):
            one = gptq_quantize(w[e], hs[e], 3, 16, act_order=act_order, block_size=32)
            assert torch.equal(batch[e].qweight, one.qweight) and torch.equal(batch[e].scale, one.scale)
    assert torch.equal(batch[1].qweight, quantize_rtn(w[1], 3, 16).qweight)  # expert without tokens: RTN
