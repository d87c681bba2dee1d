"""Peak RSS of streamed passes on a random-weight Qwen3-MoE much larger than a tiny model.

    python bench/stream_bench.py --layers 20 --passes prune,merge         # ~4.1 GB bf16 checkpoint
    python bench/stream_bench.py --layers 40 --passes prune               # ~8.2 GB: RSS must stay flat
    python bench/stream_bench.py --passes prune@quarter,prune@chunked     # budgets: 1/4 checkpoint, 1/2 layer
    python bench/stream_bench.py --speed                                  # small model: streamed vs in-memory

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


def generate(folder: Path, layers: int, hidden: int, width: int, experts: int, shard: str,
             vocab: int = 320) -> tuple[int, int]:
    """Random Qwen3-MoE checkpoint written layer by layer; returns (weight bytes, bytes of one decoder layer)."""
    from transformers import Qwen3MoeConfig

    from moecompress.engine.sink import ShardWriter, on_disk_state, parse_size
    from moecompress.engine.source import skeleton
    from moecompress.zoo.tiny import tiny_tokenizer

    cfg = Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=hidden // 8, intermediate_size=4 * hidden,
                         moe_intermediate_size=width, num_experts=experts, num_experts_per_tok=8,
                         norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False)
    cfg.dtype = torch.bfloat16
    model = skeleton(cfg, torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, parse_size(shard))
    gen = torch.Generator().manual_seed(0)

    def fill(module: torch.nn.Module, prefix: str) -> int:
        state = {}
        for name, p in module.named_parameters():
            t = torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
            if "norm" in name:
                t = torch.ones(p.shape, dtype=torch.bfloat16)
            state[prefix + name] = t
        writer.add(on_disk_state(model, state))
        return sum(t.numel() * t.element_size() for t in state.values())

    inner = model.model
    layer_bytes = 0
    for i, layer in enumerate(inner.layers):
        layer_bytes = fill(layer, f"model.layers.{i}.")
    fill(inner.embed_tokens, "model.embed_tokens.")
    fill(inner.norm, "model.norm.")
    fill(model.lm_head, "lm_head.")
    writer.finish()
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return writer.total, layer_bytes


def _layer_bytes(src: Path) -> int:
    from moecompress.engine.source import ModelSource

    source = ModelSource(src)
    return source.part_bytes(0)


def calib(path: Path, n: int = 400) -> Path:
    import random

    words = "the quick brown fox jumps over a lazy dog while experts route every token 12 + 30 = 42".split()
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=60))}) + "\n" for _ in range(n)))
    return path


COMMANDS = {
    "prune": ["prune", "--ratio", "0.25", "--criterion", "reap", "--no-heal"],
    "prune-heal": ["prune", "--ratio", "0.25", "--criterion", "reap", "--heal"],
    "heapr": ["prune", "--neuron-ratio", "0.25", "--criterion", "heapr", "--no-heal"],
    "gptq": ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "128"],
    "merge": ["merge", "--ratio", "0.25", "--method", "msmoe", "--merge", "freq", "--router", "average",
              "--align", "none", "--no-heal"],
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


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
m, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, output_loading_info=True)
print(json.dumps({k: len(v) for k, v in info.items()}))
"""


def reload(out: Path) -> str:
    """Vanilla ``from_pretrained`` of a streamed output, in its own process: loading-info counts and peak RSS."""
    rss, wall, stdout = run([sys.executable, "-c", RELOAD, str(out)])
    return f"vanilla reload {stdout.strip().splitlines()[-1]} in {wall:.0f}s, peak RSS {rss / 2**30:.2f} GiB"


