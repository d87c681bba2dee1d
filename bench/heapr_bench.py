"""Atomic-expert (neuron) pruning on the trained reference MoE: HEAPr vs CAMERA-style, magnitude, random,
and whole-expert REAP at the same parameter count; plus the memory of HEAPr's gradient statistics.

Prints (1) held-out perplexity at ~10/25/50% of expert neurons removed (uniform width; HEAPr also with the
global ranking written masked), (2) what the global ranking would keep per expert, (3) peak memory of the
score computation, each variant in a fresh subprocess, against the size of one layer's explicit M.
Run from the repo root: `python bench/heapr_bench.py` (≈ 5-8 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("MOECOMPRESS_CACHE", tempfile.mkdtemp(prefix="heapr-bench-"))

from common import REFERENCE, Bench, table, torch  # noqa: E402

from moecompress.arch import moe_layers  # noqa: E402
from moecompress.passes.prune_atomic import PruneAtomicConfig  # noqa: E402
from moecompress.passes.prune_experts import PruneExpertsConfig  # noqa: E402

RATIOS = (0.1, 0.25, 0.5)
RANDOM_SEEDS = 5


def wait_for_reference(path: Path, timeout: float) -> None:
    """The reference is trained by another job; poll until its folder is complete."""
    t0 = time.time()
    need = [path / "config.json", path / "data" / "val.jsonl", path / "data" / "train.jsonl"]
    while not all(p.is_file() for p in need) or not any(path.glob("*.safetensors")):
        if time.time() - t0 > timeout:
            sys.exit(f"reference model not found at {path} after {timeout:.0f}s")
        print(f"waiting for {path} …", flush=True)
        time.sleep(30)
    time.sleep(2)  # let the writer finish renaming


# ---- memory probe (runs in a fresh subprocess so every variant starts from the same allocator state) ----
class PeakRSS:
    """Samples this process's resident set every millisecond; `peak` is the highest value seen."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.base = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def memory_probe(mode: str, batch_size: int, samples: int, seqlen: int) -> None:
    from moecompress.calib.data import CalibSpec, load_calibration
    from moecompress.calib.gradients import collect_gradient_stats
    from moecompress.io.checkpoint import load_model

    torch.set_num_threads(2)
    loaded = load_model(REFERENCE)
    model = loaded.model
    calib = load_calibration(CalibSpec(source=str(REFERENCE / "data" / "train.jsonl"), samples=samples,
                                       seqlen=seqlen), loaded.tokenizer)
    layers = [ly.index for ly in moe_layers(model)]
    explicit = layers if mode == "explicit_all" else []
    with PeakRSS() as mem:
        gs = collect_gradient_stats(model, calib.batches(batch_size), explicit_layers=explicit,
                                    checkpoint_layers=mode != "projected_nockpt")
    print(json.dumps({"mode": mode, "peak_delta": mem.peak - mem.base, "state_bytes": gs.state_bytes(),
                      "seconds": gs.meta["collect_seconds"], "tokens": calib.n_tokens}))


