"""Evaluation: lm-eval on an in-memory model, bundled offline tasks, base-vs-compressed retention.

Bundled tasks read the reference model's ``data/`` folder and are built as lm-eval task *dicts* (design §4),
so no YAML, no network and no custom metric code are involved:

- ``ref_ppl``  rolling log-likelihood of ``val.jsonl`` → word_perplexity, byte_perplexity, bits_per_byte
- ``ref_mc``   word-order multiple choice on ``mc.jsonl`` (real sentence vs 3 shuffles) → acc
- ``ref_ppl:<domain>`` / ``ref_mc:<domain>`` the same on one domain's rows; ``ref_ppl:*`` expands to every
  domain present in the file.

Any other name is a standard lm-eval task (``arc_easy``, ``hellaswag`` …), which needs the Hub once.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ConfigDict, Field, field_validator

from moecompress.errors import UserError

Results = dict[str, dict[str, float]]

BUNDLED = {"ref_ppl": "val.jsonl", "ref_mc": "mc.jsonl"}
_PPL_METRICS = [
    {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
    {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
    {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
]
_MC_METRICS = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
# Exact metric names (before lm-eval's ",filter" suffix) where lower is better; plus any "*perplexity*".
LOWER_IS_BETTER = frozenset({"bits_per_byte", "loss", "ter", "wer", "cer"})
_NOISY_LOGGERS = ("lm_eval", "lm-eval", "datasets", "transformers", "evaluate", "accelerate", "filelock", "httpx")


class EvalSpec(BaseModel):
    """What to evaluate: task names (bundled or lm-eval's) and how much of each."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: list[str] = Field(min_length=1, description="Task names; a comma-separated string is accepted too.")
    data_dir: Path | None = Field(
        None, description="Folder with val.jsonl / mc.jsonl for the bundled tasks (the reference model's data/)."
    )
    limit: int | None = Field(None, ge=1, description="At most this many documents per task (quick checks).")
    batch_size: int = Field(8, ge=1)
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples for standard tasks.")

    @field_validator("tasks", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, (list, tuple)):
            v = [t.strip() if isinstance(t, str) else t for t in v]
            v = [t for t in v if t != ""]
        return v


# ------------------------------------------------------------------------------------ bundled tasks


def is_bundled(name: str) -> bool:
    return name.split(":", 1)[0] in BUNDLED


def _read_rows(path: Path) -> list[dict[str, Any]]:
    from moecompress.zoo.metrics import load_jsonl

    return load_jsonl(path)


def _domain_filter(domain: str) -> Callable[[Any], Any]:
    """lm-eval `process_docs` hook keeping one domain's rows (a closure: dict tasks accept callables)."""

    def process_docs(dataset: Any) -> Any:
        return dataset.filter(lambda row: row.get("domain") == domain)

    return process_docs


def bundled_task_configs(names: Sequence[str], data_dir: Path | None) -> list[dict[str, Any]]:
    """lm-eval task dicts for the bundled names (``ref_ppl:*`` expanded), with absolute data paths."""
    if data_dir is None:
        raise UserError(
            f"tasks {', '.join(names)} read the reference data; pass --data-dir (the reference model folder's "
            "data/, holding val.jsonl and mc.jsonl) or set eval.data_dir in the recipe"
        )
    data_dir = Path(data_dir).expanduser().resolve()
    configs: list[dict[str, Any]] = []
    rows_cache: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        base, _, domain = name.partition(":")
        path = data_dir / BUNDLED[base]
        if not path.is_file():
            raise UserError(f"task {name} needs {path}; is {data_dir} the reference model's data/ folder?")
        rows = rows_cache.setdefault(base, _read_rows(path))
        if not rows:
            raise UserError(f"{path} has no rows; task {name} has nothing to evaluate")
        field = "text" if base == "ref_ppl" else "choices"
        if any(field not in r for r in rows):
            raise UserError(f"{path}: every row needs a {field!r} field for task {base}")
        domains = sorted({str(r["domain"]) for r in rows if "domain" in r})
        if domain == "*":
            targets = [f"{base}:{d}" for d in domains]
            if not targets:
                raise UserError(f"{path} has no `domain` field, so {name} has nothing to expand to; use {base}")
        elif domain:
            if domain not in domains:
                raise UserError(f"{path} has no rows of domain {domain!r}; domains present: "
                                f"{', '.join(domains) or 'none'}")
            targets = [name]
        else:
            targets = [base]
        for task in targets:
            configs.append(_task_dict(task, path))
    return configs


def _task_dict(task: str, path: Path) -> dict[str, Any]:
    base, _, domain = task.partition(":")
    cfg: dict[str, Any] = {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "doc_to_text": "",
        "metadata": {"version": 1.0},
    }
    if base == "ref_ppl":
        cfg.update(output_type="loglikelihood_rolling", doc_to_target="text", metric_list=_PPL_METRICS)
    else:  # empty context: lm-eval scores each full sentence after the BOS/EOS prefix token
        cfg.update(output_type="multiple_choice", doc_to_choice="choices", doc_to_target="label",
                   target_delimiter="", metric_list=_MC_METRICS)
    if domain:
        cfg["process_docs"] = _domain_filter(domain)
    return cfg


# ------------------------------------------------------------------------------------ evaluation


@functools.lru_cache(maxsize=1)
def _default_task_manager() -> Any:
    """lm-eval's full task index (≈15 s to build on 2 cores), built once per process and only when needed."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager()


def _check_standard(names: Sequence[str]) -> Any:
    tm = _default_task_manager()
    known = set(tm.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, list(known) + list(BUNDLED), n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(
                f"unknown task {name!r}; {hint}bundled offline tasks: {', '.join(BUNDLED)}, "
                "<task>:<domain>, <task>:* (standard lm-eval tasks such as arc_easy need the Hub)"
            )
    return tm


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval, datasets and tqdm print progress bars and advisory warnings per task; keep the console clean."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    import datasets

    bars_were_on = not datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()), _silence_fd2():
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if not bars_were_on:
            datasets.utils.logging.enable_progress_bar()


@contextlib.contextmanager
def _silence_fd2() -> Iterator[None]:
    """Child processes write to file descriptor 2 directly (lm-eval runs `git describe` to record a commit,
    which prints "fatal: not a git repository" outside a clone); Python-level redirection cannot catch that."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr descriptor: nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def _preserve_rng() -> Iterator[None]:
    """simple_evaluate reseeds python, numpy and torch globally; a caller's random baseline must not notice."""
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _metrics(entry: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in entry.items():
        if "_stderr" in key or key in ("name", "alias", "sample_len", "samples"):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key.removesuffix(",none")] = float(value)
    return out


def _model_data_dir(model: Any) -> Path | None:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    cand = Path(name) / "data" if name else None
    return cand if cand is not None and cand.is_dir() else None


def check_eval_spec(spec: EvalSpec, data_dir: Path | None = None) -> list[Any]:
    """Validate task names and bundled data before any weights load; returns the tasks for lm-eval.

    Bundled names become task dicts (their data files are read and checked); standard names are looked up in
    lm-eval's index, which costs ≈15 s the first time in a process, so only specs that use them pay it.
    """
    bundled = [t for t in spec.tasks if is_bundled(t)]
    standard = [t for t in spec.tasks if not is_bundled(t)]
    tasks: list[Any] = bundled_task_configs(bundled, data_dir or spec.data_dir) if bundled else []
    if standard:
        _check_standard(standard)
    return tasks + standard


def evaluate_model(model: Any, tokenizer: Any, spec: EvalSpec,
                   progress: Callable[[int], None] | None = None) -> Results:
    """Run `spec.tasks` on an in-memory model → {task: {metric: value}} (",none" stripped, no stderr).

    `progress(1)` is called after every forward batch lm-eval runs (lm-eval's own bars are silenced).
    """
    if tokenizer is None:
        raise UserError("evaluation needs a tokenizer; save one beside the model (tokenizer.json)")
    tasks = check_eval_spec(spec, spec.data_dir or _model_data_dir(model))
    standard = [t for t in tasks if isinstance(t, str)]
    if standard:
        task_manager = _default_task_manager()
    else:
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(include_defaults=False)

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with _quiet(), _preserve_rng():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size, device=device)
            if progress is not None:
                lm._model_call = _counting(lm._model_call, progress)  # the one call every request goes through
            kwargs: dict[str, Any] = {"limit": spec.limit} if spec.limit else {}
            if spec.num_fewshot is not None:
                kwargs["num_fewshot"] = spec.num_fewshot
            out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, bootstrap_iters=0,
                                          log_samples=False, **kwargs)
    except OSError as exc:  # datasets raises ConnectionError (an OSError) when the Hub is unreachable
        if not standard:
            raise
        raise UserError(
            f"could not download the data of {', '.join(standard)} ({type(exc).__name__}: {str(exc)[:200]}); "
            f"offline, use the bundled tasks instead: {', '.join(BUNDLED)} (with --data-dir)"
        ) from None
    finally:
        model.train(was_training)
    results: Results = {}
    for section in ("groups", "results"):
        for task, entry in (out.get(section) or {}).items():
            results[task] = _metrics(entry)
    return results


