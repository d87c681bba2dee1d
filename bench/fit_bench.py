"""fit vs single-axis compression at the same or a larger size, on a trained reference MoE.

The target keeps `--expert-share` (default 0.3) of the routed experts' bytes: target = bytes on disk of the
input − (1 − share) × its routed-expert bytes (everything else stays as stored). `moecompress fit` writes its
winner for that target (a recipe run, as the CLI does); then every single-axis plan — expert pruning only
(REAP), HEAPr neuron pruning only (uniform layout), quantization only (GPTQ 8/4 bits) — is sized with the
same accounting fit uses, and for each axis (unhealed and healed for the structural ones) the smallest plan
whose bytes are ≥ fit's (both as fit's accounting predicts them) is built in memory. Held-out perplexity (the reference's val.jsonl,
not the calibration text) decides; an axis that cannot reach fit's size is listed as such.

Run from the repo root: `python bench/fit_bench.py REFERENCE [--expert-share 0.3] [--out runs/fit-bench]
[--json out.json]`. Not run by the tests (they cover fit on tiny models).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from common import Bench, table
from transformers import AutoModelForCausalLM

from moecompress.arch.skeleton import analyse, meta_model
from moecompress.calib.stats import Stats
from moecompress.fit import SearchSpace, fit_model
from moecompress.fit.measure import apply_plan
from moecompress.fit.space import Candidate, Choice, Sizer, header_model, keep_counts, widths
from moecompress.io.checkpoint import check_model_dir, checkpoint_bytes
from moecompress.io.storage import stored_bytes
from moecompress.plan import config_bytes
from moecompress.runner import RunOptions, float_view, obtain_stats


def expert_bytes(config: dict[str, Any]) -> int:
    model = meta_model(config)
    by_group, _ = stored_bytes(config, model, analyse(model, config))
    return by_group["routed_experts"]


def single_axis(sizer: Sizer, floor: int) -> dict[str, Candidate | None]:
    """Per axis, the smallest plan of that axis alone whose bytes are ≥ `floor` (None: none reaches it)."""
    e, w = sizer.experts, sizer.width
    ks = [k for k in keep_counts(sizer.adapter, sizer.config, sizer.space) if k < e]
    axes: dict[str, list[Choice]] = {
        "REAP expert pruning": [Choice(k, w, None, False) for k in ks],
        "REAP expert pruning + heal": [Choice(k, w, None, True) for k in ks],
        "HEAPr neurons (uniform)": [Choice(e, v, None, False) for v in widths(w, sizer.space)[:-1]],
        "HEAPr neurons (uniform) + heal": [Choice(e, v, None, True) for v in widths(w, sizer.space)[:-1]],
        "GPTQ quantization": [Choice(e, w, b, False) for b in (8, 4)],
    }
    out: dict[str, Candidate | None] = {}
    for name, choices in axes.items():
        sized = []
        for ch in choices:
            s = sizer.size(ch.keep, ch.width, ch.bits)
            if s is not None and s[0] >= floor:
                sized.append(Candidate(ch, sizer.passes(ch), s[0], e, w, s[1]))
        out[name] = min(sized, key=lambda c: c.bytes) if sized else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", type=Path)
    ap.add_argument("--expert-share", type=float, default=0.3, help="share of routed-expert bytes the target keeps")
    ap.add_argument("--out", type=Path, default=Path("runs/fit-bench"))
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--held-out", type=int, default=16)
    ap.add_argument("--measure", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    b = Bench(args.reference, val_docs=400, mc_rows=1, calib_samples=args.calib_samples,
              calib_seqlen=args.calib_seqlen)
    config, adapter = check_model_dir(b.path)
    config = float_view(config)
    input_bytes = checkpoint_bytes(b.path)
    target = int(input_bytes - (1 - args.expert_share) * expert_bytes(config))
    print(f"input {input_bytes:,} B, routed experts {expert_bytes(config):,} B → target {target:,} B "
          f"({args.expert_share:.0%} of the expert bytes kept)")

    shutil.rmtree(args.out / "fit", ignore_errors=True)
    t0 = time.perf_counter()
    result = fit_model(str(b.path), args.out / "fit", target_size=str(target), target_ratio=None,
                       space=SearchSpace(), calibration=b.calib_spec, held_out=args.held_out,
                       n_measure=args.measure, opts=RunOptions(plots=True))
    fit_seconds = time.perf_counter() - t0
    s = result["summary"]
    fitted = AutoModelForCausalLM.from_pretrained(s["checkpoint"]).eval()  # compressed-tensors loads as such
    rows: list[dict[str, Any]] = [{"run": f"fit: {s['winner']}", "bytes": s["predicted_bytes"],
                                   "ppl": b.ppl(fitted), "seconds": round(fit_seconds, 1)}]
    del fitted
    base_ppl = b.ppl(b.model)

    space = SearchSpace()
    sizer = Sizer(config, adapter, space, header_model(b.path, config_bytes(config)))
    stats: Stats = obtain_stats(b.model, lambda: _calib(b), b.path, b.calib_spec, RunOptions())
    winner = next(r for r in result["candidates"] if r["chosen"])
    for name, cand in single_axis(sizer, s["predicted_bytes"]).items():  # same accounting on both sides
        if cand is None:
            rows.append({"run": name, "bytes": None, "ppl": None, "note": "no plan of this axis alone is this large"})
            continue
        t0 = time.perf_counter()
        model = apply_plan(b.model, b.tok, cand, _calib(b), lambda: stats)
        same = (cand.choice.keep, cand.choice.width, cand.choice.bits, cand.choice.heal) == (
            winner["keep"], winner["width"], winner["bits"], winner["heal"])
        rows.append({"run": f"{name}: {cand.label}" + (" (fit's own plan)" if same else ""), "bytes": cand.bytes,
                     "ppl": b.ppl(model), "seconds": round(time.perf_counter() - t0, 1), "same_as_fit": same})
        del model
    fit_ppl = rows[0]["ppl"]
    beaten = all(r["ppl"] is None or r.get("same_as_fit") or fit_ppl < r["ppl"] for r in rows[1:])
    print(table([[r["run"], f"{r['bytes']:,}" if r["bytes"] else "—", r["ppl"] if r["ppl"] is not None else "—",
                  r.get("seconds", "")] for r in rows], ["run", "bytes (≥ fit's)", "held-out ppl", "s"]))
    print(f"base ppl {base_ppl:.3f}; target {target:,} B, fit wrote {s['written_bytes']:,} B "
          f"({'meets' if s['meets_target'] else 'MISSES'} it); fit beats every other single-axis run: {beaten}")
    if args.json:
        args.json.write_text(json.dumps({"target": target, "base_ppl": base_ppl, "rows": rows, "fit": result},
                                        indent=2, default=str))


def _calib(b: Bench) -> Any:
    from moecompress.calib.data import load_calibration

    return load_calibration(b.calib_spec, b.tok)


if __name__ == "__main__":
    main()
