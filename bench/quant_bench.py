"""Expert-aware quantization on the trained reference MoE: quality, real checkpoint bytes and time per method.

Every quantized variant goes through ``moecompress.runner.run_pass`` into a temporary folder (the pass's own
reload check included) and is then *reloaded from disk* with vanilla transformers for scoring, so bytes are
the real ``model.safetensors`` size and quality is what a user of the checkpoint gets. Columns:

- val ppl: held-out perplexity (``val.jsonl``, same code as every other bench); Δ% vs fp32,
- KL: mean per-token KL(fp32 ‖ variant) of next-token distributions on the first eval batches — far less
  noisy than perplexity when quantization barely hurts, so it is what separates methods here,
- mc acc: word-order multiple-choice accuracy (300 rows, so ±0.3% is one row),
- bits: code width of routed experts (effective = what the quantizer used; stored = on disk),
- pass s: load + calibration + quantization (``run_pass``'s clock); total s adds writing and the reload check.

A second table re-runs the W3 calibration options (balance / affinity) on two more calibration samples
(document-shuffle seeds) to tell real effects from the luck of one sample.

``--peer`` then runs llm-compressor's GPTQ on the same calibration tokens in its own virtualenv
(``bench/peer_llmcompressor.py``; created under ``artifacts/peer-venv`` when missing), in both of its expert
calibration modes (every token through every expert = our ``balance``; routed tokens only = our default),
reloads its checkpoints here with ``output_loading_info=True`` and scores them with the same code.

    python bench/quant_bench.py            # main, seeds and little-calibration tables (~5-6 min on 2 shared cores)
    python bench/quant_bench.py --peer     # + llm-compressor comparison (~2-3 min more, + venv creation once)
    python bench/quant_bench.py --peer-only --seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REFERENCE, Bench, table, torch

from moecompress.calib.data import CalibSpec, load_calibration
from moecompress.io.checkpoint import checkpoint_bytes, load_model
from moecompress.passes.quantize import QuantizeConfig
from moecompress.runner import RunOptions, run_pass
from moecompress.zoo.metrics import _batches, _pad_id, _windows

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / "artifacts" / "peer-venv"
PEER_SCRIPT = Path(__file__).resolve().parent / "peer_llmcompressor.py"
PEER_PACKAGES = ["llmcompressor==0.14.0.1"]
GROUP = 32
KL_BATCHES = 8  # first 8 eval batches of 16 windows (the longest ones: batches are length-sorted)


def _quiet_compressed_tensors() -> None:
    """compressed-tensors logs 'Could not match re:...experts...' on every load of a fused-expert model.

    It is harmless here (transformers maps the per-expert checkpoint names onto its fused experts itself;
    every reload below is checked against the in-memory model or the peer's own numbers), so silence it.
    """
    import logging

    logging.getLogger("compressed_tensors.utils.match").setLevel(logging.ERROR)


def variants(extra_w2: bool) -> list[tuple[str, QuantizeConfig]]:
    q = lambda **kw: QuantizeConfig(group_size=GROUP, **kw)  # noqa: E731
    rows = [
        ("RTN W4", q(bits=4, method="rtn")),
        ("RTN W3", q(bits=3, method="rtn")),
        ("GPTQ W4", q(bits=4)),
        ("GPTQ W3", q(bits=3)),
        ("GPTQ W3 + balance", q(bits=3, balance=True)),
        ("GPTQ W3 + affinity", q(bits=3, affinity=True)),
        ("GPTQ W3 + balance + affinity", q(bits=3, balance=True, affinity=True)),
        ("GPTQ mixed 3.5-bit budget (2/3/4)*", q(bits=4, bits_budget=3.5, candidate_bits=[2, 3, 4])),
    ]
    if extra_w2:
        rows += [("RTN W2 (extra)", q(bits=2, method="rtn")), ("GPTQ W2 (extra)", q(bits=2)),
                 ("GPTQ W2 + balance + affinity (extra)", q(bits=2, balance=True, affinity=True))]
    return rows


class Scorer:
    """Perplexity, MC accuracy and KL to the fp32 reference, all on the Bench's eval data."""

    def __init__(self, b: Bench) -> None:
        self.b = b
        texts = [r["text"] for r in b.val]
        self.eval_batches = [(ids, mask) for _, ids, mask in _batches(_windows(b.tok, texts, 256), 16, _pad_id(b.tok))]
        self._ref_logp = [self._logp(b.model, ids, mask) for ids, mask in self.eval_batches[:KL_BATCHES]]

    @staticmethod
    @torch.no_grad()
    def _logp(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1]).logits.float(), -1)

    @torch.no_grad()
    def kl(self, model: Any) -> float:
        model.eval()
        total, n = 0.0, 0
        for (ids, mask), ref in zip(self.eval_batches[:KL_BATCHES], self._ref_logp, strict=False):
            lq = self._logp(model, ids, mask)
            keep = mask[:, :-1].bool()
            kl = (ref.exp() * (ref - lq)).sum(-1)
            total += float(kl[keep].sum())
            n += int(keep.sum())
        return total / n

    def score(self, model: Any) -> dict[str, float]:
        return {"ppl": self.b.ppl(model), "kl": self.kl(model), "mc": self.b.mc_acc(model)}