# ------------------------------------------------------------------------------------ comparison


def lower_is_better(metric: str) -> bool:
    """Perplexity-like metrics (lower is better) versus scores like acc (higher is better)."""
    base = metric.split(",", 1)[0]
    return "perplexity" in base or base in LOWER_IS_BETTER


def compare(base: Results, compressed: Results) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task/metric: base, compressed and retention in percent (100 = nothing lost, >100 = better).

    Convention: for higher-is-better metrics (acc …) retention = compressed / base × 100; for lower-is-better
    ones (perplexities, bits_per_byte) retention = base / compressed × 100, so a perplexity that rises from
    10 to 12.5 retains 80 %. Retention is None when the divisor is 0 or a value is not finite. Only
    task/metric pairs present in both results are compared.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task in base.keys() & compressed.keys():
        rows: dict[str, dict[str, Any]] = {}
        for metric in base[task].keys() & compressed[task].keys():
            b, c = float(base[task][metric]), float(compressed[task][metric])
            low = lower_is_better(metric)
            num, den = (b, c) if low else (c, b)
            ok = math.isfinite(b) and math.isfinite(c) and den != 0
            rows[metric] = {"base": b, "compressed": c, "retention": num / den * 100 if ok else None,
                            "higher_is_better": not low}
        out[task] = dict(sorted(rows.items()))
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------ cache + loading