def speed(work: Path, args: argparse.Namespace) -> None:
    """Each pass on a small random model: streamed through the engine (`run_pass`, verification included) vs
    today's in-memory path (load whole, statistics, the pass's `fn`, `save_pretrained`, reload check)."""
    from moecompress.calib.collect import collect_stats
    from moecompress.calib.data import CalibSpec, load_calibration
    from moecompress.io.checkpoint import load_model, probe_input, verify_reload
    from moecompress.passes.base import PassContext, get_pass
    from moecompress.passes.merge_experts import MergeExpertsConfig
    from moecompress.passes.prune_atomic import PruneAtomicConfig
    from moecompress.passes.prune_experts import PruneExpertsConfig
    from moecompress.passes.quantize import QuantizeConfig
    from moecompress.runner import RunOptions, run_pass

    src = work / "small"
    nbytes, _ = generate(src, 4, 512, 512, 16, "200MB")
    data = calib(work / "calib.jsonl")
    spec = CalibSpec(source=str(data), samples=args.calib_samples, seqlen=args.calib_seqlen)
    configs = {
        "prune reap": PruneExpertsConfig(ratio=0.25, criterion="reap"),
        "merge msmoe": MergeExpertsConfig(ratio=0.25, method="msmoe", merge="freq", router="average", align="none"),
        "heapr": PruneAtomicConfig(neuron_ratio=0.25, criterion="heapr"),
        "gptq w4": QuantizeConfig(method="gptq", bits=4, group_size=128),
        "rtn w4": QuantizeConfig(method="rtn", bits=4, group_size=128),
    }
    print(f"speed: random Qwen3-MoE 4 layers x 16 experts, hidden 512: {nbytes / 2**20:.0f} MiB bf16; "
          f"calibration {args.calib_samples} x {args.calib_seqlen} tokens")
    print("| pass | streamed (s) | in-memory (s) | ratio |\n|---|---|---|---|")
    for name, cfg in configs.items():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        run_pass(cfg, src, work / "streamed", calibration=spec,
                 opts=RunOptions(plots=False, stats_cache=work / "s-stream", device="cpu"))
        streamed = time.perf_counter() - t0
        shutil.rmtree(work / "streamed")
        torch.manual_seed(0)
        t0 = time.perf_counter()
        loaded = load_model(src)
        batch = load_calibration(spec, loaded.tokenizer)
        batches = batch.forward_batches()
        stats = collect_stats(loaded.model, batches, total_tokens=int(batch.attention_mask.sum()), sample_tokens=2048)
        ctx = PassContext(model=loaded.model, tokenizer=loaded.tokenizer, adapter=loaded.adapter, config=cfg,
                          get_stats=lambda stats=stats: stats, get_calibration=lambda batch=batch: batch)
        get_pass(cfg.name).fn(ctx)
        loaded.model.save_pretrained(work / "inmem")
        ids = probe_input(loaded.model.config.vocab_size)
        with torch.no_grad():
            ref = loaded.model(input_ids=ids).logits.float()
        if cfg.name != "quantize":  # the packed quantized format is written by the runner, not save_pretrained
            verify_reload(work / "inmem", ref, ids)
        inmem = time.perf_counter() - t0
        shutil.rmtree(work / "inmem")
        del loaded, ctx
        print(f"| {name} | {streamed:.1f} | {inmem:.1f} | {streamed / inmem:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--passes", default="prune,merge,heapr,gptq,prune@quarter,prune@chunked",
                    help="comma-separated; NAME@quarter runs with --max-memory at 1/4 of the checkpoint's bytes, "
                    "NAME@chunked at 1/2 of one decoder layer's bytes (experts read in chunks); both reload the output")
    ap.add_argument("--speed", action="store_true", help="streamed vs in-memory wall time on a small model, then exit")
    ap.add_argument("--max-memory", default=None, help="--max-memory for the passes (default: the engine's own)")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=128)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/moecompress-stream-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    ap.add_argument("--src", type=Path, default=None, help="use this generated checkpoint (not deleted)")
    args = ap.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    try:
        if args.speed:
            work.mkdir(parents=True)
            speed(work, args)
            return
        src = work / "src"
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if args.src is not None:  # a checkpoint generated earlier (`--keep`), e.g. to rerun single passes
            src = args.src
            nbytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            layer_bytes = _layer_bytes(src)
        else:
            nbytes, layer_bytes = generate(src, args.layers, args.hidden, args.width, args.experts, "1GB")
        sys.stdout.flush()
        layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
        print(f"checkpoint: {layers} layers x {args.experts} experts, hidden {args.hidden}, width {args.width}: "
              f"{nbytes / 2**30:.2f} GiB bf16 in {len(list(src.glob('*.safetensors')))} shards, one decoder layer "
              f"{layer_bytes / 2**20:.0f} MiB (generated in {time.perf_counter() - t0:.0f}s)", flush=True)
        data = calib(work / "calib.jsonl")
        for spec in args.passes.split(","):
            name, _, variant = spec.partition("@")
            out = work / f"out-{name}"
            cmd = [sys.executable, "-m", "moecompress.cli", *COMMANDS[name][:1], str(src), "--out", str(out),
                   *COMMANDS[name][1:], "--calib", str(data), "--calib-samples", str(args.calib_samples),
                   "--calib-seqlen", str(args.calib_seqlen), "--max-shard-size", "1GB", "--device", "cpu"]
            if name != "gptq":  # each run collects its own statistics (quantize collects none)
                cmd += ["--stats-cache", str(work / f"stats-{spec}")]
            budget = {"quarter": str(nbytes // 4), "chunked": str(layer_bytes // 2)}.get(variant, args.max_memory)
            if budget:
                cmd += ["--max-memory", budget]
            rss, wall, _ = run(cmd)
            report = json.loads((out / "report.json").read_text())
            shards = len(list(out.glob("*.safetensors")))
            shown = f"{int(budget) / 2**20:.0f} MiB" if budget and budget.isdigit() else (budget or "default")
            print(f"{spec:14s} max-memory {shown}: peak RSS {rss / 2**30:.2f} GiB = {rss / nbytes:.2f}x checkpoint; "
                  f"wall {wall:.0f}s; output {report['bytes_after'] / 2**30:.2f} GiB in {shards} shards; "
                  f"expert chunks {report['engine'].get('expert_chunks')}; verify {report['verify']}", flush=True)
            if variant:
                print(f"{'':14s} {reload(out)}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
