"""Is the reference MoE a usable yardstick? Val ppl must sit far below the unigram baseline, and removing
half the experts of every layer at random must clearly hurt (otherwise no pruning method can be ranked).

    python bench/reference_sanity.py --model artifacts/reference      # evaluate an existing one
    python bench/reference_sanity.py --out /tmp/ref --minutes 9        # train one first
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="existing reference folder (skip training)")
    ap.add_argument("--out", type=Path, default=Path("artifacts/reference"), help="where to train one")
    ap.add_argument("--minutes", type=float, default=9.0)
    ap.add_argument("--seeds", type=int, default=5, help="random half-prunings to average")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from moecompress.zoo.metrics import (
        load_jsonl,
        load_jsonl_texts,
        mc_accuracy,
        perplexity,
        unigram_perplexity,
    )
    from moecompress.zoo.reference import build_reference

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = args.model
    if path is None:
        build_reference(args.out, minutes=args.minutes)
        path = args.out
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    val = load_jsonl_texts(path / "data" / "val.jsonl")
    mc = load_jsonl(path / "data" / "mc.jsonl")
    train_ids = tok(load_jsonl_texts(path / "data" / "train.jsonl"), add_special_tokens=False)["input_ids"]

    t0 = time.perf_counter()
    base = perplexity(model, tok, val)
    t_ppl = time.perf_counter() - t0
    base_mc = mc_accuracy(model, tok, mc)
    uni = unigram_perplexity(train_ids, tok, val, len(tok))
    print(f"val ppl {base:.3f}  (unigram baseline {uni:.2f}; {len(val)} docs scored in {t_ppl:.1f}s)")
    print(f"MC word-order accuracy {base_mc:.1%} (chance 25%)")

    import copy

    from moecompress.arch import moe_layers
    from moecompress.surgery import keep_experts_everywhere

    n_exp = model.config.num_experts
    ppls, accs = [], []
    for seed in range(args.seeds):
        rng = random.Random(seed)
        pruned = copy.deepcopy(model)  # the product's own surgery, not a routing mask
        keep_experts_everywhere(pruned, {ly.index: sorted(rng.sample(range(n_exp), n_exp - n_exp // 2))
                                         for ly in moe_layers(pruned)})
        ppls.append(perplexity(pruned, tok, val))
        accs.append(mc_accuracy(pruned, tok, mc))
        print(f"  random half-prune seed {seed}: ppl {ppls[-1]:.3f}  MC {accs[-1]:.1%}")
    print(f"random half-prune ({args.seeds} seeds): ppl {statistics.mean(ppls):.3f} ± {statistics.pstdev(ppls):.3f} "
          f"(×{statistics.mean(ppls) / base:.2f} of base)  MC {statistics.mean(accs):.1%}")


if __name__ == "__main__":
    main()