def run_probe(mode: str, batch_size: int, samples: int, seqlen: int) -> dict:
    cmd = [sys.executable, __file__, "--memory-probe", mode, "--batch-size", str(batch_size),
           "--samples", str(samples), "--seqlen", str(seqlen)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- quality ------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> None:
    wait_for_reference(REFERENCE, args.wait)
    torch.set_num_threads(2)
    b = Bench(val_docs=args.val_docs, calib_samples=args.samples, calib_seqlen=args.seqlen)
    cfg = b.model.config
    width, n_exp = cfg.moe_intermediate_size, b.adapter.num_experts(cfg)
    layers = moe_layers(b.model)
    t0 = time.perf_counter()
    base = b.ppl(b.model)
    t_eval = time.perf_counter() - t0
    print(f"reference: {b.path}  {len(layers)} MoE layers x {n_exp} experts x {width} neurons, "
          f"hidden {cfg.hidden_size}; val ppl {base:.3f} ({len(b.val)} docs, {t_eval:.1f}s per eval)\n")
    b.stats()  # forward statistics once (camera, REAP)

    results: dict[str, dict[float, float]] = {}
    spread: dict[float, float] = {}
    shares: dict[float, str] = {}
    global_info: dict[float, dict] = {}
    timing: dict[str, float] = {}
    for r in RATIOS:
        atomic = PruneAtomicConfig(neuron_ratio=r)
        kept = atomic.new_width(width)
        share = 1 - kept / width
        n_drop = round(share * n_exp)
        shares[r] = f"{share:.1%} neurons ({width}->{kept}) | {n_drop}/{n_exp} experts"
        for name, c in [("heapr (uniform)", dict(criterion="heapr")),
                        ("heapr (global, masked)", dict(criterion="heapr", layout="masked")),
                        ("camera (uniform)", dict(criterion="camera")),
                        ("camera (global, masked)", dict(criterion="camera", layout="masked")),
                        ("magnitude (uniform)", dict(criterion="magnitude"))]:
            model, det = b.variant(PruneAtomicConfig(neuron_ratio=r, **c))
            results.setdefault(name, {})[r] = b.ppl(model)
            timing[name] = timing.get(name, 0.0) + det["seconds"]
            if name.startswith("heapr (global"):
                global_info[r] = det["global_ranking"]
        rand = []
        for seed in range(RANDOM_SEEDS):
            model, _ = b.variant(PruneAtomicConfig(neuron_ratio=r, criterion="random", seed=seed))
            rand.append(b.ppl(model))
        results.setdefault(f"random neurons ({RANDOM_SEEDS} seeds, mean)", {})[r] = statistics.mean(rand)
        spread[r] = statistics.stdev(rand)
        model, _ = b.variant(PruneExpertsConfig(keep=n_exp - n_drop, criterion="reap"))
        results.setdefault("REAP whole experts (same params)", {})[r] = b.ppl(model)
        print(f"  done {shares[r]}", flush=True)

    print("\n## Held-out perplexity (lower is better); base", f"{base:.3f}")
    header = ["method"] + [shares[r] for r in RATIOS]
    rows = [[name] + [vals[r] for r in RATIOS] for name, vals in results.items()]
    print(table(rows, header))
    print("random neuron spread (stdev over seeds): " + ", ".join(f"{spread[r]:.3f}" for r in RATIOS))
    for r in RATIOS:
        best = min(results, key=lambda n: results[n][r])
        print(f"best at {shares[r].split(' ')[0]} neurons: {best} (ppl {results[best][r]:.3f})")
    print("decision time summed over the 3 ratios (heapr's first run includes its backward pass, later ones hit "
          "the gradient-statistics cache): " + ", ".join(f"{k.split(' ')[0]} {v:.1f}s" for k, v in timing.items()
                                                          if "random" not in k))

    print("\n## What the global HEAPr ranking keeps per expert (uniform keeps the same width everywhere)")
    grows = []
    for r in RATIOS:
        g = global_info[r]
        per_layer = {k: f"{min(v)}-{max(v)}" for k, v in g["kept_per_expert"].items()}
        grows.append([shares[r].split(" ")[0], PruneAtomicConfig(neuron_ratio=r).new_width(width), g["min"],
                      g["median"], g["max"], g["dead_experts"], g["agreement_with_per_expert"],
                      " ".join(f"L{k}:{v}" for k, v in per_layer.items())])
    print(table(grows, ["removed", "uniform width", "min", "median", "max", "experts emptied",
                        "overlap w/ uniform", "range per layer"]))

    if not args.skip_memory:
        print("\n## Peak memory of the HEAPr score computation (fresh process each; RSS above the loaded model)")
        h, n_layers = cfg.hidden_size, len(layers)
        one_m = n_exp * h * h * 8
        mrows = []
        for mode, label in [("projected", "projected Σ(gᵀW)², layer checkpointing (default)"),
                            ("projected_nockpt", "projected, no checkpointing"),
                            ("explicit_all", "explicit M for every layer at once (public impl.)")]:
            p = run_probe(mode, args.batch_size, args.samples, args.seqlen)
            mrows.append([label, p["state_bytes"] / 2**20, p["peak_delta"] / 2**20, p["seconds"]])
        print(table(mrows, ["statistics", "state held (MiB)", "peak RSS delta (MiB)", "seconds"]))
        print(f"one layer's explicit M = E·H²·8 B = {one_m / 2**20:.2f} MiB; all {n_layers} layers "
              f"{n_layers * one_m / 2**20:.2f} MiB; projected state for ALL layers "
              f"{n_layers * n_exp * width * 2 * 8 / 2**20:.2f} MiB (+ [E] counts). "
              f"batch {args.batch_size}x{args.seqlen} tokens, {args.samples} sequences.")
        print("At a real model's scale (E=128, H=4096, 48 layers) the explicit M is "
              f"{128 * 4096**2 * 8 * 48 / 2**30:.0f} GiB; the projected state (I=768) is "
              f"{128 * 768 * 2 * 8 * 48 / 2**20:.0f} MiB.")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--memory-probe", choices=["projected", "projected_nockpt", "explicit_all"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--val-docs", type=int, default=1000)
    ap.add_argument("--wait", type=float, default=1800, help="seconds to wait for the reference model")
    ap.add_argument("--skip-memory", action="store_true")
    a = ap.parse_args()
    if a.memory_probe:
        memory_probe(a.memory_probe, a.batch_size, a.samples, a.seqlen)
    else:
        main(a)
