"""Peer run: llm-compressor's GPTQModifier on the reference MoE, inside the peer's own virtualenv.

Started by ``bench/quant_bench.py --peer`` with ``artifacts/peer-venv/bin/python`` (llm-compressor 0.14 pins
transformers 5.15–5.17 and compressed-tensors 0.19, so it cannot share our environment). It must not import
moecompress. Inputs come from a ``torch.save`` file written by our side so that both tools see identical data:

- ``calib_input_ids`` / ``calib_attention_mask``: the calibration rows our quantize pass uses,
- ``eval_batches``: the held-out perplexity batches our ``perplexity`` scores (same windows, same padding),
  so the peer's *in-memory* perplexity is directly comparable with what we measure after reloading its checkpoint.

For each requested bit width and expert-calibration mode: load, ``linearize_moe`` (experts linearised to per-expert
``nn.Linear`` so GPTQ can target them), ``oneshot`` GPTQ on routed-expert linears only (router, attention and
lm_head left in float, like ours), score in memory, ``save_pretrained(save_compressed=True)``. Prints one JSON
object on the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

EXPERT_TARGET = r"re:.*mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$"


@torch.no_grad()
def eval_ppl(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """exp(-mean log-prob) over the given (ids, mask) windows: the same sum our `perplexity` computes."""
    total, n = 0.0, 0
    model.eval()
    for ids, mask in batches:
        logits = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits.float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:].bool()
        total += float((lp * keep).sum())
        n += int(keep.sum())
    return math.exp(-total / max(n, 1))


def run_one(args: argparse.Namespace, bits: int, mode: str, data: dict) -> dict:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res: dict = {"bits": bits, "mode": mode}
    t0 = time.perf_counter()
    # `load_quantizable_moe()` (the documented loader) walks every transformers model module through
    # transformers' monkey-patching registry, which imports image processors that need torchvision; the
    # post-load `linearize_moe` (what `oneshot` itself falls back to) reaches the same per-expert Linears
    # without it.
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    linearize_moe(model)
    tok = AutoTokenizer.from_pretrained(args.model)
    res["load_seconds"] = time.perf_counter() - t0
    res["expert_linears_before"] = sum(
        1 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".experts." in n)

    ids, mask = data["calib_input_ids"], data["calib_attention_mask"]
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})
    scheme = QuantizationScheme(
        targets=[EXPERT_TARGET],
        weights=QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group",
                                 group_size=args.group_size),
    )
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head", r"re:.*mlp\.gate$"],
                          dampening_frac=args.damp, actorder=None)
    t1 = time.perf_counter()
    oneshot(model=model, processor=tok, recipe=recipe, dataset=ds, num_calibration_samples=int(ids.shape[0]),
            max_seq_length=int(ids.shape[1]), shuffle_calibration_samples=False,
            moe_calibrate_all_experts=(mode == "all"))
    res["oneshot_seconds"] = time.perf_counter() - t1
    res["quantized_modules"] = sum(1 for _, m in model.named_modules() if getattr(m, "quantization_scheme", None))
    res["ppl_in_memory"] = eval_ppl(model, data["eval_batches"])
    out = Path(args.out_root) / f"llmcompressor-w{bits}-{mode}"
    t2 = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    res["save_seconds"] = time.perf_counter() - t2
    res["total_seconds"] = time.perf_counter() - t0
    res["path"] = str(out)
    cfg = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    res["format"] = cfg.get("format")
    res["bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.name.endswith(".safetensors"))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="torch.save file with calib_* and eval_batches")
    ap.add_argument("--out-root", required=True)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--modes", nargs="+", choices=["all", "routed"], default=["all", "routed"],
                    help="moe_calibrate_all_experts=True (llm-compressor's default: every calibration token through "
                    "every expert for the Hessians) and/or False (each expert sees only its routed tokens)")
    args = ap.parse_args()

    import compressed_tensors
    import llmcompressor
    import transformers

    data = torch.load(args.data)
    report: dict = {"versions": {"llmcompressor": llmcompressor.__version__, "transformers": transformers.__version__,
                                 "compressed_tensors": compressed_tensors.__version__, "torch": torch.__version__},
                    "threads": torch.get_num_threads(), "runs": []}
    base = None
    try:
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        report["ppl_base_in_memory"] = eval_ppl(base, data["eval_batches"])
        del base
    except Exception as exc:  # noqa: BLE001 - report, don't die
        report["base_error"] = f"{type(exc).__name__}: {exc}"
    for bits in args.bits:
        for mode in args.modes:
            try:
                report["runs"].append(run_one(args, bits, mode, data))
            except Exception as exc:  # noqa: BLE001 - an unsupported width is a result, not a crash
                tb = traceback.format_exc().strip().splitlines()
                report["runs"].append({"bits": bits, "mode": mode, "error": f"{type(exc).__name__}: {str(exc)[:500]}",
                                       "where": tb[-40:]})
    sys.stdout.flush()
    print("\n" + json.dumps(report))


if __name__ == "__main__":
    main()
