"""Tiny random models for every supported family, built from transformers config classes (no downloads).

They prove plumbing (surgery, save/reload, hooks) only: random weights say nothing about quality.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from moecompress.errors import UserError
from moecompress.zoo.tokenizer import train_bpe_tokenizer

VOCAB = 320
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

# Per-family overrides on top of _COMMON. Keys follow each config class; expert width is 32 throughout.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "deepseek_v2": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, num_hidden_layers=3, kv_lora_rank=16, q_lora_rank=None,
                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
                        num_key_value_heads=4, routed_scaling_factor=1.0, topk_method="greedy"),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        n_group=2, topk_group=1, first_k_dense_replace=1, num_hidden_layers=3,
                        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=16, head_dim=8, num_key_value_heads=4, routed_scaling_factor=2.5),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                    layer_types=["sliding_attention", "full_attention"], sliding_window=16),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    "glm4_moe": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                     n_group=2, topk_group=1, first_k_dense_replace=1, num_hidden_layers=3,
                     partial_rotary_factor=0.5),
    "dots1": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                  n_group=2, topk_group=1, first_k_dense_replace=1, num_hidden_layers=3,
                  layer_types=["full_attention"] * 3),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
                         moe_layer_start_index=1, moe_layer_end_index=2, num_hidden_layers=3),
    "qwen3_next": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, norm_topk_prob=True,
                       layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=32,
                        intermediate_size_mlp=96, interleave_moe_layer_step=1, moe_layers=[0, 1],
                        no_rope_layers=[1, 0], layer_types=["chunked_attention", "full_attention"],
                        attention_chunk_size=64),
}

FAMILIES: tuple[str, ...] = tuple(TINY_OVERRIDES)

_TOKENIZER_TEXT = [
    "the quick brown fox jumps over the lazy dog. 12 + 30 = 42.",
    "def add(a, b):\n    return a + b\n",
    "name: ada ; city: paris ; age: 36",
    "Mixture of experts models route each token to a few experts.",
]


def tiny_config(family: str, **overrides: Any):
    """A tiny config of `family` (a transformers model_type) with eager attention and eager experts."""
    if family not in TINY_OVERRIDES:
        raise UserError(f"no tiny model for family {family!r}; known: {', '.join(FAMILIES)}")
    kwargs = {**_COMMON, **TINY_OVERRIDES[family], **overrides}
    cfg = AutoConfig.for_model(family, **kwargs)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE small enough to match the tiny models' vocabulary."""
    return train_bpe_tokenizer(_TOKENIZER_TEXT * 4, vocab_size=VOCAB)


@torch.no_grad()
def give_signal(model: torch.nn.Module) -> None:
    """Random init leaves some routers, biases and correction vectors at zero; give them signal so routing and
    every tensor are non-trivial (a zero tensor would hide layout bugs)."""
    for name, p in model.named_parameters():
        if p.dim() == 1 and ("bias" in name or "correction" in name):
            p.normal_(0, 0.05)
        elif p.dim() >= 2 and p.abs().sum() == 0:
            p.normal_(0, 0.05)
    for name, buf in model.named_buffers():
        if "e_score_correction_bias" in name and buf.is_floating_point():
            buf.normal_(0, 0.05)
    for mod in model.modules():  # hash routing tables (DeepSeek-V4 tid2eid [vocab, k]): k distinct experts per token
        w = getattr(mod, "weight", None)
        for buf in mod.buffers(recurse=False):
            if (isinstance(w, torch.Tensor) and w.dim() == 2 and not buf.is_floating_point() and buf.dim() == 2
                    and 0 < buf.shape[1] <= w.shape[0] and not bool(buf.any())):
                buf.copy_(torch.rand(buf.shape[0], w.shape[0]).argsort(dim=1)[:, : buf.shape[1]])


def tiny(family: str, seed: int = 0, **overrides: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a random tiny model of `family` plus a matching tokenizer."""
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    give_signal(model)
    model.eval()
    return model, tiny_tokenizer()
