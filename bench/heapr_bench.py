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

RATIOS = (0.1, 0.25, 0.5, 0.75)  # 10/25/50% asked; 75% added because criteria only separate there
RANDOM_SEEDS = 3


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


def balanced(rows: list[dict], n: int) -> list[dict]:
    """The first n/D documents of each of the D domains."""
    domains = sorted({r["domain"] for r in rows})
    per = max(1, n // len(domains))
    return [r for d in domains for r in [x for x in rows if x["domain"] == d][:per]]


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


def memory_probe(mode: str, batch_size: int, samples: int, seqlen: int, synthetic_layers: int | None) -> None:
    """Peak RSS of one gradient-statistics pass; on the reference, or on a random wider model of N layers."""
    from moecompress.calib.data import CalibSpec, load_calibration
    from moecompress.calib.gradients import collect_gradient_stats
    from moecompress.io.checkpoint import load_model
    from moecompress.zoo.tiny import tiny

    torch.set_num_threads(2)
    if synthetic_layers:
        model, _ = tiny("qwen3_moe", **SYNTHETIC, num_hidden_layers=synthetic_layers)
        ids = torch.randint(0, model.config.vocab_size, (samples, seqlen), generator=torch.Generator().manual_seed(0))
        batches = [(ids[i : i + batch_size], torch.ones_like(ids[i : i + batch_size]))
                   for i in range(0, samples, batch_size)]
        n_tokens = ids.numel()
    else:
        loaded = load_model(REFERENCE)
        model = loaded.model
        calib = load_calibration(CalibSpec(source=str(REFERENCE / "data" / "train.jsonl"), samples=samples,
                                           seqlen=seqlen), loaded.tokenizer)
        batches, n_tokens = list(calib.batches(batch_size)), calib.n_tokens
    layers = [ly.index for ly in moe_layers(model)]
    explicit = layers if mode == "explicit_all" else []
    with PeakRSS() as mem:
        gs = collect_gradient_stats(model, batches, explicit_layers=explicit, checkpoint_layers=mode != "projected_nockpt")
    print(json.dumps({"mode": mode, "peak_delta": mem.peak - mem.base, "state_bytes": gs.state_bytes(),
                      "seconds": gs.meta["collect_seconds"], "tokens": n_tokens}))


SYNTHETIC = dict(hidden_size=512, num_experts=16, moe_intermediate_size=256, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=64, intermediate_size=1024, max_position_embeddings=512)
MODES = [("projected", "projected Σ(gᵀW)², layer checkpointing (default)"),
         ("projected_nockpt", "projected, no layer checkpointing"),
         ("explicit_all", "explicit M for every layer at once (public impl.)")]


def run_probe(mode: str, batch_size: int, samples: int, seqlen: int, synthetic_layers: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--memory-probe", mode, "--batch-size", str(batch_size),
           "--samples", str(samples), "--seqlen", str(seqlen), "--synthetic-layers", str(synthetic_layers)]
    # glibc keeps freed mid-size blocks in its heap, so RSS would show the allocator's high-water mark;
    # serving every block above 64 KiB by mmap makes RSS follow the live tensors.
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_section(args: argparse.Namespace, n_exp: int, hidden: int, width: int, n_layers: int) -> None:
    mib = 2**20
    print("\n## Peak memory of the HEAPr score computation (fresh process each; RSS above the loaded model)")
    rows = []
    for mode, label in MODES:
        p = run_probe(mode, args.batch_size, args.samples, args.seqlen)
        rows.append([label, args.samples, p["state_bytes"] / mib, p["peak_delta"] / mib, p["seconds"]])
    p = run_probe("projected", args.batch_size, args.samples // 4, args.seqlen)
    rows.append([MODES[0][1], args.samples // 4, p["state_bytes"] / mib, p["peak_delta"] / mib, p["seconds"]])
    print(f"reference ({n_layers} layers, E={n_exp}, H={hidden}, I={width}), batches of {args.batch_size}x{args.seqlen}:")
    print(table(rows, ["statistics", "calib seqs", "state held (MiB)", "peak RSS delta (MiB)", "seconds"]))
    one_m = n_exp * hidden * hidden * 8
    print(f"one layer's explicit M = E·H²·8 B = {one_m / mib:.2f} MiB; projected state for all {n_layers} layers = "
          f"{n_layers * n_exp * (2 * width + 1) * 8 / mib:.3f} MiB. The peak does not grow with the calibration "
          "size (streamed); on a model this small it is mostly one batch's activations and logits.")

    s = SYNTHETIC
    e, h, i = s["num_experts"], s["hidden_size"], s["moe_intermediate_size"]
    srows = []
    for mode, label in MODES:
        vals = {n: run_probe(mode, 4, 4, 256, n) for n in (2, 8)}
        srows.append([label] + [f"{vals[n]['peak_delta'] / mib:.0f} (state {vals[n]['state_bytes'] / mib:.2f})"
                                for n in (2, 8)] + [(vals[8]["peak_delta"] - vals[2]["peak_delta"]) / 6 / mib])
    print(f"\nscaling with depth: random qwen3_moe E={e}, H={h}, I={i}, one batch of 4x256 tokens "
          f"(one layer's explicit M = {e * h * h * 8 / mib:.0f} MiB; one layer boundary = {4 * 256 * h * 4 / mib:.0f} MiB):")
    print(table(srows, ["statistics", "2 layers: peak MiB", "8 layers: peak MiB", "MiB per extra layer"]))
    print(f"At a real model's scale (E=128, H=4096, 48 layers) the explicit M is {128 * 4096**2 * 8 * 48 / 2**30:.0f} "
          f"GiB (fp64); the projected state (I=768) is {128 * 768 * 2 * 8 * 48 / mib:.0f} MiB.")


# ---- quality ------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> None:
    wait_for_reference(REFERENCE, args.wait)
    torch.set_num_threads(2)
    b = Bench(val_docs=10**9, calib_samples=args.samples, calib_seqlen=args.seqlen)
    b.val = balanced(b.val, args.val_docs)  # val.jsonl is sorted by domain: a prefix would cover only one or two
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
        shares[r] = f"{share:.1%} ({kept}/{width} wide; {n_drop}/{n_exp} experts)"
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
        print(f"best at {shares[r].split(' ')[0]} removed: {best} (ppl {results[best][r]:.3f})")
    print(f"decision time summed over the {len(RATIOS)} ratios (heapr's first run includes its backward pass; the "
          "others hit the gradient-statistics cache): "
          + ", ".join(f"{k} {v:.1f}s" for k, v in timing.items()))

    print("\n## What the global HEAPr ranking keeps per expert (uniform keeps the same width everywhere)")
    grows = []
    for r in RATIOS:
        g = global_info[r]
        per_layer = {k: f"{min(v)}-{max(v)}" for k, v in g["kept_per_expert"].items()}
        grows.append([shares[r].split(" ")[0], PruneAtomicConfig(neuron_ratio=r).new_width(width), g["min"],
                      int(g["median"]), g["max"], g["dead_experts"], g["agreement_with_per_expert"],
                      " ".join(f"L{k}:{v}" for k, v in per_layer.items())])
    print(table(grows, ["removed", "uniform width", "min", "median", "max", "experts emptied",
                        "overlap w/ uniform", "range per layer"]))

    if not args.skip_memory:
        memory_section(args, n_exp, cfg.hidden_size, width, len(layers))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--memory-probe", choices=["projected", "projected_nockpt", "explicit_all"])
    ap.add_argument("--synthetic-layers", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--val-docs", type=int, default=600, help="balanced over domains")
    ap.add_argument("--wait", type=float, default=1800, help="seconds to wait for the reference model")
    ap.add_argument("--skip-memory", action="store_true")
    a = ap.parse_args()
    if a.memory_probe:
        memory_probe(a.memory_probe, a.batch_size, a.samples, a.seqlen, a.synthetic_layers)
    else:
        main(a)