def _row(name: str, s: dict[str, float], base_ppl: float, nbytes: int, bits: str, pass_s: Any, total_s: Any) -> list:
    return [name, f"{s['ppl']:.4f}", f"{100 * (s['ppl'] / base_ppl - 1):+.2f}%", f"{s['kl']:.5f}", f"{s['mc']:.3f}",
            f"{nbytes:,}", bits, pass_s, total_s]


HEADER = ["variant", "val ppl", "Δppl", "KL vs fp32", "mc acc", "checkpoint bytes", "expert bits (eff/stored)",
          "pass s", "total s"]


def run_variant(b: Bench, sc: Scorer, cfg: QuantizeConfig, out: Path, spec: CalibSpec | None = None,
                dtype: str | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    rep = run_pass(cfg, b.path, out, calibration=spec or b.calib_spec, opts=RunOptions(plots=False, dtype=dtype))
    total = time.perf_counter() - t0
    if rep["verify"].get("max_abs_logit_diff", 1.0) > 1e-4:
        print(f"  WARNING: reload of {out} differs from the in-memory model: {rep['verify']}")
    model = load_model(out, tokenizer=False).model
    fmt = rep["details"]["format"]
    return {"scores": sc.score(model), "bytes": checkpoint_bytes(out), "pass_s": rep["seconds"], "total_s": total,
            "eff_bits": fmt["effective_bits"], "stored_bits": fmt["stored_bits"],
            "expert_bits": rep["details"]["expert_bits"], "verify": rep["verify"],
            "out_err": rep["details"]["mean_output_error"]}


def main_table(b: Bench, sc: Scorer, tmp: Path, extra_w2: bool) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    base = sc.score(b.model)
    base_ppl = base["ppl"]
    fp32_bytes = checkpoint_bytes(b.path)
    rows = [_row("fp32 (reference)", base, base_ppl, fp32_bytes, "32", "-", "-")]
    results["fp32"] = {"scores": base, "bytes": fp32_bytes}

    t0 = time.perf_counter()
    bf = load_model(b.path, tokenizer=False).model.to(torch.bfloat16)
    bf.save_pretrained(tmp / "bf16")
    t_bf = time.perf_counter() - t0
    bf = load_model(tmp / "bf16", tokenizer=False).model
    s = sc.score(bf)
    rows.append(_row("bf16 (cast + save_pretrained)", s, base_ppl, checkpoint_bytes(tmp / "bf16"), "16", "-",
                     f"{t_bf:.1f}"))
    results["bf16"] = {"scores": s, "bytes": checkpoint_bytes(tmp / "bf16")}
    del bf
    print(f"fp32 val ppl {base_ppl:.4f}, bf16 done; quantizing {len(variants(extra_w2)) + 1} variants …", flush=True)

    todo = [(n, c, None) for n, c in variants(extra_w2)]
    todo.append(("GPTQ W4, rest bf16: --dtype bfloat16 (extra)", QuantizeConfig(bits=4, group_size=GROUP), "bfloat16"))
    for i, (name, cfg, dtype) in enumerate(todo):
        r = run_variant(b, sc, cfg, tmp / f"v{i:02d}", dtype=dtype)
        results[name] = r
        bits = (f"{r['eff_bits']:.2f} / {r['stored_bits']:.0f}" if abs(r["eff_bits"] - r["stored_bits"]) > 1e-6
                else f"{r['eff_bits']:.0f}")
        rows.append(_row(name, r["scores"], base_ppl, r["bytes"], bits, f"{r['pass_s']:.1f}", f"{r['total_s']:.1f}"))
        print(f"  {name}: ppl {r['scores']['ppl']:.4f}  KL {r['scores']['kl']:.5f}  {r['pass_s']:.1f}s", flush=True)

    print(f"\n## Quantization of routed experts (group size {GROUP}, calibration {b.calib_spec.samples} × "
          f"{b.calib_spec.seqlen} tokens of train.jsonl; router, attention, embeddings, lm_head stay fp32)")
    print(table(rows, HEADER))
    mixed = [k for k in results if k.startswith("GPTQ mixed")]
    if mixed:
        eb = results[mixed[0]]["expert_bits"]
        hist = {bb: sum(v.count(bb) for v in eb.values()) for bb in (2, 3, 4)}
        print(f"* mixed: per-expert widths chosen {hist} (per layer: "
              f"{ {k: ''.join(map(str, v)) for k, v in eb.items()} }); transformers loads one expert scheme per "
              "model, so the checkpoint stores every expert at the widest width (4): bytes equal W4, the quality "
              "is that of the mixed allocation, the effective average is the first bits number.")
    _conclusions(results)
    return results


def _conclusions(r: dict[str, dict[str, Any]]) -> None:
    def kl(k: str) -> float:
        return r[k]["scores"]["kl"]

    def ppl(k: str) -> float:
        return r[k]["scores"]["ppl"]

    print("\nReading:")
    for bits in (4, 3, 2):
        g, n = f"GPTQ W{bits}", f"RTN W{bits}"
        g = g if g in r else f"{g} (extra)"
        n = n if n in r else f"{n} (extra)"
        if g in r and n in r:
            ratio = kl(g) / kl(n)
            verdict = "beats" if ratio < 0.8 else ("ties" if ratio < 1.25 else "LOSES TO")
            print(f"- W{bits}: GPTQ {verdict} RTN on KL (×{ratio:.2f}: {kl(g):.5f} vs {kl(n):.5f}); ppl {ppl(g):.4f} vs "
                  f"{ppl(n):.4f} (fp32 {ppl('fp32'):.4f}; ppl moves under ~0.05% are within evaluation noise)")
    base = "GPTQ W3"
    for k in ("GPTQ W3 + balance", "GPTQ W3 + affinity", "GPTQ W3 + balance + affinity"):
        if k in r:
            d = kl(k) / kl(base) - 1
            print(f"- {k}: KL {100 * d:+.1f}% vs plain GPTQ W3, ppl {ppl(k) - ppl(base):+.4f} (one calibration sample; "
                  "see the seeds table)")


def seed_table(b: Bench, sc: Scorer, tmp: Path, results: dict[str, dict[str, Any]], seeds: list[int]) -> None:
    """Are the W3 calibration options' effects real? Re-run them on other calibration samples (document seeds)."""
    names = ["GPTQ W3", "GPTQ W3 + balance", "GPTQ W3 + affinity", "GPTQ W3 + balance + affinity"]
    cfgs = dict(variants(False))
    kls: dict[str, list[float]] = {n: [] for n in names}
    ppls: dict[str, list[float]] = {n: [] for n in names}
    for seed in seeds:
        spec = b.calib_spec.model_copy(update={"seed": seed})
        for n in names:
            r = results[n] if seed == b.calib_spec.seed and n in results else run_variant(
                b, sc, cfgs[n], tmp / f"seed{seed}-{n.replace(' ', '_').replace('+', 'p')}", spec)
            kls[n].append(r["scores"]["kl"])
            ppls[n].append(r["scores"]["ppl"])
        print(f"  calibration seed {seed} done", flush=True)
    rows = []
    for n in names:
        rel = [k / p for k, p in zip(kls[n], kls["GPTQ W3"], strict=True)]
        rows.append([n, *(f"{k:.5f}" for k in kls[n]), f"{statistics.mean(kls[n]):.5f}",
                     f"{statistics.mean(rel):.2f} ({min(rel):.2f}–{max(rel):.2f})", f"{statistics.mean(ppls[n]):.4f}"])
    rtn = results.get("RTN W3")
    if rtn:
        rows.append(["RTN W3 (no calibration)", *([f"{rtn['scores']['kl']:.5f}"] * len(seeds)),
                     f"{rtn['scores']['kl']:.5f}", f"{statistics.mean(rtn['scores']['kl'] / k for k in kls['GPTQ W3']):.2f}",
                     f"{rtn['scores']['ppl']:.4f}"])
    print(f"\n## W3 calibration options over {len(seeds)} calibration samples (document-shuffle seeds {seeds}; "
          f"each {b.calib_spec.samples} × {b.calib_spec.seqlen} tokens)")
    print(table(rows, ["variant", *(f"KL seed {s}" for s in seeds), "KL mean", "KL / plain GPTQ W3 (min–max)",
                       "ppl mean"]))


def low_calibration_table(b: Bench, sc: Scorer, tmp: Path, samples: int, seqlen: int) -> None:
    """Balance's case: so few calibration tokens that routed-only expert Hessians are rank-deficient."""
    spec = b.calib_spec.model_copy(update={"samples": samples, "seqlen": seqlen})
    n_exp, top_k = b.adapter.num_experts(b.model.config), b.model.config.num_experts_per_tok
    per_expert = samples * seqlen * top_k / n_exp
    rows = []
    names = ["RTN W3", "GPTQ W3", "GPTQ W3 + balance", "GPTQ W3 + affinity", "GPTQ W3 + balance + affinity"]
    cfgs = dict(variants(False))
    for n in names:
        r = run_variant(b, sc, cfgs[n], tmp / f"low-{n.replace(' ', '_').replace('+', 'p')}", spec)
        rows.append([n, f"{r['scores']['ppl']:.4f}", f"{r['scores']['kl']:.5f}", f"{r['pass_s']:.1f}"])
    print(f"\n## Little calibration: {samples} × {seqlen} tokens (≈{per_expert:.0f} routed tokens per expert vs hidden "
          f"{b.model.config.hidden_size}: routed-only Hessians are rank-deficient)")
    print(table(rows, ["variant", "val ppl", "KL vs fp32", "pass s"]))


# ------------------------------------------------------------------------------------------------ peer


def ensure_peer_venv(venv: Path = PEER_VENV) -> Path:
    """A virtualenv with llm-compressor (it pins transformers 5.15–5.17, so never our own environment)."""
    py = venv / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", "import llmcompressor"], capture_output=True).returncode == 0:
        return py
    print(f"creating {venv} (torch from the local wheel, then {' '.join(PEER_PACKAGES)}) …", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True)  # pip config's find-links: the CPU build on this disk
    subprocess.run(pip + PEER_PACKAGES, check=True)
    return py


def reload_foreign(path: Path) -> tuple[Any, dict[str, list[str]]]:
    """Vanilla transformers, as any user would: from_pretrained with the loading report."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    model.eval()
    return model, {k: sorted(map(str, v)) for k, v in info.items()}


def peer_comparison(b: Bench, sc: Scorer, tmp: Path, ours: dict[str, dict[str, Any]], bits: list[int]) -> None:
    import transformers

    py = ensure_peer_venv()
    calib = load_calibration(b.calib_spec, b.tok)
    data = tmp / "peer_data.pt"
    torch.save({"calib_input_ids": calib.input_ids, "calib_attention_mask": calib.attention_mask,
                "eval_batches": sc.eval_batches}, data)
    print(f"\nrunning llm-compressor GPTQ W{'/W'.join(map(str, bits))} in {py.parent.parent} …", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([str(py), str(PEER_SCRIPT), "--model", str(b.path), "--data", str(data),
                           "--out-root", str(tmp / "peer"), "--group-size", str(GROUP), "--bits", *map(str, bits)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (tmp / "peer.log").write_text(proc.stderr)
    try:
        peer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        print(f"peer run failed (rc {proc.returncode}); stderr tail:\n{proc.stderr[-3000:]}")
        return
    v = peer["versions"]
    print(f"peer: llm-compressor {v['llmcompressor']}, transformers {v['transformers']}, compressed-tensors "
          f"{v['compressed_tensors']}, torch {v['torch']}, {peer['threads']} threads; process wall {wall:.1f}s; "
          f"its fp32 ppl on our eval batches {peer.get('ppl_base_in_memory', float('nan')):.4f} (ours "
          f"{ours['fp32']['scores']['ppl']:.4f})")

    # our side with matched settings: the peer's default routes every calibration token through every expert
    # (moe_calibrate_all_experts=True), i.e. our --balance without --affinity
    for w in bits:
        for name, cfg in ((f"GPTQ W{w}", QuantizeConfig(bits=w, group_size=GROUP)),
                          (f"GPTQ W{w} + balance", QuantizeConfig(bits=w, group_size=GROUP, balance=True))):
            if name not in ours:
                ours[name] = run_variant(b, sc, cfg, tmp / f"ours-{name.replace(' ', '_').replace('+', 'p')}")

    base_ppl = ours["fp32"]["scores"]["ppl"]
    rows, notes = [], []
    matched = {"routed": "", "all": " + balance"}  # our variant computing the same Hessians as the peer's mode
    for run in peer["runs"]:
        w, mode = run["bits"], run["mode"]
        label = f"llm-compressor GPTQ W{w} ({'all experts' if mode == 'all' else 'routed only'})"
        if "error" in run:
            notes.append(f"{label}: FAILED — {run['error']}")
            continue
        model, info = reload_foreign(Path(run["path"]))
        s = sc.score(model)
        missing, unexpected = info.get("missing_keys", []), info.get("unexpected_keys", [])
        exact = abs(s["ppl"] - run["ppl_in_memory"]) < 1e-3 * run["ppl_in_memory"]
        notes.append(f"{label} reload (transformers {transformers.__version__}, output_loading_info): {len(missing)} "
                     f"missing, {len(unexpected)} unexpected, {len(info.get('mismatched_keys', []))} mismatched keys"
                     + (f" (missing e.g. {missing[:3]})" if missing else "")
                     + (f" (unexpected e.g. {unexpected[:3]})" if unexpected else "")
                     + f"; ppl in its own memory {run['ppl_in_memory']:.4f} vs reloaded here {s['ppl']:.4f} → "
                     + ("reload exact" if exact else "RELOAD CHANGES THE MODEL"))
        peer_q, peer_t = run["load_seconds"] + run["oneshot_seconds"], run["total_seconds"]
        rows.append(_row(label, s, base_ppl, run["bytes"], str(w), f"{peer_q:.1f}", f"{peer_t:.1f}"))
        name = f"GPTQ W{w}{matched[mode]}"
        o = ours[name]
        rows.append(_row(f"  moecompress {name}", o["scores"], base_ppl, o["bytes"], str(w), f"{o['pass_s']:.1f}",
                         f"{o['total_s']:.1f}"))
        notes.append(f"W{w} {mode}: ours ({name}) / peer — time: quantize {o['pass_s'] / peer_q:.2f}, end-to-end "
                     f"{o['total_s'] / peer_t:.2f}; KL {o['scores']['kl'] / s['kl']:.2f}")
    print(f"\n## Peer comparison: llm-compressor vs moecompress (group size {GROUP}, identical calibration tokens)")
    print(table(rows, HEADER))
    print("(each peer row is followed by our variant that builds the same expert Hessians. Peer 'pass s' = load + "
          "oneshot; 'total s' adds save_pretrained. Ours: load + quantize; total adds write + reload check. Same "
          "machine, same run; the 2 cores are shared with other jobs, so compare timings only within one run.)")
    for n in notes:
        print("- " + n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer", action="store_true", help="also run llm-compressor in its own virtualenv")
    ap.add_argument("--peer-only", action="store_true", help="skip the main table (fp32 + matched GPTQ only)")
    ap.add_argument("--peer-bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--no-w2", action="store_true", help="skip the extra W2 rows")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                    help="calibration seeds for the W3 calibration-options table (empty: skip it)")
    ap.add_argument("--low-calib", type=int, nargs=2, default=[4, 64], metavar=("SAMPLES", "SEQLEN"),
                    help="calibration size of the little-calibration table (0 0: skip it)")
    ap.add_argument("--json", type=Path, help="also write all numbers here")
    args = ap.parse_args()
    _quiet_compressed_tensors()
    b = Bench(REFERENCE)
    ref = json.loads((b.path / "reference.json").read_text()) if (b.path / "reference.json").is_file() else {}
    print(f"reference: {b.path} ({ref.get('steps', '?')} steps, {b.model.num_parameters():,} params), torch threads "
          f"{torch.get_num_threads()}")
    sc = Scorer(b)
    with tempfile.TemporaryDirectory(prefix="quant_bench-") as d:
        tmp = Path(d)
        if args.peer_only:
            results = {"fp32": {"scores": sc.score(b.model), "bytes": checkpoint_bytes(b.path)}}
        else:
            results = main_table(b, sc, tmp, extra_w2=not args.no_w2)
            if args.seeds:
                seed_table(b, sc, tmp, results, args.seeds)
            if args.low_calib[0] > 0:
                low_calibration_table(b, sc, tmp, *args.low_calib)
        if args.peer or args.peer_only:
            peer_comparison(b, sc, tmp, results, args.peer_bits)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
