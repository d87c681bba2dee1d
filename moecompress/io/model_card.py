"""Model card (README.md) for a compressed checkpoint, built only from files in the checkpoint folder.

Why only from the folder: `push` must work on any checkpoint we wrote, long after the run, without
the recipe run's memory. Every input except ``config.json`` is optional and every key is read
defensively, so a partial report gives a shorter card rather than an error.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huggingface_hub import ModelCard

PROVENANCE_FILE = "moecompress.json"
REPORT_FILE = "report.json"
RECIPE_FILE = "recipe.yaml"

# Metrics where a smaller number is better: retention is base/compressed for these.
_LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "bpb", "loss", "nll", "ppl", "error", "wer", "cer")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# config.json keys holding the routed expert count / top-k across the families we support.
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOPK_KEYS = ("num_experts_per_tok", "moe_k", "top_k")
_WIDTH_KEYS = ("moe_intermediate_size", "intermediate_size")


def _read_json(path: Path) -> Any:
    """Parsed JSON or None: a missing or damaged optional file must not block the card."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def looks_like_hub_id(source: str | None, *, check_local: bool = True) -> bool:
    """True for ``owner/name`` (and, with ``check_local``, not an existing local folder).

    Only Hub ids are valid ``base_model`` metadata; a recorded ``models/foo`` may be a local path.
    """
    if not source or not _HUB_ID.match(source) or "--" in source or ".." in source:
        return False
    return not (check_local and Path(source).expanduser().exists())


def _display_source(source: str, *, on_hub: bool) -> str:
    """Hub ids link to the Hub; local paths show only their folder name (the rest is private detail)."""
    if on_hub:
        return f"[{source}](https://huggingface.co/{source})"
    name = Path(source.rstrip("/\\")).name or source
    return f"a local checkpoint (`{name}`)"


def _fmt_value(v: float) -> str:
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"


def _fmt_count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def _fmt_bytes(n: float) -> str:
    for div, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None or before == 0:
        return ""
    return f"{(after - before) / before * 100:+.1f}%"


def _metric_name(key: str) -> str:
    """lm-eval keys look like ``acc,none``; the filter suffix is noise on a card."""
    name, _, filt = key.partition(",")
    return name if filt in ("", "none") else f"{name} ({filt})"


def _lower_is_better(metric: str) -> bool:
    return any(tag in metric.lower() for tag in _LOWER_IS_BETTER)


def _eval_pairs(report: dict[str, Any]) -> dict[tuple[str, str], tuple[float | None, float | None]]:
    """(task, metric key) -> (base, compressed) from a report's ``eval``.

    Reads the runner's ``comparison`` ({task: {metric: {base, compressed, ...}}}) when present, else the
    plain ``base`` / ``compressed`` result dicts ({task: {metric: value}}); anything else is skipped.
    """
    ev = _as_dict(report.get("eval"))
    pairs: dict[tuple[str, str], tuple[float | None, float | None]] = {}
    for task, metrics in _as_dict(ev.get("comparison")).items():
        for key, v in _as_dict(metrics).items():
            v = _as_dict(v)
            pairs[(str(task), str(key))] = (_number(v.get("base")), _number(v.get("compressed")))
    if pairs:
        return pairs
    base, comp = _as_dict(ev.get("base")), _as_dict(ev.get("compressed"))
    for task, metrics in comp.items():
        for key, value in _as_dict(metrics).items():
            pairs[(str(task), str(key))] = (_number(_as_dict(base.get(task)).get(key)), _number(value))
    return pairs


def _eval_rows(reports: list[dict[str, Any]]) -> list[tuple[str, str, float | None, float, str]]:
    """(task, metric, base, compressed, retention): base from the first evaluated report, compressed from the last."""
    evaluated = [p for p in (_eval_pairs(r) for r in reports) if p]
    if not evaluated:
        return []
    first, last = evaluated[0], evaluated[-1]
    rows = []
    for (task, key), (_, comp) in last.items():
        if comp is None or "stderr" in key:
            continue
        ref = first.get((task, key), (None, None))[0]
        metric = _metric_name(key)
        retention = ""
        if ref is not None:
            if _lower_is_better(metric):
                retention = f"{ref / comp * 100:.1f}%" if comp else ""
            elif ref:
                retention = f"{comp / ref * 100:.1f}%"
        rows.append((task, metric, ref, comp, retention))
    return rows


def _safetensors_params(checkpoint_dir: Path) -> int | None:
    """Element count from safetensors headers alone (no weights read); None if any header is unreadable."""
    total = 0
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        return None
    for f in files:
        try:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        for name, meta in header.items():
            if name == "__metadata__" or not isinstance(meta, dict):
                continue
            count = 1
            for d in meta.get("shape", []):
                count *= int(d)
            total += count
    return total


