"""Expert chunks: a decoder layer larger than the memory budget, run and written a few experts at a time.

Given the routing, routed experts are independent: the engine materialises a layer without its routed experts
(attention, norms, router, shared experts), and the experts module carries an ``ExpertChunks`` reader instead
of weights (its fused parameters stay on ``meta``, with their shapes). The experts forward (the statistics tap
implementation, ``calib.collect``) sorts the routed (token, expert) pairs by expert as always, then computes
them chunk by chunk, holding one chunk's weights at a time; the outputs are the same pairs in the same order,
so the layer output and every statistic are what the whole layer gives. Surgery that selects experts
(``surgery.keep_experts``) selects the reader's source ids too, so a pruned layer reads and writes exactly the
kept experts; ``write_chunked_experts`` emits them chunk by chunk. Passes that rewrite expert weights (merging,
quantization, neuron pruning) declare ``LayerwisePass.chunks`` false and are refused with the budget they need.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

_NUMBERED = re.compile(r"\.experts\.(\d+)\.")


@dataclass
class ChunkMeter:
    """What expert chunks held: the instrumented peak (bytes of expert weights in memory at once)."""

    held: int = 0
    peak: int = 0
    chunks_read: int = 0
    experts_read: int = 0

    def summary(self) -> dict[str, int]:
        return {"peak_expert_bytes": self.peak, "chunks_read": self.chunks_read, "experts_read": self.experts_read}


class ExpertChunks:
    """The routed experts of one layer, read from the shards `per_chunk` at a time by source expert id."""

    def __init__(self, load: Callable[[list[int]], dict[str, torch.Tensor]], num_experts: int, per_chunk: int,
                 meter: ChunkMeter) -> None:
        self._load = load
        self.ids = list(range(num_experts))  # source expert id of each current position
        self.per_chunk = max(1, per_chunk)
        self.meter = meter

    def select(self, index: Sequence[int]) -> None:
        """Follow ``keep_experts``: position j now holds the expert that was at position index[j]."""
        self.ids = [self.ids[int(j)] for j in index]

    def ranges(self) -> list[tuple[int, int]]:
        n = len(self.ids)
        return [(p, min(n, p + self.per_chunk)) for p in range(0, n, self.per_chunk)]

    @contextlib.contextmanager
    def holding(self, module: torch.nn.Module, p0: int, p1: int) -> Iterator[dict[str, torch.Tensor]]:
        """Experts at positions p0..p1 loaded into `module` (as experts 0..p1-p0) for the duration."""
        tensors = self._load(self.ids[p0:p1])
        saved = {n: module._parameters[n] for n in tensors}
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.meter.held += nbytes
        self.meter.peak = max(self.meter.peak, self.meter.held)
        self.meter.chunks_read += 1
        self.meter.experts_read += p1 - p0
        try:
            for n, t in tensors.items():
                module._parameters[n] = torch.nn.Parameter(t, requires_grad=False)
            yield tensors
        finally:
            module._parameters.update(saved)
            self.meter.held -= nbytes
            del tensors


def chunks_of(module: torch.nn.Module) -> ExpertChunks | None:
    return module.__dict__.get("expert_chunks")


def chunked_expert_outputs(module: torch.nn.Module, chunks: ExpertChunks, x_sorted: torch.Tensor,
                           eid_sorted: torch.Tensor, counts: torch.Tensor,
                           compute: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """`compute(module, x, eid, counts)` over pairs sorted by expert, one chunk of experts loaded at a time.

    The chunks' rows are consecutive in the sorted order, so concatenating their outputs gives the same rows
    in the same order as the whole layer would."""
    starts = [0, *torch.cumsum(counts, 0).tolist()]
    ys, acts = [], []
    for p0, p1 in chunks.ranges():
        a, b = starts[p0], starts[p1]
        if a == b and (ys or p1 < len(chunks.ids)):
            continue  # no pair routed here (the last chunk still runs when nothing ran, for empty inputs)
        with chunks.holding(module, p0, p1):
            y, act = compute(module, x_sorted[a:b], eid_sorted[a:b] - p0, counts[p0:p1])
        ys.append(y)
        acts.append(act)
    return (ys[0], acts[0]) if len(ys) == 1 else (torch.cat(ys), torch.cat(acts))


def write_chunked_experts(writer: Any, model: torch.nn.Module, module: torch.nn.Module, prefix: str) -> None:
    """Emit a chunked layer's routed experts in the on-disk layout, chunk by chunk.

    Per-expert layouts (``experts.<e>.gate_proj.weight``): each chunk's experts are renumbered to their
    positions and written as they come. Fused on-disk tensors get their room reserved in the shard once and
    are filled a chunk of rows at a time."""
    from moecompress.engine.sink import on_disk_state

    chunks = chunks_of(module)
    assert chunks is not None
    total = len(chunks.ids)
    for p0, p1 in chunks.ranges():
        with chunks.holding(module, p0, p1) as tensors:
            disk = on_disk_state(model, {prefix + n: t for n, t in tensors.items()})
        numbered, fused = {}, {}
        for key, t in disk.items():
            m = _NUMBERED.search(key)
            if m:
                numbered[key[: m.start(1)] + str(p0 + int(m.group(1))) + key[m.end(1):]] = t
            else:
                if t.shape[0] != p1 - p0:
                    raise RuntimeError(f"{key}: cannot write a chunk of experts into shape {tuple(t.shape)}")
                fused[key] = t
        writer.add(numbered)
        if fused:
            if p0 == 0:
                writer.reserve({k: ((total, *t.shape[1:]), t.dtype) for k, t in fused.items()})
            for key, t in fused.items():
                writer.fill(key, p0, t)
        del disk, numbered, fused
