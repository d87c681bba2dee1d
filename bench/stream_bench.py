"""Peak RSS of streamed passes on a random-weight Qwen3-MoE much larger than a tiny model.

    python bench/stream_bench.py --layers 10 --passes prune,merge         # ~4.1 GB bf16 checkpoint
    python bench/stream_bench.py --layers 20 --passes prune               # ~8.2 GB: RSS must stay flat

The checkpoint is generated a layer at a time (random bf16 weights written through the engine's own writer, so
the generator never holds the model either) into --workdir, each pass runs in its own process under
``/usr/bin/time -v`` (peak RSS of the whole process), and everything is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch


def generate(folder: Path, layers: int, hidden: int, width: int, experts: int, shard: str) -> int:
    """Random Qwen3-MoE checkpoint written layer by layer; returns its weight bytes."""
    from transformers import Qwen3MoeConfig

    from moecompress.engine.sink import ShardWriter, on_disk_state, parse_size
    from moecompress.engine.source import skeleton
    from moecompress.zoo.tiny import tiny_tokenizer

    cfg = Qwen3MoeConfig(vocab_size=320, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=hidden // 8, intermediate_size=4 * hidden,
                         moe_intermediate_size=width, num_experts=experts, num_experts_per_tok=8,
                         norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False)
    cfg.dtype = torch.bfloat16
    model = skeleton(cfg, torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, parse_size(shard))
    gen = torch.Generator().manual_seed(0)

    def fill(module: torch.nn.Module, prefix: str) -> None:
        state = {}
        for name, p in module.named_parameters():
            t = torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
            if "norm" in name:
                t = torch.ones(p.shape, dtype=torch.bfloat16)
            state[prefix + name] = t
        writer.add(on_disk_state(model, state))

    inner = model.model
    for i, layer in enumerate(inner.layers):
        fill(layer, f"model.layers.{i}.")
    fill(inner.embed_tokens, "model.embed_tokens.")
    fill(inner.norm, "model.norm.")
    fill(model.lm_head, "lm_head.")
    writer.finish()
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return writer.total


def calib(path: Path, n: int = 400) -> Path:
    import random

    words = "the quick brown fox jumps over a lazy dog while experts route every token 12 + 30 = 42".split()
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=60))}) + "\n" for _ in range(n)))
    return path


COMMANDS = {
    "prune": ["prune", "--ratio", "0.25", "--criterion", "reap"],
    "heapr": ["prune", "--neuron-ratio", "0.25", "--criterion", "heapr"],
    "gptq": ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "128"],
    "merge": ["merge", "--ratio", "0.25", "--method", "msmoe", "--merge", "freq", "--router", "average",
              "--align", "none"],
}


def run(cmd: list[str]) -> tuple[float, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    rss = int(m.group(1)) * 1024 if m else float("nan")
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode})")
    return rss, wall, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--passes", default="prune,merge,heapr,gptq,prune@quarter",
                    help="comma-separated; NAME@quarter runs with --max-memory at 1/4 of the checkpoint's bytes")
    ap.add_argument("--max-memory", default=None, help="--max-memory for the passes (default: the engine's own)")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=128)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moecompress-stream-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = ap.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    try:
        src = work / "src"
        t0 = time.perf_counter()
        nbytes = generate(src, args.layers, args.hidden, args.width, args.experts, "1GB")
        sys.stdout.flush()
        print(f"checkpoint: {args.layers} layers x {args.experts} experts, hidden {args.hidden}, width {args.width}: "
              f"{nbytes / 2**30:.2f} GiB bf16 in {len(list(src.glob('*.safetensors')))} shards "
              f"(generated in {time.perf_counter() - t0:.0f}s)")
        data = calib(work / "calib.jsonl")
        for spec in args.passes.split(","):
            name, _, variant = spec.partition("@")
            out = work / f"out-{name}"
            cmd = [sys.executable, "-m", "moecompress.cli", *COMMANDS[name][:1], str(src), "--out", str(out),
                   *COMMANDS[name][1:], "--calib", str(data), "--calib-samples", str(args.calib_samples),
                   "--calib-seqlen", str(args.calib_seqlen), "--max-shard-size", "1GB", "--device", "cpu",
                   "--stats-cache", str(work / "stats")]
            budget = str(nbytes // 4) if variant == "quarter" else args.max_memory
            if budget:
                cmd += ["--max-memory", budget]
            rss, wall, _ = run(cmd)
            report = json.loads((out / "report.json").read_text())
            shards = len(list(out.glob("*.safetensors")))
            print(f"{spec:14s} max-memory {budget or 'default'}: peak RSS {rss / 2**30:.2f} GiB = {rss / nbytes:.2f}x checkpoint; wall {wall:.0f}s; "
                  f"output {report['bytes_after'] / 2**30:.2f} GiB in {shards} shards; verify {report['verify']}")
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
