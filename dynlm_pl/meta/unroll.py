"""Meta-training's inner loop: unrolled dynamic evaluation through which the meta-gradient flows into φ.

An unroll reads U segments of M tokens: each inner step scores a segment with θ_{t-1} (its loss enters the
meta-loss), takes ∇L_t and applies the rule, θ_t = f⊙θ_{t-1} + i⊙∇L_t + z⊙θ_0. The meta-loss is the mean token
loss over the unroll (plus EWC), backpropagated into φ through the weights (truncated BPTT).

Memory: with `checkpointing`, each inner step is one non-reentrant `torch.utils.checkpoint` region, so an unroll
stores about θ_{t-1} and ∇L_t per step (2P floats) and recomputes the step's graph in backward. A checkpoint
group G > 1 nests this: groups of G steps run first without any graph and keep only their input θ and hidden
state; backward reruns one group at a time with per-step checkpointing. An unroll of U steps then holds U/G + 2G
parameter-sized tensors instead of 2U (G = √(U/2): 2√(2U)), for one more forward pass per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dynlm_pl.errors import require
from dynlm_pl.meta.rules import GateRule, Rule
from dynlm_pl.meta.scoring import score
from dynlm_pl.meta.weights import DynamicSpec, DynamicWeights, sample_coordinates
from dynlm_pl.models import Backbone


def inner_step(model: Backbone, rule: Rule, spec: DynamicSpec, theta: Tensor, hidden: Any, x: Tensor,
               y: Tensor, second_order: bool = False, checkpointing: bool = False) -> tuple[Tensor, Any, Tensor]:
    """Score x -> y with θ_{t-1}, take ∇L_t, apply the rule: (θ_t, hidden, summed token loss).

    L_t is the mean token loss of each stream (summed over streams, so each stream's gradient is its
    own). First order: ∇L_t (and the L_t feature) are constants to the meta-gradient; second order:
    `create_graph` keeps their dependence on earlier gates.

    `checkpointing`: the LM's forward and the rule are two non-reentrant checkpoint regions, recomputed
    in backward, so the step keeps about θ_{t-1} and ∇L_t (2P floats) instead of its graph. ∇L_t is
    taken between them: an autograd.grad *inside* a checkpointed region makes torch keep that region's
    recomputed tensors alive, which loses much of the savings.
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
        return new, model.detach_state(hidden), losses.detach().sum()
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


class CheckpointedSteps(torch.autograd.Function):
    """A run of inner steps as one region that stores only its input state (θ, hidden tensors).

    forward: `run(*state) -> (θ, *hidden, loss)` without a graph. backward: rerun it with one (its steps
    checkpointed one by one) and backpropagate into the state and φ. A Function rather than a reentrant
    `checkpoint`: φ's gradient is returned as an input gradient, so autograd sums it over regions before
    φ's accumulator fires once (what DDP's hooks expect), and ∇L_t is taken inside the region.
    """

    @staticmethod
    def forward(ctx: Any, run: Callable[..., tuple[Tensor, ...]], n_state: int, *args: Tensor) -> tuple[Tensor, ...]:
        ctx.run, ctx.params = run, args[n_state:]
        ctx.save_for_backward(*args[:n_state])
        return run(*args[:n_state])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        state = [t.detach().requires_grad_(t.is_floating_point()) for t in ctx.saved_tensors]
        with torch.enable_grad():
            outs = ctx.run(*state)
        pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None and o.requires_grad]
        wrt = [t for t in (*state, *ctx.params) if t.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))
        return None, None, *[next(got) if t.requires_grad else None for t in (*state, *ctx.params)]


def group_size(setting: int | str | None, unroll: int) -> int:
    """meta.checkpoint_group: 'auto' -> √(unroll/2) rounded (fewest stored tensors); 0 or 1: per step only."""
    if setting in ("auto", None):
        return max(1, round(math.sqrt(unroll / 2)))
    require(isinstance(setting, int) and setting >= 0, f"meta.checkpoint_group must be auto or an integer >= 0, "
            f"got {setting!r}")
    return int(setting)


