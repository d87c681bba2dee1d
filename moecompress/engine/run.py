"""The engine: one way to run a layerwise pass on a checkpoint, whether it fits in memory or not.

Sweep 1 (statistics, only on a cache miss): calibration hidden states flow through the decoder one layer at a
time from the source shards while the statistics tap observes each MoE layer. Sweep 2 (compress + write): each
decoder layer is read, the pass decides and applies surgery to it, a probe batch flows through the compressed
layer (the reference logits for verification), and the layer is written to the output shards and released.
Verification streams the written checkpoint the same way (keys, shapes, dtypes against the meta model of the
written config, then the probe's logits); a vanilla ``from_pretrained`` reload is added when the model fits.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from moecompress.calib.layers import block_io
from moecompress.calib.stats import Stats, StatsWriter
from moecompress.engine.chunks import write_chunked_experts
from moecompress.engine.loop import head_logits, run_layer, start_flow, stream_forward
from moecompress.engine.reader import reader_for
from moecompress.engine.sink import ShapeRecorder, ShardWriter, on_disk_state, parse_size
from moecompress.engine.source import (
    REST,
    ModelSource,
    prefer_mmap_for_large_blocks,
    return_freed_memory,
    weight_allocations,
)
from moecompress.engine.targets import RecordedTargets
from moecompress.errors import UserError
from moecompress.io.checkpoint import (
    checkpoint_bytes,
    probe_input,
    temp_dir_beside,
    verify_reload,
    write_beside_weights,
)
from moecompress.io.mtp import MTP_PART
from moecompress.passes.base import LayerwisePass, PassContext, observe_and_apply

DEFAULT_SHARD = "5GB"


def memory_budget(max_memory: str | int | None) -> int:
    """Bytes of CPU RAM the engine may use: --max-memory, else 3/4 of what the machine has available now."""
    if max_memory is not None:
        n = parse_size(max_memory)
        if n <= 0:
            raise UserError(f"--max-memory must be positive, got {max_memory!r}")
        return n
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 * 3 // 4
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def pick_device(device: str | None) -> str:
    """cpu | cuda | auto (cuda when available)."""
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device must be cpu, cuda or auto, got {device!r}")
    return device


@contextmanager
def sweep_progress(console: Any, label: str, total: int) -> Iterator[Callable[[], None]]:
    """One progress bar per sweep over decoder layers (with ETA)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("layers"), TimeRemainingColumn(),
                  console=console, disable=console is None, transient=True) as prog:
        task = prog.add_task(label, total=total)
        yield lambda: prog.advance(task, 1)


def stream_stats(source: ModelSource, batches: list[tuple[torch.Tensor, torch.Tensor]], *, total_tokens: int,
                 sample_tokens: int, budget: int, spill_dir: Path | None = None, console: Any = None,
                 meta: dict[str, Any] | None = None, first_token: int = 0, out: Path | None = None,
                 targets: RecordedTargets | None = None) -> Stats:
    """The statistics ``collect_stats`` gives, computed one decoder layer at a time from the shards.

    `out`: a statistics folder to write each MoE layer's statistics to as soon as its layer has run (then freed:
    memory stays flat in the layer count); the result then reads them back from there on demand. Without it
    they are returned in memory (a data-parallel rank's share, which `reduce_stats` still adds up).
    `targets`: each MoE block's inputs and outputs and the last boundary are recorded too (heal's targets)."""
    from moecompress.calib.collect import collecting
    from moecompress.heal.walk import real_tokens

    t0 = time.perf_counter()
    source.materialise(REST)
    flow = start_flow(source, batches, budget=budget, spill_dir=spill_dir)
    masks = flow.masks()
    if targets is not None:
        targets.start(batches)
    writer = StatsWriter(out) if out is not None else None
    try:
        with torch.inference_mode(), collecting(source.model, sample_tokens, total_tokens, first_token) as taps, \
                sweep_progress(console, "collecting statistics", source.num_layers) as advance:
            for i in range(source.num_layers):
                layer = source.materialise(i)

                def set_mask(b: int) -> None:
                    for tap in taps.values():
                        tap.mask = masks[b].to(flow.device)

                moe = source.moe_layer(i) if targets is not None else None
                if moe is None:
                    run_layer(flow, i, layer, before_batch=set_mask)
                else:
                    with block_io(moe.block) as (ins, outs):
                        run_layer(flow, i, layer, before_batch=set_mask)
                    targets.record_layer(i, real_tokens(ins, masks), real_tokens(outs, masks))
                    del ins, outs
                source.release(i)
                if writer is not None and i in taps:  # layer i never runs again in this sweep
                    writer.add(i, taps[i].take())
                advance()
            if writer is None:
                layers = {idx: tap.finish() for idx, tap in taps.items()}
            else:
                missing = sorted(set(taps) - {int(k) for k in writer.entries})
                if missing:
                    raise RuntimeError(f"statistics sweep never ran MoE layers {missing}")
            if targets is not None:
                targets.record_last([flow.acts.get(b) for b in range(len(flow.acts))])
    finally:
        flow.close()
    info = dict(meta or {})
    info["collect_seconds"] = round(time.perf_counter() - t0, 3)
    info["engine"] = "streamed"
    return writer.finish(info) if writer is not None else Stats(layers=layers, meta=info)


