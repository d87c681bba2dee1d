"""Multi-token-prediction (MTP) layers: shipped in checkpoints, never built by transformers.

DeepSeek-V3/R1/V3.2, GLM-4.5, MiMo, Qwen3-Next/3.5, LongCat… store MTP layers next to the decoder; transformers
skips their weights on load, so a compressed checkpoint written from the loaded model has none. Leaving the
config announcing them would make a server that drafts with MTP (speculative decoding) look for weights that
are not there. moecompress therefore drops them explicitly: the count in config.json becomes 0 and the drop is
recorded (provenance, report, model card). Compressing the MTP layers themselves (same expert count) is not
implemented.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moecompress.arch.layers import MTP_KEYS


def mtp_layers(config: dict[str, Any]) -> tuple[dict[str, Any], str, int] | None:
    """(the (sub-)config holding it, key, count) of the MTP layers a config announces, or None."""
    for cfg in (config, config.get("text_config")):
        if not isinstance(cfg, dict):
            continue
        for key in MTP_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return cfg, key, value
    return None


def drop_mtp(folder: Path) -> str | None:
    """Set the MTP count of a written checkpoint to 0 (its weights are not in it); returns the line to record."""
    cfg_file = Path(folder) / "config.json"
    config = json.loads(cfg_file.read_text())
    found = mtp_layers(config)
    if found is None:
        return None
    holder, key, n = found
    holder[key] = 0
    cfg_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return (f"dropped {n} multi-token-prediction layer(s): transformers does not load them, so their weights are "
            f"not in this checkpoint and `{key}` is now 0 (speculative decoding with MTP is unavailable)")
