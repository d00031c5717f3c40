"""Update rules: θ_t from θ_{t-1}, ∇L_t and L_t. One small class per rule behind one interface:

    rule.update(θ, ∇L, L) -> θ_t        differentiable (meta-training)
    rule.update_(θ, ∇L, L) -> θ_t       in place when possible (evaluation, under no_grad)

θ and ∇L are flat: [P], or [B, P] for B streams each with its own weights; L is a scalar or [B]. Every rule is an
instance of θ_t = f⊙θ_{t-1} + i⊙∇L_t + z⊙θ_0 (`gated_update`): SGD (f = 1, i = −η, z = 0), Krause et al. 2017's
RMS rule (f = 1 − d, i = −η/(RMS+ε), z = d) and the learned gates of the meta-learner (`GateRule`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dynlm_pl.errors import require
from dynlm_pl.meta.weights import DynamicSpec, DynamicWeights, trust_region, trust_region_


def gated_update(theta: Tensor, grad: Tensor, theta0: Tensor, f: Tensor, i: Tensor, z: Tensor | None) -> Tensor:
    """θ_t = f⊙θ_{t-1} + i⊙∇L_t + z⊙θ_0 (COPY, UPDATE, FLUSH; z None: no FLUSH), out of place and differentiable.

    The one statement of the update; the meta-learner's chunked and compiled passes call it on slices of θ."""
    new = torch.addcmul(f * theta, i, grad)
    return new if z is None else new.addcmul(z, theta0)


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


def krause_coefficients(ms: Tensor, spec: DynamicSpec, lr: float | Tensor, lamb: float | Tensor,
                        eps: float) -> tuple[Tensor, Tensor]:
    """Krause et al. 2017 (dynamiceval.py), per coordinate [P]: step a = −η/(RMS+ε) and decay d.

    RMS = sqrt(MS); his decay rate is RMS / (mean over tensors of mean(RMS)), clipped at 1/λ so that
    d = λ·rate ≤ 1 (a decay never overshoots θ_0). Means are per tensor, then over the tensors.
    η and λ are numbers (his rule) or [P] vectors (rms_pt: one value per group of tensors).
    """
    rms, rate = krause_rate(ms, spec)
    if isinstance(lamb, Tensor):
        d = (lamb * rate).clamp(max=1.0)  # = λ·min(rate, 1/λ), and 0 where λ = 0
    else:
        d = (lamb * rate.clamp(max=1.0 / lamb)) if lamb > 0 else torch.zeros_like(rms)
    return -lr / (rms + eps), d


