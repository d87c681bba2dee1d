"""`moecompress zoo …`: models built in code. The lead mounts `zoo_app` and adds `tiny` to it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from moecompress.errors import UserError

zoo_app = typer.Typer(
    help="Models built in code: tiny random ones (plumbing) and the trained reference MoE (quality yardstick).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@zoo_app.callback()
def _zoo() -> None:
    """Models built in code. `reference` trains the quality yardstick (~9 min on 2 CPU cores)."""


@zoo_app.command("reference")
def reference_cmd(
    out: Path = typer.Option(..., "--out", help="Folder for the model, tokenizer, data/ and reference.json."),
    seed: int = typer.Option(0, help="Seed for corpus, tokenizer data order and weights."),
    minutes: float = typer.Option(9.0, help="Training time budget in minutes (2 CPU cores: ~9 is enough)."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many steps (if earlier)."),
    text: Path | None = typer.Option(None, "--text", help="Also train on this UTF-8 text file (domain 'text')."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
) -> None:
    """Train the reference Qwen3-MoE on a generated multi-domain corpus and report its quality."""
    _quiet_transformers()
    build_reference_folder(out, seed=seed, minutes=minutes, max_steps=max_steps, text=text, overwrite=overwrite,
                           console=Console())
    typer.echo(f"wrote reference model to {out}")


def build_reference_folder(out: Path, *, seed: int = 0, minutes: float = 9.0, max_steps: int | None = None,
                           text: Path | None = None, overwrite: bool = False, console: Any = None) -> None:
    """Train the reference into a temp folder beside `out` and rename it into place (never a half-built model).

    A progress bar follows the training budget; the corpus/model/evaluation lines are printed above it.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from moecompress.io.checkpoint import prepare_output, publish, temp_dir_beside
    from moecompress.zoo.reference import build_reference

    if minutes <= 0:
        raise UserError(f"--minutes must be > 0, got {minutes}")
    if text is not None and not text.is_file():
        raise UserError(f"--text {text} is not a file; pass an existing UTF-8 text file")
    prepare_output(out, overwrite=overwrite)
    tmp = temp_dir_beside(out)
    try:
        with Progress(TextColumn("training the reference MoE"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=console is None,
                      transient=True) as prog:
            task = prog.add_task("train", total=1.0)
            build_reference(tmp, seed=seed, minutes=minutes, max_steps=max_steps, text_file=text,
                            log=(console.print if console is not None else (lambda _s: None)),
                            on_progress=lambda f: prog.update(task, completed=f))
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # reference.json recorded the temp folder it was built in; point it at the final place.
    result_file = out / "reference.json"
    result = json.loads(result_file.read_text())
    result["out_dir"] = str(out)
    result_file.write_text(json.dumps(result, indent=2) + "\n")


@zoo_app.command("miniature")
def miniature_cmd(
    config: Path = typer.Argument(..., help="A config.json of a real checkpoint (or the folder holding it)."),
    out: Path = typer.Option(..., "--out", help="Folder for the miniature checkpoint and its tokenizer."),
    seed: int = typer.Option(0, help="Seed for the random weights."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
) -> None:
    """Write a random-weight miniature of a real checkpoint's CONFIG: same model_type, nesting, layer pattern,
    dense-first layers, shared experts, routing groups, MTP layers (weights in the family's key layout), tied
    embeddings, on-disk layout and dtype — at toy sizes (hidden 64, ≤16 experts, a few layers), so every pass can
    be tried on the structure in seconds."""
    from moecompress.zoo.miniature import write_miniature

    _quiet_transformers()
    info = write_miniature(config, out, seed=seed, overwrite=overwrite)
    mtp = f", {info['mtp_tensors']} MTP tensors" if info.get("mtp_tensors") else ""
    typer.echo(f"wrote {info['class']} miniature ({info['params']:,} params{mtp}, {info['dtype']}) of "
               f"{info['model_type']} to {out}")


def _quiet_transformers() -> None:
    """Per-file progress bars and advisory warnings would drown the training log."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
