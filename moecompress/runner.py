"""Run passes: load → (statistics) → decide/surgery → write (temp dir, verified reload) → eval → report.

``run_pass`` is the unit (the CLI's prune/merge/quantize call it once); ``run_recipe`` chains passes into
``OUT/NN-pass/`` folders and resumes: a step whose ``report.json`` exists is finished and skipped, an
interrupted step left only a temp folder, which is discarded and redone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from moecompress.calib.stats import Stats
from moecompress.dist import peak_rss_mb, world
from moecompress.engine.targets import RecordedTargets
from moecompress.errors import UserError
from moecompress.io.checkpoint import (
    check_model_dir,
    checkpoint_bytes,
    load_model,
    prepare_output,
    publish,
    source_format,
    write_checkpoint,
)
from moecompress.io.locations import default_cache_root, default_calibration_source  # noqa: F401 (re-exported)
from moecompress.io.resolve import ResolvedModel, resolve_model
from moecompress.passes.base import PassConfig, PassContext, get_pass

REPORT = "report.json"


class RunOptions(BaseModel):
    """Machinery, not science: where and how to run (CLI options)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    overwrite: bool = False
    dtype: str | None = None
    stats_cache: Path | None = None
    sample_tokens: int = 2048
    verify: bool = True
    plots: bool = True
    device: str | None = None  # cpu | cuda | auto (engine)
    max_memory: str | None = None  # CPU RAM budget of the engine, e.g. "24GiB"; default: 3/4 of available
    max_shard_size: str = "5GB"
    revision: str | None = None  # branch, tag or commit when the model is a Hub id
    target: str | None = None  # "vllm": serving checks are errors, raised before anything loads
    ep_size: int | None = None  # expert-parallel size the output must divide by


def model_fingerprint(path: Path) -> str:
    """Identity of a checkpoint's content for caches (shared with the eval cache)."""
    from moecompress.eval import checkpoint_fingerprint

    return checkpoint_fingerprint(path)


def resolve_calibration(spec: Any, model_dir: Path) -> Any:
    from moecompress.calib.data import CalibSpec

    if spec is not None:
        return spec
    src = default_calibration_source(model_dir)
    if src is None:
        raise UserError("this pass needs calibration data: pass --calib (a local .txt/.jsonl/.parquet file or a "
                        "dataset name) or set `calibration:` in the recipe")
    return CalibSpec(source=str(src))


def mtp_request(cfg: PassConfig, get_calibration: Callable[[], Any], opts: RunOptions) -> Any:
    """What the writers do with the checkpoint's MTP layers (moecompress.io.mtp): the pass's --mtp, calibration
    batches for ranking their experts (None when the run has no calibration data), the shard size."""
    from moecompress.engine.sink import parse_size
    from moecompress.io.mtp import MTPRequest

    def batches() -> list[Any] | None:
        try:
            batch = get_calibration()
        except UserError:  # no calibration data: the data-free criterion, said so in the report
            return None
        return batch.forward_batches()

    from moecompress.engine.run import memory_budget

    return MTPRequest(mode=getattr(cfg, "mtp", "keep"), calibration=batches,
                      max_shard_bytes=parse_size(opts.max_shard_size), budget=memory_budget(opts.max_memory))


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def calibration_loader(cache: dict[str, Any], tok: Any, calibration: Any, src: Path) -> Callable[[], Any]:
    """Tokenized calibration data, loaded on first use and kept in `cache["calib"]` (a pass may never need it)."""
    def get_calibration() -> Any:
        if "calib" not in cache:
            from moecompress.calib.data import load_calibration

            if tok is None:
                raise UserError(f"{src} has no tokenizer; calibration data cannot be tokenized")
            cache["calib"] = load_calibration(resolve_calibration(calibration, src), tok)
        return cache["calib"]

    return get_calibration


