"""Heal's targets recorded by the statistics sweep, so heal need not run the original model a second time.

Heal fits each compressed MoE block to the original block's outputs on the calibration tokens and needs the
original model's last boundary for the held-out calibration KL. The statistics sweep already runs the original
model over the same calibration batches, one layer at a time; when the pass asks for heal it hands each MoE
block's inputs and outputs (real tokens) and the last boundary to a ``RecordedTargets``, which writes them to
files in the run's spill folder (plain file writes, not a memory map: nothing of it stays resident) — or, up to
`hold_bytes` (a small share of the engine's budget), keeps them in RAM: on the trained reference writing and
reading the files cost ~0.4 s of heal's ~4 s. The heal then reads one layer's targets when it reaches that layer.
Without a recording (statistics from the cache, a data-parallel run whose ranks each saw a share) heal runs the
original layers itself, as before.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

Batches = list[tuple[torch.Tensor, torch.Tensor]]


class RecordedTargets:
    """Per MoE layer: the original block's inputs and outputs at real tokens ([N, H] each, activations' dtype);
    the original last boundary of every batch; the batches they were recorded on."""

    def __init__(self, folder: Path, hold_bytes: int = 0) -> None:
        self.folder = Path(folder)
        self.hold_bytes = hold_bytes
        self.batches: Batches | None = None
        self.layers: set[int] = set()
        self.held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.complete = False

    def start(self, batches: Batches) -> None:
        """A new recording over `batches` (a sweep that starts again forgets the last one)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.batches = [(ids.clone(), mask.clone()) for ids, mask in batches]
        self.layers.clear()
        self.held.clear()
        self.complete = False

    def record_layer(self, index: int, x: torch.Tensor, y: torch.Tensor) -> None:
        held = sum(a.nbytes + b.nbytes for a, b in self.held.values())
        if held + x.nbytes + y.nbytes <= self.hold_bytes:
            self.held[index] = (x, y)
        else:
            save_file({"x": x.contiguous(), "y": y.contiguous()}, str(self.folder / f"layer-{index}.safetensors"))
        self.layers.add(index)

    def record_last(self, boundary: list[torch.Tensor]) -> None:
        save_file({str(b): h.contiguous() for b, h in enumerate(boundary)}, str(self.folder / "last.safetensors"))
        self.complete = True

    def serves(self, batches: Batches) -> bool:
        """Whether a finished recording was made on exactly these batches (same split, same tokens)."""
        mine = self.batches
        return (self.complete and mine is not None and len(mine) == len(batches)
                and all(torch.equal(a, c) and torch.equal(b, d)  # equal also means same shape
                        for (a, b), (c, d) in zip(mine, batches, strict=True)))

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block inputs, block outputs) of MoE layer `index` (a finished recording has every MoE layer)."""
        if index not in self.layers:
            raise KeyError(f"MoE layer {index} was not recorded by the statistics sweep")
        if index in self.held:
            return self.held[index]
        t = load_file(str(self.folder / f"layer-{index}.safetensors"))
        return t["x"], t["y"]

    def last(self, b: int) -> torch.Tensor:
        with safe_open(str(self.folder / "last.safetensors"), framework="pt") as f:
            return f.get_tensor(str(b))
