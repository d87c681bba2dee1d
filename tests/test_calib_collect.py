"""Grouped expert matmuls in calibration: rows padded to bounded sizes give the unpadded results."""

from __future__ import annotations

import torch

from moecompress.calib.collect import _grouped_outputs, _grouped_rows, bucketed_counts
from moecompress.zoo.tiny import tiny


def test_bucketed_counts_bound_padding_and_distinct_sizes():
    counts = torch.arange(0, 9000)
    padded = bucketed_counts(counts)
    assert int(padded[0]) == 0
    assert bool((padded >= counts).all())
    assert bool((padded % 16 == 0).all())
    big = counts >= 128
    assert bool((padded[big] <= counts[big] * 1.125).all())  # ≤ 12.5% extra rows once a group has 128
    assert bool((padded[~big] - counts[~big] < 16).all())
    assert len(set(padded.tolist())) <= 60  # bounded kernel shapes: ~8 per power of two


def test_padded_grouped_rows_equal_unpadded_in_bf16():
    """bf16 on CPU pads each expert's rows (oneDNN keeps a kernel per row count); the real rows' results are
    the unpadded ones, to bf16 rounding (rtol 1e-2, atol 1e-3: the padded call may block the matmul differently)."""
    model = tiny("qwen3_moe")[0].to(torch.bfloat16)
    experts = next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))
    n_exp = int(experts.down_proj.shape[0])
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 40, (n_exp,), generator=gen)
    eid = torch.repeat_interleave(torch.arange(n_exp), counts)
    x = torch.randn(int(counts.sum()), experts.gate_up_proj.shape[-1], generator=gen).to(torch.bfloat16)
    y, act = _grouped_outputs(experts, x, eid, counts)
    y0, act0 = _grouped_rows(experts, x, eid, counts)
    assert y.shape == y0.shape and act.shape == act0.shape
    torch.testing.assert_close(y.float(), y0.float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(act.float(), act0.float(), rtol=1e-2, atol=1e-3)
