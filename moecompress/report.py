"""Human-readable reports: report.md tables and PNG plots beside each pass's report.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def human_bytes(n: float) -> str:
    """Binary-prefixed size (KiB, MiB, ...) as the CLI and reports print it."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def eval_rows(report: dict[str, Any]) -> list[tuple[str, str, float, float, float | None]]:
    """(task, metric, base, compressed, retention %) from a report's eval comparison."""
    rows = []
    comparison = (report.get("eval") or {}).get("comparison") or {}
    for task, metrics in comparison.items():
        for metric, v in metrics.items():
            if isinstance(v, dict) and "base" in v:
                rows.append((task, metric, v["base"], v["compressed"], v.get("retention")))
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# {report['pass']}", "", f"source: `{report['source']}`  ", f"output: `{report['output']}`", ""]
    cfg = ", ".join(f"{k}={v}" for k, v in report.get("config", {}).items() if v is not None)
    lines += [f"config: {cfg}", ""]
    lines += ["| | before | after | change |", "|---|---:|---:|---:|"]
    pb, pa = report["params_before"], report["params_after"]
    bb, ba = report["bytes_before"], report["bytes_after"]
    lines.append(f"| parameters | {pb:,} | {pa:,} | {100 * (pa - pb) / max(pb, 1):+.1f}% |")
    lines.append(f"| bytes on disk | {human_bytes(bb)} | {human_bytes(ba)} | {100 * (ba - bb) / max(bb, 1):+.1f}% |")
    lines += ["", f"time: {report['seconds']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MiB", ""]
    lines += removal_lines(report.get("details") or {})
    if report.get("mtp"):
        lines += [f"multi-token prediction: {report['mtp']}", ""]
    if report.get("paired_experts"):
        lines += [f"**paired expert sets: {report['paired_experts']}**", ""]
    rows = eval_rows(report)
    if rows:
        lines += ["| task | metric | base | compressed | retention |", "|---|---|---:|---:|---:|"]
        for task, metric, b, c, r in rows:
            lines.append(f"| {task} | {metric} | {b:.4g} | {c:.4g} | {'' if r is None else f'{r:.1f}%'} |")
        lines.append("")
    return "\n".join(lines)


def removal_lines(details: dict[str, Any]) -> list[str]:
    """What removal cost on the calibration data (routed mass, KL) and what heal won back; byte caveats."""
    lines: list[str] = []
    if details.get("bytes_note"):
        lines += [f"**{details['bytes_note']}**", ""]
    if details.get("coupled"):  # JetMoE: the attention experts were cut too (one config key sizes both sets)
        lines += [f"**{details['coupled']}**", ""]
    mass = details.get("removed_routed_mass")
    if mass:
        lines += ["routed probability mass the removed experts carried (calibration data): "
                  + ", ".join(f"layer {k} {100 * v:.1f}%" for k, v in mass.items()), ""]
    kl = details.get("calibration_kl") or {}
    if kl.get("unhealed") is not None:
        healed = kl.get("healed")
        lines += [f"calibration KL to the input (held-out calibration sequences): unhealed {kl['unhealed']:.4g}"
                  + (f", healed {healed:.4g}" if healed is not None else " (heal not run)"), ""]
    if details.get("heal_skipped"):
        lines += [f"**heal (on by default) did not run — {details['heal_skipped']}**", ""]
    return lines


def write_markdown(out: Path, report: dict[str, Any]) -> None:
    (Path(out) / "report.md").write_text(markdown(report))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_usage_heatmap(stats: Any, path: Path, title: str = "expert usage per layer",
                       kept: dict[str, list[int]] | None = None) -> None:
    """Share of routed tokens per expert (rows: layers) — dead or dominant experts stand out; removed ones get ×."""
    plt = _plt()
    layers = sorted(stats.layers)
    mat = torch.stack([stats.layers[i].sums["freq"] / stats.layers[i].sums["freq"].sum().clamp_min(1) for i in layers])
    fig, ax = plt.subplots(figsize=(max(4, mat.shape[1] * 0.35), max(2.5, len(layers) * 0.4)))
    im = ax.imshow(mat.numpy(), aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    for row, layer in enumerate(layers):
        keep = (kept or {}).get(str(layer))
        if keep is not None:
            for e in sorted(set(range(mat.shape[1])) - set(keep)):
                ax.text(e, row, "×", ha="center", va="center", color="white", fontsize=11, fontweight="bold")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pass(out: Path, report: dict[str, Any], stats: Any = None) -> None:
    if stats is not None:
        kept = (report.get("details") or {}).get("kept")
        title = f"expert usage before {report['pass']}" + (" (× = removed)" if kept else "")
        plot_usage_heatmap(stats, Path(out) / "expert_usage.png", title, kept if isinstance(kept, dict) else None)


def plot_metric_vs_size(points: list[dict[str, Any]], path: Path, metric_label: str, title: str) -> None:
    """Quality vs bytes, one labelled point per variant; the Pareto front is drawn as a line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for p in points:
        ax.scatter(p["bytes"] / 2**20, p["value"], s=30)
        ax.annotate(p["label"], (p["bytes"] / 2**20, p["value"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lower_better = bool(points and points[0].get("lower_is_better"))
    front = pareto_front(points, lower_better)
    if len(front) > 1:
        ax.plot([p["bytes"] / 2**20 for p in front], [p["value"] for p in front], "--", color="gray", lw=1)
    ax.set_xlabel("checkpoint size (MiB)")
    ax.set_ylabel(metric_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(points: list[dict[str, Any]], lower_is_better: bool) -> list[dict[str, Any]]:
    """Points not beaten by a smaller-or-equal one, sorted by size."""
    best = None
    front = []
    for p in sorted(points, key=lambda q: (q["bytes"], q["value"] if lower_is_better else -q["value"])):
        v = p["value"]
        if best is None or (v < best if lower_is_better else v > best):
            front.append(p)
            best = v
    return front


def write_run_summary(out: Path, reports: list[dict[str, Any]]) -> None:
    """run.md + size/metric plot across the steps of a recipe."""
    out = Path(out)
    parts = ["# moecompress run", ""]
    for i, r in enumerate(reports, start=1):
        parts.append(markdown(r).replace(f"# {r['pass']}", f"## step {i}: {r['pass']}", 1))
    (out / "run.md").write_text("\n".join(parts))
    (out / "run.json").write_text(json.dumps(reports, indent=2, default=str))
    if not reports:
        return
    first = eval_rows(reports[0])
    if not first:
        return
    task, metric = first[0][0], first[0][1]
    points = [{"label": "base", "bytes": reports[0]["bytes_before"], "value": first[0][2]}]
    for i, r in enumerate(reports, start=1):
        for t, m, _, c, _ in eval_rows(r):
            if (t, m) == (task, metric):
                points.append({"label": f"{i}:{r['pass']}", "bytes": r["bytes_after"], "value": c})
    lower = "perplexity" in metric or "bits_per" in metric
    for p in points:
        p["lower_is_better"] = lower
    plot_metric_vs_size(points, out / "metric_vs_size.png", f"{task} {metric}", "quality vs size per step")
