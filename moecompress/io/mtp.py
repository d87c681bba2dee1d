"""Multi-token-prediction (MTP) layers: shipped in checkpoints, never built by transformers.

DeepSeek-V3/R1/V3.2, GLM-4.5, MiMo, Qwen3-Next/3.5, LongCat… store MTP layers next to the decoder, and servers
draft tokens with them (speculative decoding). transformers skips their weights on load, so a checkpoint
written from the loaded model has none; a config still announcing them would break such a server.

`--mtp keep` (the default) carries them over from the input checkpoint, consistently with what the pass did to
the decoder: when the pass changed the routed-expert count or width (prune, merge, neuron pruning), each MTP
layer's MoE block gets the same count and width through the same surgery (``moecompress.surgery``), keeping the
experts with the highest REAP score of the MTP layer's own router on calibration data fed as servers feed it
(``_feed``/``_route``: the compressed model's final hidden state and the next token's embedding), or by weight
norms (``expert_scores``) when the run has no calibration data; otherwise its tensors are copied unchanged.
A quantized output keeps them in high precision, named in the quantization ``ignore`` list. `--mtp drop` (or an
input without MTP weights, or a layout this module does not know) sets the count in config.json to 0. Either
way one line is recorded (provenance, report, model card).

Two on-disk layouts, told apart by the pattern the model class uses to ignore them on load:
``decoder``: layer j is decoder layer ``num_hidden_layers + j`` (``model.layers.61.*`` in DeepSeek-V3: a full
decoder layer plus ``embed_tokens``, ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.{norm,head}``);
``module``: a separate tree (Qwen3-Next/3.5 ``mtp.layers.0.*`` plus ``mtp.fc``, ``mtp.pre_fc_norm_*``, ``mtp.norm``).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from moecompress.arch.layers import MTP_KEYS
from moecompress.errors import UserError

MTPMode = Literal["keep", "drop"]
MTP_PART = "mtp"  # the engine's part holding the MTP keys (never a module of the transformers model)
CRITERION = ("data-free: router-row L2 norm × Frobenius norm of the expert's down projection × geometric mean of "
             "its gate/up Frobenius norms (group-balanced for group-limited routers); neurons by the product of "
             "their gate-row, up-row and down-column norms")
CALIBRATED = ("REAP (mean gate-weighted output norm over routed tokens) of the MTP layer's own router and experts on "
              "{tokens} calibration tokens, fed as servers feed the MTP block: proj(cat(norm(embed(next token)), "
              "norm(final hidden state of the compressed model))) (group-balanced for group-limited routers); "
              "neurons by routed gate-weighted activation RMS × down-column norm")
MAX_SEQUENCES = 32  # calibration sequences streamed through the written model to feed the MTP router
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class MTPRequest:
    """What a pass asks of the MTP layers; both writers hand it to ``carry_mtp``."""

    mode: MTPMode = "keep"
    calibration: Callable[[], list[tuple[torch.Tensor, torch.Tensor]] | None] | None = None  # batches, or None
    max_shard_bytes: int = 5 * 10**9  # --max-shard-size: MTP tensors are written in shards of at most this
    budget: int | None = None  # --max-memory: streaming the written model for calibration reads experts in chunks


class _Deferred:
    """A source tensor read only when its shard is written: copying never holds a whole MTP layer."""

    def __init__(self, reader: Any, key: str) -> None:
        self.reader, self.key = reader, key
        self.shape = list(reader.get_slice(key).get_shape())  # dequantizing readers: the logical shape
        self.nbytes = int(torch.Size(self.shape).numel()) * 4  # at most float32: only sizes the shards

    def read(self) -> torch.Tensor:
        return self.reader.get(self.key).contiguous()


def _nbytes(t: torch.Tensor | _Deferred) -> int:
    return t.nbytes if isinstance(t, _Deferred) else t.numel() * t.element_size()


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


@dataclass(frozen=True)
class MTPLayout:
    """Where a checkpoint keeps the MTP layers its config announces."""

    key: str  # config key of the count
    count: int
    style: Literal["decoder", "module"]
    layers_prefix: str  # on-disk prefix of the decoder layers ("model.layers")
    num_layers: int  # num_hidden_layers
    module_prefix: str = ""  # "module" style: "mtp."

    def block_prefix(self, j: int) -> str:
        """On-disk prefix of MTP layer j's decoder block."""
        if self.style == "decoder":
            return f"{self.layers_prefix}.{self.num_layers + j}."
        return f"{self.module_prefix}layers.{j}."

    def owns(self, key: str) -> bool:
        """Whether on-disk `key` belongs to one of the announced MTP layers."""
        if self.style == "decoder":
            m = re.match(re.escape(self.layers_prefix) + r"\.(\d+)\.", key)
            return m is not None and self.num_layers <= int(m.group(1)) < self.num_layers + self.count
        if not key.startswith(self.module_prefix):
            return False
        m = re.match(re.escape(self.module_prefix) + r"layers\.(\d+)\.", key)
        return m is None or int(m.group(1)) < self.count

    def block_of(self, key: str) -> int | None:
        """Which MTP layer's decoder block `key` is in (None: a tensor beside the blocks, e.g. ``mtp.fc``)."""
        for j in range(self.count):
            if key.startswith(self.block_prefix(j)):
                return j
        return None