def obtain_stats(model: Any, get_calibration: Any, model_dir: Path, calib_spec: Any, opts: RunOptions,
                 console: Any = None, collector: Any = None) -> Stats:
    """Statistics for (model, calibration spec): from the cache when the same pair was seen, else one pass.

    `collector(batches, total_tokens, meta, first_token, out=folder|None)` computes them (the engine's streamed
    sweep; with `out` it writes each layer there as it finishes); default: one forward of the in-memory `model`.
    In a data-parallel run each rank collects its share of the batches and the shares are reduced, so every rank
    returns the same statistics; rank 0 alone writes the cache. Statistics in the cache folder are returned as
    read from it on demand (`StatsLayers`: a few layers in memory at a time); other ranks keep theirs in memory.
    """
    from moecompress.calib.collect import collect_sharded, collect_stats

    key = f"{model_fingerprint(model_dir)}-{calib_spec.cache_key()}-s{opts.sample_tokens}"
    cache_dir = (opts.stats_cache or default_cache_root() / "stats") / key
    if world().all_true(Stats.exists(cache_dir)):  # every rank must take the same branch
        if console:
            console.print(f"[dim]statistics: cache hit {cache_dir}[/]")
        stats = Stats.load(cache_dir)
        stats.meta["cache"] = "hit"
        return stats
    batch = get_calibration()  # tokenized once per pass, shared with passes that also read the tokens
    batches = batch.forward_batches()
    total = int(batch.attention_mask.sum())
    meta = {"model": str(model_dir), "calibration": calib_spec.model_dump(mode="json"), "tokens": total}
    if collector is not None:
        # one process: the streamed sweep writes each layer into the cache as it finishes (nothing to reduce)
        direct = cache_dir if not world().distributed else None
        stats = collect_sharded(lambda own, first: collector(own, total, meta, first, out=direct), batches,
                                opts.sample_tokens)
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("collecting statistics"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                      TimeRemainingColumn(), console=console, disable=console is None, transient=True) as prog:
            task = prog.add_task("stats", total=total)
            stats = collect_sharded(
                lambda own, first: collect_stats(model, own, total_tokens=total, sample_tokens=opts.sample_tokens,
                                                 progress=lambda n: prog.advance(task, n), meta=meta,
                                                 first_token=first),
                batches, opts.sample_tokens)
    if world().is_main and not stats.on_disk:
        stats.save(cache_dir)
        # from here on each layer is read from the cache when a pass asks for it, not held for the whole run
        stats = Stats(layers=Stats.load(cache_dir).layers, meta=stats.meta)
    stats.meta["cache"] = "miss"
    if console:
        console.print(f"statistics: {total:,} tokens in {stats.meta['collect_seconds']:.1f}s → {cache_dir}")
    return stats


