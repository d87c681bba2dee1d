"""Shared benchmark plumbing: load the reference model, collect statistics once, run passes in memory, score.

Benchmarks print numbers; they are not tests. Run from the repo root: `python bench/<name>.py`.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402

from moecompress.calib.collect import collect_stats  # noqa: E402
from moecompress.calib.data import CalibSpec, load_calibration  # noqa: E402
from moecompress.calib.stats import Stats  # noqa: E402
from moecompress.io.checkpoint import load_model  # noqa: E402
from moecompress.passes.base import PassConfig, PassContext, get_pass  # noqa: E402
from moecompress.zoo.metrics import load_jsonl, load_jsonl_texts, mc_accuracy, perplexity  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

REFERENCE = Path(os.environ.get("MOECOMPRESS_REFERENCE", Path(__file__).resolve().parent.parent / "artifacts" / "reference"))


def require_reference(path: Path = REFERENCE) -> Path:
    if not (path / "config.json").is_file():
        sys.exit(f"reference model not found at {path}; build it with `moecompress zoo reference --out {path}`")
    return path


class Bench:
    """The reference model in memory, its eval data and one statistics collection shared by every variant."""

    def __init__(self, path: Path = REFERENCE, *, val_docs: int = 400, mc_rows: int = 300, calib_samples: int = 64,
                 calib_seqlen: int = 256, calib_domain: str | None = None) -> None:
        self.path = require_reference(path)
        loaded = load_model(self.path)
        self.model, self.tok, self.adapter = loaded.model, loaded.tokenizer, loaded.adapter
        data = self.path / "data"
        self.val = stratified(load_jsonl(data / "val.jsonl"), val_docs)
        self.mc = stratified(load_jsonl(data / "mc.jsonl"), mc_rows)
        self.domains = sorted({r["domain"] for r in self.val})
        self.calib_spec = CalibSpec(source=str(data / "train.jsonl"), samples=calib_samples, seqlen=calib_seqlen,
                                    domain=calib_domain)
        self._stats: dict[CalibSpec, Stats] = {}

    def stats(self, spec: CalibSpec | None = None) -> Stats:
        spec = spec or self.calib_spec
        if spec not in self._stats:
            calib = load_calibration(spec, self.tok)
            batches = list(calib.batches(8))
            self._stats[spec] = collect_stats(self.model, batches, total_tokens=int(calib.attention_mask.sum()))
        return self._stats[spec]

    def variant(self, cfg: PassConfig, spec: CalibSpec | None = None, base: Any = None) -> tuple[Any, dict[str, Any]]:
        """Apply one pass to a copy of the model in memory (no disk round trip: the runner's tests cover that)."""
        model = copy.deepcopy(base if base is not None else self.model)
        stats = self.stats(spec) if base is None else None
        if stats is None:
            def get_stats() -> Stats:
                calib = load_calibration(spec or self.calib_spec, self.tok)
                return collect_stats(model, list(calib.batches(8)), total_tokens=int(calib.attention_mask.sum()))
        else:
            def get_stats() -> Stats:
                return stats

        def get_calibration() -> Any:
            return load_calibration(spec or self.calib_spec, self.tok)

        ctx = PassContext(model=model, tokenizer=self.tok, adapter=self.adapter, config=cfg, get_stats=get_stats,
                          get_calibration=get_calibration)
        t0 = time.perf_counter()
        details = get_pass(cfg.name).fn(ctx)
        details["seconds"] = time.perf_counter() - t0
        return model, details

    def ppl(self, model: Any, domain: str | None = None) -> float:
        texts = [r["text"] for r in self.val if domain is None or r["domain"] == domain]
        return perplexity(model, self.tok, texts, seqlen=256, batch_size=16)

    def mc_acc(self, model: Any) -> float:
        return mc_accuracy(model, self.tok, self.mc)


def stratified(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to `n` rows with every domain equally represented (the files are grouped by domain)."""
    by_domain: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_domain.setdefault(r.get("domain", ""), []).append(r)
    per = max(1, n // max(len(by_domain), 1))
    return [r for group in by_domain.values() for r in group[:per]]


def params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


__all__ = ["Bench", "REFERENCE", "load_jsonl_texts", "params", "table", "torch"]
