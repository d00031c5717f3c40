"""Dynamic weights θ_t: which parameters adapt, scoring a segment with θ_{t-1}, and update rules.

Shared by meta-training (differentiable, `inner_step`) and evaluation (`adaptive_eval`, lean).

Layout: the dynamic parameters live in ONE flat vector θ of P floats ([P], or [B, P] for B streams
that each keep their own weights); `DynamicSpec.unflatten` turns it into named views for
`torch.func.functional_call`, so the rest of the model stays static (its own, frozen, parameters).
A flat vector makes every update rule a few whole-vector ops instead of a loop over tensors: batch-1
dynamic evaluation is bound by memory traffic, so that matters (see `RMSRule.update_`).

Update rules share one interface:
    rule.update(θ, ∇L, L) -> θ_t        differentiable (meta-training)
    rule.update_(θ, ∇L, L) -> θ_t       in place when possible (evaluation, under no_grad)
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from dynlm_pl.errors import require
from dynlm_pl.models.awd_lstm import AWDLSTM, Hidden

# ----------------------------------------------------------------------------------------------------
# Which parameters are dynamic, and the flat layout
# ----------------------------------------------------------------------------------------------------


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

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """[P] -> {name: view of shape}, [B, P] -> {name: [B, *shape]}; differentiable (gradients flow back
        into `flat`)."""
        lead = flat.shape[:-1]
        return {n: t.view(*lead, *s) for n, t, s in zip(self.names, flat.split(self.sizes, -1), self.shapes,
                                                         strict=True)}


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


def freeze(model: nn.Module) -> nn.Module:
    """The LM's own parameters never train here (and must not, under DDP): requires_grad False."""
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------
# Scoring a segment with θ_{t-1}
# ----------------------------------------------------------------------------------------------------


def token_losses(logits: Tensor, y: Tensor) -> Tensor:
    """[B, T, V], [B, T] -> [B, T] cross-entropy, at least float32 (float64 stays float64)."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").view_as(y)


def score(model: AWDLSTM, spec: DynamicSpec, theta: Tensor, x: Tensor, y: Tensor,
          hidden: Hidden, sparse_grad: bool = False, grad_into: Tensor | None = None) -> tuple[Tensor, Hidden]:
    """Per-token losses [B, T] of segment x -> y [B, T] under θ, and the hidden state after it.

    theta [P]: one set of weights for all B rows. theta [B, P]: row b has its own weights (streams
    adapt independently): each dynamic tensor gets a leading stream dimension and the model runs them as
    batched matmuls (static tensors stay shared: one softmax matrix for all rows when it is not dynamic).
    `grad_into`: a buffer shaped like θ that θ's gradient is written into (`UnflattenInto`; first order).
    """
    if x.is_cuda and model.kernel == "fused":
        # cuDNN's LSTM refuses backward in eval mode and has no double backward: use ATen's kernel.
        with torch.backends.cudnn.flags(enabled=False):
            return _score(model, spec, theta, x, y, hidden, sparse_grad, grad_into)
    return _score(model, spec, theta, x, y, hidden, sparse_grad, grad_into)


class UnflattenInto(torch.autograd.Function):
    """`spec.unflatten(θ)` whose backward writes the per-tensor gradients into a persistent buffer shaped like θ
    and returns it as θ's gradient (first order only). Why: autograd's own backward of the split concatenates
    them into a fresh [B, P] tensor every segment, and a fresh tensor that large is page-faulted in anew (1.75 s
    per segment at B = 16 on model=small, a third of the time at B = 8: bench_eval --profile); the buffer is
    touched once. The gradient returned is the buffer itself, overwritten by the next segment's backward."""

    @staticmethod
    def forward(ctx: Any, theta: Tensor, buffer: Tensor, spec: DynamicSpec) -> tuple[Tensor, ...]:
        ctx.buffer, ctx.spec = buffer, spec
        return tuple(spec.unflatten(theta.detach()).values())

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor, None, None]:
        lead = ctx.buffer.shape[:-1]
        for part, g in zip(ctx.buffer.split(ctx.spec.sizes, -1), grads, strict=True):
            if g is None:  # a tensor the loss does not reach
                part.zero_()
            else:
                part.copy_((g if g.layout == torch.strided else g.to_dense()).reshape(*lead, -1))
        return ctx.buffer, None, None


