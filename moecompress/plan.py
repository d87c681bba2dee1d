"""`moecompress plan`: before → after of every step, the memory the run needs and serving checks, from config alone.

Each pass already knows the config it leaves behind (``planned_config``); transformers builds that config on the
meta device and ``moecompress.inspect`` counts it, so the numbers are the same ones ``inspect`` would print on
the output. Memory is a model, not a measurement — see ``MEMORY_MODEL`` — of the layer-streaming engine (one
decoder layer materialised at a time, calibration activations cached between layers), next to what today's
in-memory path needs (the whole model at the compute dtype).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel

from moecompress.arch.adapter import MoEAdapter, adapter_for_config_dict
from moecompress.arch.skeleton import Skeleton, analyse, meta_model, text_config_dict
from moecompress.errors import UserError
from moecompress.io.storage import scheme_bytes, stored_bytes
from moecompress.serving import Finding, Target, enforce, serving_findings

GiB = 1024**3
OVERHEAD = int(1.5 * GiB)  # python, torch, transformers, tokenizer, allocator slack
MEMORY_MODEL = (
    "layer-streaming engine: CPU RAM ≈ 1.5 GiB runtime + embeddings and LM head + two decoder layers at the compute "
    "dtype (the one being processed and the next being read; +1 layer as stored when the source is quantized) + "
    "the calibration activation cache (samples × seqlen × hidden × 2 bytes: one layer boundary, each layer's "
    "outputs overwrite its inputs) + the pass's per-layer statistics (GPTQ: per-expert Hessians; merge: "
    "expert-output features; HEAPr: fp32 gradients). GPU ≈ one decoder layer + statistics + one batch of "
    "activations. --max-memory caps CPU RAM: the engine keeps the activation cache in RAM while it fits in half "
    "the cap, else all of it in a file beside --out; below the fixed part the run cannot start. In-memory "
    "(load_model path, used only where the engine cannot stream: expert + neuron pruning in one pass, families "
    "whose layers pass more than hidden states): runtime + the whole model at the compute dtype + the written "
    "output reloaded for verification + statistics. After the stream, when 3x the output's bytes fit the budget "
    "(--max-memory, else 3/4 of the RAM available at run time), a vanilla from_pretrained reload checks the output "
    "(≈ runtime + the output at the compute dtype); prune/merge/HEAPr then measure the calibration KL with input and "
    "output both loaded when 3x both fit (≈ runtime + both + fp64 logits of a batch of 8). bench/plan_memory.py "
    "compares these with measured peak RSS."
)


class StepState(BaseModel):
    experts_per_layer: int
    top_k: int
    expert_width: int
    total_params: int
    active_params: int
    bytes: int
    format: str


class MemoryEstimate(BaseModel):
    cpu_peak_bytes: int
    gpu_peak_bytes: int
    in_memory_bytes: int
    layer_bytes: int
    embedding_bytes: int
    activation_cache_bytes: int
    statistics_bytes: int
    heal_bytes: int = 0  # heal's working set (prune / merge / neuron pruning heal by default)
    spilled_to_disk_bytes: int = 0
    max_memory_bytes: int | None = None
    # after the stream, a vanilla from_pretrained reload of the output when 3x its bytes fit the budget
    reload_check_bytes: int = 0
    reload_check_runs: bool | None = None  # None: depends on the machine's free RAM (no --max-memory given)


class PlanStep(BaseModel):
    index: int
    name: str
    config: dict[str, Any]
    before: StepState
    after: StepState
    memory: MemoryEstimate
    findings: list[Finding]


class Plan(BaseModel):
    model: str
    target: str | None
    ep_size: int | None
    calibration: dict[str, int]
    memory_model: str = MEMORY_MODEL
    steps: list[PlanStep]


class _State:
    """Where a run stands between passes: the config and how the weights are stored."""

    def __init__(self, config: dict[str, Any], quant: tuple[int, int, set[str]] | None = None) -> None:
        self.config = config
        self.quant = quant  # (bits, group_size, groups) after our quantize pass
        self.model = meta_model(config)
        self.skel: Skeleton = analyse(self.model, config)

    def state(self) -> StepState:
        if self.quant is not None:
            bits, gs, groups = self.quant
            by_group, fmt = scheme_bytes(self.model, self.skel, groups, bits, gs), f"W{bits}A16 g{gs} (experts)"
        else:
            by_group, fmt = stored_bytes(self.config, self.model, self.skel)
        ly = self.skel.moe_layers[0]
        return StepState(experts_per_layer=ly.experts, top_k=ly.top_k, expert_width=ly.expert_width,
                         total_params=self.skel.total_params, active_params=self.skel.active_params,
                         bytes=sum(by_group.values()), format=fmt)


def config_bytes(config: dict[str, Any]) -> int:
    """Bytes of the weights a checkpoint with this config stores (the `bytes on disk` row of `plan`)."""
    return _State(config).state().bytes


def parse_size(text: str | None) -> int | None:
    """'64GiB', '64GB', '500MiB', '1.5T' → bytes (binary units for bare K/M/G/T)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"--max-memory {text!r}: use a size such as 64GiB, 500MiB or 1.5TB")
    value, unit, suffix = float(m.group(1)), m.group(2).upper(), (m.group(3) or "")
    base = 1000 if suffix.upper() == "B" and unit else 1024
    return int(value * base ** "_KMGT".index(unit or "_"))