def layer_visitor(source: ModelSource) -> Callable[[Callable[[int, Any], Any], bool], dict[int, Any]]:
    """``PassContext.for_each_layer`` for a streamed model: each layer read, visited, released in turn."""

    def visit(fn: Callable[[int, Any], Any], weights: bool) -> dict[int, Any]:
        out: dict[int, Any] = {}
        for i in range(source.num_layers):
            layer = source.materialise(i) if weights else source.layer(i)
            try:
                out[i] = fn(i, layer)
            finally:
                if weights:
                    source.release(i)
        return out

    return visit


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compress_streamed(lp: LayerwisePass, ctx: PassContext, source: ModelSource, tmp: Path | None, *,
                      max_shard_bytes: int, budget: int = 1 << 62, spill_dir: Path | None = None,
                      console: Any = None, heal: Callable[[], Any] | None = None
                      ) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Sweep 2: plan, then per layer read → (observe) → apply → probe → write → release.

    Returns (details, probe ids, probe logits of the compressed model, config keys to add). `tmp` None writes
    nothing (a data-parallel rank other than 0 runs every layer for the collectives, rank 0 writes). `heal()`
    starts a ``StreamedHeal`` (engine/heal.py) that repairs each layer right after its surgery; its report is
    ``details["heal"]``.
    """
    plan = lp.plan(ctx)
    source.hold = False  # layers held by the sweeps before (statistics, gradients) are released once written
    text_config = source.config.get_text_config() if hasattr(source.config, "get_text_config") else source.config
    ids = probe_input(text_config.vocab_size)
    probe = [(ids, torch.ones_like(ids))]
    writer = ShardWriter(tmp, max_shard_bytes) if tmp is not None else ShapeRecorder()
    source.materialise(REST)
    flow = start_flow(source, probe, budget=1 << 62)
    calib = None
    if lp.calibration is not None:
        calib = start_flow(source, lp.calibration(ctx, plan), budget=budget, spill_dir=spill_dir)
    per_layer: dict[int, dict[str, Any]] = {}
    healer = heal() if heal is not None else None
    try:
        with sweep_progress(console, f"{ctx.config.name}: compress + write", source.num_layers) as advance:
            for i in range(source.num_layers):
                layer = source.materialise(i)
                # heal computes on the calibration tokens under the compute threshold (with 1 MiB its token-size
                # temporaries each paid an mmap: (b) ~1.7x slower on the reference), then a trim hands back what it
                # freed. 20-layer stream bench, prune --heal: 1.17 GiB under the mmap rule, 1.27 GiB under the compute
                # threshold while the fitted down projections were stacked before the write, 1.13 GiB now that each
                # is written in place on its own
                if healer is not None:
                    healer.before_surgery(i, layer)
                # surgery with mmap-backed blocks (merge's apply left ~0.3 GiB in glibc's heap on a 198 MiB
                # layer otherwise). A pass that observes the calibration flow (GPTQ) runs its forwards under the
                # compute threshold and its apply (the solves) under the mmap rule: on the 20-layer stream bench
                # GPTQ peaked at 1.31 GiB with solves under the compute threshold, 1.15 GiB under the mmap rule
                # (and 16 MiB Hessian stacks: 1.02 GiB), 377 → 510–573 s: page faults on every fresh block
                with weight_allocations(lp.observe is None):
                    info = observe_and_apply(lp, ctx, plan, i, layer, calib, around_apply=weight_allocations)
                if healer is not None:
                    healer.after_surgery(i, layer, info)
                    return_freed_memory()  # what heal's fits freed goes back to the OS before the write
                if info is not None:
                    per_layer[i] = info
                run_layer(flow, i, layer)
                # the write with mmap-backed blocks too: GPTQ's emit packs and checks each of ~100 linears, and
                # its MiB-size temporaries between the kept packed tensors grew glibc's heap by ~0.2 GiB a layer
                with weight_allocations(True):
                    state = on_disk_state(source.model, source.state_of(i))  # a chunked layer: all but its experts
                    writer.add(lp.emit(ctx, plan, i, state) if lp.emit is not None else state)
                    del state  # its per-expert views hold the layer's tensors: not alive while the next is read
                if source.chunked(i):
                    moe = source.moe_layer(i)
                    write_chunked_experts(writer, source.model, moe.experts, source.experts_prefix(i))
                source.release(i)
                advance()
        logits = head_logits(source, probe[0], flow.acts.get(0))
        heal_kl = healer.calibration_kl() if healer is not None else None
    finally:
        flow.close()
        if calib is not None:
            calib.close()
        if healer is not None:
            healer.close()
    details = lp.finish(ctx, plan, per_layer)
    if healer is not None:
        details["heal"] = healer.report()
        details["calibration_kl"] = heal_kl
    writer.add(on_disk_state(source.model, source.state_of(REST)))
    writer.finish()
    update = lp.config_update(ctx, plan, writer.shapes) if lp.config_update is not None else {}
    return details, ids, logits, update


def write_metadata(source: ModelSource, tokenizer: Any, tmp: Path, *, src: Path, pass_entry: dict[str, Any],
                   extra_files: dict[str, str | bytes] | None, config_update: dict[str, Any] | None = None,
                   hub: dict[str, str] | None = None, mtp: Any = "keep") -> None:
    """config (as the pass left it, plus `config_update`), generation config, tokenizer, MTP layers (`mtp`: keep |
    drop or an ``MTPRequest``; read from `src`), provenance, extras."""
    config = source.model.config
    config.dtype = source.dtype
    config.architectures = [type(source.model).__name__]
    config.save_pretrained(tmp)
    if config_update:
        cfg_file = tmp / "config.json"
        data = json.loads(cfg_file.read_text())
        data.update(config_update)
        cfg_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    gen = Path(src) / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, tmp / gen.name)
    write_beside_weights(tmp, tokenizer=tokenizer, source=src, pass_entry=pass_entry, hub=hub,
                         extra_files=extra_files, mtp=mtp)


def verify_streamed(folder: Path, ids: torch.Tensor, reference: torch.Tensor, *, budget: int, device: str,
                    atol: float | None = None, full_reload: bool | None = None, console: Any = None,
                    reloaded: list[Any] | None = None) -> dict[str, Any]:
    """Written keys/shapes/dtypes equal the meta model of the written config, and the written checkpoint gives the
    compressed model's logits: through a vanilla reload when the model fits (it checks keys, shapes and logits as
    every user will load it), else through a streamed forward.

    `reloaded`: when given and the vanilla reload runs, the reloaded model is appended to it (the runner measures
    the calibration KL on it instead of loading the output a second time)."""
    reader = None
    if json.loads((Path(folder) / "config.json").read_text()).get("quantization_config"):
        from moecompress.engine.reader import PackedDequantReader

        reader = PackedDequantReader(Path(folder))
    vsrc = ModelSource(folder, device=device, reader=reader, budget=budget)
    assigned = {k for part in [REST, *range(vsrc.num_layers)] for k in vsrc.keys_of(part)}
    mtp = set(vsrc.keys_of(MTP_PART))  # exactly the MTP layers config.json announces (checked when written)
    stray = set(vsrc.reader.keys()) - assigned - mtp
    if stray:
        raise RuntimeError(f"written checkpoint has keys no module takes: {sorted(stray)[:3]}")
    summary: dict[str, Any] = {"keys_checked": len(assigned)}
    if mtp:
        summary["mtp_keys"] = len(mtp)
    if full_reload if full_reload is not None else checkpoint_bytes(folder) * 3 < budget:
        vsrc.close()
        summary.update(verify_reload(folder, reference, ids, atol=atol, keep=reloaded))
        summary["full_reload"] = True
        return summary
    with sweep_progress(console, "verifying (streamed)", vsrc.num_layers) as advance:
        got = stream_forward(vsrc, [(ids, torch.ones_like(ids))], budget=budget, progress=lambda _i: advance())[0]
    vsrc.close()
    diff = float((got - reference).abs().max())
    scale = float(reference.abs().max()) or 1.0
    tol = atol if atol is not None else 1e-4 * max(1.0, scale)
    if not diff <= tol:
        raise RuntimeError(f"streamed reload logits differ from the compressed model by {diff:.3g} (tolerance {tol:.3g})")
    summary["streamed_max_abs_logit_diff"] = diff
    if vsrc.chunked_layers:
        summary["expert_chunks"] = {"layers": len(vsrc.chunked_layers), **vsrc.meter.summary()}
    summary["full_reload"] = False
    summary["loading_info"] = {"missing_keys": 0, "unexpected_keys": 0, "mismatched_keys": 0}
    return summary


def open_source(src: Path, *, dtype: str | None, device: str | None, budget: int | None = None) -> ModelSource:
    """A ModelSource with the CLI's dtype/device options, errors as UserErrors; layers too large for `budget`
    are read in expert chunks."""
    dt: torch.dtype | None = None
    if dtype and dtype != "auto":
        dt = getattr(torch, dtype, None)
        if not isinstance(dt, torch.dtype):
            raise UserError(f"--dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    prefer_mmap_for_large_blocks()
    return ModelSource(Path(src), dtype=dt, device=pick_device(device), reader=reader_for(Path(src), dt),
                       budget=budget)


def spill_dir_beside(out: Path) -> Path:
    """Where activations spill to disk: beside the output (same filesystem the user chose), removed after."""
    return temp_dir_beside(out, "acts")


__all__ = ["DEFAULT_SHARD", "compress_streamed", "count_params", "memory_budget", "open_source", "pick_device",
           "spill_dir_beside", "stream_stats", "temp_dir_beside", "verify_streamed", "write_metadata"]
