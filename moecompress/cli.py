"""The `moecompress` command line: thin commands over the library.

Every user-fixable problem surfaces as one line on stderr and exit code 2 (``UserError``); the science
lives in recipes and pass configs, the machinery (output dir, dtype, overwrite) in options here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # library progress bars (compressed-tensors, datasets); ours are rich
# MKL's own memory manager keeps the buffers of large LAPACK/BLAS calls for reuse and never gives them back: GPTQ's
# batched Cholesky/triangular solves left ~1 GB resident between decoder layers of a 0.8 GB model (bench/README.md,
# layer streaming). Read once, when MKL first allocates, so it must be set before any torch op runs.
os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")

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
err_console = Console(stderr=True, soft_wrap=True)


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
    model: str = typer.Argument(..., help="Checkpoint folder, or a Hub id (only its config.json is downloaded). "
                                "config.json alone is enough."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
    tensors: bool = typer.Option(False, "--tensors", help="Also list every tensor with its dtype, bits and bytes."),
    revision: str | None = typer.Option(None, "--revision", help="With a Hub id: branch, tag or commit."),
) -> None:
    """Family, layer pattern, experts, top-k, total and active parameters, bytes by group — from config.json
    alone (no weight is read; safetensors headers give exact bytes when present)."""
    from moecompress.inspect import inspect_checkpoint, render
    from moecompress.io.resolve import resolve_model

    resolved = resolve_model(model, revision=revision, needs="config")
    ins = inspect_checkpoint(resolved.path)
    if resolved.repo_id:
        ins.path = resolved.label
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


# ---- options shared by every pass command (machinery, not science) -----------------------------------
OUT = typer.Option(..., "--out", "-o", help="Folder for the compressed checkpoint (+ report.json, report.md).")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace a non-empty --out.")
CALIB = typer.Option(None, "--calib", help="Calibration data: a local .txt/.jsonl/.json/.parquet file or folder, or a "
                     "HuggingFace dataset `name[:config][@split]`. Default: the reference corpus shipped with the model.")
CALIB_SAMPLES = typer.Option(128, "--calib-samples", help="Number of calibration sequences.")
CALIB_SEQLEN = typer.Option(256, "--calib-seqlen", help="Tokens per calibration sequence.")
CALIB_SEED = typer.Option(0, "--calib-seed", help="Seed for sampling calibration sequences.")
CALIB_DOMAIN = typer.Option(None, "--calib-domain", help="Only rows whose `domain` field equals this (jsonl).")
EVAL = typer.Option(None, "--eval", help="Comma-separated lm-eval tasks to compare base vs compressed "
                    "(bundled offline tasks: ref_ppl, ref_mc).")
EVAL_DATA = typer.Option(None, "--eval-data", help="Folder with val.jsonl / mc.jsonl for the bundled tasks "
                         "(default: the reference model's data/, found through provenance).")
DTYPE = typer.Option(None, "--dtype", help="Load dtype (float32, bfloat16, ...). Default: the checkpoint's.")
DEVICE = typer.Option("auto", "--device", help="Where each layer is computed: cpu | cuda | auto (cuda when "
                      "available). The model is streamed one decoder layer at a time from its shards.")
MAX_MEMORY = typer.Option(None, "--max-memory", help="CPU RAM the run may use, e.g. 24GiB (default: 3/4 of what "
                          "is free). Calibration activations beyond it spill to disk beside --out.")
MTP = typer.Option("keep", "--mtp", help="Multi-token-prediction layers the checkpoint ships (DeepSeek-V3, GLM-4.5, "
                   "Qwen3.5…): keep (reduced to the decoder's expert count and width, or copied; quantize keeps "
                   "them in high precision) | drop (removed, their count in config.json set to 0).")
MAX_SHARD = typer.Option("5GB", "--max-shard-size", help="Largest output shard (model-0000k-of-0000n.safetensors).")
REVISION = typer.Option(None, "--revision", help="With a Hub id: branch, tag or commit to download (default main).")
TARGET = typer.Option(None, "--target", help="vllm: serving checks (expert count vs --ep-size and n_group, "
                      "widths multiple of 64, 4/8-bit, group size -1/32/64/128) become errors, raised before "
                      "anything loads. Default: they are warnings.")
EP_SIZE = typer.Option(None, "--ep-size", min=1, help="Expert-parallel size the output's expert count must divide by.")
HEAL = typer.Option(None, "--heal/--no-heal", help="After removal, fit each layer's kept experts (router rows + "
                    "down projections, closed form) to the original layer's outputs on the calibration data, bottom "
                    "up. On by default: where heal cannot run (its family, layers read in expert chunks) the run "
                    "goes on without it and says why; --heal makes that an error, --no-heal skips it.")
HEAL_STEPS = typer.Option(0, "--heal-steps", help="Also run N steps of fp32 Adam per layer on experts + router, "
                          "early-stopped on held-out calibration tokens (implies --heal).")


def heal_option(heal: bool | None, steps: int) -> dict | None:
    """--heal / --no-heal / --heal-steps as the pass config's `heal` field; neither flag: the default heal
    (``HealSpec.auto``), which steps aside where it cannot run."""
    if steps < 0:
        raise UserError("--heal-steps must be ≥ 0")
    if heal is False:
        if steps:
            raise UserError("--heal-steps runs inside heal; drop --no-heal or --heal-steps")
        return None
    if heal is None and not steps:
        return {"auto": True}
    return {"steps": steps}


STATS_CACHE = typer.Option(None, "--stats-cache", help="Where calibration statistics are cached "
                           "(default ~/.cache/moecompress/stats or $MOECOMPRESS_CACHE).")


def calib_spec(calib: str | None, samples: int, seqlen: int, seed: int, domain: str | None = None,
               model: Path | None = None):
    """The calibration spec from CLI options; without --calib, the reference corpus the model ships (if any)."""
    from moecompress.calib.data import CalibSpec
    from moecompress.io.locations import default_calibration_source

    if _PLAN_MODE:  # plan sizes the activation cache from these even when no --calib is given
        _PLAN_MODE.update(samples=samples, seqlen=seqlen)
    if calib is None:
        found = default_calibration_source(model) if model is not None and Path(model).is_dir() else None
        if found is None:
            if domain is not None:
                raise UserError("--calib-domain needs --calib pointing at a jsonl file with a `domain` field")
            return None  # the pass will say it needs --calib, if it does
        calib = str(found)
    return CalibSpec(source=calib, samples=samples, seqlen=seqlen, seed=seed, domain=domain)


def eval_spec(tasks: str | None, data_dir: Path | None = None):
    """--eval/--eval-data as a spec; the runner finds the reference data itself when --eval-data is omitted."""
    if not tasks:
        return None
    from moecompress.eval import EvalSpec

    return EvalSpec(tasks=[t.strip() for t in tasks.split(",") if t.strip()], data_dir=data_dir)


def run_one(cfg_cls, fields: dict, model: Path, out: Path, *, calib=None, evals=None, eval_data: Path | None = None,
            overwrite: bool = False, dtype: str | None = None, stats_cache: Path | None = None,
            device: str | None = None, max_memory: str | None = None, max_shard_size: str = "5GB",
            target: str | None = None, ep_size: int | None = None, revision: str | None = None) -> dict | None:
    """The pass commands are one-pass recipes: validate the config, then run it through the same runner
    (or, under `moecompress plan`, size it without running)."""
    from moecompress.recipe import validated
    from moecompress.runner import RunOptions, run_pass

    quiet_transformers()
    cfg = validated(cfg_cls, {k: v for k, v in fields.items() if v is not None})
    target = check_target(target)
    if _PLAN_MODE:
        show_plan(str(model), [cfg], calib=calib, target=target, ep_size=ep_size, revision=revision, **_PLAN_MODE)
        return None
    opts = RunOptions(overwrite=overwrite, dtype=dtype, stats_cache=stats_cache, device=device,
                      max_memory=max_memory, max_shard_size=max_shard_size, target=target, ep_size=ep_size,
                      revision=revision)
    report = run_pass(cfg, str(model), out, calibration=calib, eval_spec=eval_spec(evals, eval_data), opts=opts,
                      console=console)
    print_report(report)
    return report


def check_target(target: str | None) -> str | None:
    if target not in (None, "vllm", "transformers"):
        raise UserError(f"--target {target!r}: use vllm (serving checks become errors) or transformers")
    return target


_PLAN_MODE: dict = {}  # set by `moecompress plan` while it dispatches to a pass command


def show_plan(model: str, passes: list, *, calib=None, target: str | None = None, ep_size: int | None = None,
              tp_size: int | None = None, json_out: bool = False, max_memory: str | None = None, samples: int | None = None,
              seqlen: int | None = None, revision: str | None = None) -> None:
    """Plan passes on MODEL from its config.json alone and print it (tables, or JSON for scripts)."""
    from moecompress.io.checkpoint import read_config
    from moecompress.io.resolve import resolve_model
    from moecompress.plan import parse_size, plan_passes, render_plan

    resolved = resolve_model(model, revision=revision, needs="config")
    config = read_config(resolved.path)
    model = resolved.label
    samples = calib.samples if calib is not None else (samples or CALIB_SAMPLES.default)
    seqlen = calib.seqlen if calib is not None else (seqlen or CALIB_SEQLEN.default)
    plan = plan_passes(config, passes, model=str(model), samples=samples, seqlen=seqlen, target=target,
                       ep_size=ep_size, max_memory=parse_size(max_memory), console=None if json_out else console,
                       tp_size=tp_size)
    if json_out:
        typer.echo(plan.model_dump_json(indent=2))
    else:
        render_plan(plan, console)


@app.command("plan", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan_cmd(
    ctx: typer.Context,
    what: str = typer.Argument(..., help="A recipe YAML, or a pass command (prune | merge | quantize) followed by "
                               "its usual arguments, e.g. `plan prune MODEL --ratio 0.5`."),
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    max_memory: str | None = typer.Option(None, "--max-memory", help="CPU RAM the run may use, e.g. 64GiB: the "
                                          "plan shows what spills to disk (or that it cannot fit)."),
    model: str | None = typer.Option(None, "--model", help="With a recipe: override its model."),
    target: str | None = TARGET, ep_size: int | None = EP_SIZE, revision: str | None = REVISION,
    tp_size: int | None = typer.Option(None, "--tp-size", min=1, help="Tensor-parallel size: expert widths must "
                                       "split into this many shards (each a multiple of the quantization group)."),
) -> None:
    """Before → after of every step (experts, total/active parameters, bytes, peak RAM/GPU) and serving checks,
    from config.json alone: nothing is loaded, nothing is written.

    Examples: moecompress plan recipes/reap50-w4.yaml --model Qwen/Qwen3-30B-A3B --target vllm
              moecompress plan prune Qwen/Qwen3-30B-A3B --ratio 0.5 --ep-size 8 --json
    """
    quiet_transformers()
    target = check_target(target)
    opts = {"json_out": json_out, "max_memory": max_memory, "tp_size": tp_size}
    if what.endswith((".yaml", ".yml")) or Path(what).is_file():
        from moecompress.recipe import load_recipe

        if ctx.args:
            raise UserError(f"plan {what}: unexpected arguments {' '.join(ctx.args)}")
        recipe = load_recipe(Path(what))
        src = model or recipe.model
        if src is None:
            raise UserError("no model: set `model:` in the recipe or pass --model")
        show_plan(src, recipe.passes, calib=recipe.calibration, target=target, ep_size=ep_size, revision=revision,
                  **opts)
        return
    if what not in ("prune", "merge", "quantize"):
        raise UserError(f"plan {what}: give a recipe .yaml or one of prune | merge | quantize with its arguments")
    args = list(ctx.args)
    if not any(a in ("--out", "-o") or a.startswith("--out=") for a in args):
        args += ["--out", ".moecompress-plan-unused"]  # pass commands require --out; plan never writes
    if target:
        args += ["--target", target]
    if ep_size:
        args += ["--ep-size", str(ep_size)]
    if revision:
        args += ["--revision", revision]
    _PLAN_MODE.update(opts)
    try:
        typer.main.get_command(app).main([what, *args], prog_name="moecompress plan", standalone_mode=False)
    finally:
        _PLAN_MODE.clear()


def print_report(report: dict) -> None:
    from rich.table import Table

    from moecompress.report import eval_rows, human_bytes

    if "rank" in report:  # a data-parallel rank other than 0: rank 0 reports the run
        return
    t = Table(title=f"{report['pass']} → {report['output']}")
    for col in ("", "before", "after"):
        t.add_column(col, justify="right")
    t.add_row("parameters", f"{report['params_before']:,}", f"{report['params_after']:,}")
    t.add_row("bytes", human_bytes(report["bytes_before"]), human_bytes(report["bytes_after"]))
    for task, metric, b, c, r in eval_rows(report):
        t.add_row(f"{task} {metric}", f"{b:.4g}", f"{c:.4g}" + (f" ({r:.1f}%)" if r is not None else ""))
    console.print(t)
    details = report.get("details") or {}
    kl = details.get("calibration_kl") or {}
    if kl.get("unhealed") is not None:
        healed = kl.get("healed")
        console.print(f"calibration KL to the input: {kl['unhealed']:.4g} unhealed"
                      + (f" → {healed:.4g} healed" if healed is not None else " (no --heal)"))
        if healed is not None and healed > kl["unhealed"]:
            console.print("[yellow]heal raised the calibration KL on the held-out sequences: compare with --no-heal "
                          "(more --calib-samples usually helps)[/]")
    if details.get("heal_skipped"):
        console.print(f"[yellow]heal (on by default) did not run — {details['heal_skipped']}[/]")
    mass = details.get("removed_routed_mass")
    if mass:
        console.print("routed probability mass of the removed experts per layer: "
                      + ", ".join(f"L{k} {100 * v:.1f}%" for k, v in mass.items()))
    if details.get("bytes_note"):
        console.print(f"[yellow]{details['bytes_note']}[/]")
    if details.get("coupled"):  # JetMoE: its attention experts were cut to the same count
        console.print(f"[yellow]{details['coupled']}[/]")
    if report.get("mtp"):
        console.print(f"multi-token prediction: {report['mtp']}")
    console.print(f"time {report['seconds']:.1f}s · peak RSS {report['peak_rss_mb']:.0f} MiB · reload verified "
                  f"(max logit diff {_logit_diff(report['verify']):.2g})")


def _logit_diff(verify: dict) -> float:
    return verify.get("max_abs_logit_diff", verify.get("streamed_max_abs_logit_diff", float("nan")))


def parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise UserError(f"--layers {text!r}: use comma-separated indices or ranges, e.g. 0,2,4-7") from None
    return out


@app.command("prune")
def prune_cmd(
    model: str = typer.Argument(..., help="Input checkpoint folder (never modified) or a Hub id (downloaded to the "
                                "HF cache; --revision pins a commit)."),
    out: Path = OUT,
    ratio: float | None = typer.Option(None, "--ratio", help="Share of experts to remove in every MoE layer (0-1)."),
    keep: int | None = typer.Option(None, "--keep", help="Experts to keep per layer (instead of --ratio)."),
    criterion: str | None = typer.Option(None, "--criterion", help="Experts: frequency | soft_frequency | reap "
                                         "(default) | ean | easy_ep | naee | random. With --neuron-ratio: heapr "
                                         "(default) | camera | magnitude | random (atomic criteria)."),
    protect_super_experts: bool = typer.Option(False, "--protect-super-experts",
                                               help="Never remove experts with extreme peak activations."),
    layers: str | None = typer.Option(None, "--layers", help="MoE layers to prune, e.g. 0-3 (all must be listed for "
                                      "a vanilla-loadable checkpoint)."),
    seed: int = typer.Option(0, "--seed", help="Seed for --criterion random."),
    neuron_ratio: float | None = typer.Option(None, "--neuron-ratio", help="Share of atomic experts (expert "
                                              "intermediate neurons) to remove; with --ratio/--keep, experts are "
                                              "pruned first, then neurons, into one checkpoint."),
    layout: str = typer.Option("uniform", "--layout", help="With --neuron-ratio: uniform (one width, every expert "
                               "keeps its own best neurons; loads everywhere) | masked (the global ranking's uneven "
                               "selection written as zeros in same-shape tensors, to measure it)."),
    expert_criterion: str | None = typer.Option(None, "--expert-criterion", help="Expert criterion when --ratio/"
                                                "--keep is combined with --neuron-ratio (default reap)."),
    select: str = typer.Option("criterion", "--select", help="criterion: keep the experts the criterion scores "
                               "highest | reconstruct: per layer, search the kept set on the block-output error "
                               "after heal (seeded by --criterion; implies --heal; best at high ratios)."),
    beam: int = typer.Option(1, "--beam", help="--select reconstruct: beam width (1 = greedy elimination)."),
    heal: bool | None = HEAL, heal_steps: int = HEAL_STEPS,
    calib: str | None = CALIB, calib_samples: int = CALIB_SAMPLES, calib_seqlen: int = CALIB_SEQLEN,
    calib_seed: int = CALIB_SEED, calib_domain: str | None = CALIB_DOMAIN,
    evals: str | None = EVAL, eval_data: Path | None = EVAL_DATA, overwrite: bool = OVERWRITE,
    dtype: str | None = DTYPE, stats_cache: Path | None = STATS_CACHE, target: str | None = TARGET,
    ep_size: int | None = EP_SIZE, revision: str | None = REVISION,
    device: str = DEVICE, max_memory: str | None = MAX_MEMORY, max_shard_size: str = MAX_SHARD, mtp: str = MTP,
) -> None:
    """Remove whole experts (same count per layer) or expert neurons, ranked on calibration data.

    Example: moecompress prune ref --out ref-p25 --ratio 0.25 --criterion reap --eval ref_ppl,ref_mc

    Neurons (HEAPr): moecompress prune ref --out ref-n25 --neuron-ratio 0.25 --criterion heapr

    Heal (closed-form repair of what removal cost) runs by default; --heal-steps 200 adds a short fine-tune,
    --no-heal writes the pass as is; at 75% also try --select reconstruct.
    """
    from moecompress.passes.prune_atomic import ATOMIC_CRITERIA, PruneAtomicConfig
    from moecompress.passes.prune_experts import PruneExpertsConfig

    calibration = calib_spec(calib, calib_samples, calib_seqlen, calib_seed, calib_domain, model)
    if neuron_ratio is not None:
        if criterion is not None and criterion not in ATOMIC_CRITERIA:
            raise UserError(f"--criterion {criterion} ranks whole experts; with --neuron-ratio use one of "
                            f"{' | '.join(ATOMIC_CRITERIA)} (and --expert-criterion {criterion} for the experts)")
        if protect_super_experts or layers or select != "criterion":
            raise UserError("--protect-super-experts, --layers and --select apply to expert pruning alone; drop them "
                            "when using --neuron-ratio")
        run_one(PruneAtomicConfig, dict(neuron_ratio=neuron_ratio, criterion=criterion, layout=layout,
                                        expert_ratio=ratio, expert_keep=keep, expert_criterion=expert_criterion,
                                        seed=seed, mtp=mtp, heal=heal_option(heal, heal_steps)),
                model, out, calib=calibration, evals=evals, eval_data=eval_data, overwrite=overwrite, dtype=dtype,
                stats_cache=stats_cache, device=device, max_memory=max_memory, max_shard_size=max_shard_size,
                target=target, ep_size=ep_size, revision=revision)
        return
    if criterion in ATOMIC_CRITERIA and criterion != "random":
        raise UserError(f"--criterion {criterion} ranks expert neurons; add --neuron-ratio R (e.g. 0.25)")
    if layout != "uniform" or expert_criterion is not None:
        raise UserError("--layout and --expert-criterion apply to neuron pruning; add --neuron-ratio R")
    run_one(PruneExpertsConfig, dict(ratio=ratio, keep=keep, criterion=criterion,
                                     protect_super_experts=protect_super_experts, layers=parse_layers(layers),
                                     seed=seed, select=select, beam=beam, mtp=mtp, heal=heal_option(heal, heal_steps)),
            model, out, calib=calibration, evals=evals,
            eval_data=eval_data, overwrite=overwrite, dtype=dtype, stats_cache=stats_cache, device=device,
            max_memory=max_memory, max_shard_size=max_shard_size, target=target, ep_size=ep_size, revision=revision)


@app.command("merge")
def merge_cmd(
    model: str = typer.Argument(..., help="Input checkpoint folder (never modified) or a Hub id (downloaded to the "
                                "HF cache; --revision pins a commit)."),
    out: Path = OUT,
    ratio: float | None = typer.Option(None, "--ratio", help="Share of experts to merge away in every MoE layer (0-1)."),
    keep: int | None = typer.Option(None, "--keep", help="Experts left per layer (instead of --ratio)."),
    method: str = typer.Option("ream", "--method", help="Grouping: msmoe (frequent experts absorb router-similar ones) | "
                               "hc (hierarchical clustering of expert outputs) | kmeans | ream (salient experts absorb "
                               "output+router-similar ones)."),
    merge: str = typer.Option("saliency", "--merge", help="freq (frequency-weighted average) | saliency (REAP-weighted) | "
                              "subspace (Sub-MoE shared basis; with --rank or --energy)."),
    router: str = typer.Option("refit", "--router", help="Router row of a merged expert: dominant | average | refit "
                               "(least squares to the members' summed probabilities)."),
    rank: int | None = typer.Option(None, "--rank", help="subspace: rank of the shared basis."),
    energy: float | None = typer.Option(None, "--energy", help="subspace: keep singular values holding this share "
                                        "of the energy, e.g. 0.95."),
    align: str = typer.Option("both", "--align", help="Neuron alignment before averaging: activation | weight | both | none."),
    group_size: int | None = typer.Option(None, "--group-size", help="ream: most experts one group may hold."),
    seed: int = typer.Option(0, "--seed", help="Seed for --method kmeans."),
    heal: bool | None = HEAL, heal_steps: int = HEAL_STEPS,
    calib: str | None = CALIB, calib_samples: int = CALIB_SAMPLES, calib_seqlen: int = CALIB_SEQLEN,
    calib_seed: int = CALIB_SEED, calib_domain: str | None = CALIB_DOMAIN,
    evals: str | None = EVAL, eval_data: Path | None = EVAL_DATA, overwrite: bool = OVERWRITE,
    dtype: str | None = DTYPE, stats_cache: Path | None = STATS_CACHE, target: str | None = TARGET,
    ep_size: int | None = EP_SIZE, revision: str | None = REVISION,
    device: str = DEVICE, max_memory: str | None = MAX_MEMORY, max_shard_size: str = MAX_SHARD, mtp: str = MTP,
) -> None:
    """Merge groups of experts into one each (same count per layer): the checkpoint shrinks and loads anywhere.

    Example: moecompress merge ref --out ref-m50 --ratio 0.5 --method ream --merge saliency --router refit --eval ref_ppl,ref_mc

    Heal runs after the merge by default (--no-heal: the merge as is).
    """
    from moecompress.passes.merge_experts import MergeExpertsConfig

    run_one(MergeExpertsConfig, dict(ratio=ratio, keep=keep, method=method, merge=merge, router=router, rank=rank,
                                     energy=energy, align=align, group_size=group_size, seed=seed, mtp=mtp,
                                     heal=heal_option(heal, heal_steps)),
            model, out, calib=calib_spec(calib, calib_samples, calib_seqlen, calib_seed, calib_domain, model), evals=evals,
            eval_data=eval_data, overwrite=overwrite, dtype=dtype, stats_cache=stats_cache, device=device,
            max_memory=max_memory, max_shard_size=max_shard_size, target=target, ep_size=ep_size, revision=revision)


@app.command("quantize")
def quantize_cmd(
    model: str = typer.Argument(..., help="Input checkpoint folder (float; never modified) or a Hub id."),
    out: Path = OUT,
    bits: int = typer.Option(4, "--bits", help="Weight bits: 8, 4, 3 or 2 (vLLM serves 4 and 8)."),
    group_size: int = typer.Option(128, "--group-size", help="Columns sharing one scale; -1 = per output row."),
    method: str = typer.Option("gptq", "--method", help="gptq (calibrated, error feedback) or rtn (round to nearest)."),
    balance: bool = typer.Option(False, "--balance", help="Every calibration token updates every expert's Hessian "
                                 "(rare experts get enough data)."),
    affinity: bool = typer.Option(False, "--affinity", help="Weight each token's x xᵀ by its gate affinity for the "
                                  "expert (MoEQuant AGQ)."),
    attention: bool = typer.Option(False, "--attention", help="Also quantize attention linears."),
    shared: bool = typer.Option(False, "--shared", help="Also quantize shared experts."),
    ignore: list[str] = typer.Option([], "--ignore", help="Regex of module names to keep in high precision "
                                     "(repeatable)."),
    bits_budget: float | None = typer.Option(None, "--bits-budget", help="Mixed precision: average bits per expert "
                                             "weight, allocated per expert from frequency and error (MC-MoE)."),
    damp: float = typer.Option(0.01, "--damp", help="GPTQ damping, relative to the mean Hessian diagonal."),
    calib: str | None = CALIB, calib_samples: int = CALIB_SAMPLES, calib_seqlen: int = CALIB_SEQLEN,
    calib_seed: int = CALIB_SEED, evals: str | None = EVAL, eval_data: Path | None = EVAL_DATA,
    overwrite: bool = OVERWRITE, dtype: str | None = DTYPE, target: str | None = TARGET,
    ep_size: int | None = EP_SIZE, revision: str | None = REVISION,
    device: str = DEVICE, max_memory: str | None = MAX_MEMORY, max_shard_size: str = MAX_SHARD, mtp: str = MTP,
) -> None:
    """Quantize routed experts (GPTQ or RTN) into a compressed-tensors pack-quantized checkpoint.

    Router, embeddings, lm_head and norms stay in high precision. The output loads with plain
    `from_pretrained` (and vLLM for 4/8 bits). Example: moecompress quantize ref --out ref-w4 --bits 4
    """
    from moecompress.passes.quantize import QuantizeConfig

    run_one(QuantizeConfig, dict(bits=bits, group_size=group_size, method=method, balance=balance, affinity=affinity,
                                 attention=attention, shared=shared, ignore=list(ignore), bits_budget=bits_budget,
                                 damp=damp, mtp=mtp),
            model, out, calib=calib_spec(calib, calib_samples, calib_seqlen, calib_seed, model=model), evals=evals,
            eval_data=eval_data, overwrite=overwrite, dtype=dtype, device=device, max_memory=max_memory,
            max_shard_size=max_shard_size, target=target, ep_size=ep_size, revision=revision)


@app.command("heal")
def heal_cmd(
    compressed: Path = typer.Argument(..., help="A pruned / merged / neuron-pruned checkpoint (never modified)."),
    reference: Path = typer.Option(..., "--reference", "-r", help="The checkpoint COMPRESSED was made from."),
    out: Path = OUT,
    heal_steps: int = typer.Option(0, "--heal-steps", help="fp32 Adam steps per layer after the closed-form fits "
                                   "(early-stopped on held-out calibration tokens)."),
    router: bool = typer.Option(True, "--router/--no-router", help="(a) least-squares router rows."),
    down: bool = typer.Option(True, "--down/--no-down", help="(b) ridge least-squares down projections."),
    calib: str | None = CALIB, calib_samples: int = CALIB_SAMPLES, calib_seqlen: int = CALIB_SEQLEN,
    calib_seed: int = CALIB_SEED, evals: str | None = EVAL, eval_data: Path | None = EVAL_DATA,
    overwrite: bool = OVERWRITE, dtype: str | None = DTYPE,
) -> None:
    """Repair a compressed checkpoint layer by layer against the original's outputs; shapes stay the same.

    Example: moecompress heal ref-p50 --reference ref --out ref-p50-healed --eval ref_ppl
    """
    from moecompress.passes.heal import HealConfig

    run_one(HealConfig, dict(reference=str(reference), steps=heal_steps, router=router, down=down),
            compressed, out, calib=calib_spec(calib, calib_samples, calib_seqlen, calib_seed, model=compressed),
            evals=evals, eval_data=eval_data, overwrite=overwrite, dtype=dtype)


@app.command("fit")
def fit_cmd(
    model: str = typer.Argument(..., help="Input checkpoint folder (never modified) or a Hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: the winner's recipe.yaml, its step folders "
                             "(the last one is the checkpoint), fit.md / fit.json / fit.png with every candidate."),
    target_size: str | None = typer.Option(None, "--target-size", help="Largest checkpoint on disk, e.g. 24GB, "
                                           "500MiB or a byte count (safetensors files, headers included)."),
    target_ratio: float | None = typer.Option(None, "--target-ratio", help="Instead of --target-size: the output's "
                                              "bytes on disk as a share of the input's, e.g. 0.3."),
    bits: str = typer.Option("8,4", "--bits", help="Weight widths fit may quantize routed experts to (comma-separated, "
                             "from 8,4; empty = never quantize). Experts may also stay at the stored float dtype."),
    heal: bool = typer.Option(True, "--heal/--no-heal", help="Also try every structural plan with closed-form heal."),
    criterion: str = typer.Option("reap", "--criterion", help="Which experts a plan keeps: reap | frequency | "
                                  "soft_frequency | ean | easy_ep."),
    neuron_criterion: str = typer.Option("heapr", "--neuron-criterion", help="Which expert neurons a narrower plan "
                                         "keeps: heapr (one backward pass) | camera | magnitude."),
    measure: int = typer.Option(3, "--measure", min=1, help="How many of the best predicted plans to build in memory "
                                "and measure (KL to the original on held-out calibration tokens)."),
    held_out: int = typer.Option(16, "--held-out", min=1, help="Held-out calibration sequences (taken after "
                                 "--calib-samples in the same source; no pass sees them)."),
    ep_size: int | None = EP_SIZE,
    tp_size: int | None = typer.Option(None, "--tp-size", min=1, help="Tensor-parallel size: the expert width must "
                                       "split into this many shards (and each shard by the quantization group)."),
    target: str | None = TARGET,
    calib: str | None = CALIB, calib_samples: int = CALIB_SAMPLES, calib_seqlen: int = CALIB_SEQLEN,
    calib_seed: int = CALIB_SEED, overwrite: bool = OVERWRITE, dtype: str | None = DTYPE,
    stats_cache: Path | None = STATS_CACHE, revision: str | None = REVISION, device: str = DEVICE,
    max_memory: str | None = MAX_MEMORY, max_shard_size: str = MAX_SHARD,
) -> None:
    """Compress to the size you name with the least damage, written as a rerunnable recipe.

    \b
    1. enumerate: every plan that meets the size - experts kept per layer
       (divisible by --ep-size), HEAPr expert width, experts at 8/4 bits or
       float, heal on/off - with bytes counted as written (as plan/inspect
       count them, headers included); --target vllm keeps widths multiples
       of 64 and vLLM's group sizes, --tp-size splits widths evenly.
    2. predict: each plan's damage from one statistics pass (per-layer
       block-output error of the kept experts, healed and unhealed, plus
       round-to-nearest quantization error).
    3. measure: build the --measure best in memory; KL to the original on
       --held-out calibration sequences no pass has seen.
    4. write: run the winner as a recipe into OUT (OUT/recipe.yaml reruns it
       with `moecompress run`), plus fit.md / fit.json / fit.png comparing
       predicted vs measured damage and bytes of every candidate.

    A size no plan meets is refused before anything loads (exit 2, nothing
    written). Example:
    moecompress fit ref --out runs/fit30 --target-ratio 0.3 --ep-size 4
    """
    from moecompress.fit import SearchSpace, fit_model
    from moecompress.runner import RunOptions

    quiet_transformers()
    try:
        bit_list = tuple(int(b) for b in bits.split(",") if b.strip())
    except ValueError:
        raise UserError(f"--bits {bits!r}: use comma-separated widths from 8,4") from None
    if any(b not in (4, 8) for b in bit_list):
        raise UserError(f"--bits {bits!r}: fit quantizes to 8 or 4 bits (what vLLM serves)")
    if criterion not in ("reap", "frequency", "soft_frequency", "ean", "easy_ep"):
        raise UserError(f"--criterion {criterion!r}: use reap, frequency, soft_frequency, ean or easy_ep")
    if neuron_criterion not in ("heapr", "camera", "magnitude"):
        raise UserError(f"--neuron-criterion {neuron_criterion!r}: use heapr, camera or magnitude")
    target = check_target(target)
    space = SearchSpace(bits=bit_list, heal=heal, criterion=criterion, neuron_criterion=neuron_criterion,
                        ep_size=ep_size, tp_size=tp_size, target=target)
    opts = RunOptions(overwrite=overwrite, dtype=dtype, stats_cache=stats_cache, device=device, max_memory=max_memory,
                      max_shard_size=max_shard_size, target=target, ep_size=ep_size, revision=revision)
    result = fit_model(model, out, target_size=target_size, target_ratio=target_ratio, space=space,
                       calibration=calib_spec(calib, calib_samples, calib_seqlen, calib_seed, model=Path(model)),
                       held_out=held_out, n_measure=measure, opts=opts, console=console)
    from moecompress.fit.write import render

    s = result["summary"]
    render(console, result["candidates"], s)
    console.print(f"checkpoint: {s['checkpoint']} · recipe: {s['recipe']} · table: {out / 'fit.md'}"
                  + (f" · plot: {out / 'fit.png'}" if (out / "fit.png").exists() else ""))


@app.command("sweep")
def sweep_cmd(
    model: str = typer.Argument(..., help="Input checkpoint folder or a Hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for all variants, sweep.md and pareto.png."),
    methods: str = typer.Option("prune:frequency,prune:reap", "--methods",
                                help="Comma-separated: prune:<criterion>, merge:<method>[+<rule>], atomic:<criterion>."),
    ratios: str = typer.Option("0.25,0.5", "--ratios", help="Comma-separated compression ratios."),
    calib: str | None = CALIB, calib_samples: int = CALIB_SAMPLES, calib_seqlen: int = CALIB_SEQLEN,
    calib_seed: int = CALIB_SEED, evals: str = typer.Option("ref_ppl", "--eval", help="lm-eval tasks to compare."),
    eval_data: Path | None = EVAL_DATA, overwrite: bool = OVERWRITE, dtype: str | None = DTYPE, stats_cache: Path | None = STATS_CACHE,
    revision: str | None = REVISION,
) -> None:
    """Many variants from one statistics pass: a table (sweep.md) and a quality-vs-bytes Pareto plot."""
    from moecompress.runner import RunOptions
    from moecompress.sweep import run_sweep

    quiet_transformers()
    try:
        ratio_list = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--ratios {ratios!r}: use comma-separated numbers, e.g. 0.25,0.5") from None
    rows = run_sweep(model, out, [m.strip() for m in methods.split(",") if m.strip()], ratio_list,
                     calibration=calib_spec(calib, calib_samples, calib_seqlen, calib_seed, model=model),
                     eval_spec=eval_spec(evals, eval_data),
                     opts=RunOptions(overwrite=overwrite, dtype=dtype, stats_cache=stats_cache, revision=revision),
                     console=console)
    console.print((out / "sweep.md").read_text())
    console.print(f"{len(rows)} variants; Pareto plot: {out / 'pareto.png'}")


@app.command("run")
def run_cmd(
    recipe: Path = typer.Argument(..., help="Recipe YAML: model, calibration, eval and an ordered list of passes."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: each pass writes OUT/NN-pass/."),
    model: str | None = typer.Option(None, "--model", help="Override the recipe's model (folder or Hub id)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo finished steps instead of resuming."),
    dtype: str | None = DTYPE, stats_cache: Path | None = STATS_CACHE, target: str | None = TARGET,
    ep_size: int | None = EP_SIZE, revision: str | None = REVISION,
    device: str = DEVICE, max_memory: str | None = MAX_MEMORY, max_shard_size: str = MAX_SHARD,
) -> None:
    """Run a recipe; a rerun resumes (finished steps are skipped, an interrupted one is redone)."""
    from moecompress.recipe import load_recipe
    from moecompress.runner import RunOptions, run_recipe

    parsed = load_recipe(recipe)  # validated before any weight loads
    quiet_transformers()
    reports = run_recipe(parsed, out, model=model, opts=RunOptions(overwrite=overwrite, dtype=dtype,
                                                                   stats_cache=stats_cache, device=device,
                                                                   max_memory=max_memory,
                                                                   max_shard_size=max_shard_size,
                                                                   target=check_target(target), ep_size=ep_size,
                                                                   revision=revision),
                         console=console)
    for r in reports:
        print_report(r)
    console.print(f"run summary: {out / 'run.md'}")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run folder: one subfolder per step."),
    reference: Path = typer.Option(Path("artifacts/reference"), "--reference",
                                   help="Where the trained reference MoE is (built here when missing)."),
    minutes: float = typer.Option(9.0, "--minutes", help="Training budget when the reference must be built."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo finished steps instead of resuming."),
) -> None:
    """The main job on an embedded default: reference MoE → REAP prune 25% → GPTQ W4, evaluated.

    Builds the small reference MoE locally when it is missing (~9 min on 2 CPU cores; reused afterwards),
    runs the packaged recipe (written to OUT/recipe.yaml), prints parameters, bytes, perplexity and accuracy
    after each step, and names the checkpoint, report and plots it wrote.
    """
    from moecompress.demo import run_demo

    quiet_transformers()
    run_demo(out, reference, minutes=minutes, overwrite=overwrite, console=console)


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


# commands that run under torchrun / accelerate launch (each rank calibrates on its share, rank 0 writes)
DATA_PARALLEL_COMMANDS = frozenset({"prune", "merge", "quantize", "run", "heal", "fit", "plan", "inspect"})


def _option_value(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` / `--name=VALUE` in argv (read before the command line is parsed)."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def main() -> None:
    """Console-script entry: one clear line and exit 2 for user errors.

    Under ``torchrun`` / ``accelerate launch`` (WORLD_SIZE > 1) the process first joins the run's process group;
    ranks other than 0 print nothing but their own failure (``moecompress.dist``).
    """
    from rich.markup import escape

    from moecompress import dist

    prefix = ""
    try:
        if dist.launched_size() > 1:
            command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
            if command not in DATA_PARALLEL_COMMANDS:
                raise UserError(f"`moecompress {command}` does not run data-parallel; launch it without torchrun "
                                f"(data-parallel commands: {', '.join(sorted(DATA_PARALLEL_COMMANDS))})")
            w = dist.init_from_env(sys.argv[1:], device=_option_value(sys.argv[1:], "--device"))
            if not w.is_main:
                console.quiet = True
                prefix = f"rank {w.rank}: "
        app()  # standalone: usage errors already exit 2 with a message
    except UserError as exc:
        err_console.print(f"[bold red]error:[/] {escape(prefix + str(exc))}", highlight=False)
        sys.exit(2)
    except dist.RankFailure as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(1)
    finally:
        dist.shutdown()


if __name__ == "__main__":
    main()
