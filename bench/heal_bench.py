"""Heal on the trained reference MoEs: perplexity before/after heal, each step alone and combined.

For every reference given (default: artifacts/reference and artifacts/reference-s1, two training seeds):
(1) REAP and frequency pruning at 50% and 75%, a merge (REAM, saliency, refit router) at 50%, HEAPr
uniform at 50%, each unhealed and healed with (a) router least squares, (b) ridge down projections, (c) Adam
alone, (a+b) and (a+b+c); word-order MC accuracy for unhealed / (a+b) / (a+b+c); the check that heal removes
≥ 30% of the perplexity excess at REAP 50% and 75%; (2) heal wall time vs one statistics pass over the same
calibration tokens; (3) at 75% removed, `--select reconstruct` vs three random seeds and every per-expert
criterion, all healed (a+b); the reconstruct pick and the best rival also (a+b+c). Every variant runs in
memory on a fresh copy (the disk round trip is in tests/test_heal.py).

Run from the repo root: `python bench/heal_bench.py [--refs A B] [--steps 100] [--lr 3e-3] [--json out.json]`
(about 10–15 minutes per reference on 2 shared cores); `--only cost` runs (2) alone (about half a minute per reference).

The cost compares `heal_model` with (a+b) at REAP 50% (both layer-0 captures, every layer's original forward
with its block inputs/outputs, the compressed block inputs, (a) and (b) with their held-out error checks, and
the healed layer's forward that feeds the next layer) with `collect_stats` over the same calibration batches;
neither includes loading, the pass itself or the calibration KL. Each is timed `--repeats` times after one
warm-up run; the minimum is reported (the machine is shared, so the minimum is the least disturbed run).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from common import REFERENCE, Bench, table, torch

from moecompress.arch import moe_layers
from moecompress.calib.collect import collect_stats
from moecompress.calib.data import load_calibration
from moecompress.heal.run import calibration_batches, groups_from_details, heal_model
from moecompress.heal.spec import HealSpec
from moecompress.passes.base import PassConfig
from moecompress.passes.merge_experts import MergeExpertsConfig
from moecompress.passes.prune_atomic import PruneAtomicConfig
from moecompress.passes.prune_experts import PruneExpertsConfig
from moecompress.zoo.metrics import mc_correct


def heal_variants(steps: int, lr: float) -> list[tuple[str, HealSpec]]:
    return [
        ("(a) router", HealSpec(router=True, down=False)),
        ("(b) down", HealSpec(router=False, down=True)),
        ("(c) adam", HealSpec(router=False, down=False, steps=steps, lr=lr)),
        ("(a+b)", HealSpec()),
        ("(a+b+c)", HealSpec(steps=steps, lr=lr)),
    ]


def compressions() -> list[tuple[str, PassConfig]]:
    return [
        ("REAP 50%", PruneExpertsConfig(ratio=0.5, criterion="reap")),
        ("REAP 75%", PruneExpertsConfig(ratio=0.75, criterion="reap")),
        ("frequency 50%", PruneExpertsConfig(ratio=0.5, criterion="frequency")),
        ("frequency 75%", PruneExpertsConfig(ratio=0.75, criterion="frequency")),
        ("merge REAM 50%", MergeExpertsConfig(ratio=0.5)),
        ("HEAPr uniform 50%", PruneAtomicConfig(neuron_ratio=0.5, criterion="heapr")),
    ]


class HealBench:
    def __init__(self, path: Path, steps: int, lr: float, score_base: bool = True) -> None:
        self.b = Bench(path, val_docs=400, mc_rows=300, calib_samples=64, calib_seqlen=256)
        self.batches = calibration_batches(load_calibration(self.b.calib_spec, self.b.tok))
        self.layer_ids = [ly.index for ly in moe_layers(self.b.model)]
        self.n_exp = moe_layers(self.b.model)[0].num_experts
        self.heals = heal_variants(steps, lr)
        self.base_ppl = self.b.ppl(self.b.model) if score_base else float("nan")
        self.base_mc = self.b.mc_acc(self.b.model) if score_base else float("nan")

    def healed(self, model: Any, cfg: PassConfig, details: dict[str, Any], spec: HealSpec
               ) -> tuple[Any, float, dict[str, Any]]:
        groups, _ = groups_from_details(cfg.name, details, self.layer_ids, self.n_exp)
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = heal_model(self.b.model, m, self.batches, groups, spec)
        return m, time.perf_counter() - t0, report

    def excess_cut(self, before: float, after: float) -> float:
        return 1 - (after - self.base_ppl) / (before - self.base_ppl)


def run_cost(hb: HealBench, repeats: int) -> dict[str, Any]:
    """Heal (a+b) at REAP 50% vs one statistics pass over the same batches: minimum of `repeats` runs after a
    warm-up each, the healed perplexity (to check a faster heal heals the same) and where heal's time goes."""
    b = hb.b
    cfg = PruneExpertsConfig(ratio=0.5, criterion="reap")
    model, det = b.variant(cfg)
    total = sum(int(m.sum()) for _, m in hb.batches)
    stats_t, heal_t, reports = [], [], []
    healed = None
    for r in range(repeats + 1):  # run 0 is the warm-up
        s = collect_stats(b.model, hb.batches, total_tokens=total).meta["collect_seconds"]
        healed, h, rep = hb.healed(model, cfg, det, HealSpec())
        if r:
            stats_t.append(s)
            heal_t.append(h)
            reports.append(rep)
    best = reports[heal_t.index(min(heal_t))]
    steps = {k: sum(v[k].get("seconds", float("nan")) for v in best["layers"].values()) for k in ("router", "down")}
    walk = min(heal_t) - sum(steps.values())  # nan where the heal report has no step times (older code)
    out = {"stats_seconds": min(stats_t), "heal_ab_seconds": min(heal_t), "stats_all": stats_t, "heal_all": heal_t,
           "ratio": min(heal_t) / min(stats_t), "heal_ab_ppl": b.ppl(healed), "threads": torch.get_num_threads(),
           "breakdown_seconds": {"(a) router": steps["router"], "(b) down": steps["down"],
                                 "walk (captures, forwards, error checks)": walk}}
    print(f"\n## Cost: heal (a+b) at REAP 50% {out['heal_ab_seconds']:.2f}s vs statistics pass "
          f"{out['stats_seconds']:.2f}s → ratio {out['ratio']:.2f} (goal ≤ 2); min of {repeats}, "
          f"{out['threads']} threads; healed ppl {out['heal_ab_ppl']:.4f}")
    print("   heal runs " + ", ".join(f"{t:.2f}" for t in heal_t) + "; stats runs " + ", ".join(f"{t:.2f}" for t in stats_t))
    print("   where heal's time goes: " + ", ".join(f"{k} {v:.2f}s" for k, v in out["breakdown_seconds"].items()))
    return out