def run_pass(cfg: PassConfig, src: Path | str | ResolvedModel, out: Path, *, calibration: Any = None,
             eval_spec: Any = None, opts: RunOptions | None = None, console: Any = None,
             recipe_text: str | None = None) -> dict[str, Any]:
    """Apply one pass to checkpoint `src` (a folder, a Hub id or a resolved model) and write checkpoint +
    report.json to `out`."""
    opts = opts or RunOptions()
    resolved = src if isinstance(src, ResolvedModel) else resolve_model(src, revision=opts.revision)
    src, out = resolved.path, Path(out)
    hf_config, adapter = check_model_dir(src)
    hf_config = float_view(hf_config)
    cfg.check(adapter, hf_config)
    from moecompress.heal.fit import heal_blocked

    heal_notes: list[str] = []  # why a default heal stepped aside, for the report
    cfg = drop_default_heal(cfg, heal_blocked(adapter.model_type, adapter.routing), heal_notes, console)
    findings = check_serving(cfg, adapter, hf_config, opts, console)
    from moecompress.surgery import paired_sets_note

    paired_note = paired_sets_note(adapter, hf_config, planned_config(cfg, adapter, hf_config))
    source_format(src)  # headers: FP8/MXFP4 scales present and well-shaped, files complete
    prepare_output(out, overwrite=opts.overwrite, source=src)
    if eval_spec is not None:  # a typo in --eval must fail before compression, not after
        from moecompress.eval import check_eval_spec

        check_eval_spec(eval_spec, eval_data_dir(eval_spec, src))
    registered = get_pass(cfg.name)
    if registered.layerwise is not None and registered.layerwise.streams(cfg):
        from moecompress.engine.loop import NotStreamable

        try:
            return run_streamed(cfg, registered.layerwise, src, out, calibration=calibration, eval_spec=eval_spec,
                                opts=opts, console=console, recipe_text=recipe_text, resolved=resolved,
                                findings=findings, paired_note=paired_note, heal_notes=heal_notes)
        except NotStreamable as exc:  # nothing was written yet: the same pass on the model in memory
            if console:
                console.print(f"[yellow]{exc}: the layer-streaming engine cannot run it; loading the model whole[/]")
    t0 = time.perf_counter()
    loaded = load_model(src, dtype=opts.dtype)
    model, tok = loaded.model, loaded.tokenizer
    cache: dict[str, Any] = {}

    get_calibration = calibration_loader(cache, tok, calibration, src)

    def get_stats() -> Stats:
        if "stats" not in cache:
            cache["stats"] = obtain_stats(model, get_calibration, src, resolve_calibration(calibration, src), opts,
                                          console)
        return cache["stats"]

    params_before = count_params(model)
    ctx = PassContext(model=model, tokenizer=tok, adapter=adapter, config=cfg, get_stats=get_stats,
                      get_calibration=get_calibration, console=console)
    from moecompress.engine.loop import NotStreamable

    try:
        details = registered.fn(ctx)
    except NotStreamable as exc:  # layer-by-layer calibration (GPTQ) needs each layer's inputs alone
        raise UserError(f"{cfg.name}: {exc}; this pass runs layer by layer on the cached boundary and cannot "
                        "run it") from None
    if getattr(cfg, "heal", None) is not None:  # a default heal on a layer it cannot read (latent experts)
        from moecompress.heal.fit import model_heal_blocked

        cfg = drop_default_heal(cfg, model_heal_blocked(model, adapter), heal_notes, console)
    if "heal" in type(cfg).model_fields:  # prune / merge / neuron pruning: what removal cost, and heal
        def stats_of_input(ref_model: Any) -> Stats:  # the pass's own statistics, else the reloaded input's
            if "stats" not in cache:
                cache["stats"] = obtain_stats(ref_model, get_calibration, src, resolve_calibration(calibration, src),
                                              opts, console)
            return cache["stats"]

        details.update(structural_pass_quality(cfg, details, model, src, opts, get_calibration, stats_of_input,
                                               console, heal_notes))
    if heal_notes:
        details["heal_skipped"] = heal_notes[0]
    pass_seconds = time.perf_counter() - t0
    w = world()
    entry = {"pass": cfg.name, "config": cfg.model_dump(mode="json"), "summary": details.get("summary", ""),
             "distributed": w.summary()}
    if paired_note:
        entry["paired_experts"] = paired_note
    if not w.is_main:
        return rank_done(w, cfg, details, entry["distributed"])
    extra = {"recipe.yaml": recipe_text} if recipe_text else None
    verify = write_checkpoint(model, tok, out, source=src, pass_entry=entry, overwrite=opts.overwrite,
                              verify=opts.verify, save_fn=ctx.extras.get("save_fn"),
                              verify_atol=ctx.extras.get("verify_atol"), extra_files=extra, hub=resolved.hub_ref(),
                              mtp=mtp_request(cfg, get_calibration, opts))
    w.barrier()  # published: the other ranks may now read `out` (the next recipe step)
    report: dict[str, Any] = {
        "pass": cfg.name,
        "config": cfg.model_dump(mode="json"),
        "source": resolved.label,
        "output": str(out),
        "params_before": params_before,
        "params_after": count_params(model),
        "bytes_before": checkpoint_bytes(src),
        "bytes_after": checkpoint_bytes(out),
        "seconds": round(pass_seconds, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "statistics": (cache["stats"].meta if "stats" in cache else None),
        "verify": verify,
        "serving_checks": [f.model_dump() for f in findings],
        "distributed": entry["distributed"],
        "details": details,
    }
    if entry.get("mtp"):
        report["mtp"] = entry["mtp"]
    if entry.get("paired_experts"):
        report["paired_experts"] = entry["paired_experts"]
    if eval_spec is not None:
        report["eval"] = evaluate_pair(src, model, tok, eval_spec, console, out=out if verify else None)
    write_report(out, report)
    if opts.plots:
        from moecompress.report import plot_pass

        plot_pass(out, report, cache.get("stats"))
    return report


def rank_done(w: Any, cfg: PassConfig, details: dict[str, Any], distributed: dict[str, Any]) -> dict[str, Any]:
    """A data-parallel rank other than 0 after its share of a pass: it waits until rank 0 has published the
    output (so a next recipe step can read it) and returns what it computed; rank 0 writes the report."""
    w.barrier()
    return {"pass": cfg.name, "rank": w.rank, "distributed": distributed, "details": details}


_WRITE_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM}


def run_streamed(cfg: PassConfig, lp: Any, src: Path, out: Path, **kw: Any) -> dict[str, Any]:
    """A layerwise pass through the engine: the checkpoint is never in memory whole (moecompress.engine)."""
    try:
        return _run_streamed(cfg, lp, src, out, **kw)
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:
            raise UserError(f"cannot write {out}: {exc.strerror or exc} ({getattr(exc, 'filename', None) or out}); "
                            "nothing was written there. Free space, fix permissions or choose another --out.") from exc
        raise