def _ignore_style(config: dict[str, Any]) -> tuple[str, str] | None:
    """("decoder", "") or ("module", prefix) from the patterns the model class ignores MTP keys by."""
    from moecompress.io.checkpoint import auto_class

    try:
        cls = auto_class(config)
        if cls.__name__.startswith("Auto"):
            from moecompress.zoo.miniature import config_object, model_class

            cls = model_class(config_object(config))
    except Exception:  # an unknown class: fall back to the common (DeepSeek) layout
        return None
    for pattern in getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or []:
        if re.search(r"layers\\?\.\d+", pattern):
            return "decoder", ""
        if "mtp" in pattern:
            head = pattern.split("mtp")[0]
            head = head.replace("(^|\\.)", "").replace("^", "").replace("\\.", ".")
            return "module", f"{head}mtp."
    return None


def layout(config: dict[str, Any]) -> MTPLayout | None:
    """The MTP layout of a checkpoint config (None when it announces no MTP layer)."""
    from moecompress.arch.adapter import adapter_for_config_dict

    found = mtp_layers(config)
    if found is None:
        return None
    holder, key, count = found
    try:
        adapter = adapter_for_config_dict(config)
        prefix = adapter.checkpoint_layers_path or adapter.layers_path
    except UserError:
        prefix = "model.layers"
    style = _ignore_style(config) or ("decoder", "")
    return MTPLayout(key=key, count=count, style=style[0], module_prefix=style[1], layers_prefix=prefix,  # type: ignore[arg-type]
                     num_layers=int(holder.get("num_hidden_layers", 0)))


# ---- a decoder block of the MTP layer, as a module of the family's class ------------------------------
def _template_index(model: torch.nn.Module, config: Any) -> int:
    """The decoder layer an MTP block is built like: the last MoE layer (full attention where layers differ)."""
    from moecompress.arch.adapter import moe_layers

    moe = [ly.index for ly in moe_layers(model)]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if isinstance(types, list):
        full = [i for i in moe if i < len(types) and "full" in str(types[i])]
        moe = full or moe
    return moe[-1]


