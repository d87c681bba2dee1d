"""Expert merging math as pure functions: grouping, neuron alignment, merge rules and router rows.

Nothing here changes a model. Grouping decides which experts collapse into one (each group has an
*anchor*, the expert whose slot the merged expert takes); alignment permutes a member's intermediate
neurons onto the anchor's so that averaging combines neurons that do the same job (a SwiGLU expert is
invariant under such a permutation, so alignment alone never changes an expert's function); merge rules
turn the aligned members into one expert; router rules give the merged expert its router row. The pass
``merge_experts`` wires these to statistics and calls ``moecompress.surgery.merge_into``.

Group-limited routers (DeepSeek-V3 ``n_group``) address experts by ``index // (E / n_group)``: every
grouping here works inside each routing block and keeps the same number of groups per block, so the
sorted anchors keep every merged expert in the block it came from.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from moecompress.arch.experts import ExpertWeights, apply_expert
from moecompress.errors import UserError

AlignMode = Literal["activation", "weight", "both", "none"]
ProbKind = Literal["softmax", "sigmoid"]


@dataclass
class Group:
    """Experts that become one; `members[0]` is the anchor (its slot, and its row for the dominant router)."""

    members: list[int]
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def anchor(self) -> int:
        return self.members[0]


# ---- routing blocks ---------------------------------------------------------------------------------
def routing_blocks(num_experts: int, n_groups: int) -> list[list[int]]:
    """Expert indices of each routing group (one block when the router is not group-limited)."""
    n_groups = max(1, n_groups)
    if num_experts % n_groups:
        raise UserError(f"{num_experts} experts do not split into {n_groups} routing groups")
    size = num_experts // n_groups
    return [list(range(g * size, (g + 1) * size)) for g in range(n_groups)]


def _per_block(num_experts: int, n_keep: int, n_groups: int) -> tuple[list[list[int]], int]:
    blocks = routing_blocks(num_experts, n_groups)
    if n_keep % len(blocks):
        raise UserError(f"keeping {n_keep} experts cannot be split evenly over {len(blocks)} routing groups; "
                        f"use a multiple of {len(blocks)}")
    per = n_keep // len(blocks)
    if not 1 <= per <= len(blocks[0]):
        raise UserError(f"cannot form {per} groups from {len(blocks[0])} experts per routing group")
    return blocks, per


def _anchor_first(members: Sequence[int], score: torch.Tensor) -> list[int]:
    """Members ordered with the highest-scoring one first (ties: lowest index), the rest ascending."""
    best = max(members, key=lambda m: (float(score[m]), -m))
    return [best, *sorted(m for m in members if m != best)]


# ---- grouping ---------------------------------------------------------------------------------------
def group_msmoe(freq: torch.Tensor, logit_sim: torch.Tensor, n_keep: int, n_groups: int = 1) -> list[Group]:
    """M-SMoE: the most-used experts dominate; every other expert joins its most router-similar dominant."""
    blocks, per = _per_block(freq.numel(), n_keep, n_groups)
    groups: list[Group] = []
    for block in blocks:
        order = sorted(block, key=lambda e: (-float(freq[e]), e))
        dominants = order[:per]
        members: dict[int, list[int]] = {d: [d] for d in dominants}
        for e in order[per:]:
            best = max(dominants, key=lambda d: (float(logit_sim[e, d]), -d))
            members[best].append(e)
        groups += [Group([d, *sorted(m[1:])]) for d, m in members.items()]
    return sorted(groups, key=lambda g: g.anchor)


def group_hc(features: torch.Tensor, freq: torch.Tensor, n_keep: int, n_groups: int = 1,
             metric: Literal["euclidean", "cosine"] = "euclidean") -> list[Group]:
    """HC-SMoE: average-linkage hierarchical clustering of expert-output features, cut at exactly n groups.

    Euclidean on mean outputs (the HC-SMoE choice) keeps magnitude: experts that barely move the residual
    stream cluster together, and merging those costs least.
    """
    from sklearn.cluster import AgglomerativeClustering

    blocks, per = _per_block(features.shape[0], n_keep, n_groups)
    groups: list[Group] = []
    for block in blocks:
        if per == len(block):
            groups += [Group([e]) for e in block]
            continue
        x = features[block].double().numpy()
        labels = AgglomerativeClustering(n_clusters=per, linkage="average", metric=metric).fit_predict(x)
        groups += _groups_from_labels(block, labels, per, freq)
    return sorted(groups, key=lambda g: g.anchor)


def group_kmeans(features: torch.Tensor, freq: torch.Tensor, n_keep: int, n_groups: int = 1, seed: int = 0) -> list[Group]:
    """Sub-MoE-style k-means on L2-normalised expert-output features (cosine geometry, seeded).

    Empty clusters (possible when experts are duplicates) are refilled so every group has a member.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    blocks, per = _per_block(features.shape[0], n_keep, n_groups)
    groups: list[Group] = []
    for block in blocks:
        if per == len(block):
            groups += [Group([e]) for e in block]
            continue
        x = torch.nn.functional.normalize(features[block].double(), dim=1).numpy()
        with warnings.catch_warnings():  # duplicate experts → fewer distinct points than clusters; fixed below
            warnings.simplefilter("ignore", ConvergenceWarning)
            km = KMeans(n_clusters=per, random_state=seed, n_init=10).fit(x)
        labels = _fill_empty(np.asarray(km.labels_).copy(), x, np.asarray(km.cluster_centers_), per)
        groups += _groups_from_labels(block, labels, per, freq)
    return sorted(groups, key=lambda g: g.anchor)