def _run_streamed(cfg: PassConfig, lp: Any, src: Path, out: Path, *, calibration: Any, eval_spec: Any,
                  opts: RunOptions, console: Any = None, recipe_text: str | None = None,
                  resolved: ResolvedModel | None = None, findings: list[Any] | None = None,
                  paired_note: str | None = None, heal_notes: list[str] | None = None) -> dict[str, Any]:
    from moecompress.engine import run as engine
    from moecompress.engine.sink import parse_size

    t0 = time.perf_counter()
    budget = engine.memory_budget(opts.max_memory)
    max_shard = parse_size(opts.max_shard_size)
    source = engine.open_source(src, dtype=opts.dtype, device=opts.device, budget=budget)
    heal_notes = heal_notes if heal_notes is not None else []
    if getattr(cfg, "heal", None) is not None:  # a default heal on a layer it cannot read (latent experts)
        from moecompress.heal.fit import model_heal_blocked

        cfg = drop_default_heal(cfg, model_heal_blocked(source.model, source.adapter), heal_notes, console)
    if source.chunked_layers:
        cfg = drop_default_heal(cfg, f"heal: {len(source.chunked_layers)} layer(s) exceed --max-memory "
                                f"{budget / 2**30:.2f}GiB and are read in expert chunks, while heal fits whole layers "
                                f"(give --max-memory {source.min_unchunked_budget() / 2**30:.2f}GiB or more to heal)",
                                heal_notes, console)
    cfg = check_heal_memory(cfg, source, calibration, src, budget, heal_notes, console)
    if source.chunked_layers and not lp.chunks(cfg):
        need = source.min_unchunked_budget()
        source.close()
        raise UserError(f"{cfg.name} rewrites expert weights and needs whole decoder layers in memory, but "
                        f"{len(source.chunked_layers)} layer(s) exceed --max-memory {budget / 2**30:.2f}GiB; "
                        f"give --max-memory {need / 2**30:.2f}GiB or more (only prune_experts reads experts in chunks)")
    meters = {"compress": source.meter}
    tok = None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(src)
    except Exception:  # a checkpoint without tokenizer is still compressible; calibration will say so
        tok = None
    cache: dict[str, Any] = {}
    spill = engine.spill_dir_beside(out)

    get_calibration = calibration_loader(cache, tok, calibration, src)

    # the sweeps before compression (statistics, gradients) run on the same source: one skeleton, and a model
    # small next to the budget keeps the layers they read for the compress sweep (the rule of the full reload)
    source.hold = not source.chunked_layers and 3 * source.memory_bytes() < budget

    @contextlib.contextmanager
    def sweep_meter(name: str) -> Iterator[None]:
        from moecompress.engine.chunks import ChunkMeter

        source.meter = meters[name] = ChunkMeter()
        try:
            yield
        finally:
            source.meter = meters["compress"]

    # a pass that heals reuses the statistics sweep's forward of the original model (its MoE blocks' inputs and
    # outputs, its last boundary) instead of running the original layers again; one process sees every batch
    recorded = RecordedTargets(spill / "heal-targets", hold_bytes=budget // 64) \
        if getattr(cfg, "heal", None) and not world().distributed \
        else None

    def collector(batches: Any, total: int, meta: dict[str, Any], first_token: int = 0,
                  out: Path | None = None) -> Stats:
        with sweep_meter("statistics"):
            return engine.stream_stats(source, batches, total_tokens=total, sample_tokens=opts.sample_tokens,
                                       budget=budget // 2, spill_dir=spill, console=console, meta=meta,
                                       first_token=first_token, out=out, targets=recorded)

    def get_stats() -> Stats:
        if "stats" not in cache:
            cache["stats"] = obtain_stats(None, get_calibration, src, resolve_calibration(calibration, src), opts,
                                          console, collector=collector)
        return cache["stats"]

    def grad_collector(batch_size: int) -> Any:
        from moecompress.calib.gradients import collect_grad_sharded
        from moecompress.engine.grad import stream_gradient_stats

        with sweep_meter("gradients"):
            return collect_grad_sharded(
                lambda own: stream_gradient_stats(source, own, budget=budget // 2, spill_dir=spill, console=console),
                get_calibration().batches(batch_size))

    params_before = engine.count_params(source.model)
    ctx = PassContext(model=source.model, tokenizer=tok, adapter=source.adapter, config=cfg, get_stats=get_stats,
                      get_calibration=get_calibration, console=console, layer_visitor=engine.layer_visitor(source),
                      get_grad_stats=grad_collector)
    entry: dict[str, Any] = {"pass": cfg.name, "config": cfg.model_dump(mode="json")}
    if paired_note:
        entry["paired_experts"] = paired_note
    w = world()
    tmp = engine.temp_dir_beside(out) if w.is_main else None  # rank 0 alone writes
    try:
        details, ids, logits, config_update = engine.compress_streamed(
            lp, ctx, source, tmp, max_shard_bytes=max_shard, budget=budget // 2, spill_dir=spill, console=console,
            heal=streamed_heal(cfg, source, get_calibration, budget=budget // 2, spill_dir=spill, recorded=recorded,
                               notes=heal_notes, console=console))
        pass_seconds = time.perf_counter() - t0
        entry["summary"] = details.get("summary", "")
        entry["distributed"] = w.summary()
        if tmp is None:
            return rank_done(w, cfg, details, entry["distributed"])
        engine.write_metadata(source, tok, tmp, src=src, pass_entry=entry,
                              extra_files={"recipe.yaml": recipe_text} if recipe_text else None,
                              hub=resolved.hub_ref() if resolved is not None else None,
                              config_update=config_update, mtp=mtp_request(cfg, get_calibration, opts))
        verify: dict[str, Any] = {}
        reloaded: list[Any] = []  # the vanilla reload of the output, reused for the calibration KL below
        if opts.verify:
            verify = engine.verify_streamed(tmp, ids, logits, budget=budget, device=str(source.device),
                                            atol=ctx.extras.get("verify_atol"), console=console, reloaded=reloaded)
        publish(tmp, out)
        w.barrier()  # the other ranks may now read `out` (the next recipe step)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(spill, ignore_errors=True)
        source.close()
    report: dict[str, Any] = {
        "pass": cfg.name,
        "config": cfg.model_dump(mode="json"),
        "source": resolved.label if resolved is not None else str(src),
        "output": str(out),
        "params_before": params_before,
        "params_after": engine.count_params(source.model),
        "bytes_before": checkpoint_bytes(src),
        "bytes_after": checkpoint_bytes(out),
        "seconds": round(pass_seconds, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "engine": {"mode": "streamed", "device": str(source.device), "max_memory_bytes": budget,
                   "max_shard_bytes": max_shard,
                   "expert_chunks": ({"layers": source.chunked_layers,
                                      "experts_per_chunk": max(source.chunked(i) for i in source.chunked_layers),
                                      **{k: m.summary() for k, m in meters.items()}}
                                     if source.chunked_layers else None)},
        "statistics": (cache["stats"].meta if "stats" in cache else None),
        "verify": verify,
        "serving_checks": [f.model_dump() for f in findings or []],
        "distributed": entry["distributed"],
        "details": details,
    }
    if entry.get("mtp"):
        report["mtp"] = entry["mtp"]
    if entry.get("paired_experts"):
        report["paired_experts"] = entry["paired_experts"]
    written = reloaded[0] if reloaded and next(reloaded[0].parameters()).dtype == source.dtype else None
    reloaded.clear()
    if heal_notes:
        details["heal_skipped"] = heal_notes[0]
        cfg = cfg.model_copy(update={"heal": None})  # a default heal that found no calibration data inside the sweep
    healed_kl = details.pop("calibration_kl", None)  # a heal inside the engine measured it on its own flows
    if "heal" in type(cfg).model_fields and "stats" in cache:  # what the removed experts carried
        details.update(streamed_removal_cost(cfg.name, details, cache["stats"]))
    if healed_kl is not None:
        details["calibration_kl"] = healed_kl
    elif "heal" in type(cfg).model_fields and 3 * (report["bytes_before"] + report["bytes_after"]) < budget:
        details.update(streamed_pair_quality(cfg, details, src, out, opts, get_calibration, console, written))
    del written
    if eval_spec is not None:  # a checkpoint larger than the budget is placed by accelerate, offloaded to disk
        offload = engine.spill_dir_beside(out)
        try:
            loaded = load_model(out, dtype=opts.dtype, max_memory=budget, offload_folder=offload)
            report["eval"] = evaluate_pair(src, loaded.model, loaded.tokenizer or tok, eval_spec, console,
                                           out=out)  # loaded from `out`: its results are the checkpoint's
        finally:
            shutil.rmtree(offload, ignore_errors=True)
    write_report(out, report)
    if opts.plots:
        from moecompress.report import plot_pass

        plot_pass(out, report, cache.get("stats"))
    return report


def streamed_removal_cost(pass_name: str, details: dict[str, Any], stats: Stats) -> dict[str, Any]:
    """The routed probability mass the removed experts carried, from the statistics the pass already has.

    Calibration KL needs the input and the output side by side; streamed runs report it with --heal, which
    runs the pass with both models in memory."""
    from moecompress.heal.run import groups_from_details, removed_routed_mass

    layer_ids = sorted(int(k) for k in (details.get("layers") or details.get("kept") or {}))
    n_before = details.get("experts_before") or (details.get("experts") or {}).get("experts_before")
    if not layer_ids or not n_before:
        return {}
    _, removed = groups_from_details(pass_name, details, layer_ids, int(n_before))
    if not any(removed.values()):
        return {}
    return {"removed_routed_mass": removed_routed_mass(stats, removed),
            "calibration_kl": {"note": "not measured in a streamed run; --heal measures unhealed vs healed KL"}}


def streamed_pair_quality(cfg: PassConfig, details: dict[str, Any], src: Path, out: Path, opts: RunOptions,
                          get_calibration: Callable[[], Any], console: Any = None, written: Any = None
                          ) -> dict[str, Any]:
    """Calibration KL of a streamed run, measured as the in-memory path does, when input and output both fit.

    `written`: the output already in memory (the verification's vanilla reload), else it is loaded from `out`."""
    if written is None:
        written = load_model(out, dtype=opts.dtype, tokenizer=False).model
    quality = structural_pass_quality(cfg, details, written, src, opts, get_calibration, None, console)
    del written
    return quality  # no statistics given: the routed mass already in `details` stays as computed


def check_heal_memory(cfg: PassConfig, source: Any, calibration: Any, src: Path, budget: int, notes: list[str],
                      console: Any = None) -> PassConfig:
    """Heal holds one layer's calibration tokens in RAM (inputs, float64 targets, activations): where that working
    set (``plan.heal_bytes``) is more than half the engine's budget, a default heal steps aside with a note and an
    explicit one stops here, before the statistics sweep, with what to change."""
    spec = getattr(cfg, "heal", None)
    if spec is None:
        return cfg
    try:
        calib = resolve_calibration(calibration, src)
    except UserError:
        return cfg  # no calibration data: the heal's own start says so
    from moecompress.arch.skeleton import analyse, text_config_dict
    from moecompress.plan import heal_bytes

    layers = analyse(source.model).moe_layers
    if not layers:
        return cfg
    ly = layers[0]
    hidden = int(text_config_dict(source.config.to_dict()).get("hidden_size") or 0)
    tokens = calib.samples * calib.seqlen
    need = heal_bytes(cfg, experts=ly.experts, top_k=ly.top_k, hidden=hidden, width=ly.expert_width, tokens=tokens,
                      compute_bytes=torch.empty((), dtype=source.dtype).element_size())
    if need <= budget // 2:
        return cfg
    why = (f"heal: one layer's calibration tokens need ≈{need / 2**30:.1f} GiB ({tokens:,} tokens × hidden {hidden}), "
           f"more than half of the {budget / 2**30:.1f} GiB memory budget; lower --calib-samples / --calib-seqlen or "
           "raise --max-memory")
    if spec.auto:
        return drop_default_heal(cfg, why, notes, console)
    raise UserError(why)


def drop_default_heal(cfg: PassConfig, why: str | None, notes: list[str], console: Any = None) -> PassConfig:
    """`cfg` without its heal when heal cannot run (`why`) and was not asked for (``HealSpec.auto``): the run goes
    on unhealed and `notes` (the report) says why. An explicit heal is kept: its entry point stops with `why`."""
    spec = getattr(cfg, "heal", None)
    if why is None or spec is None or not spec.auto:
        return cfg
    notes.append(why)
    if console:
        console.print(f"[yellow]{why}: running without heal (the default; --no-heal silences this)[/]")
    return cfg.model_copy(update={"heal": None})


def streamed_heal(cfg: PassConfig, source: Any, get_calibration: Callable[[], Any], *, budget: int,
                  spill_dir: Path, recorded: Any = None, notes: list[str] | None = None,
                  console: Any = None) -> Callable[[], Any] | None:
    """The engine's heal for a pass config that asks for one (``engine.heal.StreamedHeal``), else None.
    `recorded`: the statistics sweep's ``RecordedTargets`` (used when it recorded these batches); `notes`: where a
    default heal that finds no calibration data says so (the run goes on unhealed)."""
    spec = getattr(cfg, "heal", None)
    if spec is None:
        return None
    from moecompress.engine.heal import StreamedHeal
    from moecompress.heal.fit import model_heal_blocked
    from moecompress.heal.run import groups_from_details

    why = model_heal_blocked(source.model, source.adapter)
    if why is not None:  # before the statistics sweep, not after it (a default heal was dropped already)
        raise UserError(f"{why}; run without --heal")

    def groups_of(index: int, info: dict[str, Any], n_before: int) -> list[Any]:
        one = {"kept": {str(index): info["kept"]}} if "kept" in info else {"layers": {str(index): info}}
        return groups_from_details(cfg.name, one, [index], n_before)[0][index]

    def start() -> Any:
        try:
            batches = get_calibration().forward_batches()  # the statistics sweep's batching
        except UserError as exc:
            if spec.auto and notes is not None:
                drop_default_heal(cfg, f"heal: no calibration data ({exc})", notes, console)
                return None
            raise UserError(f"{cfg.name} --heal needs calibration data: {exc}") from None
        return StreamedHeal.start(source, batches, spec, groups_of, budget=budget, spill_dir=spill_dir,
                                  recorded=recorded)

    return start


def structural_pass_quality(cfg: PassConfig, details: dict[str, Any], model: Any, src: Path, opts: RunOptions,
                            get_calibration: Callable[[], Any], get_stats: Callable[[Any], Any],
                            console: Any = None, heal_notes: list[str] | None = None) -> dict[str, Any]:
    """Routed mass removed, calibration KL to the input, and heal when the pass config asks for it."""
    from moecompress.heal.run import after_pass

    spec = getattr(cfg, "heal", None)
    try:
        calib = get_calibration()
    except UserError as exc:
        if spec is not None and not (spec.auto and heal_notes is not None):
            raise
        if spec is not None:
            drop_default_heal(cfg, f"heal: no calibration data ({exc})", heal_notes, console)
        return {"calibration_kl": {"note": "no calibration data: removed routed mass and calibration KL not measured"}}
    return after_pass(model, lambda: load_model(src, dtype=opts.dtype, tokenizer=False).model, calib, get_stats,
                      cfg.name, details, spec, console)


def eval_data_dir(eval_spec: Any, model_dir: Path) -> Path | None:
    if eval_spec.data_dir is not None:
        return Path(eval_spec.data_dir)
    src = default_calibration_source(model_dir)
    return src.parent if src else None


def evaluate_pair(src: Path, model: Any, tok: Any, eval_spec: Any, console: Any = None,
                  out: Path | None = None) -> dict[str, Any]:
    """Base results (cached per checkpoint) vs the compressed in-memory model.

    `out`: the verified checkpoint of `model`; its results are cached so a later step reuses them as its base.
    """
    from moecompress.eval import cached_evaluate, compare, evaluate_model, remember_evaluation

    data_dir = eval_data_dir(eval_spec, src)
    if data_dir is not None and eval_spec.data_dir is None:
        eval_spec = eval_spec.model_copy(update={"data_dir": data_dir})
    cache = default_cache_root() / "eval"
    with batch_spinner(console) as spin:
        base = cached_evaluate(src, eval_spec, cache, progress=spin("evaluating the input on "
                                                                    + ", ".join(eval_spec.tasks)))
        compressed = evaluate_model(model, tok, eval_spec, progress=spin("evaluating the output on "
                                                                         + ", ".join(eval_spec.tasks)))
    if out is not None:
        remember_evaluation(out, eval_spec, cache, compressed)
    return {"base": base, "compressed": compressed, "comparison": compare(base, compressed)}


@contextlib.contextmanager
def batch_spinner(console: Any) -> Iterator[Callable[[str], Callable[[int], None]]]:
    """Progress for work of unknown length (lm-eval's requests): `spin(label)` starts a row, returns its counter."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed} batches"),
                  TimeElapsedColumn(), console=console, disable=console is None, transient=True) as prog:
        def spin(label: str) -> Callable[[int], None]:
            task = prog.add_task(label, total=None)
            return lambda n: prog.advance(task, n)

        yield spin


def write_report(out: Path, report: dict[str, Any]) -> None:
    """report.json goes last and atomically: its presence marks a finished step (resume)."""
    tmp = out / f".{REPORT}.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.rename(out / REPORT)
    from moecompress.report import write_markdown

    write_markdown(out, report)


def run_recipe(recipe: Any, out: Path, *, model: Path | None = None, opts: RunOptions | None = None,
               console: Any = None) -> list[dict[str, Any]]:
    """Run every pass of a parsed recipe into OUT/NN-pass/, resuming finished steps."""
    opts = opts or RunOptions()
    out = Path(out)
    model_arg = model if model is not None else recipe.model
    if model_arg is None:
        raise UserError("no model: set `model:` in the recipe or pass MODEL on the command line")
    resolved = resolve_model(model_arg, revision=opts.revision)
    src: Path | ResolvedModel = resolved
    hf_config, adapter = check_model_dir(resolved.path)
    hf_config = float_view(hf_config)
    passes = [with_reference(cfg, resolved.path) for cfg in recipe.passes]
    for i, cfg in enumerate(passes, start=1):  # fail before any weight loads
        cfg.check(adapter, hf_config)
        check_serving(cfg, adapter, hf_config, opts, where=f"step {i}")  # warnings print when the step runs
        hf_config = planned_config(cfg, adapter, hf_config)
    if out.exists() and any(out.iterdir()) and not (out / "recipe.yaml").exists() and not opts.overwrite:
        raise UserError(f"output {out} exists and does not hold a recipe run; choose another --out or --overwrite")
    w = world()
    w.barrier()  # every rank has checked `out` before rank 0 creates anything in it
    if w.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if recipe.text:
            (out / "recipe.yaml").write_text(recipe.text)
    reports: list[dict[str, Any]] = []
    for i, cfg in enumerate(passes, start=1):
        step = out / f"{i:02d}-{cfg.name}"
        if w.is_main:  # another rank must never remove the temp folder rank 0 is writing
            for stale in out.glob(f".{step.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        if (step / REPORT).is_file() and not opts.overwrite:
            if console:
                console.print(f"[green]✓[/] step {i} {cfg.name}: finished earlier, skipping ({step})")
            reports.append(json.loads((step / REPORT).read_text()))
            src = ResolvedModel(path=step)
            continue
        if console:
            console.rule(f"step {i}/{len(passes)}: {cfg.name}")
        step_opts = opts.model_copy(update={"overwrite": True})  # a step dir without report is unfinished
        reports.append(run_pass(cfg, src, step, calibration=recipe.calibration, eval_spec=recipe.eval,
                                opts=step_opts, console=console, recipe_text=recipe.text or None))
        if not (step / "config.json").is_file():  # rank 0 published it before every rank left run_pass
            raise UserError(f"rank {w.rank} cannot see step {i}'s output {step}, which rank 0 wrote; a multi-node "
                            "recipe needs --out on a filesystem every node shares")
        src = ResolvedModel(path=step)
    if w.is_main:
        from moecompress.report import write_run_summary

        write_run_summary(out, reports)
    return reports


def float_view(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The config passes see: FP8/MXFP4 sources are read as float; compressed-tensors ones are refused (one line)."""
    from moecompress.io.source_formats import detect_source_format

    fmt = detect_source_format(hf_config, [])
    if fmt.name == "compressed-tensors":
        fmt.validate()
    return {k: v for k, v in hf_config.items() if k != "quantization_config"} if fmt.quantized else hf_config


def check_serving(cfg: PassConfig, adapter: Any, hf_config: dict[str, Any], opts: RunOptions, console: Any = None,
                  where: str = "") -> list[Any]:
    """The serving checks `plan` prints, run before every pass: warnings, or errors with --target vllm."""
    from moecompress.serving import enforce, serving_findings

    findings = serving_findings(cfg, adapter, hf_config, planned_config(cfg, adapter, hf_config), opts.ep_size)
    enforce(findings, opts.target, where=where or cfg.name, console=console)  # type: ignore[arg-type]
    return findings


def with_reference(cfg: PassConfig, recipe_input: Path) -> PassConfig:
    """A `heal` step without `reference:` heals against the recipe's input model."""
    if cfg.name == "heal" and getattr(cfg, "reference", "") is None:
        return cfg.model_copy(update={"reference": str(recipe_input)})
    return cfg


def planned_config(cfg: PassConfig, adapter: Any, hf_config: dict[str, Any]) -> dict[str, Any]:
    """The config a pass will leave behind, so later passes are checked against what they will see.

    Passes other than `quantize` write float weights: a quantized source (FP8, MXFP4) is dequantized as it is
    read, so its `quantization_config` does not carry over and the output is bfloat16.
    """
    planner = getattr(cfg, "planned_config", None)
    after = planner(adapter, dict(hf_config)) if planner else dict(hf_config)
    if getattr(cfg, "mtp", None) == "drop":
        from moecompress.io.mtp import mtp_layers

        after = json.loads(json.dumps(after))  # the holder may be a nested text_config: change a copy
        found = mtp_layers(after)
        if found is not None:
            found[0][found[1]] = 0
    if cfg.name != "quantize" and after.get("quantization_config"):
        after = {k: v for k, v in after.items() if k != "quantization_config"}
        after["dtype"] = "bfloat16"
        after.pop("torch_dtype", None)
    return after