def run_engine_cost(path: Path, repeats: int) -> dict[str, Any]:
    """What a user pays for --heal: `moecompress prune REF --ratio 0.5 --criterion reap` with and without `--heal`
    (CLI defaults: 128 x 256 calibration tokens, the layer-streaming engine), each run in its own process with an
    empty statistics cache, plus a `--heal` run on a warm cache (statistics from the cache: heal then runs the
    original layers itself; a cache miss lets the statistics sweep record them). The extra wall time of the pass
    with --heal over the plain pass, and heal's own seconds, are compared with the plain run's statistics sweep.
    Minimum of each quantity over the repeats (after one warm-up round): the machine is shared."""
    import os
    import subprocess
    import sys
    import tempfile

    rows = []
    for r in range(repeats + 1):  # round 0 is the warm-up
        with tempfile.TemporaryDirectory() as tmp:
            row: dict[str, Any] = {}
            for case, extra, cache in (("plain", ["--no-heal"], "a"), ("heal", ["--heal"], "b"), ("heal_hit", ["--heal"], "b")):
                out = Path(tmp) / case
                subprocess.run([sys.executable, "-m", "moecompress", "prune", str(path), "--out", str(out), "--ratio",
                                "0.5", "--criterion", "reap", *extra], check=True, capture_output=True,
                               env={**os.environ, "MOECOMPRESS_CACHE": f"{tmp}/cache-{cache}"})
                rep = json.loads((out / "report.json").read_text())
                row[case] = {"pass": rep["seconds"], "stats": rep["statistics"]["collect_seconds"],
                             "cache": rep["statistics"]["cache"], "tokens": rep["statistics"]["tokens"]}
                heal = rep["details"].get("heal")
                if heal:
                    row[case].update(heal=heal["seconds"], targets=heal.get("original_targets"),
                                     down=sum(v["down"]["seconds"] for v in heal["layers"].values()),
                                     router=sum(v["router"]["seconds"] for v in heal["layers"].values()))
            if r:
                rows.append(row)

    def best(case: str, key: str) -> float:
        return min(x[case][key] for x in rows)

    stats = best("plain", "stats")
    out = {"runs": rows, "stats_seconds": stats, "extra_seconds": best("heal", "pass") - best("plain", "pass"),
           "heal_seconds": best("heal", "heal"), "heal_hit_seconds": best("heal_hit", "heal"),
           "recording_seconds": best("heal", "stats") - stats}
    out["ratio_extra"] = out["extra_seconds"] / stats
    out["ratio_heal"] = out["heal_seconds"] / stats
    out["ratio_hit"] = out["heal_hit_seconds"] / stats
    print(f"\n## Cost through the engine ({rows[0]['plain']['tokens']:,} calibration tokens, min of {repeats}): "
          f"statistics sweep {stats:.2f}s; prune --heal takes {out['extra_seconds']:.2f}s more than prune → "
          f"ratio {out['ratio_extra']:.2f} (goal ≤ 2); heal's own time {out['heal_seconds']:.2f}s → "
          f"{out['ratio_heal']:.2f}; the sweep's recording adds ~{out['recording_seconds']:.2f}s; with statistics "
          f"from the cache heal runs the original layers: {out['heal_hit_seconds']:.2f}s → {out['ratio_hit']:.2f}")
    for x in rows:
        print(f"   plain: pass {x['plain']['pass']:.2f}s (stats {x['plain']['stats']:.2f}) | --heal: pass "
              f"{x['heal']['pass']:.2f}s (stats {x['heal']['stats']:.2f}, heal {x['heal']['heal']:.2f}: (a) "
              f"{x['heal']['router']:.2f}, (b) {x['heal']['down']:.2f}) | --heal, cached stats: heal "
              f"{x['heal_hit']['heal']:.2f}s")
    return out


