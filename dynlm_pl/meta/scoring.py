"""Scoring a stream with a backbone: static (the LM alone) and adaptive (dynamic evaluation with an update rule).

Dynamic evaluation follows Krause et al.'s protocol: each segment is scored with θ_{t-1} first, then the rule
updates θ; the hidden state is carried across segments. Per-token losses come back in stream order (`stream_rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from tqdm import tqdm

from dynlm_pl.data import StreamWindows, batchify, segments, stream_rows
from dynlm_pl.meta.rules import Rule
from dynlm_pl.meta.weights import DynamicSpec, DynamicWeights, trust_region_
from dynlm_pl.models import Backbone, lm_loss


def token_losses(logits: Tensor, y: Tensor) -> Tensor:
    """[B, T, V], [B, T] -> [B, T] cross-entropy, at least float32 (float64 stays float64)."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").view_as(y)


def score(model: Backbone, spec: DynamicSpec, theta: Tensor, x: Tensor, y: Tensor,
          hidden: Any, sparse_grad: bool = False, grad_into: Tensor | None = None) -> tuple[Tensor, Any]:
    """Per-token losses [B, T] of segment x -> y [B, T] under θ, and the hidden state after it.

    theta [P]: one set of weights for all B rows. theta [B, P]: row b has its own weights (streams
    adapt independently): each dynamic tensor gets a leading stream dimension and the model runs them as
    batched matmuls (static tensors stay shared: one softmax matrix for all rows when it is not dynamic).
    `grad_into`: a buffer shaped like θ that θ's gradient is written into (`UnflattenInto`; first order).
    """
    if x.is_cuda and getattr(model, "kernel", None) == "fused":
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


def _score(model: Backbone, spec: DynamicSpec, theta: Tensor, x: Tensor, y: Tensor,
           hidden: Any, sparse_grad: bool, grad_into: Tensor | None = None) -> tuple[Tensor, Any]:
    params = spec.unflatten(theta) if grad_into is None else \
        dict(zip(spec.names, UnflattenInto.apply(theta, grad_into, spec), strict=True))
    out = functional_call(model, params, (x, hidden), {"sparse_grad": sparse_grad})
    return token_losses(out.logits, y), out.hidden


def _start(model: Backbone, dyn: DynamicWeights, batch_size: int, own: bool,
           carry: dict[str, Any]) -> tuple[Tensor, Any]:
    """θ (a leaf requiring grad: [B, P] with a θ per stream, else [P]) and the hidden state adaptive evaluation
    starts from: θ_0 and zeros, or what `carry` holds from the previous piece of the stream."""
    theta = carry.get("theta")
    if theta is None:
        theta = dyn.theta0.expand(batch_size, -1).clone() if own else dyn.theta0.clone()
    hidden = carry["hidden"] if carry.get("hidden") is not None else model.init_hidden(batch_size)
    return theta.requires_grad_(True), hidden