class Unroller:
    """`unroll` inner steps of `rule` over a chunk of B streams: the meta-loss, θ_U and the hidden state.

    `params`: φ, the tensors the meta-gradient is for (what nested checkpoint groups return gradients to).
    `order` 2 keeps ∇L_t's dependence on earlier gates (create_graph). `ewc_lambda` > 0 adds λ/2 Σ F (θ_t − θ_0)²
    once per step, like L_t.
    """

    def __init__(self, lm: Backbone, rule: Rule, dyn: DynamicWeights, params: list[nn.Parameter], segment: int,
                 unroll: int, order: int = 1, checkpointing: bool = True, group: int = 0,
                 ewc_lambda: float = 0.0, detach_hidden: bool = False) -> None:
        require(order in (1, 2), f"meta.order must be 1 (first order) or 2 (second order), got {order}")
        require(ewc_lambda == 0 or dyn.fisher is not None,
                "meta.ewc_lambda > 0 needs the Fisher from fisher.pt; run `python train.py stage=fisher`")
        self.lm, self.rule, self.dyn, self.params = lm, rule, dyn, params
        self.segment, self.unroll, self.order = segment, unroll, order
        self.checkpointing, self.group, self.ewc_lambda = checkpointing, group, ewc_lambda
        self.detach_hidden = detach_hidden  # cut the path through the hidden state (what FastFirstOrder drops)

    def initial_state(self, batch: int) -> tuple[Tensor, Any]:
        """θ_0 ([P], or [B, P] for B > 1 streams) and the backbone's initial state."""
        theta = self.dyn.theta0.clone() if batch == 1 else self.dyn.theta0.expand(batch, -1).clone()
        return theta, self.lm.init_hidden(batch)

    def __call__(self, chunk: Tensor, resets: Tensor | None, theta: Tensor,
                 hidden: Any) -> tuple[Tensor, Tensor, Any, int]:
        """chunk [B, U·M+1], resets [B, U] bool (θ ← θ_0 before segment k of stream b; None: never) ->
        (meta-loss, θ_U, hidden, tokens scored)."""
        n_tok = self.unroll * self.segment * chunk.size(0)
        g = self.group
        if not (self.checkpointing and 1 < g < self.unroll):
            total, theta, hidden = self.steps(chunk, resets, 0, self.unroll, theta, hidden)
            return total / n_tok, theta, hidden, n_tok
        total = theta.new_zeros(())
        params = [p for p in self.params if p.requires_grad]
        for k0 in range(0, self.unroll, g):
            run = self._group_fn(chunk, resets, k0, min(self.unroll, k0 + g))
            state = [theta, *[t for hc in hidden for t in hc]]
            *state, part = CheckpointedSteps.apply(run, len(state), *state, *params)
            theta, hidden = state[0], list(zip(state[1::2], state[2::2], strict=True))
            total = total + part
        return total / n_tok, theta, hidden, n_tok

    def _group_fn(self, chunk: Tensor, resets: Tensor | None, k0: int, k1: int) -> Callable[..., tuple[Tensor, ...]]:
        """Steps k0..k1 as a function of the flat state (θ, h_1, c_1, ...) -> (θ, h_1, c_1, ..., loss sum)."""

        def run(theta: Tensor, *flat: Tensor) -> tuple[Tensor, ...]:
            hidden = list(zip(flat[0::2], flat[1::2], strict=True))
            total, theta, hidden = self.steps(chunk, resets, k0, k1, theta, hidden)
            return theta, *[t for hc in hidden for t in hc], total

        return run

    def steps(self, chunk: Tensor, resets: Tensor | None, k0: int, k1: int, theta: Tensor,
              hidden: Any) -> tuple[Tensor, Tensor, Any]:
        """Inner steps k0..k1-1 of the unroll: (summed token loss (+ EWC), θ, hidden)."""
        m = self.segment
        total = theta.new_zeros(())
        for k in range(k0, k1):
            x, y = chunk[:, k * m : (k + 1) * m], chunk[:, k * m + 1 : (k + 1) * m + 1]
            reset = None if resets is None else resets[:, k].to(theta.device)
            if reset is not None and bool(reset.any()):  # an article starts in this segment: θ ← θ_0 there
                theta = self.dyn.theta0.clone() if theta.dim() == 1 else torch.where(reset[:, None], self.dyn.theta0,
                                                                                     theta)
            theta, hidden, lsum = inner_step(self.lm, self.rule, self.dyn.spec, theta, hidden, x, y,
                                             self.order == 2, self.checkpointing)
            if self.detach_hidden:
                hidden = self.lm.detach_state(hidden)
            total = total + lsum
            if self.ewc_lambda:  # counts once per step, like L_t (the total is divided by tokens)
                pen = checkpoint(self.dyn.ewc_penalty, theta, self.ewc_lambda, use_reentrant=False) \
                    if self.checkpointing else self.dyn.ewc_penalty(theta, self.ewc_lambda)
                total = total + pen * y.numel()
        return total, theta, hidden


