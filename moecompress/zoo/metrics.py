"""Fast quality yardsticks for small causal LMs: perplexity, word-order MC accuracy, expert usage.

Every document is scored as ``<eos> + text`` because training packs documents separated by eos;
this is also what lm-eval's rolling log-likelihood does, so the numbers line up with theirs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from moecompress.arch.discover import text_model
from moecompress.calib.data import jsonl_values
from moecompress.errors import UserError


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    """All rows of a JSON-lines file, with the line number in any error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a .jsonl file (one JSON object per line)")
    rows = []
    for n, row in jsonl_values(path):
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n} is not a JSON object; each line must look like {{\"text\": ...}}")
        rows.append(row)
    return rows


def load_jsonl_texts(path: Path, domain: str | None = None) -> list[str]:
    """The "text" field of every row (only rows of `domain` when given)."""
    texts = []
    for n, row in enumerate(load_jsonl(path), 1):
        if "text" not in row:
            raise UserError(f"{path}: row {n} has no \"text\" field; rows must look like {{\"text\": ..., \"domain\": ...}}")
        if domain is None or row.get("domain") == domain:
            texts.append(str(row["text"]))
    if domain is not None and not texts:
        known = sorted({str(r.get("domain")) for r in load_jsonl(path)})
        raise UserError(f"{path} has no rows of domain {domain!r}; domains present: {', '.join(known)}")
    return texts


def _windows(tokenizer: Any, texts: Sequence[str], seqlen: int) -> list[tuple[int, list[int]]]:
    """(text index, ids) windows of ≤ seqlen+1 tokens; each target token appears in exactly one window."""
    eos = tokenizer.eos_token_id
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    out = []
    for i, ids in enumerate(enc):
        ids = [eos, *ids]
        for s in range(0, len(ids) - 1, seqlen):
            out.append((i, ids[s : s + seqlen + 1]))
    return out


def _batches(windows: list[tuple[int, list[int]]], batch_size: int, pad_id: int) -> Iterable[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """Length-sorted right-padded batches (little padding → fast), with their attention masks."""
    order = sorted(range(len(windows)), key=lambda j: -len(windows[j][1]))
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = len(windows[idx[0]][1])
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, j in enumerate(idx):
            w = windows[j][1]
            ids[r, : len(w)] = torch.tensor(w)
            mask[r, : len(w)] = 1
        yield idx, ids, mask


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def text_logprobs(model: Any, tokenizer: Any, texts: Sequence[str], seqlen: int = 128,
                  batch_size: int = 8) -> list[tuple[float, int]]:
    """Per text: (sum of token log-probs, number of scored tokens)."""
    windows = _windows(tokenizer, texts, seqlen)
    sums = [0.0] * len(texts)
    counts = [0] * len(texts)
    device = next(model.parameters()).device
    for idx, ids, mask in _batches(windows, batch_size, _pad_id(tokenizer)):
        ids, mask = ids.to(device), mask.to(device)
        logits = text_model(model)(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:].bool()
        per_row = (lp * keep).sum(-1).tolist()
        n_row = keep.sum(-1).tolist()
        for r, j in enumerate(idx):
            t = windows[j][0]
            sums[t] += per_row[r]
            counts[t] += int(n_row[r])
    return list(zip(sums, counts, strict=True))


def perplexity(model: Any, tokenizer: Any, texts: Sequence[str], seqlen: int = 128, batch_size: int = 8) -> float:
    """Token-level perplexity over all `texts` (each scored from an eos prefix, padding masked)."""
    if not texts:
        raise UserError("no texts to score; pass a non-empty evaluation set")
    was_training = model.training
    model.eval()
    try:
        scores = text_logprobs(model, tokenizer, texts, seqlen, batch_size)
    finally:
        model.train(was_training)
    total = sum(s for s, _ in scores)
    n = sum(c for _, c in scores)
    return math.exp(-total / max(n, 1))


def mc_accuracy(model: Any, tokenizer: Any, mc_rows: Sequence[dict[str, Any]], batch_size: int = 32) -> float:
    """Share of rows where the choice with the highest total log-likelihood is `label`."""
    right = mc_correct(model, tokenizer, mc_rows, batch_size)
    return sum(right) / len(right)


def mc_correct(model: Any, tokenizer: Any, mc_rows: Sequence[dict[str, Any]], batch_size: int = 32) -> list[bool]:
    """Per row: is the choice with the highest total log-likelihood `label`? (Paired comparisons of two models
    count the rows that flip, which a difference of accuracies hides.)"""
    if not mc_rows:
        raise UserError("no multiple-choice rows to score; pass a non-empty mc.jsonl")
    flat = [c for row in mc_rows for c in row["choices"]]
    was_training = model.training
    model.eval()
    try:
        scores = text_logprobs(model, tokenizer, flat, seqlen=512, batch_size=batch_size)
    finally:
        model.train(was_training)
    right: list[bool] = []
    pos = 0
    for row in mc_rows:
        k = len(row["choices"])
        ll = [s for s, _ in scores[pos : pos + k]]
        pos += k
        right.append(max(range(k), key=ll.__getitem__) == int(row["label"]))
    return right


def unigram_perplexity(train_ids: Iterable[Sequence[int]], tokenizer: Any, texts: Sequence[str],
                       vocab_size: int, seqlen: int = 128) -> float:
    """Perplexity of an add-one unigram model fitted on `train_ids`, over exactly the tokens `perplexity` scores.

    The floor a language model must beat by far; "ppl 12" means little until you know unigram is 90.
    """
    counts = torch.ones(vocab_size, dtype=torch.float64)
    for ids in train_ids:
        counts += torch.bincount(torch.as_tensor(ids, dtype=torch.long), minlength=vocab_size)[:vocab_size].double()
    logp = torch.log(counts / counts.sum())
    total, n = 0.0, 0
    for _, w in _windows(tokenizer, texts, seqlen):
        targets = torch.as_tensor(w[1:], dtype=torch.long)
        total += float(logp[targets].sum())
        n += len(targets)
    return math.exp(-total / max(n, 1))


def balance_loss(router_logits: Sequence[torch.Tensor], top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over layers of each layer's own Switch-style balance loss E·Σ_e f_e·P_e (1.0 = uniform).

    Balancing each layer separately is the point: transformers' pooled loss averages usage over layers
    first, so one layer can collapse onto a few experts while the pooled number looks balanced.
    `mask` ([B*S] or [B,S], 1 = real token) keeps padding out of the statistics.
    """
    losses = []
    keep = None if mask is None else mask.reshape(-1).bool()
    for logits in router_logits:
        if keep is not None:
            logits = logits[keep]
        probs = torch.softmax(logits.float(), -1)
        n_exp = probs.shape[-1]
        idx = probs.topk(top_k, -1).indices
        frac = torch.zeros(n_exp, device=probs.device).index_add_(
            0, idx.reshape(-1), torch.ones(idx.numel(), device=probs.device)) / max(idx.numel(), 1)
        losses.append(n_exp * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def expert_usage(model: Any, tokenizer: Any, texts: Sequence[str], top_k: int, seqlen: int = 128,
                 batch_size: int = 8) -> list[list[float]]:
    """Per MoE layer: share of routed (token, slot) assignments that go to each expert (padding masked)."""
    windows = _windows(tokenizer, texts, seqlen)
    totals: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        for _, ids, mask in _batches(windows, batch_size, _pad_id(tokenizer)):
            out = text_model(model)(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], output_router_logits=True)
            keep = mask[:, :-1].reshape(-1).bool()
            for layer, logits in enumerate(out.router_logits):
                idx = logits[keep.to(logits.device)].topk(top_k, -1).indices.reshape(-1).cpu()
                counts = torch.bincount(idx, minlength=logits.shape[-1]).double()
                if layer == len(totals):
                    totals.append(counts)
                else:
                    totals[layer] += counts
    finally:
        model.train(was_training)
    return [(t / t.sum().clamp_min(1)).tolist() for t in totals]


def normalized_entropy(shares: Sequence[float]) -> float:
    """Entropy of a usage distribution divided by its maximum log(E): 1.0 = perfectly even."""
    p = torch.tensor(shares, dtype=torch.float64)
    if len(p) < 2:
        return 1.0
    nz = p[p > 0]
    return float(-(nz * nz.log()).sum() / math.log(len(p)))
