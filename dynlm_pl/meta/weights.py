"""Dynamic weights θ_t: which parameters of a backbone adapt, and the flat layout every update rule works on.

The dynamic parameters live in ONE flat vector θ of P floats ([P], or [B, P] for B streams that each keep their own
weights); `DynamicSpec.unflatten` turns it into named views for `torch.func.functional_call`, so the rest of the
model stays static (its own, frozen, parameters). A flat vector makes every update rule a few whole-vector ops
instead of a loop over tensors: batch-1 dynamic evaluation is bound by memory traffic, so that matters.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dynlm_pl.errors import require
from dynlm_pl.fisher import ewc_penalty_of


@dataclass(frozen=True)
class DynamicSpec:
    """Names, shapes and sizes of the dynamic parameters, in `named_parameters()` order."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """{name: tensor} -> [P] (a copy)."""
        return torch.cat([tensors[n].detach().reshape(-1) for n in self.names])

    @property
    def groups(self) -> list[str]:
        """`tensor_group` of each tensor, in order, and so the distinct groups in first-seen order via dict.fromkeys."""
        return [tensor_group(n) for n in self.names]

    def per_group(self, values: dict[str, float], like: Tensor) -> Tensor:
        """[P] with each tensor's coordinates set to the value of its group (`values` must name every group)."""
        missing = sorted(set(self.groups) - set(values))
        require(not missing, f"no value for the parameter group(s) {missing}; groups are {sorted(set(self.groups))}")
        return torch.cat([torch.full((n,), float(values[g]), dtype=like.dtype, device=like.device)
                          for g, n in zip(self.groups, self.sizes, strict=True)])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """[P] -> {name: view of shape}, [B, P] -> {name: [B, *shape]}; differentiable (gradients flow back
        into `flat`)."""
        lead = flat.shape[:-1]
        return {n: t.view(*lead, *s) for n, t, s in zip(self.names, flat.split(self.sizes, -1), self.shapes,
                                                         strict=True)}


def tensor_group(name: str) -> str:
    """The group a parameter tensor belongs to for per-group tuning (rms_pt): every bias together, else the name up
    to its first numeric component (one group per layer: `rnns.0`, `blocks.3`), else its first component
    (`encoder`: the embedding, tied to the softmax)."""
    parts = name.split(".")
    if "bias" in parts[-1]:
        return "bias"
    for k, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: k + 1])
    return parts[0]


def select_dynamic(model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = ()) -> DynamicSpec:
    """Parameters whose name matches an `include` glob and no `exclude` glob (all by default)."""
    names, shapes = [], []
    for n, p in model.named_parameters():
        if any(fnmatch.fnmatch(n, pat) for pat in include) and not any(fnmatch.fnmatch(n, pat) for pat in exclude):
            names.append(n)
            shapes.append(p.shape)
    require(bool(names), f"no parameter matches meta.dynamic include={list(include)} exclude={list(exclude)}; "
            f"parameters are: {', '.join(n for n, _ in model.named_parameters())}")
    return DynamicSpec(tuple(names), tuple(shapes))


@dataclass
class DynamicWeights:
    """Everything per coordinate that rules and the meta-learner read, flat [P], on the model's device.

    theta0: θ_0, where adaptation starts and FLUSH/decay return to. ms: Krause's mean squared batch
    gradients (RMS = sqrt(ms)), fisher: diagonal Fisher, both optional (from `fisher.pt`).
    """

    spec: DynamicSpec
    theta0: Tensor
    ms: Tensor | None = None
    fisher: Tensor | None = None
    # A sample of another DynamicWeights' coordinates (`restrict`): the parent, the coordinates taken [S], and the
    # per-stream drift feature of the parent's whole θ at the step being replayed (the reverse pass sets it: a
    # norm over a sample is not the norm over all coordinates)
    parent: DynamicWeights | None = None
    index: Tensor | None = None
    drift: Tensor | None = None

    @classmethod
    def build(cls, model: nn.Module, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
              fisher_art: Any | None = None) -> DynamicWeights:
        """θ_0 from the model itself (or the artifact's theta0, which must agree in shape)."""
        spec = select_dynamic(model, include, exclude)
        params = dict(model.named_parameters())
        theta0 = spec.flatten(params)
        ms = fisher = None
        if fisher_art is not None:
            for n in spec.names:
                require(n in fisher_art.ms and fisher_art.ms[n].shape == params[n].shape,
                        f"fisher.pt has no statistics of shape {tuple(params[n].shape)} for {n}; "
                        "rerun `python train.py stage=fisher` for this LM")
            dev = theta0.device
            ms = spec.flatten(fisher_art.ms).to(dev, theta0.dtype)
            fisher = spec.flatten(fisher_art.fisher).to(dev, theta0.dtype) if fisher_art.fisher else None
        return cls(spec, theta0, ms, fisher)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DynamicWeights:
        mv = lambda t: None if t is None else t.to(device, dtype or t.dtype)
        return DynamicWeights(self.spec, mv(self.theta0), mv(self.ms), mv(self.fisher))


    def restrict(self, sample: CoordinateSample) -> DynamicWeights:
        """The sampled coordinates as DynamicWeights of their own: each tensor becomes its sampled coordinates
        (shape [n_k]), θ_0, ms and F sliced. Constants that depend on whole tensors (Krause's decay rate divides by
        means over tensors) must be taken from `parent` and sliced, not recomputed here: the meta-learner does."""
        spec = DynamicSpec(self.spec.names, tuple(torch.Size([n]) for n in sample.sizes))
        index = sample.index.to(self.theta0.device)
        take = lambda t: None if t is None else t.index_select(0, index)
        return DynamicWeights(spec, take(self.theta0), take(self.ms), take(self.fisher), parent=self, index=index)

    def ewc_penalty(self, theta: Tensor, lam: float) -> Tensor:
        """EWC: λ/2 Σ F (θ − θ_0)² over the flat vector (differentiable in θ)."""
        require(self.fisher is not None, "the EWC penalty needs the Fisher from fisher.pt; run "
                "`python train.py stage=fisher`")
        return ewc_penalty_of(theta, self.theta0, self.fisher, lam)


