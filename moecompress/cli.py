"""The `moecompress` command line: thin commands over the library.

Every user-fixable problem surfaces as one line on stderr and exit code 2 (``UserError``); the science
lives in recipes and pass configs, the machinery (output dir, dtype, overwrite) in options here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from moecompress.errors import UserError  # noqa: E402

app = typer.Typer(
    name="moecompress",
    help="Make Mixture-of-Experts checkpoints smaller: prune, merge and quantize experts into checkpoints that "
    "load with plain transformers, and measure what it cost.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Compress MoE checkpoints. Start with `moecompress zoo reference --out ref` and `moecompress inspect ref`."""


def quiet_transformers() -> None:
    """transformers' per-file progress bars and advisory warnings drown our own output."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command("inspect")
def inspect_cmd(
    model: Path = typer.Argument(..., help="Checkpoint folder (config.json + *.safetensors)."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
    tensors: bool = typer.Option(False, "--tensors", help="Also list every tensor with its dtype, bits and bytes."),
) -> None:
    """Show family, routing, experts per layer and where the parameters and bytes are (no weights load)."""
    from moecompress.inspect import inspect_checkpoint, render

    ins = inspect_checkpoint(model)
    if json_out:
        data = ins.model_dump()
        if not tensors:
            data.pop("tensors")
        typer.echo(__import__("json").dumps(data, indent=2))
        return
    render(ins, console)
    if tensors:
        from rich.table import Table

        t = Table(title="tensors")
        for col in ("name", "group", "dtype", "shape", "bits", "bytes"):
            t.add_column(col)
        for ti in ins.tensors:
            t.add_row(ti.name, ti.group, ti.dtype, "x".join(map(str, ti.shape)), f"{ti.bits:g}", str(ti.bytes))
        console.print(t)


def zoo_tiny(
    family: str = typer.Argument(..., help="A transformers model_type, e.g. qwen3_moe, mixtral, deepseek_v3."),
    out: Path = typer.Option(..., "--out", help="Folder to write the checkpoint into."),
    seed: int = typer.Option(0, help="Random seed for the weights."),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
) -> None:
    """Write a tiny random model of FAMILY (plumbing tests only: random weights say nothing about quality)."""
    quiet_transformers()
    from moecompress.io.checkpoint import write_checkpoint
    from moecompress.zoo.tiny import tiny

    model, tok = tiny(family, seed=seed)
    write_checkpoint(model, tok, out, source=None, overwrite=overwrite,
                     pass_entry={"pass": "zoo.tiny", "config": {"family": family, "seed": seed}})
    console.print(f"wrote tiny {family} to {out}")


def _register_optional() -> None:
    """Attach commands whose modules live elsewhere in the package (kept out of this file on purpose)."""
    from importlib import import_module

    for module, attr, name in [
        ("moecompress.zoo.cli", "zoo_app", "zoo"),
    ]:
        try:
            sub = getattr(import_module(module), attr)
        except (ImportError, AttributeError):
            sub = typer.Typer(help="Models built in code: tiny random ones and the trained reference MoE.")
        if name == "zoo":
            sub.command("tiny")(zoo_tiny)
        app.add_typer(sub, name=name)
    for module, attr, name in [
        ("moecompress.eval", "eval_command", "eval"),
        ("moecompress.io.hub", "push_command", "push"),
    ]:
        try:
            fn = getattr(import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        app.command(name)(fn)


_register_optional()


def main() -> None:
    """Console-script entry: one clear line and exit 2 for user errors."""
    try:
        app()  # standalone: usage errors already exit 2 with a message
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
