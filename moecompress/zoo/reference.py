"""The trained reference MoE: a small Qwen3-MoE trained on the generated corpus in minutes on CPU.

It is the project's quality yardstick: random tiny models say nothing about which pruning or merging
method is better, this one does. Two choices matter (design §5): every layer is load-balanced on its
own (a pooled balance loss lets single layers collapse, and then frequency pruning looks free), and
the corpus has several clearly different domains so experts specialise.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from moecompress.errors import UserError
from moecompress.io.checkpoint import verify_model_reload, write_count_aliases
from moecompress.zoo.corpus import Doc, generate_corpus, split_docs, text_file_docs, word_order_task
from moecompress.zoo.metrics import (
    balance_loss,
    expert_usage,
    load_jsonl,
    load_jsonl_texts,
    mc_accuracy,
    normalized_entropy,
    perplexity,
    text_logprobs,
    unigram_perplexity,
)
from moecompress.zoo.tokenizer import save_tokenizer, train_bpe_tokenizer

__all__ = ["ReferenceResult", "build_reference", "evaluate_reference", "load_jsonl_texts", "mc_accuracy",
           "perplexity", "reference_config"]

DATA_DIR = "data"
RESULT_FILE = "reference.json"


class ReferenceResult(BaseModel):
    """What the training run achieved; saved as reference.json beside the model."""

    out_dir: str
    seed: int
    model: dict[str, Any]
    train: dict[str, Any]
    steps: int
    tokens_seen: int
    train_seconds: float
    final_train_loss: float
    val_ppl: float
    unigram_ppl: float
    domain_ppl: dict[str, float]
    mc_accuracy: float
    mc_by_domain: dict[str, float]
    expert_usage: list[list[float]]
    layer_entropy: list[float]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def reference_config(vocab_size: int, *, hidden: int, layers: int, experts: int, top_k: int,
                     expert_width: int, heads: int, seqlen: int) -> Any:
    """A Qwen3-MoE config: every layer sparse, renormalised top-k, eager experts for reproducible training."""
    from transformers import Qwen3MoeConfig

    if top_k > experts:
        raise UserError(f"top_k={top_k} exceeds experts={experts}; lower top_k or add experts")
    if hidden % heads:
        raise UserError(f"hidden={hidden} is not divisible by heads={heads}; pick hidden as a multiple of heads")
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=hidden // heads,
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=expert_width,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=max(512, seqlen),
        tie_word_embeddings=False,
        router_aux_loss_coef=0.0,  # we add our own per-layer loss
        experts_implementation="eager",
        attn_implementation="sdpa",
    )


def _token_stream(tokenizer: Any, texts: list[str]) -> tuple[torch.Tensor, list[list[int]]]:
    """All training texts tokenised and packed into one stream, documents separated by eos."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    flat: list[int] = []
    for seq in ids:
        flat.extend(seq)
        flat.append(eos)
    return torch.tensor(flat, dtype=torch.long), ids


