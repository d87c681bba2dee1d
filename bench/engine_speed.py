"""Wall time of each pass streamed through the engine vs the in-memory path, on the trained reference model.

    python bench/engine_speed.py [REFERENCE] [--repeats 3] [--profile PASS]

Both sides are ``runner.run_pass`` as the CLI calls it (statistics collected afresh each run, write, verification,
calibration KL where the pass reports it, no plots, ``--device cpu``); the in-memory side is the same call with
the pass's ``streams`` switched off, i.e. the path every pass took before the engine. Each (pass, side) runs in its
own process (the engine steers glibc's malloc settings process-wide, which must not leak into the other side): one
warm-up run (imports, first calls), then ``--repeats`` timed runs; the best wall time is kept (the machine is
shared; the minimum is the least disturbed run), with the process CPU time of that run (user + system, all
threads), which a busy machine disturbs less.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REFERENCE  # noqa: E402

from moecompress.calib.data import CalibSpec  # noqa: E402
from moecompress.passes import base  # noqa: E402
from moecompress.passes.merge_experts import MergeExpertsConfig  # noqa: E402
from moecompress.passes.prune_atomic import PruneAtomicConfig  # noqa: E402
from moecompress.passes.prune_experts import PruneExpertsConfig  # noqa: E402
from moecompress.passes.quantize import QuantizeConfig  # noqa: E402
from moecompress.runner import RunOptions, run_pass  # noqa: E402

PASSES: dict[str, Any] = {
    "prune reap 50%": PruneExpertsConfig(ratio=0.5, criterion="reap"),
    "merge 50% (defaults)": MergeExpertsConfig(ratio=0.5),
    "HEAPr uniform 50%": PruneAtomicConfig(neuron_ratio=0.5, criterion="heapr"),
    "GPTQ W4 g32": QuantizeConfig(method="gptq", bits=4, group_size=32),
}


@contextlib.contextmanager
def in_memory(cfg: Any) -> Iterator[None]:
    """run_pass takes the in-memory path for this pass while the context is active."""
    reg = base.PASSES[cfg.name]
    saved = reg.layerwise
    if saved is not None:
        reg.layerwise = dataclasses.replace(saved, streams=lambda c: False)
    try:
        yield
    finally:
        reg.layerwise = saved


def timed(cfg: Any, src: Path, work: Path, spec: CalibSpec, streamed: bool) -> tuple[float, float]:
    out = work / "out"
    opts = RunOptions(plots=False, stats_cache=Path(tempfile.mkdtemp(dir=work)), device="cpu", overwrite=True)
    torch.manual_seed(0)
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.nullcontext() if streamed else in_memory(cfg):
        report = run_pass(cfg, src, out, calibration=spec, opts=opts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert (report.get("engine") or {}).get("mode") == ("streamed" if streamed else None), report.get("engine")
    shutil.rmtree(out)
    shutil.rmtree(opts.stats_cache)
    return wall, cpu


def one(name: str, side: str, args: argparse.Namespace, spec: CalibSpec, work: Path) -> None:
    """Child process: warm-up, then the timed repeats of one pass on one side; prints 'wall cpu' of the best."""
    cfg = PASSES[name]
    timed(cfg, args.reference, work, spec, side == "streamed")
    runs = [timed(cfg, args.reference, work, spec, side == "streamed") for _ in range(args.repeats)]
    print("RESULT", *min(runs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reference", nargs="?", type=Path, default=REFERENCE)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--only", default=None, help="comma-separated substrings of the pass names to run")
    ap.add_argument("--profile", default=None, help="cProfile the streamed run of the pass whose name contains this")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: "PASS NAME::side"
    ap.add_argument("--profile-in-memory", action="store_true", help="profile the in-memory run instead")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = CalibSpec(source=str(args.reference / "data" / "train.jsonl"), samples=args.samples, seqlen=args.seqlen)
    work = Path(tempfile.mkdtemp(prefix="engine-speed-"))
    try:
        if args.profile:
            name, cfg = next((n, c) for n, c in PASSES.items() if args.profile.lower() in n.lower())
            timed(cfg, args.reference, work, spec, not args.profile_in_memory)  # warm imports
            prof = cProfile.Profile()
            prof.enable()
            wall, cpu = timed(cfg, args.reference, work, spec, not args.profile_in_memory)
            prof.disable()
            print(f"{name}: {wall:.2f}s wall, {cpu:.2f}s cpu")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(60)
            return
        if args.one:
            name, side = args.one.split("::")
            one(name, side, args, spec, work)
            return
        print(f"reference {args.reference}; calibration {args.samples} x {args.seqlen} tokens; "
              f"torch threads {torch.get_num_threads()}; best of {args.repeats}")
        print("| pass | in-memory wall (cpu) | streamed wall (cpu) | streamed / in-memory wall (cpu) |\n"
              "|---|---:|---:|---:|")
        names = [n for n in PASSES if not args.only or any(s.lower() in n.lower() for s in args.only.split(","))]
        for name in names:
            res = {}
            for side in ("in-memory", "streamed"):
                proc = subprocess.run([sys.executable, __file__, str(args.reference), "--repeats", str(args.repeats),
                                       "--samples", str(args.samples), "--seqlen", str(args.seqlen),
                                       "--one", f"{name}::{side}"], capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
                if proc.returncode or line is None:
                    raise SystemExit(f"{name} {side} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
                res[side] = [float(x) for x in line.split()[1:]]
            (mw, mc), (sw, sc) = res["in-memory"], res["streamed"]
            print(f"| {name} | {mw:.2f} s ({mc:.2f} s) | {sw:.2f} s ({sc:.2f} s) | {sw / mw:.2f} ({sc / mc:.2f}) |",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