def run_reference(path: Path, steps: int, lr: float, out: dict[str, Any], only: str = "all", repeats: int = 3) -> None:
    if only == "engine-cost":
        out[str(path)] = {"engine_cost": run_engine_cost(path, repeats)}
        return
    hb = HealBench(path, steps, lr, score_base=only != "cost")
    if only == "cost":
        print(f"\n# {path}: cost only, calibration {sum(int(m.sum()) for _, m in hb.batches):,} tokens")
        out[str(path)] = {"cost": run_cost(hb, repeats), "engine_cost": run_engine_cost(path, repeats)}
        return
    res: dict[str, Any] = {"base_ppl": hb.base_ppl, "base_mc": hb.base_mc, "rows": {}, "selection": {}}
    out[str(path)] = res
    print(f"\n# {path}: base val ppl {hb.base_ppl:.3f}, mc acc {hb.base_mc:.3f}, calibration "
          f"{sum(int(m.sum()) for _, m in hb.batches):,} tokens ({len(hb.batches)} batches), heal steps {steps}")

    if only == "mc-flips":
        res["mc_flips"] = run_mc_flips(hb)
        return
    if only == "breadth":
        res["breadth"] = run_breadth(hb, with_mc=False)
        return
    if only != "selection":
        run_heal_rows(hb, res)
        res["cost"] = run_cost(hb, repeats)  # (2) heal (a+b) vs one statistics pass over the same tokens
        res["engine_cost"] = run_engine_cost(path, repeats)
    run_selection(hb, res)


def breadth_variants() -> list[tuple[str, PassConfig]]:
    """Every expert criterion, every merge method and both HEAPr layouts, at 50% and 75%: the rows the default
    heal must never hurt."""
    out: list[tuple[str, PassConfig]] = []
    for ratio in (0.5, 0.75):
        pct = f"{round(ratio * 100)}%"
        for crit in ("frequency", "soft_frequency", "reap", "ean", "easy_ep", "naee", "random"):
            out.append((f"prune {crit} {pct}", PruneExpertsConfig(ratio=ratio, criterion=crit)))
        for method in ("msmoe", "hc", "kmeans", "ream"):
            out.append((f"merge {method} {pct}", MergeExpertsConfig(ratio=ratio, method=method)))
        for layout in ("uniform", "masked"):
            out.append((f"HEAPr {layout} {pct}", PruneAtomicConfig(neuron_ratio=ratio, criterion="heapr",
                                                                   layout=layout)))
    return out


