"""`moecompress demo`: from a fresh install to a compressed, evaluated checkpoint in one command.

The demo is the main job on an embedded default: it builds the locally trained reference MoE when it is
missing (or reuses it), runs the packaged two-pass recipe (REAP expert pruning, then expert-aware GPTQ W4)
through the same runner as `moecompress run`, and names the report, plots and checkpoint it wrote.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from moecompress.errors import UserError

REFERENCE_MARKER = "reference.json"
HEADLINE_METRICS = (" word_perplexity", " acc")  # the table's columns; every metric is in run.md and demo.json


def demo_recipe_text(model: Path) -> str:
    """The packaged recipe with this machine's model and calibration file filled in (a rerunnable recipe)."""
    packaged = resources.files("moecompress").joinpath("data/demo.yaml").read_text()
    header = "".join(line + "\n" for line in packaged.splitlines() if line.startswith("#"))
    data = yaml.safe_load(packaged)
    data = {"model": str(model), **data}
    data["calibration"] = {"source": str(Path(model) / "data" / "train.jsonl"), **data["calibration"]}
    return header + yaml.safe_dump(data, sort_keys=False)


def ensure_reference(reference: Path, *, minutes: float, console: Any) -> None:
    """Reuse a finished reference build; train one where the folder is missing or empty."""
    from moecompress.zoo.cli import build_reference_folder

    if (reference / REFERENCE_MARKER).is_file() and (reference / "config.json").is_file():
        console.print(f"reference model: reusing {reference}")
        return
    if reference.exists() and any(reference.iterdir()):
        raise UserError(f"{reference} exists but is not a reference build (no {REFERENCE_MARKER}); pass "
                        "--reference to another folder, or remove it")
    console.print(f"reference model: not found at {reference}; training it (~{minutes:g} min on 2 CPU cores)")
    build_reference_folder(reference, minutes=minutes, console=console)


def run_demo(out: Path, reference: Path, *, minutes: float = 9.0, overwrite: bool = False,
             console: Any) -> list[dict[str, Any]]:
    """Build/reuse the reference, run the demo recipe into `out`, print what it cost and where it went."""
    from moecompress.recipe import parse_recipe
    from moecompress.runner import RunOptions, run_recipe

    out, reference = Path(out), Path(reference)
    if out.exists() and any(out.iterdir()) and not (out / "recipe.yaml").is_file() and not overwrite:
        raise UserError(f"output {out} exists and does not hold a demo run; choose another --out or --overwrite")
    ensure_reference(reference, minutes=minutes, console=console)
    text = demo_recipe_text(reference)
    recipe = parse_recipe(yaml.safe_load(text), text)
    reports = run_recipe(recipe, out, opts=RunOptions(overwrite=overwrite), console=console)
    print_summary(reports, out, console)
    return reports


def summary_rows(reports: list[dict[str, Any]]) -> list[tuple[str, int, int, dict[str, float]]]:
    """(label, parameters, bytes, {"task metric": value}) for the input and after every step."""

    def metrics(which: str, report: dict[str, Any]) -> dict[str, float]:
        results = (report.get("eval") or {}).get(which) or {}
        return {f"{task} {m}": v for task, ms in results.items() for m, v in ms.items()}

    first = reports[0]
    rows = [("input", first["params_before"], first["bytes_before"], metrics("base", first))]
    for i, r in enumerate(reports, start=1):
        rows.append((f"{i}: {r['pass']}", r["params_after"], r["bytes_after"], metrics("compressed", r)))
    return rows


def print_summary(reports: list[dict[str, Any]], out: Path, console: Any) -> None:
    from rich.table import Table

    from moecompress.report import human_bytes

    rows = summary_rows(reports)
    shown = [n for n in sorted({k for *_, m in rows for k in m}) if n.endswith(HEADLINE_METRICS)]
    table = Table(title="moecompress demo: the reference MoE, step by step")
    for col in ["step", "parameters", "bytes", *shown]:
        table.add_column(col, justify="left" if col == "step" else "right")
    for label, params, size, m in rows:
        table.add_row(label, f"{params:,}", human_bytes(size), *(f"{m[n]:.4g}" if n in m else "" for n in shown))
    console.print(table)
    last = Path(reports[-1]["output"])
    console.print(f"checkpoint : {last}  (loads with AutoModelForCausalLM.from_pretrained)")
    console.print(f"report     : {out / 'run.md'}  (+ report.json / report.md in each step folder)")
    plots = [p for p in (out / "metric_vs_size.png", *(Path(r["output"]) / "expert_usage.png" for r in reports))
             if p.is_file()]
    console.print("plots      : " + ", ".join(str(p) for p in plots))
    console.print(f"recipe     : {out / 'recipe.yaml'}  (rerun: moecompress run {out / 'recipe.yaml'} --out DIR)")
    (out / "demo.json").write_text(json.dumps([{"step": lbl, "params": p, "bytes": b, "metrics": m}
                                               for lbl, p, b, m in rows], indent=2))
