"""Check `plan`'s memory estimates against measured runs of the layer-streaming engine.

Builds a random Qwen3-MoE of ~0.5B parameters (bf16, ~1 GB) on disk; for each pass asks `moecompress plan` for
its estimate, then runs the pass (which streams the checkpoint a decoder layer at a time through
moecompress.engine) under `/usr/bin/time -v` and reads the peak RSS of the whole process.
Run: `python bench/plan_memory.py [--layers 8] [--experts 32] [--passes prune,quantize,merge]`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from moecompress.io.checkpoint import write_checkpoint  # noqa: E402
from moecompress.zoo.tiny import tiny  # noqa: E402
from tests.helpers import calib_file  # noqa: E402

GiB = 1024**3
PASSES = {  # pass name → CLI arguments (given the expert count)
    "prune": lambda e: ["prune", "--keep", str(e // 2), "--criterion", "frequency", "--no-heal"],
    "quantize": lambda e: ["quantize", "--bits", "4", "--group-size", "128", "--method", "gptq"],
    "merge": lambda e: ["merge", "--keep", str(e // 2), "--no-heal"],
    "heapr": lambda e: ["prune", "--neuron-ratio", "0.5", "--criterion", "heapr", "--no-heal"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--passes", default="prune,quantize,merge")
    ap.add_argument("--plan-only", action="store_true", help="print the estimates, skip the measured runs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as d:
        d = Path(d)
        model, tok = tiny("qwen3_moe", num_hidden_layers=args.layers, num_experts=args.experts,
                          num_experts_per_tok=4, hidden_size=args.hidden, moe_intermediate_size=args.width,
                          num_attention_heads=16, num_key_value_heads=4, head_dim=64, vocab_size=32000)
        model = model.to(torch.bfloat16)
        write_checkpoint(model, tok, d / "m", source=None, verify=False)
        n_params = sum(p.numel() for p in model.parameters())
        del model
        calib = calib_file(d / "c.jsonl", n=400)
        common = ["--calib", str(calib), "--calib-samples", "32", "--calib-seqlen", "128"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
        print("| pass | params | bf16 bytes | plan: streamed layers | plan: full reload check | measured peak RSS | "
              "plan: in-memory path |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in args.passes.split(","):
            pass_args = PASSES[name](args.experts)
            plan = subprocess.run([sys.executable, "-m", "moecompress.cli", "plan", *pass_args[:1], str(d / "m"),
                                   *pass_args[1:], *common, "--json"], env=env, capture_output=True, text=True,
                                  check=True)
            mem = json.loads(plan.stdout)["steps"][0]["memory"]
            out = d / f"o-{name}"
            if args.plan_only:
                print(f"| {' '.join(pass_args)} | {n_params / 1e9:.2f}B | {2 * n_params / GiB:.2f} GiB | "
                      f"{mem['cpu_peak_bytes'] / GiB:.2f} GiB | {mem['reload_check_bytes'] / GiB:.2f} GiB | - | "
                      f"{mem['in_memory_bytes'] / GiB:.2f} GiB |", flush=True)
                continue
            run = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "moecompress.cli", *pass_args[:1],
                                  str(d / "m"), "--out", str(out), *pass_args[1:], *common], env=env,
                                 capture_output=True, text=True)
            if run.returncode:
                sys.exit(run.stderr[-3000:])
            peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1)) * 1024
            shutil.rmtree(out, ignore_errors=True)
            print(f"| {' '.join(pass_args)} | {n_params / 1e9:.2f}B | {2 * n_params / GiB:.2f} GiB | "
                  f"{mem['cpu_peak_bytes'] / GiB:.2f} GiB | {mem['reload_check_bytes'] / GiB:.2f} GiB | "
                  f"{peak / GiB:.2f} GiB | {mem['in_memory_bytes'] / GiB:.2f} GiB |",
                  flush=True)


if __name__ == "__main__":
    main()