def run_breadth(hb: HealBench, with_mc: bool) -> dict[str, Any]:
    """Unhealed vs the default heal (closed form, a+b) on every row of `breadth_variants`: held-out perplexity
    (and word-order accuracy with `with_mc`)."""
    b = hb.b
    rows, res = [], {}
    for name, cfg in breadth_variants():
        t0 = time.perf_counter()
        try:
            model, det = b.variant(cfg)
        except Exception as exc:  # a variant the config refuses at this size: say so, keep going
            print(f"   {name}: skipped ({str(exc).splitlines()[0][:100]})")
            continue
        healed, _, _ = hb.healed(model, cfg, det, HealSpec())
        r = {"unhealed": b.ppl(model), "healed": b.ppl(healed)}
        if with_mc:
            r.update(mc_unhealed=b.mc_acc(model), mc_healed=b.mc_acc(healed))
        r["excess_cut"] = hb.excess_cut(r["unhealed"], r["healed"])
        res[name] = r
        rows.append([name, f"{r['unhealed']:.3f}", f"{r['healed']:.3f}", f"{r['excess_cut']:.3f}",
                     *([f"{r['mc_unhealed']:.3f}→{r['mc_healed']:.3f}"] if with_mc else []),
                     f"{time.perf_counter() - t0:.0f}s"])
        print(f"   {name}: {r['unhealed']:.3f} → {r['healed']:.3f}", flush=True)
    print(f"\n## Default heal (a+b) on every criterion, merge method and HEAPr layout (base {hb.base_ppl:.3f})")
    print(table(rows, ["variant", "unhealed", "healed (a+b)", "excess cut", *(["mc"] if with_mc else []), "time"]))
    worse = [n for n, r in res.items() if r["healed"] > r["unhealed"]]
    print(f"heal raised perplexity in {len(worse)} of {len(res)} rows" + (f": {', '.join(worse)}" if worse else ""))
    return res