class _Block:
    """The skeleton of a checkpoint's model (meta) with one extra decoder layer appended for an MTP block."""

    def __init__(self, config: dict[str, Any], dtype: torch.dtype) -> None:
        from moecompress.arch.adapter import adapter_for_config_dict, decoder_layers
        from moecompress.engine.source import skeleton
        from moecompress.zoo.miniature import config_object

        cfg = _float_config(config)
        self.adapter = adapter_for_config_dict(cfg)
        self.dtype = dtype
        obj = config_object(cfg)
        self.model = skeleton(obj, dtype)
        layers = decoder_layers(self.model, self.adapter)
        self.template = _template_index(self.model, obj)
        self.index = len(layers)
        layers.append(copy.deepcopy(layers[self.template]))
        self.module = layers[self.index]
        self.layers_path = next(n for n, m in self.model.named_modules() if m is layers)
        self.disk_prefix = self.adapter.checkpoint_layers_path or self.adapter.layers_path

    def takes(self, keys: list[str], block_prefix: str) -> dict[str, str]:
        """On-disk key → loader key (renamed to the appended layer) for the keys this decoder block takes."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(self.model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        meta = self.model.state_dict()
        out = {}
        for key in keys:
            if not key.startswith(block_prefix):
                continue
            renamed = f"{self.disk_prefix}.{self.index}." + key[len(block_prefix):]
            target, _ = rename_source_key(renamed, renamings, converters, self.model.base_model_prefix, meta)
            if target in meta:
                out[key] = renamed
        return out

    def load(self, state: dict[str, Any], what: str) -> None:
        """transformers' loader (the family's conversion rules) on the block's tensors; all must fit exactly."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        from moecompress.engine.source import _quiet_transformers

        mapping = get_model_conversion_mapping(self.model)
        load_config = LoadStateDictConfig(device_map={"": "cpu"}, dtype=self.dtype, weight_mapping=mapping)
        with _quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(self.model, state, load_config)
        self.model._weight_conversions = [m for m in mapping if m.was_used()]
        prefix = f"{self.layers_path}.{self.index}."
        expected = {prefix + k for k in self.module.state_dict()}
        bad = {"missing": sorted(k for k in info.missing_keys if k in expected),
               "unexpected": sorted(info.unexpected_keys),
               "mismatched": sorted(str(m[0]) for m in info.mismatched_keys)}
        bad = {k: v for k, v in bad.items() if v}
        if bad:
            kind, keys = next(iter(bad.items()))
            raise UserError(f"{what} does not match the config ({kind}: {keys[:3]})")

    def moe(self) -> Any:
        from moecompress.arch.adapter import moe_layers

        return next(ly for ly in moe_layers(self.model, self.adapter) if ly.index == self.index)

    def on_disk(self, block_prefix: str) -> dict[str, torch.Tensor]:
        """The block's tensors in the checkpoint's layout, under `block_prefix`."""
        from moecompress.engine.sink import on_disk_state

        prefix = f"{self.layers_path}.{self.index}."
        state = on_disk_state(self.model, {prefix + k: v for k, v in self.module.state_dict().items()})
        disk = f"{self.disk_prefix}.{self.index}."
        return {block_prefix + k[len(disk):]: v.detach().contiguous() for k, v in state.items()}