def _weight_bytes(checkpoint_dir: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint_dir.iterdir() if p.suffix in (".safetensors", ".bin"))


def _first(cfg: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return None


def _architecture_line(cfg: dict[str, Any]) -> str:
    text = _as_dict(cfg.get("text_config")) or cfg  # multimodal wrappers nest the LM config
    parts = [f"`{cfg.get('model_type', 'unknown')}`"]
    if text.get("num_hidden_layers") is not None:
        parts.append(f"{text['num_hidden_layers']} layers")
    experts, topk = _first(text, _EXPERT_KEYS), _first(text, _TOPK_KEYS)
    if experts is not None:
        parts.append(f"{experts} routed experts" + (f" (top-{topk})" if topk is not None else ""))
    width = _first(text, _WIDTH_KEYS)
    if width is not None:
        parts.append(f"expert width {width}")
    if text.get("hidden_size") is not None:
        parts.append(f"hidden size {text['hidden_size']}")
    return ", ".join(parts)


def _pass_tag(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _reports(raw: Any) -> list[dict[str, Any]]:
    """report.json is one pass report; a list of them (a multi-pass run) is accepted too."""
    if isinstance(raw, dict):
        return [raw]
    if isinstance(raw, list):
        return [r for r in raw if isinstance(r, dict)]
    return []


def _same_dir(a: Any, b: Path) -> bool:
    try:
        return isinstance(a, str) and Path(a).resolve() == b.resolve()
    except OSError:
        return False


def _load_reports(checkpoint_dir: Path) -> list[dict[str, Any]]:
    """This step's reports from the original model on: a recipe run's ``../run.json`` covers every step.

    Only used when one of its entries names this folder as output, so a moved folder falls back to
    its own report.json (which compares against the previous step only).
    """
    run = _reports(_read_json(checkpoint_dir.parent / "run.json"))
    for i, r in enumerate(run):
        if _same_dir(r.get("output"), checkpoint_dir):
            return run[: i + 1]
    return _reports(_read_json(checkpoint_dir / REPORT_FILE))


def _pick(reports: list[dict[str, Any]], key: str, *, last: bool) -> Any:
    seq = reversed(reports) if last else reports
    for r in seq:
        if r.get(key) is not None:
            return r[key]
    return None


def build_model_card(checkpoint_dir: Path, repo_id: str, *, base_model: str | None = None) -> ModelCard:
    """Model card for a compressed checkpoint: what was done, what it cost, how to load it.

    ``base_model`` overrides the base recorded in ``moecompress.json``; it only enters the metadata if
    it is a Hub id (a local path there would be rejected or mislinked by the Hub).
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    import moecompress

    checkpoint_dir = Path(checkpoint_dir)
    cfg = _as_dict(_read_json(checkpoint_dir / "config.json"))
    prov = _as_dict(_read_json(checkpoint_dir / PROVENANCE_FILE))
    reports = _load_reports(checkpoint_dir)
    recipe = None
    if (checkpoint_dir / RECIPE_FILE).is_file():
        recipe = (checkpoint_dir / RECIPE_FILE).read_text(encoding="utf-8", errors="replace").strip()

    recorded = prov.get("base_model") or prov.get("source")
    base = base_model or (str(recorded) if recorded else None)
    hub_base = base if base and looks_like_hub_id(base, check_local=base_model is None) else None
    passes = [p for p in prov.get("passes", []) if isinstance(p, dict)] if isinstance(prov.get("passes"), list) else []
    if not passes:  # no provenance: fall back to what the report names
        passes = [{"pass": r["pass"]} for r in reports if isinstance(r.get("pass"), str)]
    pass_names = [str(p.get("pass", "?")) for p in passes]
    version = prov.get("moecompress_version") or moecompress.__version__
    quantized = "quantization_config" in cfg

    # ---- evaluation
    rows = _eval_rows(reports)
    # Reports that start after the first real pass compare against an intermediate checkpoint, not the base.
    real_passes = [n for n in pass_names if not n.startswith("zoo.")]
    partial = bool(reports) and len(reports) < len(real_passes)

    # ---- sizes
    params_before = _number(_pick(reports, "params_before", last=False))
    params_after = _number(_pick(reports, "params_after", last=True))
    bytes_before = _number(_pick(reports, "bytes_before", last=False))
    bytes_after = _number(_pick(reports, "bytes_after", last=True))
    if bytes_after is None:
        bytes_after = float(_weight_bytes(checkpoint_dir)) or None
    if params_after is None and not quantized:  # packed int weights would miscount
        n = _safetensors_params(checkpoint_dir)
        params_after = float(n) if n else None

    # ---- metadata
    tags = ["moe", "mixture-of-experts", "moecompress"]
    tags += [_pass_tag(n) for n in pass_names if _pass_tag(n)]
    if cfg.get("model_type"):
        tags.append(str(cfg["model_type"]))
    if quantized:
        tags.append(str(_as_dict(cfg.get("quantization_config")).get("quant_method", "quantized")))
    eval_results = [
        EvalResult(
            task_type="text-generation",
            task_name="Text Generation",
            dataset_type=task,
            dataset_name=task,
            metric_type=metric,
            metric_name=metric,
            metric_value=round(comp, 6),
        )
        for task, metric, _, comp, _ in rows
    ]
    extra: dict[str, Any] = {}
    if hub_base and pass_names and all("quant" in n for n in pass_names):
        extra["base_model_relation"] = "quantized"
    data = ModelCardData(
        base_model=hub_base,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        model_name=repo_id if eval_results else None,
        eval_results=eval_results or None,
        **extra,
    )

    # ---- body
    name = repo_id.split("/")[-1]
    lines = [f"# {name}", ""]
    origin = f"a compressed version of {_display_source(base, on_hub=base == hub_base)}" if base else "a compressed Mixture-of-Experts model"
    lines += [f"This model is {origin}, produced with moecompress {version}.", ""]
    if prov.get("base_revision"):
        lines += [f"Base weights: commit `{prov['base_revision']}` of the base model.", ""]
    lines += [f"Architecture: {_architecture_line(cfg)}.", ""]

    lines += ["## What was done", ""]
    if passes:
        for i, p in enumerate(passes, 1):
            summary = p.get("summary") or ""
            lines.append(f"{i}. **{p.get('pass', '?')}**" + (f": {summary}" if summary else ""))
            if p.get("mtp"):
                lines.append(f"   Multi-token prediction: {p['mtp']}.")
            if p.get("paired_experts"):
                lines.append(f"   Paired expert sets: {p['paired_experts']}.")
            conf = _as_dict(p.get("config"))
            if conf:
                settings = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in conf.items())
                lines.append(f"   Settings: {settings}")
    else:
        lines.append("No provenance (`moecompress.json`) was found in the checkpoint, so the steps are not recorded.")
    lines.append("")

    col = "Before last pass" if partial else "Base"
    note = (
        [f"Only the last pass's report is in this folder, so *{col}* is the checkpoint that pass started from, "
         "not the original model.", ""]
        if partial else []
    )
    size_rows = []
    for label, before, after, fmt in (
        ("Parameters", params_before, params_after, _fmt_count),
        ("Weights on disk", bytes_before, bytes_after, _fmt_bytes),
    ):
        if after is None:
            continue
        size_rows.append(
            f"| {label} | {fmt(before) if before is not None else 'n/a'} | {fmt(after)} | {_change(before, after)} |"
        )
    if size_rows:
        lines += ["## Size", "", *note, f"| | {col} | Compressed | Change |", "|---|---:|---:|---:|", *size_rows, ""]

    lines += ["## Evaluation", ""]
    if rows:
        lines += [*([] if size_rows else note), f"| Task | Metric | {col} | Compressed | Retention |",
                  "|---|---|---:|---:|---:|"]
        for task, metric, ref, comp, retention in rows:
            ref_s = _fmt_value(ref) if ref is not None else "n/a"
            lines.append(f"| {task} | {metric} | {ref_s} | {_fmt_value(comp)} | {retention} |")
        lines += [
            "",
            "Retention is compressed / base (base / compressed for perplexity-like metrics, where lower is better).",
            "",
        ]
    else:
        lines += ["No evaluation results were recorded for this checkpoint.", ""]

    lines += [
        "## How to load",
        "",
        "Loads with plain transformers, no moecompress needed:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", dtype="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        "```",
        "",
    ]
    if quantized:
        method = _as_dict(cfg.get("quantization_config")).get("quant_method", "")
        if method:
            lines += [f"The weights are quantized (`{method}`); install the matching package to load them.", ""]

    if recipe:
        lines += ["## Recipe", "", "```yaml", recipe, "```", ""]

    versions = {"moecompress": version, **{str(k): str(v) for k, v in _as_dict(prov.get("versions")).items()}}
    lines += ["## Software", "", *[f"- {k} {v}" for k, v in versions.items()], ""]

    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)
