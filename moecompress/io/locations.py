"""Where things live by default: the cache root and a checkpoint's own calibration corpus.

Kept below both the runner and eval so that the runner → eval dependency runs one way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PROVENANCE = "moecompress.json"  # same name as io.checkpoint.PROVENANCE (kept import-free here)


def default_cache_root() -> Path:
    return Path(os.environ.get("MOECOMPRESS_CACHE", Path.home() / ".cache" / "moecompress"))


def default_calibration_source(model_dir: Path) -> Path | None:
    """The reference model ships its corpus; compressed descendants find it through provenance."""
    candidates = [Path(model_dir)]
    prov = Path(model_dir) / PROVENANCE
    if prov.is_file():
        base = json.loads(prov.read_text()).get("base_model")
        if base:
            candidates.append(Path(base))
    for c in candidates:
        f = c / "data" / "train.jsonl"
        if f.is_file():
            return f
    return None