def adaptive_eval(model: Backbone, tokens: Tensor, rule: Rule, segment: int = 5, dyn: DynamicWeights | None = None,
                  batch_size: int = 1, reset_at: Sequence[int] = (), progress: bool | str = False,
                  on_segment: Callable[[int, Tensor, Tensor], None] | None = None, shared: bool = False,
                  max_drift: float | None = None, drift: list[float] | None = None,
                  carry: dict[str, Any] | None = None) -> Tensor:
    """Dynamic evaluation: per-token losses [B, n] of the targets 1..B·n in stream order (`stream_rows`).

    Score each segment with θ_{t-1} first, then update; hidden state carried across segments. B = 1 is Krause's
    protocol. B > 1 reads B contiguous pieces of the split in parallel; each stream keeps its own θ [B, P] (the
    same numbers as B separate batch-1 runs), or with `shared=True` one θ [P] for all of them, updated with the
    gradient of the streams' summed mean losses (the paper's batch mode). `reset_at`: token offsets (e.g. article
    starts, B=1) where θ goes back to θ_0 before the segment containing them. `on_segment(start, θ_t, the
    segment's losses [B, t])` after each update. `max_drift`: after each update, θ_t − θ_0 is scaled back onto the
    ball of radius max_drift·‖θ_0‖ when it leaves it (per stream) -- a trust region that keeps a rule without decay
    (λ = 0, FLUSH ≈ 0) bounded over streams far longer than its tuning slice; None: unbounded. `drift`: a list that
    gets ‖θ_t − θ_0‖ after every update (after the trust region; the largest over streams), from the same one pass
    over θ that the trust region's check makes (`drift_norm`). `carry`: a dict holding θ and the hidden state
    between calls, so pieces of one stream (`data.stream_pieces`) give the losses of one call over all of it.
    """
    dyn = dyn or DynamicWeights.build(model)
    was_training = model.training
    model.eval()
    dev = dyn.theta0.device
    streams = stream_rows(tokens, batch_size).to(dev)
    n = streams.size(1)
    own = batch_size > 1 and not shared  # one θ per stream
    carry = {} if carry is None else carry
    theta, hidden = _start(model, dyn, batch_size, own, carry)
    grad_buf = torch.empty_like(theta, requires_grad=False)  # ∇L_t, rewritten in place by every segment's backward
    out = torch.empty(batch_size, n - 1, device=dev, dtype=torch.promote_types(dyn.theta0.dtype, torch.float32))
    resets = sorted(set(reset_at))
    r = 0
    radius = None if max_drift is None else float(max_drift) * float(dyn.theta0.norm())
    bar = progress if isinstance(progress, str) else "adaptive"  # a string: the bar's label (method and split)
    for start, t in tqdm(segments(n, segment), disable=not progress, desc=bar, leave=False, mininterval=2.0):
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
        hidden = model.detach_state(hidden)
        with torch.no_grad():
            out[:, start : start + t] = losses.detach()
            rule.update_(theta, grad, per_stream.detach() if own else per_stream.detach().mean())
            if radius is not None or drift is not None:
                norm = trust_region_(theta, dyn.theta0, radius)
                if drift is not None:
                    drift.append(float(norm.max()))
        if on_segment is not None:
            on_segment(start, theta, out[:, start : start + t])
    model.train(was_training)
    carry.update(theta=theta, hidden=hidden)
    return out


@torch.no_grad()
def static_eval(model: Backbone, tokens: Tensor, batch_size: int = 1, bptt: int = 70,
                progress: bool = False) -> tuple[float, int]:
    """Summed loss and tokens scored of `model` (eval mode) over `tokens` [N] read as streams."""
    model.eval()
    streams = batchify(tokens, batch_size)
    hidden, total, n = model.init_hidden(batch_size), 0.0, 0
    for x, y in tqdm(StreamWindows(streams, bptt), disable=not progress, desc="static", leave=False):
        out = model(x, hidden)
        hidden = model.detach_state(out.hidden)
        total += lm_loss(out.logits, y, reduction="sum").item()
        n += y.numel()
    return total, n


@torch.no_grad()
def static_losses(model: Backbone, tokens: Tensor, bptt: int = 70, progress: bool | str = False,
                  streams: int = 1, on_window: Callable[[Tensor], None] | None = None) -> Tensor:
    """Per-token losses of the static LM over `tokens` read as `streams` rows (`stream_rows`), flat in
    stream order: [N-1] for one stream, the same targets as `adaptive_eval` for B. `on_window(losses [B, t])` after
    each window."""
    model.eval()
    rows = stream_rows(tokens, streams)
    hidden, out = model.init_hidden(streams), []
    bar = progress if isinstance(progress, str) else "static"
    for x, y in tqdm(StreamWindows(rows, bptt), disable=not progress, desc=bar, leave=False):
        o = model(x, hidden)
        hidden = model.detach_state(o.hidden)
        out.append(lm_loss(o.logits, y, reduction="none").view(streams, -1))
        if on_window is not None:
            on_window(out[-1])
    return torch.cat(out, dim=1).reshape(-1)


def method_losses(lm: Backbone, tokens: Tensor, rule: Rule, segment: int, dyn: DynamicWeights, streams: int = 1,
                  shared: bool = False, max_drift: float | None = None,
                  progress: bool | str = False,
                  on_segment: Callable[[Tensor], None] | None = None) -> tuple[Tensor, list[float]]:
    """What `evaluate` runs for one adaptive method: per-token losses [B·n] in stream order, and ‖θ_t − θ_0‖
    after every update (the largest over streams when each keeps its own θ): adaptation must stay bounded.
    `on_segment(losses [B, t])` after each update."""
    drift: list[float] = []
    hook = None if on_segment is None else lambda _start, _theta, losses: on_segment(losses)
    lt = adaptive_eval(lm, tokens, rule, segment, dyn, batch_size=streams, shared=shared, max_drift=max_drift,
                       progress=progress, drift=drift, on_segment=hook).view(-1)
    return lt, drift
