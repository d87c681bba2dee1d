"""Shared test helpers: run the real CLI entry point in-process and build tiny checkpoints on disk."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from moecompress.io.checkpoint import write_checkpoint
from moecompress.zoo.tiny import tiny

WORDS = ("the quick brown fox jumps over a lazy dog while seven experts route every token to "
         "two of them and add the numbers 12 + 30 = 42 def f ( x ) : return x").split()


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Call `moecompress ARGS` exactly as the console script does; returns (exit code, stdout, stderr)."""
    from moecompress.cli import main

    old = sys.argv
    sys.argv = ["moecompress", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def tiny_checkpoint(path: Path, family: str = "qwen3_moe", seed: int = 0, **overrides) -> Path:
    model, tok = tiny(family, seed=seed, **overrides)
    write_checkpoint(model, tok, path, source=None, verify=False)
    return path


def calib_file(path: Path, n: int = 200, seed: int = 0, domain: str = "toy") -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"text": " ".join(rng.choices(WORDS, k=40)), "domain": domain}) + "\n")
    return path