def _fill_empty(labels: np.ndarray, x: np.ndarray, centers: np.ndarray, k: int) -> np.ndarray:
    """Give every empty cluster the point farthest from its centre in the largest cluster (duplicates collapse k-means)."""
    for c in range(k):
        if (labels == c).any():
            continue
        big = int(np.bincount(labels, minlength=k).argmax())
        idx = np.nonzero(labels == big)[0]
        dist = ((x[idx] - centers[big]) ** 2).sum(1)
        labels[idx[int(dist.argmax())]] = c
    return labels


def _groups_from_labels(block: list[int], labels: np.ndarray, k: int, freq: torch.Tensor) -> list[Group]:
    out = []
    for c in range(k):
        members = [block[i] for i in range(len(block)) if int(labels[i]) == c]
        if not members:
            raise UserError("clustering produced an empty group; this is a bug, please report it")
        out.append(Group(_anchor_first(members, freq)))
    return out


def group_ream(saliency: torch.Tensor, similarity: torch.Tensor, n_keep: int, n_groups: int = 1,
               group_size: int | None = None) -> list[Group]:
    """REAM-style: the most salient experts dominate and absorb their most similar other experts.

    Pairs (expert, dominant) are taken in descending similarity; a dominant stops absorbing at `group_size`
    members (default ⌈E/n⌉ per routing block), so one dominant cannot swallow a whole domain while others
    stay alone — merging many experts into one averages away what each did.
    """
    blocks, per = _per_block(saliency.numel(), n_keep, n_groups)
    groups: list[Group] = []
    for block in blocks:
        cap = group_size or math.ceil(len(block) / per)
        if cap * per < len(block):
            raise UserError(f"group_size {cap} × {per} groups cannot hold {len(block)} experts; raise group_size "
                            f"to ≥ {math.ceil(len(block) / per)}")
        order = sorted(block, key=lambda e: (-float(saliency[e]), e))
        dominants = order[:per]
        members: dict[int, list[int]] = {d: [d] for d in dominants}
        pairs = sorted(((float(similarity[e, d]), e, d) for e in order[per:] for d in dominants),
                       key=lambda p: (-p[0], p[1], p[2]))
        placed: set[int] = set()
        for _, e, d in pairs:
            if e not in placed and len(members[d]) < cap:
                members[d].append(e)
                placed.add(e)
        groups += [Group([d, *sorted(m[1:])]) for d, m in members.items()]
    return sorted(groups, key=lambda g: g.anchor)


def cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """[E, D] → [E, E] cosine similarity."""
    f = torch.nn.functional.normalize(features.double(), dim=1)
    return f @ f.T


