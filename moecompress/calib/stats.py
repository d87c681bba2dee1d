"""Per-layer, per-expert routing statistics: what the collector fills and every decision reads.

Kept as plain tensors so they save to safetensors and reload without the model; derived criteria
(REAP, EAN, ...) are computed from the sums here, so one calibration sweep serves every method and ratio.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from moecompress.errors import UserError


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file under its final name only once complete (a crash leaves a `.tmp`, never a torn file)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp))
    tmp.rename(path)


def _unreadable(what: str, path: Path, exc: Exception) -> UserError:
    return UserError(f"{what} at {path} are unreadable ({exc}); delete the folder to recollect")


def save_bundle(path: Path, stem: str, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write `stem.safetensors` (atomically, via a temp name) and then `stem.json` into folder `path`.

    The json goes last, so `bundle_exists` is only true for a complete pair.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _write_atomic(path / f"{stem}.safetensors", tensors)
    (path / f"{stem}.json").write_text(json.dumps(info, indent=2, default=str))


def load_bundle(path: Path, stem: str, what: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a pair written by `save_bundle`; an unreadable one is a UserError naming `what` and the fix."""
    path = Path(path)
    try:
        info = json.loads((path / f"{stem}.json").read_text())
        tensors = load_file(str(path / f"{stem}.safetensors"))
    except (OSError, json.JSONDecodeError) as exc:
        raise _unreadable(what, path, exc) from exc
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


# stats.json "format": absent or 1 = every layer in one stats.safetensors; 2 = one layer-{idx}.safetensors per
# layer (a streamed sweep writes each layer as it finishes). Tensor keys are "{idx}.{field}" in both.
STATS_FORMAT = 2
# layers a folder-backed `Stats` keeps loaded: the compress sweep reads them in order, and each held one costs
# its token sample plus [E, H] / [E, I] float64 sums (~5 MiB in a 2k-hidden model), for every layer otherwise
LAYERS_KEPT = 2


def _layer_file(idx: int) -> str:
    return f"layer-{idx}.safetensors"


def _layer_entry(ls: LayerStats) -> dict[str, Any]:
    return {"num_experts": ls.num_experts, "hidden": ls.hidden, "width": ls.width, "n_tokens": ls.n_tokens,
            "extra_picks": ls.extra_picks}