def _lr_factor(progress: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay to `floor` × peak at progress 1."""
    if progress < warmup:
        return max(progress / warmup, 0.01)
    t = min(1.0, (progress - warmup) / (1 - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def train_model(model: Any, stream: torch.Tensor, *, seed: int, seconds: float, max_steps: int | None,
                seqlen: int, batch_size: int, lr: float, balance_coef: float, log: Callable[[str], None],
                on_progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """AdamW on random packed windows until the time budget or `max_steps`, LR decayed over whichever ends first.

    `on_progress(fraction)` is called after every step (fraction of the time/step budget used, 0..1).
    """
    n_windows = (len(stream) - 1) // seqlen
    if n_windows < batch_size:
        raise UserError(f"corpus too small: {n_windows} windows of {seqlen} tokens for batch {batch_size}; "
                        "raise n_docs or give a longer --text file")
    windows = stream[: n_windows * seqlen + 1]
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    top_k = model.config.num_experts_per_tok
    model.train()
    order = torch.randperm(n_windows, generator=gen)
    cursor, step, ema = 0, 0, None
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        progress = elapsed / seconds if seconds > 0 else 0.0
        if max_steps is not None:
            progress = max(progress, step / max_steps)
        if on_progress is not None:
            on_progress(min(progress, 1.0))
        if progress >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = lr * _lr_factor(progress)
        if cursor + batch_size > n_windows:
            order, cursor = torch.randperm(n_windows, generator=gen), 0
        starts = order[cursor : cursor + batch_size] * seqlen
        cursor += batch_size
        batch = torch.stack([windows[s : s + seqlen + 1] for s in starts.tolist()])
        out = model(input_ids=batch[:, :-1], output_router_logits=True)
        ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(),
                                               batch[:, 1:].reshape(-1))
        bal = balance_loss(out.router_logits, top_k)
        loss = ce + balance_coef * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ce_val = ce.item()
        ema = ce_val if ema is None else 0.98 * ema + 0.02 * ce_val
        if step % 100 == 0:
            log(f"step {step:5d}  {time.perf_counter() - start:6.0f}s  loss {ema:.3f}  balance {bal.item():.3f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}")
    model.eval()
    return {"steps": step, "tokens_seen": step * batch_size * seqlen, "train_seconds": time.perf_counter() - start,
            "final_train_loss": ema if ema is not None else float("nan")}


def build_reference(
    out_dir: Path,
    *,
    seed: int = 0,
    minutes: float = 9.0,
    max_steps: int | None = None,
    text_file: Path | None = None,
    n_docs: int = 50000,
    val_fraction: float = 0.04,
    mc_per_domain: int = 60,
    vocab_size: int = 1024,
    hidden: int = 128,
    layers: int = 4,
    experts: int = 16,
    top_k: int = 2,
    expert_width: int = 128,
    heads: int = 4,
    seqlen: int = 128,
    batch_size: int = 32,
    lr: float = 3e-3,
    balance_coef: float = 0.01,
    train_experts_impl: str = "grouped_mm",
    log: Callable[[str], None] = print,
    on_progress: Callable[[float], None] | None = None,
) -> ReferenceResult:
    """Generate the corpus, train tokenizer + Qwen3-MoE, evaluate, and save everything into `out_dir`.

    `out_dir` gets the model and tokenizer (vanilla `from_pretrained` loads them), data/{train,val,mc}.jsonl
    and reference.json. Callers wanting atomic output pass a temp dir and rename (the CLI does).
    """
    from transformers import AutoModelForCausalLM

    if minutes <= 0 and max_steps is None:
        raise UserError("minutes must be > 0 (or pass max_steps); e.g. --minutes 9")
    if max_steps is not None and max_steps < 1:
        raise UserError(f"max_steps must be ≥ 1, got {max_steps}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    docs: list[Doc] = generate_corpus(n_docs, seed)
    if text_file is not None:
        docs += text_file_docs(text_file)
    train_docs, val_docs = split_docs(docs, val_fraction, seed)
    mc_rows = [r.model_dump() for r in word_order_task(val_docs, seed, per_domain=mc_per_domain)]
    data = out_dir / DATA_DIR
    write_jsonl(data / "train.jsonl", [d.model_dump() for d in train_docs])
    write_jsonl(data / "val.jsonl", [d.model_dump() for d in val_docs])
    write_jsonl(data / "mc.jsonl", mc_rows)
    log(f"corpus: {len(train_docs)} train / {len(val_docs)} val docs, {len(mc_rows)} MC rows")

    train_texts = [d.text for d in train_docs]
    tokenizer = train_bpe_tokenizer(train_texts, vocab_size=vocab_size)
    stream, train_ids = _token_stream(tokenizer, train_texts)
    log(f"tokenizer: {len(tokenizer)} tokens; {len(stream)} training tokens")

    torch.manual_seed(seed)
    cfg = reference_config(len(tokenizer), hidden=hidden, layers=layers, experts=experts, top_k=top_k,
                           expert_width=expert_width, heads=heads, seqlen=seqlen)
    model = AutoModelForCausalLM.from_config(cfg)
    # grouped_mm trains ~1.5x faster than eager on CPU and is just as reproducible (bit-identical reruns at a
    # fixed thread count, measured on torch 2.13); "eager" stays available for debugging.
    model.set_experts_implementation(train_experts_impl)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: qwen3_moe {layers}x{hidden}, {experts} experts top-{top_k} width {expert_width}, "
        f"{n_params / 1e6:.2f}M params")
    train_stats = train_model(model, stream, seed=seed, seconds=minutes * 60, max_steps=max_steps, seqlen=seqlen,
                              batch_size=batch_size, lr=lr, balance_coef=balance_coef, log=log,
                              on_progress=on_progress)

    model.set_experts_implementation("grouped_mm")  # vanilla default: what a plain from_pretrained gives
    result = evaluate_reference(model, tokenizer, data, train_ids=train_ids, seqlen=seqlen)
    result_full = ReferenceResult(
        out_dir=str(out_dir), seed=seed,
        model={"family": "qwen3_moe", "hidden": hidden, "layers": layers, "experts": experts, "top_k": top_k,
               "expert_width": expert_width, "heads": heads, "vocab_size": len(tokenizer), "params": n_params},
        train={"n_docs": n_docs, "text_file": str(text_file) if text_file else None, "seqlen": seqlen,
               "batch_size": batch_size, "lr": lr, "balance_coef": balance_coef,
               "train_experts_impl": train_experts_impl, "minutes": minutes,
               "max_steps": max_steps},
        **train_stats, **result)

    model.save_pretrained(out_dir)
    write_count_aliases(out_dir)
    save_tokenizer(tokenizer, out_dir)
    (out_dir / RESULT_FILE).write_text(result_full.model_dump_json(indent=2) + "\n")
    verify_model_reload(model.eval(), out_dir)  # zero loading-info entries and the logits we have in memory
    log(format_result(result_full))
    return result_full


def evaluate_reference(model: Any, tokenizer: Any, data: Path, *, train_ids: list[list[int]] | None = None,
                       seqlen: int = 128) -> dict[str, Any]:
    """Val ppl (overall and per domain), unigram baseline, MC accuracy and per-layer expert usage."""
    val = load_jsonl(data / "val.jsonl")
    mc = load_jsonl(data / "mc.jsonl")
    texts = [r["text"] for r in val]
    domains = sorted({r["domain"] for r in val})
    scores = text_logprobs(model, tokenizer, texts, seqlen=seqlen, batch_size=16)

    def ppl(sel: list[int]) -> float:
        return math.exp(-sum(scores[i][0] for i in sel) / max(1, sum(scores[i][1] for i in sel)))

    domain_ppl = {d: ppl([i for i, r in enumerate(val) if r["domain"] == d]) for d in domains}
    if train_ids is None:
        train_ids = tokenizer(load_jsonl_texts(data / "train.jsonl"), add_special_tokens=False)["input_ids"]
    unigram = unigram_perplexity(train_ids, tokenizer, texts, len(tokenizer), seqlen=seqlen)
    mc_by_domain = {d: mc_accuracy(model, tokenizer, [r for r in mc if r["domain"] == d])
                    for d in sorted({r["domain"] for r in mc})}
    usage = expert_usage(model, tokenizer, texts, model.config.num_experts_per_tok, seqlen=seqlen, batch_size=16)
    return {
        "val_ppl": ppl(list(range(len(val)))),
        "unigram_ppl": unigram,
        "domain_ppl": domain_ppl,
        "mc_accuracy": sum(mc_by_domain[d] * sum(r["domain"] == d for r in mc) for d in mc_by_domain) / max(1, len(mc)),
        "mc_by_domain": mc_by_domain,
        "expert_usage": usage,
        "layer_entropy": [normalized_entropy(u) for u in usage],
    }


def format_result(r: ReferenceResult) -> str:
    """Plain-text summary: the numbers a reviewer asks for first."""
    lines = [
        f"trained {r.steps} steps ({r.tokens_seen / 1e6:.2f}M tokens) in {r.train_seconds:.0f}s, "
        f"final train loss {r.final_train_loss:.3f}",
        f"val ppl {r.val_ppl:.3f}   unigram ppl {r.unigram_ppl:.2f}   MC word-order acc {r.mc_accuracy:.1%} (chance 25%)",
        "per-domain ppl: " + "  ".join(f"{d} {p:.2f}" for d, p in r.domain_ppl.items()),
        "per-domain MC:  " + "  ".join(f"{d} {a:.0%}" for d, a in r.mc_by_domain.items()),
    ]
    for i, (u, h) in enumerate(zip(r.expert_usage, r.layer_entropy, strict=True)):
        lines.append(f"layer {i}: entropy {h:.3f}  min/max share {min(u):.3f}/{max(u):.3f}  "
                     + " ".join(f"{x:.2f}" for x in u))
    return "\n".join(lines)