def _float_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without quantization blocks (MTP layers are read and written as float)."""
    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    if isinstance(cfg.get("text_config"), dict):
        cfg["text_config"] = {k: v for k, v in cfg["text_config"].items() if k != "quantization_config"}
    return cfg


# ---- deciding which experts / neurons an MTP block keeps ---------------------------------------------
def expert_scores(moe: Any) -> torch.Tensor:
    """Data-free expert importance (see CRITERION): an MTP layer sees no calibration data here."""
    from moecompress.arch.experts import ExpertView

    w = ExpertView(moe).get_all()
    router = moe.router.weight.detach().float().norm(dim=1)
    down = w.down.float().flatten(1).norm(dim=1)
    up = w.up.float().flatten(1).norm(dim=1)
    gate = w.gate.float().flatten(1).norm(dim=1) if w.gate is not None else up
    return router * down * (gate * up).sqrt()


def _neuron_keep(moe: Any, width: int, act_sq: torch.Tensor | None = None) -> torch.Tensor:
    """[E, width] kept neurons per expert: by activation RMS × down-column norm when calibration statistics
    (`act_sq` [E, I], routed gate-weighted) are given, else by gate/up-row × down-column norms."""
    from moecompress.arch.experts import ExpertView

    w = ExpertView(moe).get_all()
    down = w.down.float().norm(dim=1)
    if act_sq is not None:
        score = act_sq.double().sqrt() * down.double()
    else:
        score = w.up.float().norm(dim=2) * down
        if w.gate is not None:
            score = score * w.gate.float().norm(dim=2)
    return score.topk(width, dim=1).indices.sort(dim=1).values


# ---- carrying MTP layers into a written checkpoint --------------------------------------------------
def drop_mtp(folder: Path, reason: str | None = None) -> str | None:
    """Set the MTP count of a written checkpoint to 0 (its weights are not in it); returns the line to record."""
    cfg_file = Path(folder) / "config.json"
    config = json.loads(cfg_file.read_text())
    found = mtp_layers(config)
    if found is None:
        return None
    holder, key, n = found
    holder[key] = 0
    cfg_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    why = reason or "--mtp drop"
    return (f"dropped {n} multi-token-prediction layer(s) ({why}): their weights are not in this checkpoint and "
            f"`{key}` is now 0 (speculative decoding with MTP is unavailable)")


def source_mtp_keys(source: Path, lay: MTPLayout) -> list[str]:
    """The input's MTP keys as the engine reads them (FP8/MXFP4 sources: logical keys, scales folded in)."""
    from moecompress.engine.reader import reader_for

    reader = reader_for(Path(source))
    try:
        return [k for k in reader.keys() if lay.owns(k)]
    finally:
        reader.close()


def carry_mtp(folder: Path, source: Path | None, request: MTPRequest | str = "keep") -> str | None:
    """Make a written checkpoint's MTP layers agree with its config.json; returns the line to record (or None).

    `folder` holds the pass's weights and config; `source` is the checkpoint the pass read (MTP weights come
    from there); `request.calibration()` gives (input_ids, attention_mask) batches for ranking the MTP layer's
    experts (None, or None returned: the data-free criterion). Called by both writers (in memory and streamed)
    before verification.
    """
    req = request if isinstance(request, MTPRequest) else MTPRequest(mode=request)  # type: ignore[arg-type]
    if req.mode not in ("keep", "drop"):
        raise UserError(f"--mtp {req.mode!r}: use keep or drop")
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    lay = layout(config)
    if lay is None:
        return None
    if req.mode == "drop":
        return drop_mtp(folder)
    if source is None or not any(Path(source).glob("*.safetensors")):
        return drop_mtp(folder, "the input holds no MTP weights")
    src_config = json.loads((Path(source) / "config.json").read_text())
    src_lay = layout(src_config)
    keys = source_mtp_keys(Path(source), src_lay) if src_lay is not None and src_lay.count == lay.count else []
    if not keys or src_lay is None:
        return drop_mtp(folder, "the input holds no MTP weights")
    blocks = {src_lay.block_of(k) for k in keys} - {None}
    if _counts(_float_config(src_config)) != _counts(_float_config(config)) and len(blocks) != lay.count:
        return drop_mtp(folder, f"their on-disk layout under {src_lay.block_prefix(0)!r} is not one moecompress "
                                "can reduce to the new expert count")
    from moecompress.engine.reader import reader_for

    reader = reader_for(Path(source))
    try:
        try:
            tensors, action = _mtp_tensors(folder, config, lay, reader, src_config, src_lay, keys, req.calibration,
                                           req.budget)
        except _ForeignBlock as exc:  # a layout we cannot reduce: a checkpoint without MTP still serves
            return drop_mtp(folder, f"{exc}, so they cannot be reduced to the new expert count")
        _append_shards(folder, tensors, req.max_shard_bytes)
    finally:
        reader.close()
    if config.get("quantization_config"):
        _ignore_in_quantization(folder, tensors)
        action += "; kept in high precision (listed in quantization_config.ignore)"
    return f"kept {lay.count} multi-token-prediction layer(s) ({len(tensors)} tensors): {action}"


