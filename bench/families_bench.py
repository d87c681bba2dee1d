"""Every family on its miniature: prune / merge / HEAPr / quantize / vanilla reload, one row per config.

    python bench/families_bench.py [--configs DIR] [--families] [--only NAME …]

Rows: each config.json in shared/real-configs (miniature of the real checkpoint) and, with --families, the
reference miniature of every supported model type. Each pass starts from the miniature and runs through the
real CLI (`moecompress prune|merge|quantize`), which writes and verifies the checkpoint (vanilla reload, zero
missing/unexpected keys, same logits); "reload" is an independent reload of the pruned checkpoint with the class
named in `architectures`. Prints a markdown table for bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PASSES = {
    "prune": ["prune", "--ratio", "0.5", "--criterion", "reap", "--no-heal"],
    "merge": ["merge", "--ratio", "0.5", "--no-heal"],
    "heapr": ["prune", "--neuron-ratio", "0.5", "--criterion", "heapr", "--no-heal"],
    "quantize": ["quantize", "--bits", "4", "--group-size", "16", "--method", "rtn"],
}
CALIB = ["--calib-samples", "8", "--calib-seqlen", "32"]


def _cli(args: list[str]) -> tuple[int, str]:
    """Run the console entry point in-process; (exit code, last error line)."""
    import contextlib
    import io

    from moecompress.cli import main

    old = sys.argv
    sys.argv = ["moecompress", *map(str, args)]
    err = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:  # a traceback is a bug: record it as such
        return 99, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    finally:
        sys.argv = old
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and "warn" not in ln.lower()]
    return code, (lines[-1][:200] if lines else "")


def run_config(name: str, config: dict, work: Path, calib: Path) -> dict[str, str]:
    """One row: miniature of `config`, then each pass from it. Cell: 'ok', or 'exit N: message'."""
    from moecompress.io.checkpoint import auto_class, read_config
    from moecompress.zoo.miniature import write_miniature

    row: dict[str, str] = {}
    src = work / name / "mini"
    (work / name).mkdir(parents=True, exist_ok=True)
    cfg_file = work / name / "config.json"
    cfg_file.write_text(json.dumps(config))
    try:
        write_miniature(cfg_file, src)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return {"miniature": f"fail: {type(exc).__name__}: {str(exc)[:120]}"}
    row["miniature"] = "ok"
    for pname, args in PASSES.items():
        t0 = time.perf_counter()
        code, msg = _cli([args[0], src, "--out", work / name / pname, *args[1:], "--calib", calib, *CALIB])
        row[pname] = "ok" if code == 0 else f"exit {code}: {msg}"
        row[pname + "_s"] = f"{time.perf_counter() - t0:.1f}"
    out = work / name / "prune"
    if row.get("prune") == "ok":
        try:
            from moecompress.io.mtp import unexpected_mtp

            cls = auto_class(read_config(out))
            _, info = cls.from_pretrained(out, output_loading_info=True)
            # kept MTP layers: transformers' ignore pattern names the real depth, not a miniature's (io/mtp.py)
            _, info["unexpected_keys"] = unexpected_mtp(read_config(out), info["unexpected_keys"])
            row["reload"] = "ok" if not any(info.values()) else f"not clean: {info}"
        except Exception as exc:  # noqa: BLE001
            row["reload"] = f"fail: {type(exc).__name__}"
    else:
        row["reload"] = "n/a (prune failed)"
    return row


def main() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "data" / "real-configs")
    ap.add_argument("--families", action="store_true", help="also every supported model type's reference miniature")
    ap.add_argument("--only", nargs="*", default=None)
    a = ap.parse_args()
    from tests.helpers import calib_file

    rows: dict[str, dict] = {}
    todo: list[tuple[str, dict]] = [(p.stem, json.loads(p.read_text())) for p in sorted(a.configs.glob("*.json")) if p.name != "published.json"]
    if a.families:
        from moecompress.arch.families import reference_config, routed_expert_model_types, unsupported_reason

        todo += [(f"[{t}]", reference_config(t)) for t in routed_expert_model_types() if unsupported_reason(t) is None]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        calib = calib_file(work / "calib.jsonl", n=40)
        for name, cfg in todo:
            if a.only and not any(o in name for o in a.only):
                continue
            rows[name] = run_config(name.strip("[]"), cfg, work, calib)
            r = rows[name]
            print(f"{name}: " + " ".join(f"{k}={r.get(k, '-')[:60]}" for k in ("miniature", *PASSES, "reload")),
                  file=sys.stderr, flush=True)
    cols = ["miniature", *PASSES, "reload"]
    print("| config | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(r.get(c, "-").replace("|", "/") for c in cols) + " |")


if __name__ == "__main__":
    main()
