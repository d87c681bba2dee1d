"""Regenerate calib_golden.json: routing statistics of the 14 declared families' tiny models.

Run with the code whose statistics are the reference (it was produced from main at 8a4c87b, before adapters
were derived from transformers): `PYTHONPATH=<that checkout> python tests/data/make_calib_golden.py OUT.json`.
"""

import json
import sys

import torch

from moecompress.calib.collect import collect_stats
from moecompress.zoo.tiny import FAMILIES, tiny

NAMES = ("freq", "soft_freq", "reap_sum", "ean", "easy_ep", "logit_sum", "max_act")


def golden() -> dict:
    out = {}
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 300, (2, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    for family in FAMILIES:
        model, _ = tiny(family, seed=3)
        stats = collect_stats(model, [(ids, mask)], total_tokens=int(mask.sum()), sample_tokens=8)
        out[family] = {str(i): {"n_tokens": ls.n_tokens, **{k: ls.sums[k].tolist() for k in NAMES},
                                "sample_sum": float(ls.sample.double().sum()) if ls.sample is not None else None}
                       for i, ls in stats.layers.items()}
    return out


if __name__ == "__main__":
    with open(sys.argv[1], "w") as fh:
        json.dump(golden(), fh)