def _score(model: AWDLSTM, spec: DynamicSpec, theta: Tensor, x: Tensor, y: Tensor,
           hidden: Hidden, sparse_grad: bool, grad_into: Tensor | None = None) -> tuple[Tensor, Hidden]:
    params = spec.unflatten(theta) if grad_into is None else \
        dict(zip(spec.names, UnflattenInto.apply(theta, grad_into, spec), strict=True))
    out = functional_call(model, params, (x, hidden), {"sparse_grad": sparse_grad})
    return token_losses(out.logits, y), out.hidden


# ----------------------------------------------------------------------------------------------------
# Update rules
# ----------------------------------------------------------------------------------------------------


class Rule:
    """θ_t from θ_{t-1} [P] or [B, P], ∇L_t (same shape) and L_t (scalar or [B])."""

    def update(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        raise NotImplementedError

    def update_(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        return theta.copy_(self.update(theta, grad, loss))


class StaticRule(Rule):
    """No adaptation (θ_t = θ_0): the static baseline through the same loop."""

    def update(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        return theta

    def update_(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        return theta


class SGDRule(Rule):
    """θ ← θ − η ∇L (Krause et al.'s plain SGD dynamic evaluation)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def update(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        return theta - self.lr * grad

    def update_(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        return theta.add_(grad, alpha=-self.lr)


def krause_rate(ms: Tensor, spec: DynamicSpec) -> tuple[Tensor, Tensor]:
    """RMS = sqrt(MS) [P] and Krause's (unclipped) decay rate RMS / (mean over tensors of mean(RMS)) [P]."""
    rms = ms.clamp_min(0).sqrt()
    gmean = torch.stack([t.mean() for t in rms.split(spec.sizes)]).mean()
    return rms, (rms / gmean if gmean > 0 else torch.zeros_like(rms))


def krause_coefficients(ms: Tensor, spec: DynamicSpec, lr: float, lamb: float,
                        eps: float) -> tuple[Tensor, Tensor]:
    """Krause et al. 2017 (dynamiceval.py), per coordinate [P]: step a = −η/(RMS+ε) and decay d.

    RMS = sqrt(MS); his decay rate is RMS / (mean over tensors of mean(RMS)), clipped at 1/λ so that
    d = λ·rate ≤ 1 (a decay never overshoots θ_0). Means are per tensor, then over the tensors.
    """
    rms, rate = krause_rate(ms, spec)
    d = (lamb * rate.clamp(max=1.0 / lamb)) if lamb > 0 else torch.zeros_like(rms)
    return -lr / (rms + eps), d


class RMSRule(Rule):
    """Krause's RMS-scaled SGD with decay toward θ_0: θ ← θ − η∇/(RMS+ε) + d⊙(θ_0 − θ).

    Written as θ ← (1 − d)⊙θ + a⊙∇ + d⊙θ_0 with a, 1 − d and d⊙θ_0 precomputed, so one update is two
    passes over P floats (addcmul into θ, then addcmul of the gradient) instead of five ops.
    """

    def __init__(self, dyn: DynamicWeights, lr: float, lamb: float, eps: float) -> None:
        require(dyn.ms is not None, "the rms rule needs gradient statistics (ms) from fisher.pt; "
                "run `python train.py stage=fisher` first")
        self.a, self.d = krause_coefficients(dyn.ms, dyn.spec, lr, lamb, eps)
        self.keep = 1.0 - self.d  # f = 1 − d
        self.pull = self.d * dyn.theta0  # z⊙θ_0, constant

    def update(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        return torch.addcmul(self.pull, theta, self.keep).addcmul(self.a, grad)

    def update_(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        torch.addcmul(self.pull, theta, self.keep, out=theta)  # elementwise: out may alias an input
        return theta.addcmul_(self.a, grad)


class GateRule(Rule):
    """θ_t = f⊙θ_{t-1} + i⊙∇L_t + z⊙θ_0 with (f, i, z) from a gate module (the meta-learner).

    `gates(theta, grad, loss, dyn) -> (f, i, z)`, each broadcastable to θ; z may be None (no FLUSH).
    """

    def __init__(self, gates: nn.Module, dyn: DynamicWeights) -> None:
        self.gates, self.dyn = gates, dyn

    def update(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        # float32 even under autocast (trainer.precision=bf16-mixed): bf16 gates round f = σ(10) to exactly 1
        # and i to 3 digits, changing the flat θ update itself (~10% of one step's size, measured).
        with torch.autocast(theta.device.type, enabled=False):
            if theta.dim() == 1 and getattr(self.gates, "fused", False):  # meta.fused_gate: one compiled pass
                return self.gates.fused_update(theta, grad, loss, self.dyn)
            return self.combine(theta, grad, *self.gates(theta, grad, loss, self.dyn))

    def update_(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        self.apply_(theta, grad, loss, stats=False)  # nobody reads the gate means here: skip their sums
        return theta

    def apply_(self, theta: Tensor, grad: Tensor, loss: Tensor, stats: bool = True) -> Tensor | None:
        """In place; returns the per-tensor mean gates [3, n_tensors] (averaged over streams) when the gate
        module updates in place itself (`MetaLearner.apply_`: chunked or compiled, stream by stream), unless
        `stats=False` lets the compiled pass skip them (then None)."""
        if not hasattr(self.gates, "apply_"):
            theta.copy_(self.update(theta, grad, loss))
            return None
        with torch.autocast(theta.device.type, enabled=False):
            if theta.dim() == 1 or getattr(self.gates, "fused", False):  # the compiled pass takes [B, P] itself
                return self.gates.apply_(theta, grad, loss, self.dyn, stats=stats)
            # B streams [B, P]: row by row (each a view of θ, updated in place with its own loss)
            means = [self.gates.apply_(theta[b], grad[b], loss[b], self.dyn, stats=stats)
                     for b in range(theta.size(0))]
            return None if means[0] is None else torch.stack(means).mean(0)

    def combine(self, theta: Tensor, grad: Tensor, f: Tensor, i: Tensor, z: Tensor | None) -> Tensor:
        new = torch.addcmul(f * theta, i, grad)
        return new if z is None else new.addcmul(z, self.dyn.theta0)


# ----------------------------------------------------------------------------------------------------
# One differentiable inner step (meta-training) and the lean evaluation loop
# ----------------------------------------------------------------------------------------------------


def inner_step(model: AWDLSTM, rule: Rule, spec: DynamicSpec, theta: Tensor, hidden: Hidden, x: Tensor,
               y: Tensor, second_order: bool = False, checkpointing: bool = False) -> tuple[Tensor, Hidden, Tensor]:
    """Score x -> y with θ_{t-1}, take ∇L_t, apply the rule: (θ_t, hidden, summed token loss).

    L_t is the mean token loss of each stream (summed over streams, so each stream's gradient is its
    own). First order: ∇L_t (and the L_t feature) are constants to the meta-gradient; second order:
    `create_graph` keeps their dependence on earlier gates.

    `checkpointing`: the LM's forward and the rule are two non-reentrant checkpoint regions, recomputed
    in backward, so the step keeps about θ_{t-1} and ∇L_t (2P floats) instead of its graph. ∇L_t is
    taken between them: an autograd.grad *inside* a checkpointed region makes torch keep that region's
    recomputed tensors alive (measured: half the savings lost).
    """
    if not torch.is_grad_enabled():  # a forward-only pass (meta.checkpoint_group's first run): no graph kept
        th = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            losses, hidden = score(model, spec, th, x, y, hidden)
            per_stream = losses.mean(1)
            (grad,) = torch.autograd.grad(per_stream.sum(), th)
        feat = per_stream.detach() if theta.dim() == 2 else per_stream.detach().mean()
        # the evaluation update, in place on a copy (theta is the region's saved input)
        new = rule.update_(theta.detach().clone(), grad, feat)
        return new, [(h.detach(), c.detach()) for h, c in hidden], losses.detach().sum()
    if not theta.requires_grad:  # fresh θ (start, reset, or detached at an unroll boundary)
        theta = theta.detach().requires_grad_(True)
    if checkpointing:
        losses, hidden = checkpoint(score, model, spec, theta, x, y, hidden, use_reentrant=False)
    else:
        losses, hidden = score(model, spec, theta, x, y, hidden)  # [B, T]
    per_stream = losses.mean(1)  # [B]
    (grad,) = torch.autograd.grad(per_stream.sum(), theta, retain_graph=True, create_graph=second_order)
    feat = per_stream if theta.dim() == 2 else per_stream.mean()
    if not second_order:
        grad, feat = grad.detach(), feat.detach()
    if checkpointing:
        new = checkpoint(rule.update, theta, grad, feat, use_reentrant=False)
    else:
        new = rule.update(theta, grad, feat)
    return new, hidden, losses.sum()


def segments(n: int, segment: int) -> list[tuple[int, int]]:
    """(start, length) of consecutive segments covering positions 0..n-2 (the last is shorter)."""
    return [(i, min(segment, n - 1 - i)) for i in range(0, n - 1, segment)]


def stream_rows(tokens: Tensor, n_streams: int) -> Tensor:
    """[N] -> [B, n+1], n = (N−1)//B: row b reads tokens b·n .. b·n+n, so consecutive rows overlap by one
    token and every target 1..B·n is scored exactly once (row-major order = stream order)."""
    n = (tokens.numel() - 1) // n_streams
    require(n >= 1, f"{tokens.numel()} tokens cannot fill {n_streams} streams; lower eval.streams")
    return tokens[: n_streams * n + 1].unfold(0, n + 1, n)


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


def adaptive_eval(model: AWDLSTM, tokens: Tensor, rule: Rule, segment: int = 5, dyn: DynamicWeights | None = None,
                  batch_size: int = 1, reset_at: Sequence[int] = (), progress: bool = False,
                  on_segment: Callable[[int, Tensor], None] | None = None, shared: bool = False,
                  max_drift: float | None = None, drift: list[float] | None = None) -> Tensor:
    """Dynamic evaluation: per-token losses [B, n] of the targets 1..B·n in stream order (`stream_rows`).

    Score each segment with θ_{t-1} first, then update; hidden state carried across segments. B = 1 is
    Krause's protocol. B > 1 reads B contiguous pieces of the split in parallel; each stream keeps its own
    θ [B, P] (the same numbers as B separate batch-1 runs), or with `shared=True` one
    θ [P] for all of them, updated with the gradient of the streams' summed mean losses (the paper's batch
    mode). `reset_at`: token offsets (e.g. article starts, B=1) where θ goes back to θ_0 before the segment
    containing them. `max_drift`: after each update, θ_t − θ_0 is scaled back onto the ball of radius
    max_drift·‖θ_0‖ when it leaves it (per stream) -- a trust region that keeps a rule without decay (λ = 0,
    FLUSH ≈ 0) bounded over streams far longer than its tuning slice; None: unbounded. `drift`: a list that gets
    ‖θ_t − θ_0‖ after every update (after the trust region; the largest over streams), from the same one pass
    over θ that the trust region's check makes (`drift_norm`).
    """
    dyn = dyn or DynamicWeights.build(model)
    was_training = model.training
    model.eval()
    dev = dyn.theta0.device
    streams = stream_rows(tokens, batch_size).to(dev)
    n = streams.size(1)
    own = batch_size > 1 and not shared  # one θ per stream
    theta = dyn.theta0.expand(batch_size, -1).clone() if own else dyn.theta0.clone()
    theta.requires_grad_(True)
    hidden = model.init_hidden(batch_size)
    grad_buf = torch.empty_like(theta, requires_grad=False)  # ∇L_t, rewritten in place by every segment's backward
    out = torch.empty(batch_size, n - 1, device=dev, dtype=torch.promote_types(dyn.theta0.dtype, torch.float32))
    resets = sorted(set(reset_at))
    r = 0
    radius = None if max_drift is None else float(max_drift) * float(dyn.theta0.norm())
    for start, t in tqdm(segments(n, segment), disable=not progress, desc="adaptive", leave=False):
        while r < len(resets) and resets[r] < start + t:  # an article starts in this segment
            if resets[r] > 0:
                with torch.no_grad():
                    theta.copy_(dyn.theta0.expand_as(theta))
            r += 1
        x, y = streams[:, start : start + t], streams[:, start + 1 : start + 1 + t]
        with torch.enable_grad():
            losses, hidden = score(model, dyn.spec, theta, x, y, hidden, sparse_grad=True,  # first order only
                                   grad_into=grad_buf)
            per_stream = losses.mean(1)
            (grad,) = torch.autograd.grad(per_stream.sum(), theta)
        hidden = [(h.detach(), c.detach()) for h, c in hidden]
        with torch.no_grad():
            out[:, start : start + t] = losses.detach()
            rule.update_(theta, grad, per_stream.detach() if own else per_stream.detach().mean())
            if radius is not None or drift is not None:
                norm = drift_norm(theta, dyn.theta0)  # [B] or []
                if radius is not None and bool((norm > radius).any()):
                    # θ ← θ_0 + (θ − θ_0)·radius/‖θ − θ_0‖ on the streams outside, in place (no θ-sized temporary)
                    for row, n_b in zip(theta.view(-1, theta.size(-1)), norm.reshape(-1).tolist(), strict=True):
                        if n_b > radius:
                            row.sub_(dyn.theta0).mul_(radius / n_b).add_(dyn.theta0)
                    norm = norm.clamp(max=radius)
                if drift is not None:
                    drift.append(float(norm.max()))
        if on_segment is not None:
            on_segment(start, theta)
    model.train(was_training)
    return out
