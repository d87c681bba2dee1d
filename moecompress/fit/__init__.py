"""`moecompress fit`: the size the user names, the least damage.

enumerate (`space`) → predict (`predict`) → measure the few best (`measure`) → choose → write the winner as a
recipe (`write`). Everything before the write reads the input and one statistics pass (cached like every
pass's); nothing is written to --out until a winner exists, so a size no plan meets leaves no trace.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from moecompress.dist import world
from moecompress.errors import UserError
from moecompress.fit.measure import choose, choose_to_measure, measure
from moecompress.fit.space import (
    Candidate,
    SearchSpace,
    Sizer,
    enumerate_candidates,
    header_model,
    smallest_plan,
)

__all__ = ["Candidate", "SearchSpace", "fit_model", "target_bytes"]


def target_bytes(target_size: str | None, target_ratio: float | None, input_bytes: int) -> int:
    """--target-size (bytes: 24GB, 500MiB, 123456) or --target-ratio (share of the input's bytes on disk)."""
    from moecompress.plan import parse_size

    if (target_size is None) == (target_ratio is None):
        raise UserError("give exactly one of --target-size (e.g. 24GB) or --target-ratio (e.g. 0.3)")
    if target_ratio is not None:
        if not 0 < target_ratio < 1:
            raise UserError(f"--target-ratio {target_ratio}: give a share of the input's bytes between 0 and 1")
        return int(target_ratio * input_bytes)
    try:
        size = parse_size(target_size)
    except UserError:
        raise UserError(f"--target-size {target_size!r}: use a size such as 24GB, 500MiB or a byte count") from None
    assert size is not None
    return size


def fit_model(model: str, out: Path, *, target_size: str | None, target_ratio: float | None, space: SearchSpace,
              calibration: Any, held_out: int, n_measure: int = 3, opts: Any = None, console: Any = None
              ) -> dict[str, Any]:
    """Find the plan that meets the size with the least measured damage and write it as a recipe run in `out`."""
    from moecompress.fit.write import candidate_rows, plot_candidates, recipe_text, write_table
    from moecompress.io.checkpoint import check_model_dir, checkpoint_bytes
    from moecompress.io.resolve import resolve_model
    from moecompress.plan import config_bytes
    from moecompress.runner import RunOptions, float_view

    t0 = time.perf_counter()
    opts = opts or RunOptions()
    out = Path(out)
    resolved = resolve_model(model, revision=opts.revision)
    src = resolved.path
    hf_config, adapter = check_model_dir(src)
    hf_config = float_view(hf_config)
    if out.exists() and any(out.iterdir()) and not opts.overwrite:
        raise UserError(f"output {out} exists and is not empty; choose another --out or pass --overwrite")
    if calibration is None:
        raise UserError("fit measures plans on calibration data: pass --calib (a local .txt/.jsonl/.parquet file or "
                        "a dataset name)")
    header = header_model(src, config_bytes(hf_config))
    target = target_bytes(target_size, target_ratio, header.input_bytes)
    if header.input_bytes <= target:
        raise UserError(f"{resolved.label} is already {_h(header.input_bytes)}, within the target {_h(target)}; "
                        "nothing to compress")
    if space.heal and adapter.routing == "sigmoid_input_scale":  # heal refuses these families (dense experts)
        space = dataclasses.replace(space, heal=False)
        if console:
            console.print(f"[yellow]fit:[/] {adapter.model_type} cannot be healed; plans are searched without heal")
    sizer = Sizer(hf_config, adapter, space, header)
    candidates = enumerate_candidates(sizer, target)
    if not candidates:
        smallest = smallest_plan(sizer)
        reach = (f"the smallest plan within these constraints is {_h(smallest[0])} ({smallest[1]})" if smallest
                 else "no plan passes the serving constraints")
        raise UserError(f"no plan fits {_h(target)} ({target / header.input_bytes:.1%} of {_h(header.input_bytes)}): "
                        f"{reach}; raise the target" + ("" if 4 in space.bits else ", allow 4-bit experts (--bits 8,4)")
                        + (" or relax --ep-size/--tp-size/--target" if space.ep_size or space.tp_size or space.target
                           else ""))
    if console:
        console.print(f"fit: {len(candidates)} plans meet {_h(target)} ({target / header.input_bytes:.1%} of "
                      f"{_h(header.input_bytes)}); predicting from one statistics pass")
    model_obj, tok, calib, held, stats = _load_inputs(src, calibration, held_out, opts, console)
    from moecompress.fit.predict import predict_all

    predict_all(candidates, model_obj, stats, space.criterion, int(adapter.text_config(hf_config)["hidden_size"]))
    to_measure = choose_to_measure(candidates, n_measure)
    for c in to_measure:
        if console:
            console.print(f"  measuring {c.label} ({_h(c.bytes)}, predicted {c.predicted:.4g})")
        measure(model_obj, tok, c, calib, held, lambda: stats)
        if console:
            console.print(f"    KL {c.measured_kl:.5g}")
    winner = choose(to_measure)
    del model_obj
    search_seconds = time.perf_counter() - t0
    text = recipe_text(resolved.label if resolved.repo_id else str(Path(src).resolve()), calibration, winner,
                       f"written by `moecompress fit` for a target of {_h(target)}: {winner.label}, "
                       f"{_h(winner.bytes)} predicted, KL {winner.measured_kl:.5g} on held-out calibration tokens")
    report = _write(out, text, opts, console)
    checkpoint = out / f"{len(winner.passes):02d}-{winner.passes[-1].name}"
    written = checkpoint_bytes(checkpoint)
    summary = {"model": resolved.label, "target_bytes": target, "input_bytes": header.input_bytes,
               "predicted_bytes": winner.bytes, "written_bytes": written, "meets_target": written <= target,
               "checkpoint": str(checkpoint), "recipe": str(out / "recipe.yaml"), "winner": winner.label,
               "measured_kl": winner.measured_kl, "held_out_tokens": int(sum(int(m.sum()) for _, m in held)),
               "calibration_tokens": calib.n_tokens, "search_seconds": round(search_seconds, 2),
               "total_seconds": round(time.perf_counter() - t0, 2), "steps": [r.get("output") for r in report]}
    summary["rank_agreement"] = rank_agreement(to_measure)
    rows = candidate_rows(candidates, header.input_bytes, winner)
    if world().is_main:  # data-parallel: rank 0 alone writes
        write_table(out, rows, summary)
        if opts.plots:
            plot_candidates(out, rows, target)
    return {"summary": summary, "candidates": rows}


def rank_agreement(measured: list[Candidate]) -> float | None:
    """Share of measured pairs the prediction orders as the measurement does (1 = same order; None: < 2)."""
    pairs = [(a, b) for i, a in enumerate(measured) for b in measured[i + 1:]]
    if not pairs:
        return None
    same = sum((a.predicted - b.predicted) * (a.measured_kl - b.measured_kl) >= 0 for a, b in pairs)
    return round(same / len(pairs), 3)


def _load_inputs(src: Path, calibration: Any, held_out: int, opts: Any, console: Any) -> tuple[Any, ...]:
    """The model, its tokenizer, the calibration batch a recipe run sees, the held-out batches after it, and the
    (cached) statistics of that calibration."""
    import torch

    from moecompress.calib.data import CalibBatch, load_calibration
    from moecompress.io.checkpoint import load_model
    from moecompress.runner import obtain_stats

    loaded = load_model(src, dtype=opts.dtype)
    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        raise UserError(f"{src} has no tokenizer; calibration data cannot be tokenized")
    calib = load_calibration(calibration, tok)
    both = load_calibration(calibration.model_copy(update={"samples": calibration.samples + held_out}), tok)
    ids, mask = both.input_ids[len(calib):], both.attention_mask[len(calib):]
    if ids.shape[0] == 0:
        raise UserError(f"calibration source {calibration.source} has no text left after {len(calib)} sequences for "
                        "held-out measurement; lower --calib-samples or add text")
    held_batch = CalibBatch(input_ids=ids, attention_mask=mask, n_tokens=int(mask.sum()), n_docs=0,
                            requested=held_out)
    held = [(i, m) for i, m in held_batch.batches(8)]
    stats = obtain_stats(model, lambda: calib, src, calibration, opts, console)
    torch.manual_seed(0)
    return model, tok, calib, held, stats


def _write(out: Path, text: str, opts: Any, console: Any) -> list[dict[str, Any]]:
    """Run the winner's recipe into `out` (recipe.yaml beside its step folders)."""
    import yaml

    from moecompress.recipe import parse_recipe
    from moecompress.runner import run_recipe

    parsed = parse_recipe(yaml.safe_load(text), text)
    steps = {f"{i:02d}-{cfg.name}" for i, cfg in enumerate(parsed.passes, start=1)}
    if out.is_dir() and opts.overwrite and world().is_main:  # a previous fit's steps that this winner does not have would mislead
        import shutil

        for stale in out.glob("[0-9][0-9]-*"):
            if stale.is_dir() and stale.name not in steps and (stale / "report.json").is_file():
                shutil.rmtree(stale)
    return run_recipe(parsed, out, opts=opts, console=console)


def _h(n: float) -> str:
    from moecompress.report import human_bytes

    return human_bytes(n)