@dataclass
class CoordinateSample:
    """Coordinates of the flat θ [P] drawn by `sample_coordinates`: their indices [S] (ascending), the inverse of
    each one's probability of being drawn [S], and how many of each tensor's coordinates were drawn."""

    index: Tensor
    weight: Tensor
    sizes: list[int]


def sample_coordinates(spec: DynamicSpec, fraction: float, block: int = 1024,
                       generator: torch.Generator | None = None, rows: Tensor | None = None,
                       vocab: int | None = None) -> CoordinateSample:
    """Blocks of `block` contiguous coordinates drawn without replacement, m = ⌈fraction·n_b⌉ of each tensor's n_b
    blocks (at least one): every coordinate of the tensor is drawn with probability m/n_b, so a sum over the sample
    weighted by n_b/m is an unbiased estimate of the sum over all P coordinates. Why per tensor: every tensor keeps
    coordinates (its gates have their own bias), and its weight is exact. Why blocks: a gather of contiguous runs
    streams through memory; single coordinates a cache line apart would read all of θ.

    `rows` (token ids) of the tensors whose first dimension is `vocab` (the embedding/softmax table, the softmax
    bias) are always taken, weight 1: the rows of the text being read carry most of those tensors' gradient (the
    lookup's is zero elsewhere; the softmax's is largest at the targets and at the frequent words, which every chunk
    holds), so drawing them at random is the likeliest source of a uniform sample's variance (bench/README.md,
    "The reverse pass on sampled coordinates"). A coordinate outside them keeps probability m/n_b: the estimate
    stays unbiased."""
    index, weight, sizes = [], [], []
    for (s, n), shape in zip(offsets(spec.sizes), spec.shapes, strict=True):
        n_b = -(-n // block)
        m = min(n_b, max(1, math.ceil(fraction * n_b)))
        keep = torch.zeros(n_b, block, dtype=torch.bool)
        keep[torch.randperm(n_b, generator=generator)[:m]] = True
        keep = keep.reshape(-1)[:n]  # the last block of a tensor may be short
        always = None
        if rows is not None and vocab is not None and len(shape) > 0 and shape[0] == vocab:
            always = torch.zeros(vocab, dtype=torch.bool)
            always[rows] = True
            always = always.repeat_interleave(n // vocab)  # [n]: every coordinate of a taken row
            keep |= always
        idx = keep.nonzero().squeeze(1)
        w = torch.full((idx.numel(),), n_b / m)
        if always is not None:
            w[always[idx]] = 1.0
        index.append(s + idx)
        weight.append(w)
        sizes.append(idx.numel())
    return CoordinateSample(torch.cat(index), torch.cat(weight), sizes)


def drift_norm(theta: Tensor, theta0: Tensor, block: int = 1 << 18) -> Tensor:
    """‖θ − θ_0‖ per stream, float64: [B] for θ [B, P], a scalar for θ [P].

    Why blocks: `(θ − θ_0).norm(dim=-1)` writes a θ-sized difference (350 MB at B = 8 on model=small), page-faulted
    in anew every segment; a block of `block` floats over all rows stays in cache, so this is one read of θ.
    """
    rows = theta.detach().reshape(-1, theta.size(-1))  # [B, P]
    step = max(1024, block // rows.size(0))
    acc = torch.zeros(rows.size(0), dtype=torch.float64, device=theta.device)
    for s in range(0, rows.size(1), step):
        acc += (rows[:, s : s + step] - theta0[s : s + step]).square_().sum(-1).double()
    return acc.sqrt().reshape(theta.shape[:-1])


def trust_region_(theta: Tensor, theta0: Tensor, radius: float | None) -> Tensor:
    """‖θ − θ_0‖ per stream after pulling the streams outside the ball of `radius` (None: no ball) back onto it:
    θ ← θ_0 + (θ − θ_0)·radius/‖θ − θ_0‖, in place, row by row (no θ-sized temporary)."""
    norm = drift_norm(theta, theta0)  # [B] or []
    if radius is not None and bool((norm > radius).any()):
        for row, n_b in zip(theta.view(-1, theta.size(-1)), norm.reshape(-1).tolist(), strict=True):
            if n_b > radius:
                row.sub_(theta0).mul_(radius / n_b).add_(theta0)
        norm = norm.clamp(max=radius)
    return norm


def trust_region(theta: Tensor, theta0: Tensor, radius: float) -> Tensor:
    """`trust_region_` out of place and differentiable (meta-training backpropagates through the projection)."""
    d = theta - theta0
    scale = (radius / d.norm(dim=-1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
    return theta0 + d * scale


def freeze(model: nn.Module) -> nn.Module:
    """The LM's own parameters never train here (and must not, under DDP): requires_grad False."""
    model.requires_grad_(False)
    return model


def offsets(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(start, length) of each tensor in the flat vector."""
    return list(zip(itertools.accumulate([0, *sizes[:-1]]), sizes, strict=True))
