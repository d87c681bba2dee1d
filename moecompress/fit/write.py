"""Write: the winner as a recipe (run through `run_recipe`, `recipe.yaml` beside the checkpoint) and the
table and plot of every candidate (predicted vs measured damage, bytes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from moecompress.fit.space import Candidate
from moecompress.passes.base import PassConfig

SHOWN = ("keep", "criterion", "neuron_ratio", "expert_keep", "expert_criterion", "bits", "group_size", "method")


def pass_entry(cfg: PassConfig) -> dict[str, Any]:
    """A recipe `passes:` item: the pass name, the fields a reader looks for first, and every field that differs
    from its default (so the recipe still means the same if a default changes)."""
    changed = cfg.model_dump(mode="json", exclude_defaults=True)
    full = cfg.model_dump(mode="json")
    fields = {k: v for k, v in full.items() if (k in SHOWN and v is not None) or k in changed}
    if fields.get("heal") == {} or fields.get("heal") == full.get("heal") == _default_heal():
        fields["heal"] = True
    return {"pass": cfg.name, **fields}


def _default_heal() -> dict[str, Any]:
    from moecompress.heal.spec import HealSpec

    return HealSpec().model_dump(mode="json")


def recipe_text(model: str, calibration: Any, candidate: Candidate, header: str) -> str:
    calib = calibration.model_dump(mode="json", exclude_defaults=True)
    local = Path(calibration.source).expanduser()
    if local.exists():  # the recipe reruns from any working directory
        calib["source"] = str(local.resolve())
    data = {"model": model, "calibration": calib, "passes": [pass_entry(c) for c in candidate.passes]}
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(data, sort_keys=False)


def candidate_rows(candidates: list[Candidate], input_bytes: int, winner: Candidate | None) -> list[dict[str, Any]]:
    rows = []
    for c in sorted(candidates, key=lambda c: (c.predicted if c.predicted is not None else float("inf"), c.bytes)):
        rows.append({"plan": c.label, "keep": c.choice.keep, "width": c.choice.width, "bits": c.choice.bits,
                     "heal": c.choice.heal, "bytes": c.bytes, "share_of_input": round(c.bytes / input_bytes, 4),
                     "predicted": c.predicted, "measured_kl": c.measured_kl, **{f"pred_{k}": v for k, v in c.parts.items()},
                     "chosen": c is winner, "passes": [pass_entry(p) for p in c.passes]})
    return rows


def write_table(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    from moecompress.report import human_bytes

    lines = ["# fit", "", f"target {human_bytes(summary['target_bytes'])} "
             f"({summary['target_bytes'] / summary['input_bytes']:.1%} of the input's {human_bytes(summary['input_bytes'])}); "
             f"{len(rows)} plans meet it, {sum(r['measured_kl'] is not None for r in rows)} measured on "
             f"{summary['held_out_tokens']:,} held-out tokens.", "",
             "predicted = Σ over MoE layers of relative block-output error on the statistics' sampled tokens "
             "(structural + round-to-nearest quantization); measured = KL(original ‖ plan) per held-out token.", "",
             "| | plan | bytes | of input | predicted | structural | quantization | routed mass removed | measured KL |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kl = f"{r['measured_kl']:.5g}" if r["measured_kl"] is not None else "—"
        lines.append(f"| {'✓' if r['chosen'] else ''} | {r['plan']} | {human_bytes(r['bytes'])} | "
                     f"{r['share_of_input']:.1%} | {r['predicted']:.4g} | {r.get('pred_structural', 0):.4g} | "
                     f"{r.get('pred_quantization', 0):.4g} | {r.get('pred_removed_routed_mass', 0):.3f} | {kl} |")
    if summary.get("rank_agreement") is not None:
        lines += ["", f"prediction vs measurement: {summary['rank_agreement']:.0%} of measured pairs in the same order"]
    if summary.get("written_bytes") is not None:
        lines += ["", f"written: {summary['checkpoint']} — {human_bytes(summary['written_bytes'])} on disk "
                  f"(target {human_bytes(summary['target_bytes'])}, predicted {human_bytes(summary['predicted_bytes'])})"]
    (out / "fit.md").write_text("\n".join(lines) + "\n")
    (out / "fit.json").write_text(json.dumps({"summary": summary, "candidates": rows}, indent=2, default=str))


def plot_candidates(out: Path, rows: list[dict[str, Any]], target_bytes: int) -> None:
    """Left: predicted vs measured damage (measured plans); right: predicted damage vs bytes (every plan)."""
    from moecompress.report import _plt

    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    measured = [r for r in rows if r["measured_kl"] is not None]
    for r in measured:
        a.scatter(r["predicted"], r["measured_kl"], color="C3" if r["chosen"] else "C0")
        a.annotate(r["plan"], (r["predicted"], r["measured_kl"]), fontsize=7)
    a.set_xlabel("predicted damage (Σ relative block error)")
    a.set_ylabel("measured KL per held-out token")
    a.set_title("measured plans")
    for r in rows:
        b.scatter(r["bytes"] / 2**20, r["predicted"], color="C3" if r["chosen"] else ("C1" if r["heal"] else "C0"),
                  marker="o" if r["measured_kl"] is not None else ".")
    b.axvline(target_bytes / 2**20, color="grey", linestyle="--", linewidth=1)
    b.set_xlabel("bytes on disk (MiB); dashed: target")
    b.set_ylabel("predicted damage")
    b.set_title("every plan that meets the size (orange: healed)")
    fig.tight_layout()
    fig.savefig(out / "fit.png", dpi=110)
    plt.close(fig)


def render(console: Any, rows: list[dict[str, Any]], summary: dict[str, Any], limit: int = 12) -> None:
    """The candidates as a terminal table (best predicted first; measured and chosen ones always shown)."""
    from rich.table import Table

    from moecompress.report import human_bytes

    shown = [r for i, r in enumerate(rows) if i < limit or r["measured_kl"] is not None]
    t = Table(title=f"fit: {len(rows)} plans meet {human_bytes(summary['target_bytes'])} "
              f"({summary['target_bytes'] / summary['input_bytes']:.1%} of {human_bytes(summary['input_bytes'])})")
    for col in ("", "plan", "bytes", "predicted", "measured KL"):
        t.add_column(col, justify="left" if col == "plan" else "right")
    for r in shown:
        t.add_row("✓" if r["chosen"] else "", r["plan"], human_bytes(r["bytes"]), f"{r['predicted']:.4g}",
                  f"{r['measured_kl']:.4g}" if r["measured_kl"] is not None else "—")
    console.print(t)
    if len(shown) < len(rows):
        console.print(f"[dim]{len(rows) - len(shown)} more plans in fit.md[/]")
    console.print(f"written {summary['checkpoint']}: {human_bytes(summary['written_bytes'])} on disk "
                  f"({'meets' if summary['meets_target'] else 'MISSES'} the target), KL {summary['measured_kl']:.4g} "
                  f"on {summary['held_out_tokens']:,} held-out tokens")