def _counts(config: dict[str, Any]) -> tuple[int, int]:
    from moecompress.arch.adapter import adapter_for_config_dict

    adapter = adapter_for_config_dict(config)
    return adapter.num_experts(config), adapter.expert_width(config)


def _mtp_tensors(folder: Path, config: dict[str, Any], lay: MTPLayout, reader: Any, src_config: dict[str, Any],
                 src_lay: MTPLayout, keys: list[str], calibration: Callable[[], Any] | None = None,
                 budget: int | None = None) -> tuple[dict[str, Any], str]:
    """The MTP tensors for `folder`'s config: the source's (read from `reader`, deferred when copied unchanged),
    with each block's experts reduced to match."""
    from moecompress.passes.criteria import expert_scores as stat_scores
    from moecompress.passes.criteria import select_by_score
    from moecompress.surgery import keep_experts, shrink_neurons

    (n_src, w_src), (n_out, w_out) = _counts(_float_config(src_config)), _counts(_float_config(config))
    if (n_src, w_src) == (n_out, w_out):  # same structure: the same keys (the pass kept the depth)
        return ({k: _Deferred(reader, k) for k in keys},
                f"copied unchanged ({n_out} routed experts each, as config.json says)")
    if n_out > n_src or w_out > w_src:
        raise UserError(f"the output has {n_out} experts of width {w_out} but the input's MTP layers have "
                        f"{n_src} of width {w_src}; MTP layers cannot grow")
    batches = calibration() if calibration is not None else None
    feed, why = None, " (no calibration data)" if calibration is not None and not batches else ""
    if batches:
        from moecompress.engine.loop import NotStreamable

        try:
            feed = _feed(folder, batches, budget)
        except NotStreamable:  # glm_moe_dsa, hy_v4…: a layer's inputs are more than the cached hidden states
            why = " (its decoder layers cannot run one at a time from cached hidden states)"
    chosen: dict[int, list[int]] = {}
    tokens = 0
    out: dict[str, Any] = {}
    dtype = _dtype(reader, keys)
    for j in range(lay.count):
        block = _Block(_float_config(src_config), dtype)
        prefix = src_lay.block_prefix(j)
        takes = block.takes(keys, prefix)
        try:
            block.load({takes[k]: reader.get(k) for k in takes}, f"MTP layer {j} of {reader.folder}")
        except UserError as exc:
            raise _ForeignBlock(f"their tensors do not fit the family's decoder layer ({exc})") from exc
        moe = block.moe()
        beside = {k[len(prefix):]: reader.get(k) for k in keys if src_lay.block_of(k) == j and k not in takes}
        beside.update({k[len(src_lay.module_prefix):]: reader.get(k) for k in keys if src_lay.block_of(k) is None})
        stats = _route(block, feed, beside) if feed is not None else None
        act_sq = stats.sums["act_sq_gated"] if stats is not None else None
        if stats is not None:
            tokens += stats.n_tokens
        if n_out < n_src:
            scores = stat_scores(stats, "reap") if stats is not None else expert_scores(moe)
            kept = select_by_score(scores, n_out, block.adapter.num_groups(src_config))
            keep_experts(moe, kept)
            chosen[j] = kept
            act_sq = act_sq[kept] if act_sq is not None else None
        if w_out < w_src:
            shrink_neurons(moe, _neuron_keep(moe, w_out, act_sq))
        out.update(block.on_disk(lay.block_prefix(j)))
        out.update({lay.block_prefix(j) + k: v.contiguous() for k, v in beside.items()
                    if src_lay.block_prefix(j) + k in keys})  # enorm, eh_proj, shared_head… unchanged
    out.update({k: reader.get(k).contiguous() for k in keys if src_lay.block_of(k) is None})  # mtp.fc, mtp.norm
    check_mtp_tensors(config, lay, out)
    what = []
    if n_out < n_src:
        what.append(f"routed experts reduced {n_src} → {n_out} (kept: "
                    + "; ".join(f"layer {j}: {v}" for j, v in chosen.items()) + ")")
    if w_out < w_src:
        what.append(f"expert width reduced {w_src} → {w_out}")
    criterion = CALIBRATED.format(tokens=tokens // lay.count) if tokens else CRITERION + why
    return out, ", ".join(what) + f", as config.json says; criterion {criterion}"


class _ForeignBlock(UserError):
    """An MTP block whose tensors are not a decoder layer of the family (a layout moecompress does not know)."""


@dataclass
class _FeedBatch:
    """What an MTP block sees for one calibration batch."""

    mask: torch.Tensor  # [B*T] bool: real tokens that have a next token
    next_embeds: torch.Tensor  # [B, T, H] embedding of token t+1 (the main model's embedding table)
    next_ids: torch.Tensor  # [B, T] token t+1 (for an MTP layer's own embed_tokens)
    hidden: torch.Tensor  # [B, T, H] final hidden state (after the final norm: what the head reads)
    call: tuple[tuple, dict]  # the template decoder layer's call arguments (masks, rotary embeddings)


def _feed(folder: Path, batches: list[tuple[torch.Tensor, torch.Tensor]], budget: int | None = None
          ) -> list[_FeedBatch]:
    """Stream the written (compressed) checkpoint over `batches` one decoder layer at a time (the engine's loop)
    and keep what its MTP layers would be fed: final hidden states, next-token embeddings, call arguments."""
    from moecompress.engine.loop import head_logits, run_layer, start_flow
    from moecompress.engine.source import REST, ModelSource

    src = ModelSource(Path(folder), budget=budget)
    try:
        src.materialise(REST)
        picked: list[tuple[torch.Tensor, torch.Tensor]] = []
        for ids, mask in batches:  # the first MAX_SEQUENCES sequences
            if sum(b[0].shape[0] for b in picked) >= MAX_SEQUENCES:
                break
            picked.append((ids, mask))
        flow = start_flow(src, picked, budget=1 << 62)
        try:
            for i in range(src.num_layers):
                run_layer(flow, i, src.materialise(i))
                src.release(i)
            head = src.model.get_output_embeddings()
            embed = src.model.get_input_embeddings()
            t = _template_index(src.model, src.config)
            out: list[_FeedBatch] = []
            for b, (ids, mask) in enumerate(flow.batches):
                seen: dict[str, torch.Tensor] = {}
                handle = head.register_forward_pre_hook(lambda m, a, seen=seen: seen.update(h=a[0].detach()))
                try:
                    head_logits(src, (ids, mask), flow.acts.get(b))
                finally:
                    handle.remove()
                nxt = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
                real = mask.bool() & torch.cat([mask[:, 1:].bool(), torch.zeros_like(mask[:, :1], dtype=torch.bool)], 1)
                with torch.no_grad():
                    out.append(_FeedBatch(mask=real.reshape(-1), next_embeds=embed(nxt).detach(), next_ids=nxt,
                                          hidden=seen["h"].cpu(), call=flow.layer_kwargs[b][t]))
            return out
        finally:
            flow.close()
    finally:
        src.close()


# Tensors beside an MTP block that turn (next-token embedding, hidden state) into the block's input, per layout.
_INPUT_NAMES = {"decoder": ("enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight"),
                "module": ("pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight", "fc.weight", None)}


def _route(block: _Block, feed: list[_FeedBatch], beside: dict[str, torch.Tensor]) -> Any:
    """Routing statistics of the block's MoE on the calibration feed (None when its input tensors are unknown)."""
    from moecompress.calib.collect import collecting

    style = "decoder" if "eh_proj.weight" in beside else "module" if "fc.weight" in beside else None
    if style is None:
        return None
    e_name, h_name, proj_name, own_embed = _INPUT_NAMES[style]
    norms = []
    for name in (e_name, h_name):  # the family's own norm (zero-centred in Qwen3-Next/3.5), with the MTP weights
        norm = copy.deepcopy(block.module.input_layernorm)
        norm.weight = torch.nn.Parameter(beside[name].to(block.dtype), requires_grad=False)
        norms.append(norm)
    proj = beside[proj_name].to(block.dtype)
    table = beside.get(own_embed) if own_embed else None
    total = sum(int(f.mask.sum()) for f in feed)
    with torch.inference_mode(), collecting(block.model, 1, max(total, 1)) as taps:
        tap = taps[block.index]
        for f in feed:
            e = table[f.next_ids].to(block.dtype) if table is not None else f.next_embeds.to(block.dtype)
            x = torch.cat([norms[0](e), norms[1](f.hidden.to(block.dtype))], dim=-1) @ proj.T
            tap.mask = f.mask
            args, kwargs = f.call
            block.module(x, *args, **kwargs)
        return tap.finish()


def _dtype(reader: Any, keys: list[str]) -> torch.dtype:
    for k in keys:
        t = reader.get(k)
        if t.is_floating_point():
            return t.dtype
    return torch.bfloat16


def check_mtp_tensors(config: dict[str, Any], lay: MTPLayout, tensors: dict[str, torch.Tensor]) -> None:
    """Each MTP block's tensors load into a decoder layer built from `config` with no missing, unexpected or
    mismatched key: the shapes are what config.json implies (expert count and width included)."""
    keys = list(tensors)
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.bfloat16)
    for j in range(lay.count):
        block = _Block(_float_config(config), dtype)
        takes = block.takes(keys, lay.block_prefix(j))
        if not takes:
            raise RuntimeError(f"MTP layer {j} has no decoder-block tensors under {lay.block_prefix(j)}")
        block.load({takes[k]: tensors[k] for k in takes}, f"MTP layer {j}")


