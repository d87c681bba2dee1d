"""Heal a whole model, select by healed reconstruction, and the report numbers around them.

`heal_model` and `reconstruct_selection` drive the pure per-layer functions through `walk_two_streams`
(the seam the streaming engine replaces). `after_pass` is what the runner calls after prune / merge /
neuron pruning: routed probability mass removed per layer, calibration KL before heal, heal (when asked),
KL after.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch

from moecompress.arch.adapter import moe_layers
from moecompress.arch.discover import text_model
from moecompress.errors import UserError
from moecompress.heal.fit import heal_block, heal_summary
from moecompress.heal.select import HealedReconstruction, select_reconstruct
from moecompress.heal.spec import HealSpec
from moecompress.heal.walk import holdout_rows, walk_two_streams
from moecompress.passes.merging import Group
from moecompress.surgery import keep_experts

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def calibration_batches(calib: Any, batch_size: int = 8) -> Batches:
    return list(calib.batches(batch_size))


def held_out_batches(batches: Batches, holdout: float) -> Batches:
    """The held-out calibration sequences (the last ones, as the walk holds them out), re-batched."""
    ids = torch.cat([b[0] for b in batches])
    mask = torch.cat([b[1] for b in batches])
    n = holdout_rows(ids.shape[0], holdout)
    ids, mask = ids[-n:], mask[-n:]
    return [(ids[i : i + 8], mask[i : i + 8]) for i in range(0, n, 8)]


@torch.no_grad()
def calibration_kl(ref_model: torch.nn.Module, model: torch.nn.Module, batches: Batches) -> float:
    """Mean per-token KL(original ‖ compressed) of the next-token distributions over real tokens."""
    total, count = 0.0, 0
    for ids, mask in batches:
        m = mask.bool()
        ref_logits = text_model(ref_model)(input_ids=ids, attention_mask=mask).logits[m]  # real tokens only: [n, vocab]
        total += kl_sum(ref_logits, text_model(model)(input_ids=ids, attention_mask=mask).logits[m])
        count += int(m.sum())
    return total / max(count, 1)


def kl_sum(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Σ over positions of KL(softmax(ref) ‖ softmax(logits)), logits [n, vocab]; fp64 a few hundred positions
    at a time (large vocabularies)."""
    total = 0.0
    for s in range(0, ref_logits.shape[0], 256):
        lp_ref = torch.log_softmax(ref_logits[s : s + 256].double(), -1)
        lp = torch.log_softmax(logits[s : s + 256].double(), -1)
        total += float((lp_ref.exp() * (lp_ref - lp)).sum())
    return total


def removed_routed_mass(stats: Any, removed: dict[int, list[int]]) -> dict[str, float]:
    """Per layer: share of the applied gate weight (routed probability mass) the removed experts carried."""
    out = {}
    for idx, gone in removed.items():
        soft = stats.layers[idx].sums["soft_freq"].double()
        out[str(idx)] = round(float(soft[gone].sum() / soft.sum().clamp_min(1e-30)), 5) if gone else 0.0
    return out


def groups_from_details(pass_name: str, details: dict[str, Any], layer_ids: list[int], n_ref: int
                        ) -> tuple[dict[int, list[Group]], dict[int, list[int]]]:
    """Which original experts each kept expert stands for (per layer), and which were removed, from a pass report."""
    groups: dict[int, list[Group]] = {}
    if pass_name == "merge_experts":
        for i in layer_ids:
            groups[i] = [Group(list(g["members"])) for g in details["layers"][str(i)]["groups"]]
    else:
        kept = details.get("kept") or (details.get("experts") or {}).get("kept")
        for i in layer_ids:
            keep = kept[str(i)] if kept else list(range(n_ref))
            groups[i] = [Group([int(k)]) for k in keep]  # keep_experts keeps them in this order
    removed = {i: sorted(set(range(n_ref)) - {g.anchor for g in gs}) for i, gs in groups.items()}
    return groups, removed


def heal_model(ref_model: torch.nn.Module, model: torch.nn.Module, batches: Batches, groups: dict[int, list[Group]],
               spec: HealSpec, progress: Callable[[], None] | None = None) -> dict[str, Any]:
    """Heal every MoE layer of `model` (in place) towards `ref_model`, bottom up, with error propagation."""
    t0 = time.perf_counter()
    layers: dict[str, Any] = {}

    def on_layer(i: int, ref_layer: Any, layer: Any, data: Any) -> None:
        if i not in groups:
            raise UserError(f"heal: no expert correspondence for layer {i}")
        layers[str(i)] = heal_block(ref_layer, layer, data, groups[i], spec)

    walk_two_streams(ref_model, model, batches, on_layer, holdout=spec.holdout, progress=progress)
    return heal_summary(spec, time.perf_counter() - t0, layers)