class StatsWriter:
    """Writes a statistics folder one layer at a time, so a streamed sweep need not hold finished layers.

    stats.json goes last (via a temp name): `Stats.exists` is true only for a complete folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "stats.json").unlink(missing_ok=True)  # a stale index must not vouch for a half-written folder
        self.entries: dict[str, dict[str, Any]] = {}

    def add(self, idx: int, ls: LayerStats) -> None:
        tensors = {f"{idx}.{name}": t for name, t in ls.sums.items()}
        if ls.sample is not None:
            tensors[f"{idx}.sample"] = ls.sample
        _write_atomic(self.path / _layer_file(idx), tensors)
        self.entries[str(idx)] = {**_layer_entry(ls), "file": _layer_file(idx)}

    def finish(self, meta: dict[str, Any]) -> Stats:
        """Write the index; the statistics as read back on demand from this folder (meta: this very dict)."""
        tmp = self.path / "stats.json.tmp"
        tmp.write_text(json.dumps({"format": STATS_FORMAT, "meta": meta, "layers": self.entries}, indent=2,
                                  default=str))
        tmp.rename(self.path / "stats.json")
        return Stats(layers=StatsLayers(self.path, self.entries), meta=meta)


class StatsLayers(Mapping[int, LayerStats]):
    """Read-only ``{layer index: LayerStats}`` over a statistics folder: a layer's tensors are read (only its
    keys, via ``safe_open``) when it is asked for, and only the `keep` most recently used layers stay loaded, so
    a run's memory does not grow with the layer count. Metadata comes from stats.json, without reading tensors.

    A loaded LayerStats is a fresh object: changes to it are not written back and are lost when it is evicted."""

    def __init__(self, path: Path, entries: dict[str, dict[str, Any]], keep: int = LAYERS_KEPT) -> None:
        self.path = Path(path)
        self.entries = {int(k): v for k, v in entries.items()}
        self.keep = max(1, keep)
        self._loaded: OrderedDict[int, LayerStats] = OrderedDict()

    def __getitem__(self, idx: int) -> LayerStats:
        if idx in self._loaded:
            self._loaded.move_to_end(idx)
            return self._loaded[idx]
        if idx not in self.entries:
            raise KeyError(idx)
        ls = self._read(idx, self.entries[idx])
        self._loaded[idx] = ls
        while len(self._loaded) > self.keep:
            self._loaded.popitem(last=False)
        return ls

    def _read(self, idx: int, lm: dict[str, Any]) -> LayerStats:
        file = self.path / lm.get("file", "stats.safetensors")
        try:
            with safe_open(str(file), framework="pt") as f:
                present = set(f.keys())
                sums = {n: f.get_tensor(f"{idx}.{n}") for n in (*SUM_FIELDS, *COUPLED_FIELDS)
                        if f"{idx}.{n}" in present}
                sample = f.get_tensor(f"{idx}.sample") if f"{idx}.sample" in present else None
        except (OSError, SafetensorError) as exc:
            raise _unreadable("statistics", self.path, exc) from exc
        return LayerStats(num_experts=lm["num_experts"], hidden=lm["hidden"], width=lm["width"],
                          n_tokens=lm["n_tokens"], sums=sums, sample=sample,
                          extra_picks=int(lm.get("extra_picks", 0)))

    def __contains__(self, idx: object) -> bool:  # without reading the layer (Mapping's default would)
        return idx in self.entries

    def __iter__(self) -> Iterator[int]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def loaded(self) -> list[int]:
        """Indices of the layers held in memory now, least recently used first."""
        return list(self._loaded)


@dataclass
class Stats:
    """Statistics of every MoE layer of one model under one calibration spec.

    `layers` is a dict while statistics are collected or reduced; once they are in a folder (`save`, `load`)
    it is a read-only `StatsLayers` that reads each layer from disk when asked."""

    layers: Mapping[int, LayerStats]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        writer = StatsWriter(path)
        for idx, ls in self.layers.items():
            writer.add(idx, ls)
        writer.finish(self.meta)

    @property
    def on_disk(self) -> bool:
        """Whether `layers` reads from a folder (nothing to save, nothing to mutate)."""
        return isinstance(self.layers, StatsLayers)

    @classmethod
    def load(cls, path: Path, keep: int = LAYERS_KEPT) -> Stats:
        """The statistics in folder `path` (either format), each layer read when first asked for."""
        path = Path(path)
        try:
            info = json.loads((path / "stats.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise _unreadable("statistics", path, exc) from exc
        return cls(layers=StatsLayers(path, info["layers"], keep), meta=info.get("meta", {}))

    @staticmethod
    def exists(path: Path) -> bool:
        """A complete folder: its index, and every file the index names."""
        path = Path(path)
        try:
            info = json.loads((path / "stats.json").read_text())
        except (OSError, json.JSONDecodeError):
            return False
        files = {lm.get("file", "stats.safetensors") for lm in info.get("layers", {}).values()}
        if int(info.get("format", 1)) < 2:
            files.add("stats.safetensors")
        return all((path / f).is_file() for f in files)


def reduce_stats(stats: Stats, world: Any, sample_cap: int) -> Stats:
    """Statistics of the whole calibration set from each rank's share (``moecompress.dist``): sums and token
    counts add, ``max_act`` takes the max, token samples concatenate in rank order up to `sample_cap` (each rank
    sampled at the global positions of its tokens, so the result is the sample one process would take)."""
    if not world.distributed:
        return stats
    if stats.on_disk:
        raise TypeError("reduce_stats needs the collected statistics in memory, not ones read from a folder")
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
