"""One statistics pass, many compressed variants: a table and a Pareto plot of quality vs bytes.

Methods are written `family:option`, e.g. `prune:reap`, `prune:frequency`, `merge:hc`, `merge:msmoe+subspace`,
`atomic:heapr`; each is run at every ratio. All variants of one source share the cached statistics (same
model + calibration spec), so only the first variant pays for the calibration forward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moecompress.errors import UserError
from moecompress.passes.base import PassConfig, get_pass


def method_config(method: str, ratio: float) -> PassConfig:
    """Translate `kind:option[+rule]` at `ratio` into a validated pass config."""
    from moecompress.recipe import validated

    kind, _, option = method.partition(":")
    if kind == "prune":
        name, fields = "prune_experts", {"ratio": ratio, "criterion": option or "reap"}
    elif kind == "merge":
        m, _, rule = option.partition("+")
        name, fields = "merge_experts", {"ratio": ratio, "method": m or "hc", **({"merge": rule} if rule else {})}
    elif kind == "atomic":
        name, fields = "prune_atomic", {"neuron_ratio": ratio, "criterion": option or "heapr"}
    else:
        raise UserError(f"method {method!r}: use prune:<criterion>, merge:<method>[+<rule>] or atomic:<criterion>")
    try:
        return validated(get_pass(name).config_cls, fields)
    except UserError as exc:
        raise UserError(f"method {method!r} at ratio {ratio}: {exc}") from None


def run_sweep(model: Path, out: Path, methods: list[str], ratios: list[float], *, calibration: Any, eval_spec: Any,
              opts: Any, console: Any = None) -> list[dict[str, Any]]:
    from moecompress.io.checkpoint import check_model_dir
    from moecompress.io.resolve import resolve_model
    from moecompress.runner import RunOptions, run_pass

    if eval_spec is None:
        raise UserError("a sweep compares variants by quality: pass --eval (e.g. ref_ppl) ")
    resolved = resolve_model(model, revision=getattr(opts, "revision", None))
    hf_config, adapter = check_model_dir(resolved.path)
    plan = [(m, r, method_config(m, r)) for m in methods for r in ratios]
    for _, _, cfg in plan:  # all validated before any weights load
        cfg.check(adapter, hf_config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m, r, cfg in plan:
        step = out / f"{m.replace(':', '-').replace('+', '_')}-{r:g}"
        if (step / "report.json").is_file() and not opts.overwrite:
            report = json.loads((step / "report.json").read_text())
        else:
            step_opts = RunOptions(**{**opts.model_dump(), "overwrite": True, "plots": False})
            if console:
                console.rule(f"{m} @ {r:g}")
            report = run_pass(cfg, resolved, step, calibration=calibration, eval_spec=eval_spec, opts=step_opts,
                              console=console)
        rows.append({"method": m, "ratio": r, "report": report})
    write_sweep(out, rows)
    return rows


def write_sweep(out: Path, rows: list[dict[str, Any]]) -> None:
    from moecompress.report import eval_rows, human_bytes, plot_metric_vs_size

    if not rows:
        return
    first = eval_rows(rows[0]["report"])
    metric_keys = [(t, m) for t, m, *_ in first]
    lines = ["# sweep", "", "| method | ratio | bytes | params | " + " | ".join(f"{t} {m}" for t, m in metric_keys) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(metric_keys)]
    base_vals = {(t, m): b for t, m, b, _, _ in first}
    lines.append(f"| base | 0 | {human_bytes(rows[0]['report']['bytes_before'])} | {rows[0]['report']['params_before']:,} | "
                 + " | ".join(f"{base_vals[k]:.4g}" for k in metric_keys) + " |")
    for row in rows:
        rep = row["report"]
        vals = {(t, m): c for t, m, _, c, _ in eval_rows(rep)}
        lines.append(f"| {row['method']} | {row['ratio']:g} | {human_bytes(rep['bytes_after'])} | {rep['params_after']:,} | "
                     + " | ".join(f"{vals.get(k, float('nan')):.4g}" for k in metric_keys) + " |")
    (Path(out) / "sweep.md").write_text("\n".join(lines) + "\n")
    (Path(out) / "sweep.json").write_text(json.dumps(rows, indent=2, default=str))
    task, metric = metric_keys[0]
    lower = "perplexity" in metric or "bits_per" in metric
    points = [{"label": "base", "bytes": rows[0]["report"]["bytes_before"], "value": base_vals[(task, metric)],
               "lower_is_better": lower}]
    for row in rows:
        vals = {(t, m): c for t, m, _, c, _ in eval_rows(row["report"])}
        if (task, metric) in vals:
            points.append({"label": f"{row['method']}@{row['ratio']:g}", "bytes": row["report"]["bytes_after"],
                           "value": vals[(task, metric)], "lower_is_better": lower})
    plot_metric_vs_size(points, Path(out) / "pareto.png", f"{task} {metric}", "quality vs size (Pareto front dashed)")