# ---- features on sampled layer inputs -----------------------------------------------------------------
@torch.no_grad()
def expert_outputs(module: torch.nn.Module, layout: str, w: ExpertWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every expert on the same tokens (not only routed ones): outputs [E, N, H] and activations [E, N, I]."""
    x = x.to(w.dtype)
    outs, acts = [], []
    for e in range(w.num_experts):
        y, a = apply_expert(module, layout, w.select(e), x)
        outs.append(y)
        acts.append(a)
    return torch.stack(outs), torch.stack(acts)


# ---- neuron alignment -------------------------------------------------------------------------------
def neuron_signature(w: ExpertWeights) -> torch.Tensor:
    """Per intermediate neuron: its concatenated [gate row; up row; down column] ([I, 3H]; [I, 2H] non-gated)."""
    return torch.cat([t for t in (w.gate, w.up, w.down.T) if t is not None], dim=1).double()


def _column_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    a = a / a.norm(dim=0).clamp_min(1e-12)
    b = b / b.norm(dim=0).clamp_min(1e-12)
    return a.T @ b


def align_permutation(anchor: ExpertWeights, member: ExpertWeights, anchor_act: torch.Tensor | None = None,
                      member_act: torch.Tensor | None = None, mode: AlignMode = "both") -> torch.Tensor:
    """Permutation p of the member's neurons so that member neuron p[i] sits at the anchor's neuron i.

    Hungarian matching on activation correlation over the sampled tokens and/or the cosine similarity of
    the neurons' weight signatures (``both`` adds the two).
    """
    from scipy.optimize import linear_sum_assignment

    width = anchor.width
    if mode == "none":
        return torch.arange(width)
    sim = torch.zeros(width, width, dtype=torch.float64)
    if mode in ("activation", "both"):
        if anchor_act is None or member_act is None:
            if mode == "activation":
                raise UserError("activation alignment needs sampled layer inputs; use align='weight'")
        else:
            sim += _column_corr(anchor_act, member_act)
    if mode in ("weight", "both"):
        sim += cosine_matrix_pair(neuron_signature(anchor), neuron_signature(member))
    rows, cols = linear_sum_assignment(sim.numpy(), maximize=True)
    perm = torch.empty(width, dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def cosine_matrix_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(a.double(), dim=1)
    b = torch.nn.functional.normalize(b.double(), dim=1)
    return a @ b.T


def permute_neurons(w: ExpertWeights, perm: torch.Tensor) -> ExpertWeights:
    """The same expert function with intermediate neurons reordered (single expert, canonical form)."""
    return ExpertWeights(
        gate=w.gate[perm] if w.gate is not None else None, up=w.up[perm], down=w.down[:, perm],
        gate_bias=w.gate_bias[perm] if w.gate_bias is not None else None,
        up_bias=w.up_bias[perm] if w.up_bias is not None else None,
        down_bias=w.down_bias,
    )


# ---- merge rules ------------------------------------------------------------------------------------
def normalise(weights: torch.Tensor) -> torch.Tensor:
    """Non-negative coefficients summing to one; uniform when every weight is zero (unused experts)."""
    w = weights.double().clamp_min(0)
    total = float(w.sum())
    return w / total if total > 0 else torch.full_like(w, 1.0 / w.numel())


def stack(members: Sequence[ExpertWeights]) -> ExpertWeights:
    """Single-expert weights → one ExpertWeights with a leading member axis."""
    first = members[0]
    return ExpertWeights(**{k: (torch.stack([getattr(m, k) for m in members]) if v is not None else None)
                            for k, v in first.__dict__.items()})


def merge_average(ws: ExpertWeights, coef: torch.Tensor) -> ExpertWeights:
    """Coefficient-weighted average of stacked (aligned) members [k, ...] → one expert."""
    c = coef.double()

    def avg(t: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (t.dim() - 1)
        return (t.double() * c.view(shape)).sum(0).to(t.dtype)

    return ws.map(avg)


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values hold `energy` of the squared spectrum."""
    e = (s.double() ** 2).cumsum(0)
    total = float(e[-1])
    if total <= 0:
        return 1
    return int(torch.searchsorted(e / total, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1


def subspace_merge_matrix(mats: torch.Tensor, coef: torch.Tensor, rank: int | None = None,
                          energy: float | None = None) -> tuple[torch.Tensor, int]:
    """Sub-MoE on one weight kind: members [k, O, D] share a left basis.

    Joint SVD of [W_1 | … | W_k] = U Σ [V_1 | … | V_k]; keep the top-r of U, Σ; merge the per-member right
    factors V_i by `coef`; rebuild U_r Σ_r V_merged. At full rank this is exactly Σ c_i W_i; a lower rank
    projects the merged expert onto the subspace the members share, discarding member-specific directions.
    """
    k, o, d = mats.shape
    joint = mats.double().permute(1, 0, 2).reshape(o, k * d)
    u, s, vh = torch.linalg.svd(joint, full_matrices=False)
    full = s.numel()
    r = full
    if rank is not None:
        r = min(r, rank)
    if energy is not None:
        r = min(r, energy_rank(s, energy))
    r = max(1, r)
    v_members = vh[:r].reshape(r, k, d)  # [r, k, D]
    v_merged = (v_members * coef.double().view(1, k, 1)).sum(1)  # [r, D]
    return (u[:, :r] * s[:r]) @ v_merged, r


def merge_subspace(ws: ExpertWeights, coef: torch.Tensor, rank: int | None = None,
                   energy: float | None = None) -> tuple[ExpertWeights, dict[str, int]]:
    """Sub-MoE merge of stacked members: shared-basis gate, up and down; biases averaged."""
    merged = merge_average(ws, coef)  # biases (and dtype template)
    ranks: dict[str, int] = {}
    for name in ws.projections:
        t = getattr(ws, name)
        m, r = subspace_merge_matrix(t, coef, rank, energy)
        setattr(merged, name, m.to(t.dtype))
        ranks[name] = r
    return merged, ranks


# ---- routers ----------------------------------------------------------------------------------------
def router_average(weight: torch.Tensor, groups: Sequence[Group], coef: Sequence[torch.Tensor]) -> torch.Tensor:
    """Coefficient-weighted average of each group's router rows ([n, H])."""
    rows = [(weight[g.members].double() * c.double()[:, None]).sum(0) for g, c in zip(groups, coef, strict=True)]
    return torch.stack(rows).to(weight.dtype)


def vector_merge(vec: torch.Tensor, axis: int, groups: Sequence[Group], coef: Sequence[torch.Tensor] | None) -> torch.Tensor:
    """A per-expert router vector for the merged experts: the anchor's entry, or the weighted average."""
    parts = []
    for j, g in enumerate(groups):
        sel = vec.index_select(axis, torch.as_tensor(g.members)).double()
        if coef is None:
            parts.append(sel.narrow(axis, 0, 1))
        else:
            shape = [1] * sel.dim()
            shape[axis] = -1
            parts.append((sel * coef[j].double().view(shape)).sum(axis, keepdim=True))
    return torch.cat(parts, dim=axis).to(vec.dtype)


def group_targets(logits: torch.Tensor, groups: Sequence[Group], kind: ProbKind, eps: float = 1e-4) -> torch.Tensor:
    """Per token and group, the logit under which the merged expert gets its members' summed probability.

    softmax routers: log Σ_m softmax(z)_m (defined up to a per-token constant); sigmoid routers (DeepSeek-V3,
    Llama4): logit(Σ_m σ(z_m)), clipped below 1 because a sigmoid gate cannot exceed it.
    """
    z = logits.double()
    if kind == "softmax":
        logp = torch.log_softmax(z, dim=-1)
        return torch.stack([torch.logsumexp(logp[:, g.members], dim=-1) for g in groups], dim=1)
    p = torch.sigmoid(z)
    summed = torch.stack([p[:, g.members].sum(-1) for g in groups], dim=1).clamp(eps, 1 - eps)
    return torch.logit(summed)


def refit_to_groups(x_fit: torch.Tensor, ref_logits: torch.Tensor, groups: Sequence[Group], init: torch.Tensor,
                    kind: ProbKind, ridge: float = 1e-3, init_bias: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Router rows (and logit bias) under which each group gets its members' summed original probability.

    `ref_logits [N, E_orig]` are the original router's logits; `x_fit [N, H]` the inputs the new rows will see,
    token-aligned with them. Merging fits on the same inputs; heal fits on the compressed model's inputs
    (which drift from the original's below the layer), with singleton groups after pruning. Returns the
    rows, the bias (None without `init_bias`) and the targets.
    """
    targets = group_targets(ref_logits, groups, kind)
    rows, bias = refit_router(x_fit, targets, init, kind, ridge, init_bias=init_bias)
    return rows, bias, targets


def refit_router(x: torch.Tensor, targets: torch.Tensor, init: torch.Tensor, kind: ProbKind, ridge: float = 1e-3,
                 init_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares router rows R [n, H] (and a bias if `init_bias` is given) with x R^T ≈ targets.

    Ridge-regularised towards `init` (the averaged rows) so few tokens cannot produce wild rows. For softmax
    targets a per-token constant is free, so both sides are centred across groups and the across-group
    mean row is kept from `init` (it does not change any routing decision or weight).
    """
    xx = x.double()
    n_tok, h = xx.shape
    if init_bias is not None:
        xx = torch.cat([xx, torch.ones(n_tok, 1, dtype=torch.float64)], dim=1)
        r0 = torch.cat([init.double(), init_bias.double()[:, None]], dim=1)  # [n, H+1]
    else:
        r0 = init.double()
    t = targets.double()
    gram = xx.T @ xx
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    eye = torch.eye(xx.shape[1], dtype=torch.float64)
    if kind == "softmax":
        n = t.shape[1]
        center = torch.eye(n, dtype=torch.float64) - 1.0 / n  # [n, n]
        rhs = xx.T @ t @ center + lam * r0.T @ center  # [D, n]
        r_c = torch.linalg.solve(gram + lam * eye, rhs)
        r = r_c + r0.T @ (torch.ones(n, n, dtype=torch.float64) / n)
    else:
        r = torch.linalg.solve(gram + lam * eye, xx.T @ t + lam * r0.T)
    r = r.T  # [n, D]
    if init_bias is not None:
        return r[:, :h].to(init.dtype), r[:, h].to(init_bias.dtype)
    return r.to(init.dtype), None