def reconstruct_selection(model: torch.nn.Module, batches: Batches, n_keep: int, n_groups: int, spec: HealSpec,
                          beam: int = 1, seed_keep: dict[int, list[int]] | None = None,
                          protect: dict[int, list[int]] | None = None, progress: Callable[[], None] | None = None,
                          rivals: dict[int, dict[str, list[int]]] | None = None
                          ) -> tuple[dict[int, list[int]], dict[str, Any]]:
    """Kept experts per layer chosen on the healed block error; `model` is not changed.

    A scratch copy is pruned and healed (closed form) layer by layer, so every layer is chosen on the inputs
    the layers chosen below it produce.
    """
    scratch = copy.deepcopy(model)
    closed = spec.model_copy(update={"steps": 0})
    kept: dict[int, list[int]] = {}
    info: dict[str, Any] = {}

    def on_layer(i: int, ref_layer: Any, layer: Any, data: Any) -> None:
        rec = HealedReconstruction(layer, data, closed)
        keep, sinfo = select_reconstruct(rec, n_keep, n_groups, beam, (seed_keep or {}).get(i), (protect or {}).get(i),
                                         (rivals or {}).get(i))
        keep_experts(layer, keep)
        heal_block(ref_layer, layer, data, [Group([k]) for k in keep], closed)
        kept[i] = keep
        info[str(i)] = sinfo

    walk_two_streams(model, scratch, batches, on_layer, holdout=spec.holdout, progress=progress)
    del scratch
    return kept, info


def choose_whole_model(model: torch.nn.Module, batches: Batches, candidates: dict[str, dict[int, list[int]]],
                       spec: HealSpec, refine: bool = True
                       ) -> tuple[str, dict[int, list[int]], dict[str, Any]]:
    """The selection (kept experts per layer) with the lowest held-out calibration KL once healed.

    The per-layer search minimises each layer's healed block error, which at high removal does not order
    selections the way the model's output does; so every candidate (the search's, the criteria's) is pruned
    and healed (closed form) on a scratch copy and judged on the KL of the next-token distributions on the
    held-out calibration sequences — the quantity the report shows. With `refine`, each layer of the best one
    then tries every other candidate's set for that layer (bottom up) and keeps a swap that lowers the KL.
    Returns (the best candidate's name, or "mixed" after swaps; the selection; what was measured).
    """
    held = held_out_batches(batches, spec.holdout)
    closed = spec.model_copy(update={"steps": 0})
    measured: dict[tuple, float] = {}

    def kl_of(keep: dict[int, list[int]]) -> float:
        key = tuple(sorted((i, tuple(v)) for i, v in keep.items()))
        if key not in measured:  # identical selections are measured once
            scratch = copy.deepcopy(model)
            for layer in moe_layers(scratch):
                keep_experts(layer, keep[layer.index])
            heal_model(model, scratch, batches, {i: [Group([k]) for k in v] for i, v in keep.items()}, closed)
            measured[key] = calibration_kl(model, scratch, held)
            del scratch
        return measured[key]

    kls = {name: kl_of(keep) for name, keep in candidates.items()}
    winner = min(kls, key=lambda n: kls[n])
    best, best_kl, swaps = dict(candidates[winner]), kls[winner], []
    if refine:
        for i in sorted(best):
            for name, keep in candidates.items():
                if keep[i] == best[i]:
                    continue
                trial = {**best, i: keep[i]}
                kl = kl_of(trial)
                if kl < best_kl:
                    best, best_kl = trial, kl
                    swaps.append({"layer": i, "from": name, "healed_heldout_kl": kl})
    info = {"healed_heldout_kl": kls, "swaps": swaps, "final_healed_heldout_kl": best_kl,
            "selections_measured": len(measured)}
    return (winner if not swaps else "mixed"), best, info


def after_pass(model: torch.nn.Module, load_reference: Callable[[], torch.nn.Module], calib: Any,
               get_stats: Callable[[torch.nn.Module], Any] | None, pass_name: str, details: dict[str, Any], spec: HealSpec | None,
               console: Any = None, groups: dict[int, list[Group]] | None = None) -> dict[str, Any]:
    """Report numbers every prune / merge / neuron-pruning run carries, and heal when `spec` is given.

    `groups` (which original experts each kept expert stands for) defaults to what the pass `details` say;
    `get_stats(reference_model)` gives routing statistics of the input (the pass's own, or collected on it).
    """
    ref = load_reference()
    layer_ids = [ly.index for ly in moe_layers(model)]
    n_ref = moe_layers(ref)[0].num_experts
    if groups is None:
        groups, removed = groups_from_details(pass_name, details, layer_ids, n_ref)
    else:
        removed = {i: sorted(set(range(n_ref)) - {g.anchor for g in gs}) for i, gs in groups.items()}
    out: dict[str, Any] = {}
    if get_stats is not None and any(removed.values()):
        out["removed_routed_mass"] = removed_routed_mass(get_stats(ref), removed)
    batches = calibration_batches(calib)
    holdout = (spec or HealSpec()).holdout
    held = held_out_batches(batches, holdout)
    kl = {"unhealed": round(calibration_kl(ref, model, held), 6), "tokens": int(sum(int(m.sum()) for _, m in held))}
    if spec is not None:
        from rich.progress import Progress

        with Progress(console=console, disable=console is None, transient=True) as prog:
            task = prog.add_task("healing layers", total=len(layer_ids))
            out["heal"] = heal_model(ref, model, batches, groups, spec, progress=lambda: prog.advance(task))
        kl["healed"] = round(calibration_kl(ref, model, held), 6)
    else:
        kl["healed"] = None
        kl["note"] = "heal not run (add --heal to repair the kept experts)"
    out["calibration_kl"] = kl
    del ref
    return out