def checkpoint_fingerprint(model_dir: Path) -> str:
    """Content identity of a checkpoint for caches: config bytes + weight/tokenizer file names, sizes, mtimes."""
    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and (f.name.endswith((".safetensors", ".bin")) or f.name.startswith("tokenizer")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _spec_key(spec: EvalSpec, data_dir: Path | None) -> str:
    h = hashlib.sha256(spec.model_copy(update={"data_dir": None}).model_dump_json().encode())
    if data_dir is not None and any(is_bundled(t) for t in spec.tasks):
        for name in sorted(set(BUNDLED.values())):
            f = Path(data_dir) / name
            if f.is_file():
                st = f.stat()
                h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_for_eval(model_dir: Path, dtype: str | None = None) -> tuple[Any, Any]:
    """Any causal LM folder (MoE or not) plus its tokenizer, with user-fixable errors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecompress.io.checkpoint import loadable, read_config

    read_config(model_dir)
    try:
        with loadable(model_dir) as folder:  # FP8 / MXFP4 sources are dequantized by our reader
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto")
    except (OSError, ValueError) as exc:
        raise UserError(f"could not load the model in {model_dir}: {str(exc).splitlines()[0][:300]}") from None
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir} has no usable tokenizer ({str(exc)[:200]}); evaluation needs one") from None
    model.eval()
    return model, tok


def _cache_file(model_dir: Path, spec: EvalSpec, cache_dir: Path) -> tuple[Path, EvalSpec, Path | None]:
    """Where the results of `spec` on checkpoint `model_dir` are cached (content + spec + data identity)."""
    from moecompress.io.checkpoint import read_config

    model_dir = Path(model_dir)
    read_config(model_dir)
    data_dir = spec.data_dir or (model_dir / "data" if (model_dir / "data").is_dir() else None)
    if data_dir is not None and spec.data_dir is None:
        spec = spec.model_copy(update={"data_dir": data_dir})
    key = f"{checkpoint_fingerprint(model_dir)}-{_spec_key(spec, data_dir)}"
    return Path(cache_dir) / f"{key}.json", spec, data_dir


def remember_evaluation(model_dir: Path, spec: EvalSpec, cache_dir: Path, results: Results) -> None:
    """Cache results measured on an in-memory model whose written checkpoint was verified to give its logits,
    so the next step of a recipe does not evaluate the same weights again as its base."""
    path, spec, _ = _cache_file(model_dir, spec, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"model": str(model_dir), "spec": spec.model_dump(mode="json"),
                               "results": results}, indent=2))
    tmp.replace(path)


def cached_evaluate(model_dir: Path, spec: EvalSpec, cache_dir: Path,
                    progress: Callable[[int], None] | None = None) -> Results:
    """`evaluate_model` on a checkpoint folder, cached in `cache_dir` by checkpoint content + spec + data."""
    path, spec, data_dir = _cache_file(model_dir, spec, cache_dir)
    if path.is_file():
        try:
            return json.loads(path.read_text())["results"]
        except (OSError, json.JSONDecodeError, KeyError):
            pass  # a torn or foreign file: recompute and overwrite
    check_eval_spec(spec, data_dir)  # fail before the weights load
    model, tok = load_for_eval(Path(model_dir))
    results = evaluate_model(model, tok, spec, progress)
    remember_evaluation(model_dir, spec, cache_dir, results)
    return results


def _counting(fn: Callable[..., Any], progress: Callable[[int], None]) -> Callable[..., Any]:
    def counted(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        progress(1)
        return out

    return counted


# ------------------------------------------------------------------------------------ fast helpers


def token_perplexity(model: Any, tokenizer: Any, texts: Sequence[str], seqlen: int = 256,
                     batch_size: int = 8) -> float:
    """Token-level perplexity without lm-eval (benchmarks): each text scored from an EOS prefix in windows of
    `seqlen`, padding masked, no grad. Shares its code with the reference model's own numbers."""
    from moecompress.zoo.metrics import perplexity

    return perplexity(model, tokenizer, list(texts), seqlen=seqlen, batch_size=batch_size)


def mc_accuracy(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], batch_size: int = 32) -> float:
    """Word-order multiple-choice accuracy without lm-eval; agrees with the `ref_mc` task's acc."""
    from moecompress.zoo.metrics import mc_accuracy as _mc

    return _mc(model, tokenizer, rows, batch_size=batch_size)


