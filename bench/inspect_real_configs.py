"""`inspect` on config.json alone for every real checkpoint config: parameters, active parameters, bytes.

For each file in tests/data/real-configs/ (copies of shared/real-configs), a folder holding only that file as
config.json is inspected through the CLI path (`inspect_checkpoint`), and compared with transformers' own
meta-device count (a fresh build, counted independently of moecompress' grouping) and with the published sizes
in published.json. Prints a markdown table. Run: `python bench/inspect_real_configs.py [--json]`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from moecompress.arch.skeleton import meta_model  # noqa: E402
from moecompress.inspect import inspect_checkpoint  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "tests" / "data" / "real-configs"


def meta_count(config: dict) -> int:
    """transformers' count: parameters of the model it builds on the meta device."""
    return sum(p.numel() for p in meta_model(config).parameters())


def rows() -> list[dict]:
    published = json.loads((CONFIGS / "published.json").read_text())
    out = []
    for f in sorted(CONFIGS.glob("*.json")):
        if f.name == "published.json":
            continue
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(f, Path(d) / "config.json")
            t0 = time.perf_counter()
            ins = inspect_checkpoint(Path(d))
            secs = time.perf_counter() - t0
        config = json.loads(f.read_text())
        pub = published.get(f.name, {})
        out.append({
            "file": f.name, "family": ins.family, "adapter": ins.adapter, "experts": ins.experts_per_layer,
            "top_k": ins.top_k, "moe_layers": len(ins.moe_layers), "layers": ins.num_layers,
            "groups": ins.routing_groups, "total": ins.total_params, "meta": meta_count(config),
            "active": ins.active_params, "active_ne": ins.active_params_no_embedding,
            "active_nen": ins.active_params_no_embedding_no_head, "pub_total": pub.get("total"), "pub_active": pub.get("active"),
            "bytes": ins.total_bytes, "format": ins.stored_format, "parts": ins.parts, "seconds": secs,
        })
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| config | family | MoE layers | experts × top-k | total (B) | meta count (B) | published total | "
             "active (B): all / −emb / −emb−head | published active | stored as | bytes (GB) | non-text (B) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in table:
        pt = f"{r['pub_total']:g}" if r["pub_total"] else "-"
        pa = f"{r['pub_active']:g}" if r["pub_active"] else "-"
        non_text = sum(v for k, v in r["parts"].items() if k != "language_model")
        groups = f" ({r['groups']} groups)" if r["groups"] > 1 else ""
        lines.append(
            f"| {r['file'].removesuffix('.json')} | {r['family']}{'' if r['adapter'] else '*'} | "
            f"{r['moe_layers']}/{r['layers']} | {r['experts']} × {r['top_k']}{groups} | {r['total'] / 1e9:.2f} | "
            f"{r['meta'] / 1e9:.2f} | {pt} | {r['active'] / 1e9:.2f} / {r['active_ne'] / 1e9:.2f} / {r['active_nen'] / 1e9:.2f} | {pa} | {r['format']} | "
            f"{r['bytes'] / 1e9:.1f} | {non_text / 1e9:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    table = rows()
    if "--json" in sys.argv:
        print(json.dumps(table, indent=2))
    else:
        print(markdown(table))
        print(f"\n(* = model type in the unsupported table: passes refuse it in one line; inspected from transformers' model) "
              f"{sum(r['seconds'] for r in table):.1f}s for {len(table)} configs")
