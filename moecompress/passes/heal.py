"""Pass `heal`: repair an already compressed checkpoint against the model it was made from.

`moecompress heal COMPRESSED --reference ORIGINAL --out D`, or a `- pass: heal` recipe step (the reference
defaults to the recipe's input). Shapes and config never change. Which original experts each compressed
expert stands for comes from COMPRESSED's report.json when that report names ORIGINAL as its source
(merge groups, pruned sets); otherwise each compressed router row is matched to the most similar original
row (pruning and neuron pruning keep rows exactly). Reference and compressed model must share family,
architecture, tokenizer, and the reference must have at least as many experts per layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field

from moecompress.arch.adapter import MoEAdapter, moe_layers
from moecompress.errors import UserError
from moecompress.heal.spec import HealSpec
from moecompress.passes.base import PassConfig, PassContext, register_pass
from moecompress.passes.merging import Group

_SAME = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "num_key_value_heads")


class HealConfig(PassConfig, HealSpec):
    """Fit the compressed model's kept experts and router to the reference's layer outputs."""

    name: ClassVar[str] = "heal"
    needs_stats: ClassVar[bool] = False
    reference: str | None = Field(None, description="the checkpoint COMPRESSED was made from (recipe: its input)")

    def spec(self) -> HealSpec:
        return HealSpec(**{k: getattr(self, k) for k in HealSpec.model_fields})

    def check(self, adapter: MoEAdapter, hf_config: dict[str, Any]) -> None:
        from moecompress.io.checkpoint import check_model_dir

        if self.reference is None:
            raise UserError("heal: name the original checkpoint with --reference ORIGINAL")
        if hf_config.get("quantization_config"):
            raise UserError("heal: the checkpoint is quantized; heal the float checkpoint, then quantize")
        ref_cfg, ref_adapter = check_model_dir(Path(self.reference))
        if ref_adapter.model_type != adapter.model_type:
            raise UserError(f"heal: the reference is {ref_adapter.model_type} but the checkpoint is "
                            f"{adapter.model_type}; pass the model the checkpoint was compressed from")
        for key in _SAME:
            if ref_cfg.get(key) != hf_config.get(key):
                raise UserError(f"heal: reference {key}={ref_cfg.get(key)} but the checkpoint has {hf_config.get(key)}: "
                                "another architecture; pass the model the checkpoint was compressed from")
        n_ref, n_cmp = adapter.num_experts(ref_cfg), adapter.num_experts(hf_config)
        if n_ref < n_cmp or adapter.top_k(ref_cfg) != adapter.top_k(hf_config):
            raise UserError(f"heal: the reference has {n_ref} experts per layer (top-{adapter.top_k(ref_cfg)}) and the "
                            f"checkpoint {n_cmp} (top-{adapter.top_k(hf_config)}); a compressed checkpoint has at most "
                            "the experts of the model it came from — pass that model as --reference")
        if adapter.expert_width(ref_cfg) < adapter.expert_width(hf_config):
            raise UserError(f"heal: reference experts are {adapter.expert_width(ref_cfg)} wide, narrower than the "
                            f"checkpoint's {adapter.expert_width(hf_config)}; pass the model it was compressed from")


def check_same_tokenizer(tokenizer: Any, reference: Path) -> None:
    from transformers import AutoTokenizer

    if tokenizer is None:
        raise UserError("heal: the checkpoint has no tokenizer; calibration text cannot be tokenized")
    try:
        ref_tok = AutoTokenizer.from_pretrained(reference)
    except Exception as exc:  # noqa: BLE001 - any loading failure means we cannot compare
        raise UserError(f"heal: the reference {reference} has no loadable tokenizer ({exc})") from None
    if ref_tok.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"heal: the reference {reference} uses another tokenizer than the checkpoint; pass the model "
                        "the checkpoint was compressed from")


def groups_from_report(src: Path, reference: Path, layer_ids: list[int], n_ref: int) -> dict[int, list[Group]] | None:
    """Expert correspondence from the checkpoint's own report, when that report's source is the reference."""
    from moecompress.heal.run import groups_from_details

    rep = src / "report.json"
    if not rep.is_file():
        return None
    data = json.loads(rep.read_text())
    if Path(str(data.get("source", ""))).resolve() != reference.resolve():
        return None
    try:
        return groups_from_details(data["pass"], data["details"], layer_ids, n_ref)[0]
    except (KeyError, TypeError):
        return None


def groups_by_router(ref_model: Any, model: Any, min_cosine: float = 0.5) -> dict[int, list[Group]]:
    """Match each compressed router row to a distinct original row (Hungarian on cosine similarity)."""
    from scipy.optimize import linear_sum_assignment

    ref = {ly.index: ly for ly in moe_layers(ref_model)}
    out: dict[int, list[Group]] = {}
    for ly in moe_layers(model):
        a = torch.nn.functional.normalize(ly.router.weight.detach().double(), dim=1)
        b = torch.nn.functional.normalize(ref[ly.index].router.weight.detach().double(), dim=1)
        sim = (a @ b.T).numpy()
        rows, cols = linear_sum_assignment(sim, maximize=True)
        score = float(sim[rows, cols].mean())
        if score < min_cosine:
            raise UserError(f"heal: layer {ly.index}'s router does not match the reference's (mean cosine {score:.2f}); "
                            "the checkpoint was not compressed from this reference")
        out[ly.index] = [Group([int(c)]) for _, c in sorted(zip(rows, cols, strict=True))]
    return out


@register_pass(HealConfig)
def heal(ctx: PassContext) -> dict[str, Any]:
    from moecompress.heal.run import after_pass
    from moecompress.io.checkpoint import load_model

    cfg: HealConfig = ctx.config  # type: ignore[assignment]
    assert cfg.reference is not None
    reference = Path(cfg.reference)
    check_same_tokenizer(ctx.tokenizer, reference)
    ref_model = load_model(reference, dtype=ctx.model.dtype, tokenizer=False).model
    src = Path(str(getattr(ctx.model.config, "_name_or_path", "") or ""))
    layer_ids = [ly.index for ly in moe_layers(ctx.model)]
    n_ref = moe_layers(ref_model)[0].num_experts
    groups = groups_from_report(src, reference, layer_ids, n_ref) if src.is_dir() else None
    how = "report.json" if groups is not None else "router rows"
    if groups is None:
        groups = groups_by_router(ref_model, ctx.model)
    result = after_pass(ctx.model, lambda: ref_model, ctx.get_calibration(), None, "heal", {}, cfg.spec(),
                        ctx.console, groups=groups)
    kl = result["calibration_kl"]
    return {"summary": f"healed against {reference}: calibration KL {kl['unhealed']:.4g} → {kl['healed']:.4g}",
            "reference": str(reference), "correspondence": how,
            "groups": {str(i): [g.members for g in gs] for i, gs in groups.items()}, **result}
