"""Layer loop: calibration hidden states flow through the decoder one layer at a time.

The hidden states at the current layer boundary, for every calibration batch, live in an ``ActivationCache``
(CPU RAM up to a budget, then a memory-mapped file on disk). The keyword arguments each decoder layer receives
(attention masks per layer type, rotary position embeddings, position ids) are captured once per batch by
running the model's own forward with every decoder layer short-circuited, so families with several mask kinds
(sliding / chunked / linear attention) get exactly what the full forward would give them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moecompress.arch.adapter import decoder_layers
from moecompress.arch.discover import text_model
from moecompress.engine.source import REST, ModelSource


class _Stop(Exception):
    pass


class NotStreamable(Exception):
    """The family's decoder layers hand the next layer more than hidden states (glm_moe_dsa and hy_v4 pass
    their sparse-attention indexer's top-k on; Inkling-2 hands every layer the stacked outputs of earlier
    blocks; looped stacks run a layer more than once), so a layer cannot run from a cached boundary alone."""


class ActivationCache:
    """Hidden states [B, L, H] per batch; in RAM up to `budget` bytes, the rest in a disk memmap under `spill_dir`."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, budget: int,
                 spill_dir: Path | None = None) -> None:
        self.shapes = [tuple(s) for s in shapes]
        self.dtype = dtype
        item = torch.empty((), dtype=dtype).element_size()
        sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self.nbytes = sum(sizes) * item
        self.on_disk = self.nbytes > budget
        self._slots: list[torch.Tensor]
        if self.on_disk:
            folder = Path(spill_dir) if spill_dir else Path(tempfile.gettempdir())
            folder.mkdir(parents=True, exist_ok=True)
            self._file = tempfile.NamedTemporaryFile(prefix="moecompress-acts-", suffix=".bin", dir=folder)
            self._file.truncate(sum(sizes) * item)
            flat = torch.from_file(self._file.name, shared=True, size=sum(sizes), dtype=dtype)
            self._slots, start = [], 0
            for s, n in zip(self.shapes, sizes, strict=True):
                self._slots.append(flat[start : start + n].view(s))
                start += n
        else:
            self._slots = [torch.empty(s, dtype=dtype) for s in self.shapes]

    def __len__(self) -> int:
        return len(self._slots)

    def get(self, b: int) -> torch.Tensor:
        return self._slots[b]

    def set(self, b: int, value: torch.Tensor) -> None:
        self._slots[b].copy_(value.detach().to("cpu", self.dtype))

    def close(self) -> None:
        self._slots = []
        if self.on_disk:
            self._file.close()


@dataclass
class Flow:
    """Calibration batches at the current layer boundary plus what each layer is called with."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (input_ids, attention_mask) on CPU
    acts: ActivationCache
    layer_kwargs: list[dict[int, tuple[tuple, dict]]]  # per batch: layer index → (args, kwargs)
    device: torch.device
    position: int = 0  # index of the next layer to run
    extra: dict[str, Any] = field(default_factory=dict)

    def masks(self) -> list[torch.Tensor]:
        return [m.reshape(-1).bool() for _, m in self.batches]

    def close(self) -> None:
        self.acts.close()


_CHECKED = "_moecompress_streamable"  # set on a model once its layers were found to read only hidden states


def start_flow(source: ModelSource, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, budget: int,
               spill_dir: Path | None = None) -> Flow:
    """Embed every batch (REST must be materialised) and capture each layer's call arguments."""
    model = source.model
    layers = decoder_layers(model)
    shapes, kwargs_all, first = [], [], []
    for b, (ids, mask) in enumerate(batches):
        captured, store = _capture(model, layers, ids.to(source.device), mask.to(source.device))
        if b == 0:
            _check_chain(model, layers, ids.to(source.device), mask.to(source.device), captured)
        h = store["h0"]
        shapes.append(tuple(h.shape))
        first.append(h)
        kwargs_all.append(captured)
    acts = ActivationCache(shapes, first[0].dtype if first else source.dtype, budget, spill_dir)
    for b, h in enumerate(first):
        acts.set(b, h)
    return Flow(batches=[(i.cpu(), m.cpu()) for i, m in batches], acts=acts, layer_kwargs=kwargs_all,
                device=source.device)


def _check_chain(model: torch.nn.Module, layers: torch.nn.ModuleList, ids: torch.Tensor, mask: torch.Tensor,
                 captured: dict[int, tuple[tuple, dict]]) -> None:
    """NotStreamable unless every layer's arguments and the head depend on the previous layer's hidden states alone
    (once per model: a property of the architecture, so later flows of this model skip it)."""
    if model.__dict__.get(_CHECKED):
        return
    shifted, _ = _capture(model, layers, ids, mask, shift=1.0)
    if not _same(captured, shifted) or not _head_reads_last_only(model, layers, ids, mask):
        raise NotStreamable(f"{type(model).__name__}: its decoder layers or head receive state built from "
                            "earlier layers' outputs, not only the previous layer's hidden states")
    model.__dict__[_CHECKED] = True