def _append_shards(folder: Path, tensors: dict[str, torch.Tensor | _Deferred], max_shard_bytes: int = 5 * 10**9,
                   ) -> None:
    """Add `tensors` as the last shards (at most `max_shard_bytes` each, deferred ones read as their shard is
    written) of a written checkpoint: shards renamed k-of-n, the index rewritten."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    if not tensors:
        return
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        weight_map: dict[str, str] = dict(index["weight_map"])
    elif (folder / SINGLE).is_file():
        index = {"metadata": {}}
        with safe_open(str(folder / SINGLE), "pt") as f:
            weight_map = {k: SINGLE for k in f.keys()}  # noqa: SIM118
    else:
        raise RuntimeError(f"{folder} has no safetensors weights to add MTP layers to")
    clash = sorted(set(weight_map) & set(tensors))
    if clash:
        raise RuntimeError(f"MTP tensors already written: {clash[:3]}")
    groups: list[list[str]] = [[]]
    size = 0
    for key, t in tensors.items():
        if groups[-1] and size + _nbytes(t) > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += _nbytes(t)
    files = sorted(set(weight_map.values()))
    n = len(files) + len(groups)
    rename = {old: f"model-{i:05d}-of-{n:05d}.safetensors" for i, old in enumerate(files, start=1)}
    for old, new in rename.items():
        (folder / old).rename(folder / f".{new}.tmp")
    for new in rename.values():
        (folder / f".{new}.tmp").rename(folder / new)
    weight_map = {k: rename[v] for k, v in weight_map.items()}
    for i, group in enumerate(groups, start=len(files) + 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        part = {k: tensors[k].read() if isinstance(tensors[k], _Deferred) else tensors[k].contiguous() for k in group}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
        del part
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    index.setdefault("metadata", {})["total_size"] = total
    index["weight_map"] = dict(sorted(weight_map.items()))
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _ignore_in_quantization(folder: Path, tensors: dict[str, Any]) -> None:
    """Name every MTP linear in quantization_config.ignore: the experts' `re:` target would otherwise match them."""
    cfg_file = Path(folder) / "config.json"
    config = json.loads(cfg_file.read_text())
    q = config["quantization_config"]
    names = {k[: -len(".weight")] for k, t in tensors.items() if k.endswith(".weight") and len(t.shape) == 2}
    q["ignore"] = sorted(set(q.get("ignore") or []) | names)
    cfg_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---- miniatures: MTP weights in the real layout ------------------------------------------------------