class FastFirstOrder(Unroller):
    """The first-order meta-gradient without running the LM twice (meta.fast_first_order).

    In first order ∇L_t and L_t are constants of the meta-gradient, and g_φ is coordinate-wise, so with
    a_t = ∂(meta-loss)/∂θ_t the reverse pass is a_{t-1} = w ∇L_t + J_tᵀ a_t (J_t = ∂θ_t/∂θ_{t-1}, diagonal) and φ
    collects a_tᵀ ∂θ_t/∂φ at step t: only the gate's vector-Jacobian products, no second LM forward or backward.
    The forward pass is evaluation's (no graph); per step it keeps what the gate reads, θ_{t-1} and ∇L_t (2P
    floats, as per-step checkpointing does). What it drops: L_{t+2} depends on θ_t also through the hidden state
    after segment t+1 — the autograd reference with `detach_hidden=True` is what this equals (tests). `__call__`
    returns the meta-loss without a graph: φ's gradients are already accumulated (all-reduced under DDP).

    Memory (`checkpointing` with a group G > 1, meta.checkpoint_group): the forward pass keeps only each group's
    input θ and hidden state; the reverse pass reruns one group's forward (its LM passes again) to rebuild its
    tape, last group first, whose tape the forward pass still holds. An unroll of U steps then holds U/G + 2G
    parameter-sized tensors instead of 2U, for one more LM forward and backward per step outside the last group.

    Sampled coordinates (`sample` < 1, meta.reverse_sample): J_t is diagonal, so a coordinate's adjoint depends on
    that coordinate's own history only, and φ's gradient is a sum over coordinates. The reverse pass then runs on a
    random fraction of them (`sample_coordinates`, drawn afresh per unroll; the vocabulary tables' rows of the
    chunk's words always), each weighted by the inverse of its probability of being drawn: an unbiased estimate of
    the same gradient at about that fraction of the reverse pass's cost and of the tape's memory. The forward pass
    (the LM, every coordinate's update) is unchanged.
    """

    def __init__(self, *args: Any, sample: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        require(0 < sample <= 1, f"meta.reverse_sample must be in (0, 1] (the fraction of coordinates the reverse "
                f"pass reads), got {sample!r}")
        require(sample == 1 or isinstance(self.rule, GateRule), "meta.reverse_sample < 1 needs the meta-learner's "
                "own rule: it is not a coordinate-wise map with eval.max_drift's trust region (a norm over all of θ)")
        self.sample = float(sample)

    def __call__(self, chunk: Tensor, resets: Tensor | None, theta: Tensor,
                 hidden: Any) -> tuple[Tensor, Tensor, Any, int]:
        n_tok = self.unroll * self.segment * chunk.size(0)
        g = self.group if self.checkpointing and 1 < self.group < self.unroll else self.unroll
        # the coordinates the reverse pass reads: all, or a weighted sample (θ_0, ms, F and the rule restricted)
        # (the rows of the chunk's own words always: sample_coordinates)
        sample = sample_coordinates(self.dyn.spec, self.sample, generator=_rank_generator(), rows=chunk.unique(),
                                    vocab=self.lm.vocab_size) if self.sample < 1 else None
        dyn = self.dyn.restrict(sample) if sample is not None else self.dyn
        rule = GateRule(self.rule.gates, dyn) if sample is not None else self.rule
        weight = sample.weight.to(theta.device, theta.dtype) if sample is not None else 1.0
        starts: list[tuple[int, Tensor, Any]] = []  # (first step, θ, hidden) of each group
        total = theta.new_zeros((), dtype=torch.float64)
        theta, tape = theta.detach(), []
        for k0 in range(0, self.unroll, g):
            starts.append((k0, theta, hidden))
            tape = []  # drop the previous group's tape before building this one (one tape at a time)
            tape, theta, hidden, part = self._forward(chunk, resets, k0, min(self.unroll, k0 + g), theta, hidden,
                                                      dyn=dyn)
            total += part
        # ∂M/∂θ_U: the next unroll's losses are not this meta-loss's
        a, theta_out = torch.zeros_like(_take(theta, dyn)), _take(theta, dyn)
        w, w_ewc = self.segment / n_tok, self.ewc_lambda * self.segment * chunk.size(0) / n_tok
        for i in reversed(range(len(starts))):
            if i < len(starts) - 1:  # rebuild this group's tape (the last group's is the forward pass's)
                k0, th, h = starts[i]
                tape = []
                tape = self._forward(chunk, resets, k0, min(self.unroll, k0 + g), th, h, totals=False, dyn=dyn)[0]
            a, theta_out = self._reverse(tape, a, theta_out, w * weight, w_ewc * weight if w_ewc else 0.0, rule)
        _all_reduce_grads(self.params)
        return (total / n_tok).to(theta.dtype), theta, hidden, n_tok

    def _forward(self, chunk: Tensor, resets: Tensor | None, k0: int, k1: int, theta: Tensor, hidden: Any,
                 totals: bool = True, dyn: DynamicWeights | None = None) -> tuple[list[Step], Tensor, Any, Tensor]:
        """Steps k0..k1-1 as dynamic evaluation, keeping what each gate read: (tape, θ, hidden, summed loss + EWC).
        `totals=False` (a group's tape rebuilt in the reverse pass): the sum is already known, skip its EWC terms.
        `dyn`: a restriction of self.dyn (sampled coordinates): the tape keeps those coordinates only."""
        dyn = dyn if dyn is not None else self.dyn
        m, tape = self.segment, []
        total = theta.new_zeros((), dtype=torch.float64)
        for k in range(k0, k1):
            x, y = chunk[:, k * m : (k + 1) * m], chunk[:, k * m + 1 : (k + 1) * m + 1]
            reset = None if resets is None else resets[:, k].to(theta.device)
            before = None
            if reset is not None and bool(reset.any()):  # θ ← θ_0 for these streams (the EWC term read θ before)
                before = theta
                theta = self.dyn.theta0.clone() if theta.dim() == 1 else torch.where(reset[:, None], self.dyn.theta0,
                                                                                     theta)
            th = theta.detach().requires_grad_(True)
            with torch.enable_grad():
                losses, hidden = score(self.lm, self.dyn.spec, th, x, y, hidden)
                per_stream = losses.mean(1)
                (grad,) = torch.autograd.grad(per_stream.sum(), th)
            hidden = self.lm.detach_state(hidden)
            feat = per_stream.detach() if theta.dim() == 2 else per_stream.detach().mean()
            # a sample's gates read the drift of the whole θ_in (one more read of θ, with the drift feature only)
            gates = self.rule.gates if dyn is not self.dyn else None
            drift = gates.drift_feature(theta, self.dyn) if gates is not None and "drift" in gates.features else None
            tape.append(Step(_take(theta, dyn), _take(grad, dyn), feat, reset, _take(before, dyn), drift))
            with torch.no_grad():  # the evaluation update, in place on a copy (the tape keeps θ_in)
                theta = self.rule.update_(theta.clone(), grad, feat)
                total += losses.detach().sum().double()
                if self.ewc_lambda and totals:
                    total += float(self.dyn.ewc_penalty(theta, self.ewc_lambda)) * y.numel()
        return tape, theta, hidden, total

    def _reverse(self, tape: list[Step], a: Tensor, theta_out: Tensor, w: float | Tensor, w_ewc: float | Tensor,
                 rule: GateRule | Rule) -> tuple[Tensor, Tensor]:
        """a (∂M/∂θ after the tape's last step, whose output is theta_out) backward through the tape's gates:
        φ.grad += Σ_t a_tᵀ ∂θ_t/∂φ. Returns a and θ before the tape's first step. w: the weight of a segment's mean
        loss in the meta-loss (a stream's tokens in it over the unroll's); w_ewc: that of an EWC term's gradient
        λF(θ − θ_0); both times each coordinate's inverse probability of being sampled ([S]) when `rule` reads a
        sample of the coordinates (its dyn, whose θ_0 and F these are)."""
        dyn = rule.dyn if isinstance(rule, GateRule) else self.dyn
        for step in reversed(tape):
            if isinstance(w_ewc, Tensor) or w_ewc:  # the EWC term of θ_out (this step's output) is in the meta-loss
                a = a + w_ewc * dyn.fisher * (theta_out - dyn.theta0)
            th = step.theta.detach().requires_grad_(True)
            if dyn.parent is not None:
                dyn.drift = step.drift
            with torch.enable_grad():
                torch.autograd.backward(rule.update(th, step.grad, step.feat), a)
            a = th.grad + w * step.grad  # ∂M/∂θ_in: through the gate, and through L_t directly
            if step.reset is not None:  # θ_in was θ_0 for these streams, not the previous output: nothing flows on
                a = a * (~step.reset[:, None]).to(a.dtype) if a.dim() == 2 else a * float(not bool(step.reset.any()))
            theta_out = step.theta if step.before is None else step.before
        return a, theta_out


@dataclass
class Step:
    """What FastFirstOrder keeps of one inner step: θ_in (after any reset), ∇L_t, the loss feature, the reset mask,
    and θ before the reset (only when there was one)."""

    theta: Tensor
    grad: Tensor
    feat: Tensor
    reset: Tensor | None
    before: Tensor | None
    drift: Tensor | None = None  # the drift feature of the whole θ_in, when the tape keeps a sample of it


def _take(t: Tensor | None, dyn: DynamicWeights) -> Tensor | None:
    """The coordinates of θ-like `t` ([P] or [B, P]) that `dyn` holds: all, or a restriction's sample."""
    return t if t is None or dyn.index is None else t.index_select(-1, dyn.index)


def _rank_generator() -> torch.Generator:
    """A generator seeded from the global RNG (so a resumed run draws what the killed one would have) plus the DDP
    rank: each process samples other coordinates, and their mean gradient averages independent estimates."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return torch.Generator().manual_seed(int(torch.randint(2**62, ())) + rank)


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Under DDP, the mean of φ's gradients over the ranks (the autograd path gets it from DDP's hooks)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
