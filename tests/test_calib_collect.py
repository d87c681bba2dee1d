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


def test_padded_grouped_mm_forward_is_bitwise_transformers_grouped_mm():
    """The engine runs experts through the padded forward (bounded oneDNN kernel shapes); it must give exactly
    what transformers' grouped_mm gives, so streamed results equal a vanilla reload's. Families cover gate/up
    concatenated (qwen3_moe), biased + transposed + custom gate (gpt_oss) and shared-expert routing (deepseek_v3)."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    from moecompress.calib.collect import padded_grouped_mm_forward

    for family in ("qwen3_moe", "gpt_oss", "deepseek_v3"):
        model = tiny(family)[0].to(torch.bfloat16)
        experts = next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))
        n_exp = int(experts.num_experts)
        hidden = int(experts.down_proj.shape[1] if not getattr(experts, "is_transposed", False)
                     else experts.down_proj.shape[2])
        gen = torch.Generator().manual_seed(1)
        for tokens in (1, 9, 130):
            x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
            weights, index = torch.randn(tokens, n_exp, generator=gen).softmax(-1).topk(min(4, n_exp))
            weights = weights.to(torch.bfloat16)
            expected = grouped_mm_experts_forward(experts, x, index, weights)
            got = padded_grouped_mm_forward(experts, x, index, weights)
            assert got.dtype == expected.dtype and torch.equal(got, expected), (family, tokens)


def test_engine_sources_run_the_padded_forward(tmp_path):
    """A ModelSource switches grouped_mm experts to the padded forward; the written config does not carry it."""
    import json

    from moecompress.calib.collect import PADDED_IMPLEMENTATION, experts_implementation
    from moecompress.engine.source import ModelSource

    model, tok = tiny("qwen3_moe")
    model.save_pretrained(tmp_path / "m")
    source = ModelSource(tmp_path / "m")
    assert experts_implementation(source.model) == PADDED_IMPLEMENTATION
    source.model.config.save_pretrained(tmp_path / "cfg")
    assert PADDED_IMPLEMENTATION not in json.dumps(json.loads((tmp_path / "cfg" / "config.json").read_text()))