def mcnemar_p(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p: the chance of a split at least this uneven among the flipped rows if healing
    changed nothing (each flip equally likely either way)."""
    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def run_mc_flips(hb: HealBench) -> dict[str, Any]:
    """Word-order rows right → wrong and wrong → right between each unhealed row and its (a+b) heal: a paired
    view of the accuracy changes in the heal table (300 rows: one row is 0.003)."""
    b, spec = hb.b, dict(hb.heals)["(a+b)"]
    rows, out = [], {}
    for label, cfg in compressions():
        model, det = b.variant(cfg)
        before = mc_correct(model, b.tok, b.mc)
        healed, _, _ = hb.healed(model, cfg, det, spec)
        after = mc_correct(healed, b.tok, b.mc)
        gained = sum(a and not w for w, a in zip(before, after, strict=True))
        lost = sum(w and not a for w, a in zip(before, after, strict=True))
        p = mcnemar_p(gained, lost)
        out[label] = {"gained": gained, "lost": lost, "p": p}
        rows.append([label, f"{sum(before) / len(before):.3f}", f"{sum(after) / len(after):.3f}", gained, lost,
                     f"{p:.2f}"])
    print(table(rows, ["variant", "mc unhealed", "mc (a+b)", "wrong→right", "right→wrong", "McNemar p"]))
    return out


def run_heal_rows(hb: HealBench, res: dict[str, Any]) -> None:
    """(1) heal steps alone and combined, every compression row."""
    b = hb.b
    rows = []
    for label, cfg in compressions():
        model, det = b.variant(cfg)
        p0 = b.ppl(model)
        mc0 = b.mc_acc(model)
        entry: dict[str, Any] = {"unhealed": p0, "mc_unhealed": mc0, "heals": {}}
        row: list[Any] = [label, p0]
        for hlabel, spec in hb.heals:
            m, secs, _ = hb.healed(model, cfg, det, spec)
            p = b.ppl(m)
            entry["heals"][hlabel] = {"ppl": p, "seconds": secs}
            if hlabel in ("(a+b)", "(a+b+c)"):
                entry["heals"][hlabel]["mc"] = b.mc_acc(m)
            row.append(p)
        best = min(v["ppl"] for v in entry["heals"].values())
        row += [hb.excess_cut(p0, entry["heals"]["(a+b)"]["ppl"]), hb.excess_cut(p0, best),
                f"{mc0:.3f}→{entry['heals']['(a+b)']['mc']:.3f}/{entry['heals']['(a+b+c)']['mc']:.3f}"]
        res["rows"][label] = entry
        rows.append(row)
        print(f"  {label}: unhealed {p0:.3f} → " + ", ".join(f"{k} {v['ppl']:.3f}" for k, v in entry["heals"].items()),
              flush=True)
    print("\n## Perplexity before / after heal (base " + f"{hb.base_ppl:.3f})")
    print(table(rows, ["variant", "unhealed", *[h for h, _ in hb.heals], "excess cut (a+b)", "excess cut best",
                       "mc unhealed→(a+b)/(a+b+c)"]))
    for label in ("REAP 50%", "REAP 75%"):
        e = res["rows"][label]
        for h in ("(a+b)", "(a+b+c)"):
            cut = hb.excess_cut(e["unhealed"], e["heals"][h]["ppl"])
            print(f"check {label} {h}: (ppl − base) shrinks by {100 * cut:.1f}% → "
                  f"{'PASS' if cut >= 0.30 else 'FAIL'} (goal ≥ 30%)")



def run_selection(hb: HealBench, res: dict[str, Any]) -> None:
    """(3) selection at 75%: every candidate healed (a+b); the reconstruct pick and the best rival also (a+b+c)."""
    b = hb.b
    srows = []
    cands: list[tuple[str, PruneExpertsConfig]] = [
        ("select reconstruct (seed reap)", PruneExpertsConfig(ratio=0.75, criterion="reap", select="reconstruct")),
    ]
    cands += [(c, PruneExpertsConfig(ratio=0.75, criterion=c))
              for c in ("frequency", "soft_frequency", "reap", "ean", "easy_ep", "naee")]
    cands += [(f"random seed {s}", PruneExpertsConfig(ratio=0.75, criterion="random", seed=s)) for s in range(3)]
    ab, abc = hb.heals[3][1], hb.heals[4][1]
    sel = res["selection"]
    made: dict[str, tuple[Any, PassConfig, dict[str, Any]]] = {}
    for label, cfg in cands:
        t0 = time.perf_counter()
        model, det = b.variant(cfg)
        t_sel = time.perf_counter() - t0
        p0 = b.ppl(model)
        m_ab, _, _ = hb.healed(model, cfg, det, ab)
        sel[label] = {"unhealed": p0, "(a+b)": b.ppl(m_ab), "select_seconds": t_sel}
        made[label] = (model, cfg, det)
        print(f"  75% {label}: {p0:.3f} → (a+b) {sel[label]['(a+b)']:.3f}", flush=True)
    ours = "select reconstruct (seed reap)"
    rival = min((k for k in sel if k != ours), key=lambda k: sel[k]["(a+b)"])
    for label in (ours, rival):
        model, cfg, det = made[label]
        m_abc, _, _ = hb.healed(model, cfg, det, abc)
        sel[label]["(a+b+c)"] = b.ppl(m_abc)
    for label, v in sel.items():
        srows.append([label, v["unhealed"], v["(a+b)"], v.get("(a+b+c)", "-"), f"{v['select_seconds']:.1f}s"])
    print("\n## Selection at 75% removed, all healed")
    print(table(srows, ["selection", "unhealed", "healed (a+b)", "healed (a+b+c)", "decide time"]))
    rand = [v["(a+b)"] for k, v in sel.items() if k.startswith("random")]
    print(f"check 75% (a+b): reconstruct {sel[ours]['(a+b)']:.3f} vs best other ({rival}) {sel[rival]['(a+b)']:.3f}, "
          f"best random {min(rand):.3f} (median {statistics.median(rand):.3f}) → "
          f"{'PASS' if sel[ours]['(a+b)'] < sel[rival]['(a+b)'] else 'FAIL'}")
    print(f"check 75% (a+b+c): reconstruct {sel[ours]['(a+b+c)']:.3f} vs {rival} {sel[rival]['(a+b+c)']:.3f} → "
          f"{'PASS' if sel[ours]['(a+b+c)'] < sel[rival]['(a+b+c)'] else 'FAIL'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refs", nargs="*", type=Path, default=[REFERENCE, REFERENCE.parent / "reference-s1"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", choices=["all", "cost", "engine-cost", "selection", "mc-flips", "breadth"], default="all",
                    help="cost: only heal (a+b) vs a statistics pass, in memory and through the engine (engine-cost: "
                         "the engine's alone); selection: only the 75%% selection table; mc-flips: word-order rows "
                         "that flip between unhealed and healed (a+b), with McNemar's exact p; breadth: unhealed vs "
                         "the default heal (a+b) on every criterion, merge method and HEAPr layout at 50%% and 75%%")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs for the cost (after one warm-up); min reported")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    for ref in args.refs:
        run_reference(ref, args.steps, args.lr, out, args.only, args.repeats)
        if args.json:
            args.json.write_text(json.dumps(out, indent=2))
    print(f"\ntotal {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
