"""Expert merging vs pruning on the trained reference MoE: held-out perplexity and word-order MC accuracy.

One statistics collection (64 × 256 calibration tokens) serves every variant; each variant is the pass run in
memory on a fresh copy of the model (the disk round trip is covered by tests/test_merge.py). Prints
(1) every grouping method × router rule with the frequency-weighted merge, (2) the saliency merge, (3) the
Sub-MoE subspace merge at two ranks, (4) merging without neuron alignment, beside pruning (reap, frequency)
at the same size, for 25% and 50% of experts removed; then which wins.

Run from the repo root: `python bench/merge_bench.py` (about 4–6 minutes on 2 cores).
"""

from __future__ import annotations

import time
from typing import Any

from common import Bench, table

from moecompress.passes.merge_experts import MergeExpertsConfig
from moecompress.passes.prune_experts import PruneExpertsConfig

RATIOS = (0.25, 0.5)
METHODS = ("msmoe", "hc", "kmeans", "ream")
ROUTERS = ("dominant", "average", "refit")
RANKS = (16, 64)  # expert width and hidden size are 128: full rank is 128


def variants() -> list[tuple[str, str, dict[str, Any]]]:
    """(section, label, config fields without ratio)."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for crit in ("reap", "frequency"):
        out.append(("prune", f"prune {crit}", {"pass": "prune", "criterion": crit}))
    for method in METHODS:
        for router in ROUTERS:
            out.append(("merge freq", f"{method} freq {router}", {"method": method, "merge": "freq", "router": router}))
    for method in METHODS:
        out.append(("merge saliency", f"{method} saliency refit", {"method": method, "merge": "saliency",
                                                                    "router": "refit"}))
    for method in METHODS:
        for rank in RANKS:
            out.append(("merge subspace", f"{method} subspace r{rank} refit",
                        {"method": method, "merge": "subspace", "rank": rank, "router": "refit"}))
    for method in METHODS:
        out.append(("no alignment", f"{method} freq refit align=none", {"method": method, "merge": "freq",
                                                                         "router": "refit", "align": "none"}))
    return out


def main() -> None:
    t_start = time.perf_counter()
    b = Bench(val_docs=300, mc_rows=300, calib_samples=64, calib_seqlen=256)
    n_exp = b.adapter.num_experts(b.model.config)
    stats = b.stats()
    base_ppl, base_mc = b.ppl(b.model), b.mc_acc(b.model)
    print(f"reference: {b.path}  experts/layer={n_exp}  calibration {stats.layers[0].n_tokens:,} tokens  "
          f"eval: {len(b.val)} val docs, {len(b.mc)} MC rows (±{100 * (0.9 * 0.1 / len(b.mc)) ** 0.5:.1f}% MC std)")
    print(f"base: val ppl {base_ppl:.3f}  mc acc {base_mc:.3f}\n")

    results: dict[tuple[str, float], tuple[float, float, float]] = {}
    plan = variants()
    for ratio in RATIOS:
        for _, label, fields in plan:
            fields = dict(fields)
            if fields.pop("pass", None) == "prune":
                cfg: Any = PruneExpertsConfig(ratio=ratio, **fields)
            else:
                cfg = MergeExpertsConfig(ratio=ratio, **fields)
            model, det = b.variant(cfg)
            results[(label, ratio)] = (b.ppl(model), b.mc_acc(model), det["seconds"])
            del model

    header = ["variant"] + [f"{col} @{int(r * 100)}%" for r in RATIOS for col in ("ppl", "mc")] + ["decide s"]
    section_rows: dict[str, list[list[Any]]] = {}
    for section, label, _ in plan:
        row: list[Any] = [label]
        for r in RATIOS:
            p, a, _ = results[(label, r)]
            row += [p, a]
        row.append(f"{max(results[(label, r)][2] for r in RATIOS):.1f}")
        section_rows.setdefault(section, []).append(row)
    rows: list[list[Any]] = [["base (16 experts)"] + [v for _ in RATIOS for v in (base_ppl, base_mc)] + ["-"]]
    for section, srows in section_rows.items():
        rows.append([f"— {section} —"] + [""] * (len(header) - 1))
        rows += srows
    print(f"## {n_exp} experts → {', '.join(str(n_exp - int(n_exp * r)) for r in RATIOS)} per layer "
          "(val perplexity ↓, word-order MC accuracy ↑)")
    print(table(rows, header))

    print("\n## Which wins")
    for r in RATIOS:
        here = {label: v for (label, ratio), v in results.items() if ratio == r}
        prune = {k: v for k, v in here.items() if k.startswith("prune")}
        merge = {k: v for k, v in here.items() if not k.startswith("prune")}
        bp = min(prune, key=lambda k: prune[k][0])
        bm = min(merge, key=lambda k: merge[k][0])
        bm_mc = max(merge, key=lambda k: merge[k][1])
        bp_mc = max(prune, key=lambda k: prune[k][1])
        beat = sorted(k for k, v in merge.items() if v[0] < prune[bp][0])
        verdict = "merging wins" if merge[bm][0] < prune[bp][0] else "pruning wins"
        print(f"{int(r * 100)}% removed — perplexity: {verdict}: best merge {bm} {merge[bm][0]:.3f} vs best prune "
              f"{bp} {prune[bp][0]:.3f}; {len(beat)}/{len(merge)} merge variants beat it.")
        print(f"{'':>13}MC: best merge {bm_mc} {merge[bm_mc][1]:.3f} vs best prune {bp_mc} {prune[bp_mc][1]:.3f} "
              f"(differences under ~2 points are noise at {len(b.mc)} rows)")
        for router in ROUTERS:
            vals = [here[f"{m} freq {router}"][0] for m in METHODS]
            print(f"{'':>13}router {router:<8} mean ppl over methods {sum(vals) / len(vals):.3f}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