# "module"-style families whose tensors beside the block are known (mtp.fc, mtp.pre_fc_norm_*, mtp.norm);
# "decoder"-style ones (DeepSeek-V3/V3.2, GLM-4.5…) all carry embed_tokens/enorm/hnorm/eh_proj/shared_head.
_MODULE_STYLE_FAMILIES = ("qwen3_next", "qwen3_5")


def miniature_mtp_tensors(model: torch.nn.Module, config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random MTP weights for a miniature, in the layout its family's real checkpoints use ({} if none)."""
    from moecompress.arch.adapter import adapter_for_config_dict, decoder_layers
    from moecompress.engine.sink import on_disk_state

    lay = layout(config)
    if lay is None or (lay.style == "module" and not str(config.get("model_type")).startswith(_MODULE_STYLE_FAMILIES)):
        return {}  # a layout whose tensor names we do not know: no MTP weights rather than invented ones
    adapter = adapter_for_config_dict(config)
    layers = decoder_layers(model, adapter)
    layers_path = next(n for n, m in model.named_modules() if m is layers)
    t = _template_index(model, model.config)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden, vocab = int(text.hidden_size), int(text.vocab_size)
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed + 7)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    def norm() -> torch.Tensor:
        return (1 + torch.randn(hidden, generator=g) * 0.05).to(dtype)

    out: dict[str, torch.Tensor] = {}
    for j in range(lay.count):
        block = copy.deepcopy(layers[t])
        with torch.no_grad():
            for p in block.parameters():
                p.copy_(p + torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)
        state = on_disk_state(model, {f"{layers_path}.{t}.{k}": v for k, v in block.state_dict().items()})
        disk = f"{adapter.checkpoint_layers_path or adapter.layers_path}.{t}."
        prefix = lay.block_prefix(j)
        out.update({prefix + k[len(disk):]: v.detach().clone().contiguous() for k, v in state.items()})
        if lay.style == "decoder":
            out.update({prefix + "embed_tokens.weight": rand(vocab, hidden), prefix + "enorm.weight": norm(),
                        prefix + "hnorm.weight": norm(), prefix + "eh_proj.weight": rand(hidden, 2 * hidden),
                        prefix + "shared_head.norm.weight": norm(), prefix + "shared_head.head.weight": rand(vocab, hidden)})
    if lay.style == "module":
        p = lay.module_prefix
        out.update({p + "fc.weight": rand(hidden, 2 * hidden), p + "pre_fc_norm_embedding.weight": norm(),
                    p + "pre_fc_norm_hidden.weight": norm(), p + "norm.weight": norm()})
    return out


def add_miniature_mtp(folder: Path, model: torch.nn.Module, seed: int = 0) -> int:
    """Write random MTP weights into a freshly written miniature; returns how many tensors."""
    config = json.loads((Path(folder) / "config.json").read_text())
    tensors = miniature_mtp_tensors(model, config, seed)
    _append_shards(Path(folder), tensors)
    return len(tensors)


def unexpected_mtp(config: dict[str, Any], unexpected: Any) -> tuple[list[str], list[str]]:
    """Split a reload's unexpected keys into (MTP keys the config announces, the rest).

    transformers ignores MTP keys by a pattern naming the real checkpoint's layer index (``model.layers.61``), so
    a checkpoint with another depth (a miniature) reports them as unexpected; they are expected here."""
    lay = layout(config)
    keys = sorted(unexpected)
    if lay is None:
        return [], keys
    return [k for k in keys if lay.owns(k)], [k for k in keys if not lay.owns(k)]
