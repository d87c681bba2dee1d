"""Expert-pruning criteria on the trained reference MoE: held-out perplexity and word-order accuracy.

Prints (1) every criterion at 25% and 50% of experts removed vs the unpruned model and random (5 seeds),
(2) domain-specific pruning: calibrate on one domain, see which domains keep their perplexity,
(3) the cost of the statistics pass relative to a plain forward over the same tokens.
"""

from __future__ import annotations

import statistics

from common import Bench, table
from stats_cost import measure

from moecompress.calib.data import CalibSpec
from moecompress.passes.prune_experts import PruneExpertsConfig

CRITERIA = ["frequency", "soft_frequency", "reap", "ean", "easy_ep", "naee"]


def main() -> None:
    b = Bench()
    n_exp = b.adapter.num_experts(b.model.config)
    base_ppl, base_mc = b.ppl(b.model), b.mc_acc(b.model)
    print(f"reference: {b.path}  experts/layer={n_exp}  val ppl={base_ppl:.3f}  mc acc={base_mc:.3f}\n")

    rows = [["none (base)", "0%", base_ppl, base_mc, "-"]]
    best: dict[float, tuple[str, float]] = {}
    for ratio in (0.25, 0.5):
        for crit in CRITERIA:
            model, det = b.variant(PruneExpertsConfig(ratio=ratio, criterion=crit))
            p = b.ppl(model)
            rows.append([crit, f"{int(ratio * 100)}%", p, b.mc_acc(model), f"{det['seconds']:.1f}s"])
            if ratio not in best or p < best[ratio][1]:
                best[ratio] = (crit, p)
        rand_ppl, rand_mc = [], []
        for seed in range(5):
            model, _ = b.variant(PruneExpertsConfig(ratio=ratio, criterion="random", seed=seed))
            rand_ppl.append(b.ppl(model))
            rand_mc.append(b.mc_acc(model))
        rows.append([f"random (5 seeds) ±{statistics.stdev(rand_ppl):.2f}", f"{int(ratio * 100)}%",
                     statistics.mean(rand_ppl), statistics.mean(rand_mc), "-"])
    print("## Held-out perplexity / multiple-choice accuracy by criterion")
    print(table(rows, ["criterion", "removed", "val ppl", "mc acc", "decide time"]))
    for ratio, (crit, p) in best.items():
        print(f"best at {int(ratio * 100)}%: {crit} (ppl {p:.3f})")

    print("\n## Domain-specific pruning (50% removed, calibrated on one domain only)")
    base_dom = {d: b.ppl(b.model, d) for d in b.domains}
    drows = []
    for target in b.domains:
        spec = CalibSpec(source=b.calib_spec.source, samples=32, seqlen=256, domain=target)
        for crit in ("easy_ep", "reap"):
            model, _ = b.variant(PruneExpertsConfig(ratio=0.5, criterion=crit), spec=spec)
            ratios = {d: b.ppl(model, d) / base_dom[d] for d in b.domains}
            others = [v for d, v in ratios.items() if d != target]
            drows.append([target, crit, ratios[target], statistics.mean(others), max(others)])
    print(table(drows, ["calibrated on", "criterion", "ppl ratio on that domain", "mean ratio other domains",
                        "worst other"]))
    print("(ratio = pruned ppl / base ppl on that domain; 1.0 = unchanged)")

    print("\n## Statistics pass cost")
    measure(b)


if __name__ == "__main__":
    main()