# ------------------------------------------------------------------------------------ CLI


def render_results(results: Results, console: Any, title: str = "evaluation") -> None:
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (("task", "left"), ("metric", "left"), ("value", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for task, metrics in results.items():
        for i, (metric, value) in enumerate(sorted(metrics.items())):
            table.add_row(task if i == 0 else "", metric, f"{value:.4f}")
    console.print(table)


def eval_command(
    model: str = typer.Argument(..., help="Checkpoint folder (config.json, weights, tokenizer) or a Hub id."),
    tasks: str = typer.Option(
        "ref_ppl,ref_mc", "--tasks",
        help="Comma-separated tasks. Bundled offline: ref_ppl, ref_mc, ref_ppl:<domain>, ref_ppl:* (every "
        "domain); any other name is an lm-eval task (arc_easy, hellaswag, …; needs the Hub).",
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Folder with val.jsonl and mc.jsonl for bundled tasks. Default: MODEL/data, or "
        "the data of the model this one was compressed from."),
    limit: int | None = typer.Option(None, "--limit", help="At most this many documents per task."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    num_fewshot: int | None = typer.Option(None, "--num-fewshot", help="Few-shot examples (standard tasks)."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse results of an unchanged checkpoint."),
    revision: str | None = typer.Option(None, "--revision", help="With a Hub id: branch, tag or commit."),
) -> None:
    """Evaluate a checkpoint with lm-eval (bundled offline tasks or standard ones) and print a table."""
    from pydantic import ValidationError
    from rich.console import Console

    console = Console()
    from moecompress.io.checkpoint import read_config
    from moecompress.io.resolve import resolve_model

    resolved = resolve_model(model, revision=revision)
    model = resolved.path  # type: ignore[assignment]
    read_config(model)
    if data_dir is None:
        from moecompress.io.locations import default_calibration_source

        src = default_calibration_source(model)
        data_dir = src.parent if src is not None else None
    try:
        spec = EvalSpec(tasks=tasks, data_dir=data_dir, limit=limit, batch_size=batch_size,  # type: ignore[arg-type]
                        num_fewshot=num_fewshot)
    except ValidationError as exc:
        raise UserError("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}"
                                  for e in exc.errors())) from None
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    if cache:
        from moecompress.io.locations import default_cache_root

        results = cached_evaluate(model, spec, default_cache_root() / "eval")
    else:
        check_eval_spec(spec)
        m, tok = load_for_eval(model)
        results = evaluate_model(m, tok, spec)
    render_results(results, console, title=f"{resolved.label} ({time.perf_counter() - t0:.1f} s)")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"model": resolved.label, "spec": spec.model_dump(mode="json"),
                                        "results": results}, indent=2))