def layers_chain(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether the decoder layers can run one at a time from the hidden states between them (what every layer
    walk needs); False for families whose layers hand the next one more (glm_moe_dsa, ZAYA, looped stacks)."""
    layers = decoder_layers(model)
    try:
        captured, _ = _capture(model, layers, ids, mask)
        _check_chain(model, layers, ids, mask, captured)
    except NotStreamable:
        return False
    return True


def _capture(model: torch.nn.Module, layers: torch.nn.ModuleList, ids: torch.Tensor, mask: torch.Tensor,
             shift: float = 0.0) -> tuple[dict[int, tuple[tuple, dict]], dict[str, torch.Tensor]]:
    """Each layer's call arguments in one forward whose layers return their input (+ `shift`)."""
    captured: dict[int, tuple[tuple, dict]] = {}
    store: dict[str, torch.Tensor] = {}
    try:
        with _layer_forwards(model, layers, [_catcher(i, len(layers), captured, store, shift)
                                             for i in range(len(layers))]), torch.no_grad():
            text_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    return captured, store


@contextmanager
def _layer_forwards(model: torch.nn.Module, layers: torch.nn.ModuleList, forwards: list[Callable[..., Any]]
                    ) -> Iterator[None]:
    """Run the model with each decoder layer's forward replaced (restored after); a model that unpacks more
    than hidden states from its layers is not streamable."""
    originals = [layer.__dict__.get("forward") for layer in layers]
    for layer, fn in zip(layers, forwards, strict=True):
        layer.forward = fn
    try:
        yield
    except (ValueError, TypeError) as exc:
        raise NotStreamable(f"{type(model).__name__}: its decoder layers return more than hidden states "
                            f"({str(exc).splitlines()[0][:80]})") from exc
    finally:
        for layer, orig in zip(layers, originals, strict=True):
            if orig is None:
                del layer.forward
            else:
                layer.forward = orig


def _catcher(index: int, count: int, captured: dict, store: dict, shift: float = 0.0) -> Callable[..., Any]:
    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if index in captured:
            raise NotStreamable(f"decoder layer {index} runs more than once per forward (a looped stack)")
        if index == 0:
            store["h0"] = hidden_states.detach()
        captured[index] = (args, kwargs)
        if index == count - 1:
            raise _Stop
        return hidden_states + shift if shift else hidden_states

    return forward


@torch.no_grad()
def _head_reads_last_only(model: torch.nn.Module, layers: torch.nn.ModuleList, ids: torch.Tensor,
                          mask: torch.Tensor) -> bool:
    """Whether the logits depend on the last layer's output alone: two forwards whose last outputs are equal
    but whose intermediate ones differ (the shift added by the first layer, or by the last) give equal logits."""
    n = len(layers)
    if n < 2:
        return True
    logits = []
    for shifted in (0, n - 1):
        forwards = [(lambda h, *a, **k: h + 1.0) if i == shifted else (lambda h, *a, **k: h) for i in range(n)]
        with _layer_forwards(model, layers, forwards):
            out = text_model(model)(input_ids=ids, attention_mask=mask, use_cache=False)
        logits.append(out.logits.float())
    # the same computation twice: equal up to kernel nondeterminism; a real dependency moves logits far more
    tol = 1e-5 * float(logits[0].abs().max().clamp_min(1.0))
    return bool(((logits[0] - logits[1]).abs() <= tol).all())


def _same(a: Any, b: Any) -> bool:
    """Captured layer arguments equal (tensors by value; other objects by type, as caches are rebuilt each call)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and bool(torch.equal(a, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b)


def layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_layer(flow: Flow, index: int, layer: torch.nn.Module, *, before_batch: Callable[[int], None] | None = None,
              update: bool = True) -> None:
    """Push every batch through decoder layer `index`; its outputs replace the cache (the next boundary)."""
    for b in range(len(flow.acts)):
        if before_batch is not None:
            before_batch(b)
        args, kwargs = flow.layer_kwargs[b][index]
        h = flow.acts.get(b).to(flow.device)
        out = layer_output(layer(h, *args, **kwargs))
        if update:
            flow.acts.set(b, out)
    if update:
        flow.position = index + 1


@torch.no_grad()
def head_logits(source: ModelSource, batch: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """Logits from last-boundary hidden states (REST materialised), through the model's own forward tail.

    Every decoder layer is short-circuited and the first one hands back `hidden`, so family details after the
    layers (final norm, logit scaling or soft-capping) are applied by the model's code, not restated here.
    """
    model = source.model
    layers = decoder_layers(model)
    hidden = hidden.to(source.device)
    for i, layer in enumerate(layers):
        layer.forward = (lambda h, *a, **k: hidden) if i == 0 else (lambda h, *a, **k: h)
    try:
        ids, mask = batch
        out = text_model(model)(input_ids=ids.to(source.device), attention_mask=mask.to(source.device), use_cache=False)
    except (ValueError, TypeError) as exc:  # the model unpacked more than hidden states from a layer
        raise NotStreamable(f"{type(model).__name__}: its decoder layers return more than hidden states "
                            f"({str(exc).splitlines()[0][:80]})") from exc
    finally:
        for layer in layers:
            del layer.forward
    return out.logits.float().cpu()


def stream_forward(source: ModelSource, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                   budget: int = 1 << 30, progress: Callable[[int], None] | None = None,
                   on_layer: Callable[[int, torch.nn.Module], None] | None = None) -> list[torch.Tensor]:
    """Logits of `batches` computed one layer at a time from the source (verification / streamed eval)."""
    source.materialise(REST)
    flow = start_flow(source, batches, budget=budget)
    try:
        for i in range(source.num_layers):
            layer = source.materialise(i)
            if on_layer is not None:
                on_layer(i, layer)
            run_layer(flow, i, layer)
            source.release(i)
            if progress is not None:
                progress(i)
        return [head_logits(source, flow.batches[b], flow.acts.get(b)) for b in range(len(flow.acts))]
    finally:
        flow.close()