class RMSRule(Rule):
    """Krause's RMS-scaled SGD with decay toward θ_0: θ ← θ − η∇/(RMS+ε) + d⊙(θ_0 − θ).

    Written as θ ← (1 − d)⊙θ + a⊙∇ + d⊙θ_0 with a, 1 − d and d⊙θ_0 precomputed, so one update is two
    passes over P floats (addcmul into θ, then addcmul of the gradient) instead of five ops. The decay pass runs
    only over the span of coordinates whose d > 0: none with λ = 0 (what tuning picks on WikiText-2), one group's
    tensors for an rms_pt rule that decays one group — the same numbers, half the memory traffic or less.
    """

    def __init__(self, dyn: DynamicWeights, lr: float | Tensor, lamb: float | Tensor, eps: float) -> None:
        require(dyn.ms is not None, "the rms rule needs gradient statistics (ms) from fisher.pt; "
                "run `python train.py stage=fisher` first")
        self.a, self.d = krause_coefficients(dyn.ms, dyn.spec, lr, lamb, eps)
        self.keep = 1.0 - self.d  # f = 1 − d
        self.pull = self.d * dyn.theta0  # z⊙θ_0, constant
        decays = torch.nonzero(self.d > 0).flatten()
        self.span = (int(decays[0]), int(decays[-1]) + 1) if decays.numel() else (0, 0)  # [lo, hi): where d > 0

    def update(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        return torch.addcmul(self.pull, theta, self.keep).addcmul(self.a, grad)

    def update_(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        lo, hi = self.span
        if hi > lo:
            th = theta[..., lo:hi]
            torch.addcmul(self.pull[lo:hi], th, self.keep[lo:hi], out=th)  # elementwise: out may alias an input
        return theta.addcmul_(self.a, grad)


class TrustRegion(Rule):
    """`rule`, then θ_t − θ_0 scaled back onto the ball of radius max_drift·‖θ_0‖ when it leaves it (per stream):
    eval.max_drift. Off by default (no hand-designed rule has it); when on, meta-training backpropagates through the
    projection and tuning, selection and evaluation apply it in place (`adaptive_eval`), the same map."""

    def __init__(self, rule: Rule, dyn: DynamicWeights, max_drift: float) -> None:
        self.rule, self.theta0 = rule, dyn.theta0
        self.radius = float(max_drift) * float(dyn.theta0.norm())

    def update(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        return trust_region(self.rule.update(theta, grad, loss), self.theta0, self.radius)

    def update_(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        self.rule.update_(theta, grad, loss)
        trust_region_(theta, self.theta0, self.radius)
        return theta


def with_trust_region(rule: Rule, dyn: DynamicWeights, max_drift: float | None) -> Rule:
    return rule if max_drift is None else TrustRegion(rule, dyn, max_drift)


class GateRule(Rule):
    """θ_t = f⊙θ_{t-1} + i⊙∇L_t + z⊙θ_0 with (f, i, z) from a gate module (the meta-learner).

    `gates(theta, grad, loss, dyn) -> (f, i, z)`, each broadcastable to θ; z may be None (no FLUSH).
    """

    def __init__(self, gates: nn.Module, dyn: DynamicWeights) -> None:
        self.gates, self.dyn = gates, dyn

    def update(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        # float32 even under autocast (trainer.precision=bf16-mixed): bf16 gates round f = σ(10) to exactly 1
        # and i to 3 digits, changing the flat θ update itself by a sizeable fraction of one step.
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
        return gated_update(theta, grad, self.dyn.theta0, f, i, z)


class RecordingGateRule(GateRule):
    """GateRule that also keeps, every `every` segments, the mean f, i, z of each dynamic tensor [n_tensors].

    Why not every segment: under eval.fused_gate the sums cost ~30% of the update (`MetaLearner.fused_apply_`);
    the gate plot needs far fewer points than there are segments (thousands per split).
    """

    def __init__(self, gates: torch.nn.Module, dyn: DynamicWeights, every: int = 10) -> None:
        super().__init__(gates, dyn)
        self.every, self.n = every, 0
        self.history: list[Tensor] = []  # each [3, n_tensors]

    def update(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        f, i, z = self.gates(theta, grad, loss, self.dyn)
        sizes = self.dyn.spec.sizes
        z_ = torch.zeros_like(theta) if z is None else z

        def per_tensor(g: Tensor) -> Tensor:
            return torch.stack([t.mean() for t in g.expand_as(theta).split(sizes, dim=-1)])

        self.history.append(torch.stack([per_tensor(f), per_tensor(i), per_tensor(z_)]).cpu())
        return self.combine(theta, grad, f, i, z)

    def update_(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        # the in-place update returns these very means (segments 0, every, 2·every, ...)
        means = self.apply_(theta, grad, loss, stats=self.n % self.every == 0)
        self.n += 1
        if means is not None:
            self.history.append(means.cpu())
        return theta


def group_values(hparams: dict[str, Any], key: str) -> dict[str, float]:
    """{group: value} of rms_pt's per-group hyperparameters `<key>@<group>` (e.g. `lr@rnns.0`)."""
    return {k.split("@", 1)[1]: float(v) for k, v in hparams.items() if k.startswith(key + "@")}


def group_vector(values: dict[str, float], dyn: DynamicWeights) -> Tensor:
    """[P]: each coordinate the value of its tensor's group (rms_pt's per-group η or λ), in the dtype of the RMS
    statistics (of θ_0 without them)."""
    return dyn.spec.per_group({g: float(v) for g, v in values.items()}, dyn.theta0 if dyn.ms is None else dyn.ms)


def build_rule(method: str, hparams: dict[str, Any], dyn: DynamicWeights) -> Rule:
    """A hand-designed rule from its hyperparameters (as tuned.json stores them): static, sgd {lr},
    rms {lr, lamb, eps} or rms_pt {eps, lr@<group>, lamb@<group> for each `tensor_group`}."""
    if method == "static":
        return StaticRule()
    if method == "sgd":
        return SGDRule(float(hparams["lr"]))
    if method == "rms_pt":
        return RMSRule(dyn, group_vector(group_values(hparams, "lr"), dyn),
                       group_vector(group_values(hparams, "lamb"), dyn), float(hparams["eps"]))
    require(method == "rms", f"no hand-designed rule {method!r}; use static, sgd, rms or rms_pt")
    return RMSRule(dyn, float(hparams["lr"]), float(hparams["lamb"]), float(hparams["eps"]))