def _is_quantized_source(config: dict[str, Any]) -> bool:
    return bool(config.get("quantization_config") or text_config_dict(config).get("quantization_config"))


def _layer_params(skel: Skeleton, model: Any) -> int:
    prefix = skel.lm_prefix + ".layers."
    per_layer: dict[str, int] = {}
    for name, p in model.named_parameters():
        if name.startswith(prefix):
            idx = name[len(prefix):].split(".", 1)[0]
            per_layer[idx] = per_layer.get(idx, 0) + p.numel()
    return max(per_layer.values(), default=0)


def heal_bytes(cfg: Any, *, experts: int, top_k: int, hidden: int, width: int, tokens: int, compute_bytes: int) -> int:
    """Heal's working set beside the compress sweep (0 without heal): the compressed and held-out flows' boundaries,
    one layer's tokens (compressed and original inputs, float64 targets, float32 prediction and residual, gated
    float32 activations), the down projections' copies kept to undo a step, and the float64 factors of (b) (each
    expert's [I, I] or, when it sees fewer tokens than its width, [m, m]). Counted for every kept expert as if the
    layer kept all of them: an upper bound. 3.87 GiB stream-bench model (8 × 128 tokens): ~0.13 GiB here, 0.16 GiB
    measured (prune 0.94 → prune --heal 1.10 GiB peak RSS)."""
    if getattr(cfg, "heal", None) is None:
        return 0
    per_expert_tokens = max(1, tokens * top_k // max(experts, 1))
    flows = tokens * hidden * compute_bytes * 11 // 10
    token_set = tokens * hidden * (2 * compute_bytes + 8 + 2 * 4) + tokens * top_k * width * 4
    undo = experts * hidden * width * compute_bytes
    factors = experts * min(width, per_expert_tokens) ** 2 * 8
    return flows + token_set + undo + factors


def estimate_memory(state: _State, cfg: Any, *, samples: int, seqlen: int, max_memory: int | None,
                    after_params: int | None = None, after_bytes: int | None = None,
                    before_bytes: int | None = None, compute_bytes: int = 2) -> MemoryEstimate:
    skel, model, text = state.skel, state.model, text_config_dict(state.config)
    hidden = int(text.get("hidden_size") or 0)
    moe = skel.moe_layers[0]
    layer = _layer_params(skel, model) * compute_bytes
    source_layer = layer // 2 if _is_quantized_source(state.config) else 0  # fp8/int4 read buffer ≤ half of bf16
    embed = (skel.input_embedding_params + skel.output_head_params) * compute_bytes
    cache = samples * seqlen * hidden * compute_bytes  # one boundary: each layer's outputs overwrite its inputs
    name = getattr(cfg, "name", "")
    width = moe.expert_width
    if name == "quantize":
        stats = moe.experts * (hidden * hidden + width * width) * 4  # per-expert Hessians of gate/up and down inputs
    elif name == "merge_experts":
        stats = moe.experts * int(getattr(cfg, "feature_tokens", 512)) * hidden * 4
    elif name == "prune_atomic":
        stats = layer * 2 + samples * seqlen * hidden * 4  # fp32 gradients of a layer + hidden-state gradients
    else:
        stats = moe.experts * 2048 * 4 + samples * seqlen * moe.top_k * 8  # routing logits, scores, sampled tokens
    heal = heal_bytes(cfg, experts=moe.experts, top_k=moe.top_k, hidden=hidden, width=width, tokens=samples * seqlen,
                      compute_bytes=compute_bytes)
    if heal and max_memory is not None and heal > max_memory // 2 and cfg.heal.auto:
        heal = 0  # the default heal steps aside under this cap (runner.check_heal_memory); an explicit one stops
    fixed = OVERHEAD + embed + 2 * layer + source_layer + stats + heal
    spilled = 0
    if max_memory is not None:
        if max_memory < fixed:
            raise UserError(f"--max-memory {max_memory / GiB:.1f} GiB is below what the run needs before any "
                            f"activation is cached ({fixed / GiB:.1f} GiB: runtime, embeddings, two decoder "
                            "layers, statistics); raise it")
        # the engine keeps the boundary in RAM while it fits in half the budget, else the whole of it on disk
        spilled = cache if cache > max_memory // 2 else 0
    cpu = fixed + cache - spilled
    after = skel.total_params if after_params is None else after_params
    reload = OVERHEAD + after * compute_bytes  # the output whole at the compute dtype (quantized: dequantized)
    runs = None if max_memory is None or after_bytes is None else after_bytes * 3 < max_memory
    if name in ("prune_experts", "merge_experts", "prune_atomic"):
        # structural passes then measure the calibration KL with input and output both loaded, when both fit
        vocab = int(text.get("vocab_size") or 0)
        kl_batch = min(samples, 8) * seqlen * vocab * 8 * 5  # fp64 logits, log-softmax and KL of both, per batch of 8
        reload = OVERHEAD + (skel.total_params + after) * compute_bytes + kl_batch
        runs = None if max_memory is None or after_bytes is None else (
            (after_bytes + (before_bytes or 0)) * 3 < max_memory)
    if runs:
        cpu = max(cpu, reload)
    batch_tokens = min(samples, 8) * seqlen
    gpu = layer + stats + batch_tokens * (4 * hidden + 3 * moe.top_k * width) * 4
    in_memory = OVERHEAD + (skel.total_params + after) * compute_bytes + stats + cache // 2
    if heal:  # the in-memory heal reloads the input beside the compressed model
        in_memory += heal + skel.total_params * compute_bytes
    return MemoryEstimate(cpu_peak_bytes=cpu, gpu_peak_bytes=gpu, in_memory_bytes=in_memory, layer_bytes=layer,
                          embedding_bytes=embed, activation_cache_bytes=cache, statistics_bytes=stats, heal_bytes=heal,
                          spilled_to_disk_bytes=spilled, max_memory_bytes=max_memory,
                          reload_check_bytes=reload, reload_check_runs=runs)


def planned_config(cfg: Any, adapter: MoEAdapter, config: dict[str, Any]) -> dict[str, Any]:
    from moecompress.runner import planned_config as runner_planned

    return runner_planned(cfg, adapter, config)


def plan_passes(config: dict[str, Any], passes: list[Any], *, model: str = "", samples: int = 128, seqlen: int = 512,
                target: Target | None = None, ep_size: int | None = None, max_memory: int | None = None,
                console: Any = None, tp_size: int | None = None) -> Plan:
    """Check every pass against the config it will see, then size each step before → after."""
    from moecompress.io.source_formats import detect_source_format

    adapter: MoEAdapter = adapter_for_config_dict(config)
    if detect_source_format(config, []).name == "compressed-tensors":
        detect_source_format(config, []).validate()  # refused as a source, in one line
    state = _State(config)
    steps: list[PlanStep] = []
    for i, cfg in enumerate(passes, start=1):
        where = f"step {i} ({cfg.name})"
        as_float = {k: v for k, v in state.config.items() if k != "quantization_config"}  # sources read as float
        try:
            cfg.check(adapter, as_float if state.quant is None else state.config)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        after_config = planned_config(cfg, adapter, state.config)
        findings = serving_findings(cfg, adapter, state.config, after_config, ep_size, tp_size)
        enforce(findings, target, where=where, console=console)
        before = state.state()
        if cfg.name == "quantize":
            groups = {"routed_experts"} | ({"attention"} if cfg.attention else set()) | (
                {"shared_experts"} if cfg.shared else set())
            nxt = _State(after_config, quant=(int(cfg.bits_budget and max(cfg.candidate_bits) or cfg.bits),
                                              int(cfg.group_size), groups))
        else:  # prune/merge write bf16 (a quantized source is dequantized as it is read)
            nxt = _State(after_config)
        after = nxt.state()
        memory = estimate_memory(state, cfg, samples=samples, seqlen=seqlen, max_memory=max_memory,
                                 after_params=after.total_params, after_bytes=after.bytes, before_bytes=before.bytes)
        steps.append(PlanStep(index=i, name=cfg.name, config=cfg.model_dump(mode="json"), before=before,
                              after=after, memory=memory, findings=findings))
        state = nxt
    return Plan(model=model, target=target, ep_size=ep_size, calibration={"samples": samples, "seqlen": seqlen},
                steps=steps)


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B"


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def render_plan(plan: Plan, console: Any) -> None:
    from rich.table import Table

    from moecompress.report import human_bytes

    for step in plan.steps:
        t = Table(title=f"step {step.index}: {step.name} on {plan.model}")
        for col in ("", "before", "after"):
            t.add_column(col, justify="right")
        b, a = step.before, step.after
        t.add_row("experts per layer / top-k", f"{b.experts_per_layer} / {b.top_k}", f"{a.experts_per_layer} / {a.top_k}")
        t.add_row("expert width", str(b.expert_width), str(a.expert_width))
        t.add_row("total parameters", _b(b.total_params), _b(a.total_params))
        t.add_row("active parameters / token", _b(b.active_params), _b(a.active_params))
        t.add_row("bytes on disk", human_bytes(b.bytes), human_bytes(a.bytes))
        t.add_row("stored as", b.format, a.format)
        console.print(t)
        m = step.memory
        spill = f", {_gib(m.spilled_to_disk_bytes)} of activations spilled to disk" if m.spilled_to_disk_bytes else ""
        cap = f" (--max-memory {_gib(m.max_memory_bytes)})" if m.max_memory_bytes else ""
        console.print(f"  memory{cap}: layer-streaming CPU peak ≈ {_gib(m.cpu_peak_bytes)}{spill}; GPU ≈ "
                      f"{_gib(m.gpu_peak_bytes)} (one layer {_gib(m.layer_bytes)}, activation cache "
                      f"{_gib(m.activation_cache_bytes)}, statistics {_gib(m.statistics_bytes)}"
                      + (f", heal {_gib(m.heal_bytes)}" if m.heal_bytes else "") + "); in-memory path "
                      f"≈ {_gib(m.in_memory_bytes)}")
        what = ("input + output reloaded for the calibration KL" if step.name in
                ("prune_experts", "merge_experts", "prune_atomic") else "output reloaded")
        when = {True: "runs under this cap", False: "skipped under this cap",
                None: "runs when 3x their bytes fit 3/4 of free RAM"}[m.reload_check_runs]
        console.print(f"  full reload check after the stream ({what}) ≈ {_gib(m.reload_check_bytes)} ({when})")
        for f in step.findings:
            mark = "[green]ok[/]" if f.ok else ("[red]error[/]" if plan.target == "vllm" else "[yellow]warn[/]")
            console.print(f"  serving {f.check}: {mark} {f.message}")
    console.print(f"[dim]memory model: {plan.memory_model}[/]")
