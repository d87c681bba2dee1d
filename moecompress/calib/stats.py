"""Per-layer, per-expert routing statistics: what the collector fills and every decision reads.

Kept as plain tensors so they save to safetensors and reload without the model; derived criteria
(REAP, EAN, ...) are computed from the sums here, so one calibration sweep serves every method and ratio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moecompress.errors import UserError


def save_bundle(path: Path, stem: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write `stem.safetensors` (atomically, via a temp name) and then `stem.json` into folder `path`.

    The json goes last, so `bundle_exists` is only true for a complete pair.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f"{stem}.safetensors.tmp"
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp))
    tmp.rename(path / f"{stem}.safetensors")
    (path / f"{stem}.json").write_text(json.dumps(info, indent=2, default=str))


def load_bundle(path: Path, stem: str, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a pair written by `save_bundle`; an unreadable one is a UserError naming `what` and the fix."""
    path = Path(path)
    try:
        info = json.loads((path / f"{stem}.json").read_text())
        tensors = load_file(str(path / f"{stem}.safetensors"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{what} at {path} are unreadable ({exc}); delete the folder to recollect") from exc
    return info, tensors


def bundle_exists(path: Path, stem: str) -> bool:
    return (Path(path) / f"{stem}.json").is_file() and (Path(path) / f"{stem}.safetensors").is_file()


SUM_FIELDS = (
    "freq",  # [E] routed (token, slot) pairs
    "soft_freq",  # [E] sum of applied gate weights
    "reap_sum",  # [E] sum of g * ||y||  (REAP = reap_sum / freq)
    "ean",  # [E] sum of ||g * y||
    "easy_ep",  # [E] sum of g * ||y|| * max(1 - cos(h, h + routed), 0)
    "max_act",  # [E] max |y| over routed tokens (super-expert detection)
    "out_sum",  # [E, H] sum of expert outputs y over routed tokens
    "act_sq",  # [E, I] sum of a^2 (intermediate activation) over routed tokens
    "act_sq_gated",  # [E, I] sum of (g a)^2
    "logit_sum",  # [E] sum of router logits over all tokens
    "prob_sum",  # [E] sum of softmax(router logits) over all tokens
    "logit_gram",  # [E, E] sum of logits logits^T (router-logit similarity between experts)
)

# Only for families with a coupled expert set (JetMoE's attention experts, `MoEAdapter.coupled`), [E] each: real
# tokens its own router gave each of its experts, and the gate weight they carried
COUPLED_FIELDS = ("coupled_freq", "coupled_mass")


@dataclass
class LayerStats:
    """Sums over the calibration tokens for one MoE layer, plus a token sample of the block's inputs."""

    num_experts: int
    hidden: int
    width: int
    n_tokens: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    sample: torch.Tensor | None = None  # [N, H] MoE-block inputs at real (unpadded) tokens, activations' dtype
    # (token, slot) pairs the router gave to zero-computation experts past the routed ones (LongCat-Flash): they
    # are no expert's, so freq sums to n_tokens · top-k minus these
    extra_picks: int = 0

    def __post_init__(self) -> None:
        e, h, i = self.num_experts, self.hidden, self.width
        shapes = {"out_sum": (e, h), "act_sq": (e, i), "act_sq_gated": (e, i), "logit_gram": (e, e)}
        for name in SUM_FIELDS:
            self.sums.setdefault(name, torch.zeros(shapes.get(name, (e,)), dtype=torch.float64))

    # ---- derived criteria ----------------------------------------------------------------------
    def __getattr__(self, name: str) -> torch.Tensor:
        sums = self.__dict__.get("sums", {})
        if name in sums:
            return sums[name]
        raise AttributeError(name)

    @property
    def reap(self) -> torch.Tensor:
        return self.sums["reap_sum"] / self.sums["freq"].clamp_min(1)

    @property
    def mean_output(self) -> torch.Tensor:
        return self.sums["out_sum"] / self.sums["freq"].clamp_min(1)[:, None]

    @property
    def mean_act_sq(self) -> torch.Tensor:
        return self.sums["act_sq"] / self.sums["freq"].clamp_min(1)[:, None]

    @property
    def logit_similarity(self) -> torch.Tensor:
        """Cosine similarity between experts' router-logit columns over all calibration tokens."""
        g = self.sums["logit_gram"]
        d = g.diagonal().clamp_min(1e-12).sqrt()
        return g / (d[:, None] * d[None, :])


@dataclass
class Stats:
    """Statistics of every MoE layer of one model under one calibration spec."""

    layers: dict[int, LayerStats]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        layer_meta = {}
        for idx, ls in self.layers.items():
            for name, t in ls.sums.items():
                tensors[f"{idx}.{name}"] = t
            if ls.sample is not None:
                tensors[f"{idx}.sample"] = ls.sample
            layer_meta[str(idx)] = {"num_experts": ls.num_experts, "hidden": ls.hidden, "width": ls.width,
                                    "n_tokens": ls.n_tokens, "extra_picks": ls.extra_picks}
        save_bundle(path, "stats", tensors, {"meta": self.meta, "layers": layer_meta})

    @classmethod
    def load(cls, path: Path) -> Stats:
        info, tensors = load_bundle(path, "stats", "statistics")
        layers: dict[int, LayerStats] = {}
        for key, lm in info["layers"].items():
            idx = int(key)
            sums = {n: tensors[f"{idx}.{n}"] for n in (*SUM_FIELDS, *COUPLED_FIELDS) if f"{idx}.{n}" in tensors}
            layers[idx] = LayerStats(num_experts=lm["num_experts"], hidden=lm["hidden"], width=lm["width"],
                                     n_tokens=lm["n_tokens"], sums=sums, sample=tensors.get(f"{idx}.sample"),
                                     extra_picks=int(lm.get("extra_picks", 0)))
        return cls(layers=layers, meta=info.get("meta", {}))

    @staticmethod
    def exists(path: Path) -> bool:
        return bundle_exists(path, "stats")


def reduce_stats(stats: Stats, world: Any, sample_cap: int) -> Stats:
    """Statistics of the whole calibration set from each rank's share (``moecompress.dist``): sums and token
    counts add, ``max_act`` takes the max, token samples concatenate in rank order up to `sample_cap` (each rank
    sampled at the global positions of its tokens, so the result is the sample one process would take)."""
    if not world.distributed:
        return stats
    layers = [stats.layers[i] for i in sorted(stats.layers)]
    counts = torch.tensor([ls.n_tokens for ls in layers], dtype=torch.float64)
    world.all_reduce_([ls.sums[n] for ls in layers for n in (*SUM_FIELDS, *COUPLED_FIELDS)
                       if n != "max_act" and n in ls.sums] + [counts])
    world.all_reduce_([ls.sums["max_act"] for ls in layers], "max")
    for ls, n in zip(layers, counts.tolist(), strict=True):
        ls.n_tokens = int(n)
    samples = world.gather({i: ls.sample for i, ls in stats.layers.items()})
    for i, ls in stats.layers.items():
        parts = [s[i] for s in samples if s.get(i) is not None]
        ls.sample = torch.cat(parts)[:sample_cap] if parts else None
    seconds = world.gather(stats.meta.get("collect_seconds", 0.0))
    stats.meta["collect_seconds"] = max(seconds)
    stats.meta["world_size"] = world.size
    return stats
