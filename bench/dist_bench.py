"""Data-parallel runs (torchrun, gloo on CPU): wall time, peak RSS per rank, GPTQ solve split by rank, and how far
the outputs of N = 2 and 4 ranks are from one process.

    python bench/dist_bench.py                         # the trained reference, N = 1, 2, 4
    python bench/dist_bench.py --model /tmp/big --ns 1,2 --passes gptq

Each (pass, N) runs in a fresh process group with an empty statistics cache, so the statistics sweep is part of
the timed run. N = 1 runs with all threads; N ranks run with OMP_NUM_THREADS = cores // N (torchrun's default is 1).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
PASSES = {
    "reap": ["prune", "--ratio", "0.5", "--criterion", "reap", "--no-heal"],
    "merge": ["merge", "--ratio", "0.5", "--method", "hc", "--no-heal"],
    "heapr": ["prune", "--neuron-ratio", "0.25", "--no-heal"],
    "gptq": ["quantize", "--bits", "4", "--group-size", "32"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(model: Path, name: str, n: int, out: Path, cache: Path) -> dict:
    cores = os.cpu_count() or 1
    env = {**os.environ, "MOECOMPRESS_CACHE": str(cache), "OMP_NUM_THREADS": str(max(1, cores // n)),
           "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
           str(free_port()), "-m", "moecompress", *PASSES[name][:1], str(model), *PASSES[name][1:], "--out", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"{name} N={n} failed:\n{res.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"wall": wall, "pass_seconds": report["seconds"], "dist": report["distributed"], "report": report}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in glob.glob(str(folder / "*.safetensors")):
        out.update(load_file(f))
    return out


def compare(a: Path, b: Path) -> str:
    """Max float difference of unquantized tensors and the share of equal 4-bit codes."""
    x, y = tensors(a), tensors(b)
    if set(x) != set(y):
        return "different keys"
    worst, equal, total = 0.0, 0, 0
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    for k in x:
        if k.endswith("weight_packed"):
            cx, cy = (x[k].unsqueeze(-1) >> shifts) & 0xF, (y[k].unsqueeze(-1) >> shifts) & 0xF
            equal += int((cx == cy).sum())
            total += cx.numel()
        elif x[k].is_floating_point() and not k.endswith("weight_scale"):
            worst = max(worst, float((x[k].float() - y[k].float()).abs().max()) if x[k].numel() else 0.0)
    codes = f", codes equal {equal / total:.2%}" if total else ""
    return f"max |Δw| {worst:.2g}{codes}"


def val_ppl(folder: Path, model: Path, docs: int) -> float:
    """Held-out perplexity of a written checkpoint on the reference's val set (the first `docs` documents of each
    domain, as bench/common.py stratifies)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from common import stratified

    from moecompress.io.checkpoint import load_model
    from moecompress.zoo.metrics import load_jsonl, perplexity

    loaded = load_model(folder)
    rows = stratified(load_jsonl(model / "data" / "val.jsonl"), docs)
    return perplexity(loaded.model, loaded.tokenizer, [r["text"] for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "artifacts" / "reference")
    ap.add_argument("--ns", default="1,2,4")
    ap.add_argument("--passes", default=",".join(PASSES))
    ap.add_argument("--ppl-docs", type=int, default=200, help="val docs scored per output (0: skip perplexity)")
    args = ap.parse_args()
    ns = [int(n) for n in args.ns.split(",")]
    work = Path(tempfile.mkdtemp(prefix="dist-bench-"))
    rows = []
    try:
        for name in args.passes.split(","):
            outs = {}
            for n in ns:
                out = work / f"{name}-{n}"
                r = run(args.model, name, n, out, work / f"cache-{name}-{n}")
                outs[n] = out
                d = r["dist"]
                same = "" if n == ns[0] else compare(outs[ns[0]], out)
                kept = r["report"]["details"].get("kept")
                if n != ns[0] and kept is not None:
                    base = json.loads((outs[ns[0]] / "report.json").read_text())["details"].get("kept")
                    same += f", kept experts {'equal' if kept == base else 'DIFFER'}"
                errs = r["report"]["details"].get("mean_output_error")
                if errs:
                    same += ", output error " + "/".join(f"{v:.4g}" for v in errs.values())
                if args.ppl_docs and (args.model / "data" / "val.jsonl").is_file():
                    same += f", val ppl {val_ppl(out, args.model, args.ppl_docs):.4f}"
                rows.append((name, n, r["wall"], r["pass_seconds"], d.get("peak_rss_mb_by_rank",
                             [r["report"]["peak_rss_mb"]]), d.get("solve_seconds_by_rank"), same))
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| pass | N | wall (launch → exit) | pass seconds (rank 0) | peak RSS per rank (MiB) | solve s by rank | "
          "vs N=1 |")
    print("|---|---|---|---|---|---|---|")
    for name, n, wall, secs, rss, solve, same in rows:
        print(f"| {name} | {n} | {wall:.1f}s | {secs:.1f}s | {' / '.join(f'{m:.0f}' for m in rss)} | "
              f"{' / '.join(f'{s:.2f}' for s in solve) if solve else '—'} | {same} |")


if __name__ == "__main__":
    main()
