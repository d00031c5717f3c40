"""Gate parametrizations (`gate.param`): how the meta-learner's outputs o = (o_f, o_i, o_z) per coordinate become
the gates (f, i, z) of θ_t = f⊙θ_{t-1} + i⊙∇L_t + z⊙θ_0. One small class per form:

  paper     (`gate=paper`) the paper's plain gates: f = σ(o_f), i = −η·softplus(o_i)/ln 2, z = σ(o_z); the last
            layer starts near zero with biases (+b, 0, −b): f ≈ 1, z ≈ 0 (COPY, f + z = 1 exactly) and i ≈ −η.
  krause    (`gate=krause_init`) a residual around Krause et al. 2017's RMS rule: with his step a = −η/(RMS+ε) and
            decay d, i = a·m(o_i), f = 1 − D(o_f), z = D(o_z), D(o) = clamp((d + d₀)·m(o) − d₀, 0, 1), where
            m(o) = e^{soft_clamp(o)} and d₀ = `lamb0`·(his decay rate) keeps the decay learnable when the tuned λ
            is 0 (then d = 0 and a purely multiplicative correction could never grow it). The last layer starts
            at zero, so o = 0 and the rule IS Krause's until training moves it. `rms_scale=False`: a = −η for every
            coordinate (the rule starts as plain SGD).
  rational  (`gate=krause_fast`) the krause form with m(o) = r(clamp(o)), r(o) = 1 + o for o ≥ 0 and 1/(1 − o)
            below (positive, r(0) = 1, r'(0) = 1 like e^o): with the gnorm/dnorm features the whole update is
            multiply-adds and a few divisions, no exp/log, so its compiled pass is bound by memory traffic rather
            than arithmetic (bench/bench_gate.py).
`flush=False` (meta_noflush): z ≡ 0; the krause forms then keep f = 1 + λ·o_f (no decay at init).
The krause forms' η and λ are numbers (Krause's rule) or {group: value} (rms_pt's per-group rule, groups as
`tensor_group` names them): the form then starts exactly at that rule, its a and d formed once per coordinate.

A form reads per-coordinate constants from `context(dyn)` (computed once per DynamicWeights) and has no
parameters of its own: φ is the network's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynlm_pl.errors import require
from dynlm_pl.meta.rules import group_vector, krause_coefficients, krause_rate

Gates = tuple[Tensor, Tensor, Tensor | None]
Value = float | dict[str, float]  # one value, or one per group of tensors (rms_pt)


def per_coordinate(value: Value, dyn: Any) -> float | Tensor:
    """A krause form's η or λ as `krause_coefficients` reads it: the number, or [P] from {group: value} as rms_pt
    lays it out (`group_vector`: the form at init IS that rule, to the bit)."""
    return group_vector(value, dyn) if isinstance(value, dict) else float(value)


def soft_clamp(x: Tensor, c: float) -> Tensor:
    """c·tanh(x/c): identity near 0 (exactly 0 at 0), bounded by ±c.

    Written as c·(2σ(2x/c) − 1), the same function: a vectorized tanh costs several exps on a CPU (Sleef), and the
    fused gate pass, which takes three of them per coordinate, is compute-bound (bench/bench_gate.py). σ(0) = 1/2
    exactly, so 0 still maps to 0; the error elsewhere is an ulp of 1/2 (3e-8·c absolute), and the gradient
    4σ(1 − σ) is as stable as tanh's.
    """
    return c * (2.0 * torch.sigmoid(x * (2.0 / c)) - 1.0) if c > 0 else x


def rational_exp(x: Tensor, c: float) -> Tensor:
    """r(clamp(x, ±c)), r(x) = 1 + x (x ≥ 0) or 1/(1 + |x|) (x < 0): a positive stand-in for e^x that agrees
    with it to first order at 0 and costs one division. The unused branch of `where` stays finite (1 + |x| ≥ 1),
    so its zero gradient is not 0·inf."""
    x = x.clamp(-c, c) if c > 0 else x
    return torch.where(x >= 0, 1.0 + x, 1.0 / (1.0 + x.abs()))


class PaperGates:
    """The paper's gates, starting near COPY with a small descent step −η."""

    needs_ms = False

    def __init__(self, lr: float | None = 1e-3, flush: bool = True, gate_bias: float = 10.0, init_scale: float = 1e-3,
                 **_: Any) -> None:
        require(lr is not None, "gate=paper has no step (gate.lr=null): the meta stage sets it to the tuned sgd "
                "step; elsewhere set gate.lr")
        self.lr, self.flush, self.gate_bias, self.init_scale = float(lr), flush, gate_bias, init_scale

    def init_output(self, out: nn.Linear) -> None:
        """f = σ(b), z = σ(−b), i = −η, with the weights scaled down: the output starts (almost) constant."""
        out.weight.mul_(self.init_scale)
        out.bias.copy_(torch.tensor([self.gate_bias, 0.0, -self.gate_bias]))

    def context(self, dyn: Any, features: tuple[str, ...]) -> dict[str, Tensor]:
        return {}

    def gates(self, o_f: Tensor, o_i: Tensor, o_z: Tensor, ctx: dict[str, Tensor]) -> Gates:
        f = torch.sigmoid(o_f)
        i = -self.lr * F.softplus(o_i) / math.log(2.0)
        return f, i, torch.sigmoid(o_z) if self.flush else None


class KrauseGates:
    """Multiplicative corrections e^{soft_clamp(o)} of Krause's step and decay; exactly his rule at init."""

    needs_ms = True

    def __init__(self, lr: Value = 5e-5, flush: bool = True, lamb: Value = 0.002, eps: float = 2e-5,
                 lamb0: float = 1e-3, rms_scale: bool = True, clamp: float = 5.0, **_: Any) -> None:
        self.lr, self.flush, self.lamb, self.eps = lr, flush, lamb, eps
        self.lamb0, self.rms_scale, self.clamp = lamb0, rms_scale, clamp
        # per group (rms_pt): a, d and the no-FLUSH λ are per-coordinate tensors of the context
        self.grouped = isinstance(lr, dict) or isinstance(lamb, dict)
        self.no_decay = not any(lamb.values() if isinstance(lamb, dict) else [lamb])  # λ = 0 everywhere

    def init_output(self, out: nn.Linear) -> None:
        out.weight.zero_()
        out.bias.zero_()

    def context(self, dyn: Any, features: tuple[str, ...]) -> dict[str, Tensor]:
        """a, d and d₀ per coordinate [P] (and 1/(RMS+ε) for the gnorm feature)."""
        rms, _ = krause_rate(dyn.ms, dyn.spec)
        ctx = {"inv": 1.0 / (rms + self.eps)} if "gnorm" in features else {}
        lr, lamb = per_coordinate(self.lr, dyn), per_coordinate(self.lamb, dyn)
        ctx["a"], ctx["d"] = krause_coefficients(dyn.ms, dyn.spec, lr, lamb, self.eps)
        if not self.rms_scale:  # start from plain SGD (−η for every coordinate) when that rule tuned best
            ctx["a"] = -lr if isinstance(lr, Tensor) else torch.full_like(ctx["a"], -lr)
        if isinstance(lamb, Tensor) and not self.flush and not self.no_decay:
            ctx["lamb"] = lamb  # the no-FLUSH COPY gate f = 1 + λ·o_f, per coordinate
        # d₀ = lamb0 · rate: the same per-coordinate shape as Krause's decay, at a small fixed scale
        ctx["d0"] = krause_coefficients(dyn.ms, dyn.spec, lr, self.lamb0, self.eps)[1]
        return ctx

    def coefficients(self, ctx: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Krause's step a, decay d and the decay floor d₀, per coordinate."""
        return ctx["a"], ctx["d"], ctx["d0"]

    def correction(self, o: Tensor) -> Tensor:
        """m(o): the positive factor around Krause's coefficients, 1 at o = 0."""
        return torch.exp(soft_clamp(o, self.clamp))

    def gates(self, o_f: Tensor, o_i: Tensor, o_z: Tensor, ctx: dict[str, Tensor]) -> Gates:
        a, d, d0 = self.coefficients(ctx)
        i = a * self.correction(o_i)
        if not self.flush:
            # λ = 0 (what tuning picks on WikiText-2): f ≡ 1 exactly, and saying so lets the compiled pass drop
            # o_f's row of the network
            if self.no_decay:
                return torch.ones_like(o_f), i, None
            return 1.0 + ctx.get("lamb", self.lamb) * self.bounded(o_f), i, None
        # clamp passes gradient at its bounds (inclusive mask): D stays learnable at 0
        f = 1.0 - torch.addcmul(-d0, d + d0, self.correction(o_f)).clamp(0.0, 1.0)
        z = torch.addcmul(-d0, d + d0, self.correction(o_z)).clamp(0.0, 1.0)
        return f, i, z

    def bounded(self, o: Tensor) -> Tensor:
        """o as the correction bounds it (the no-FLUSH COPY gate f = 1 + λ·o reads it directly)."""
        return soft_clamp(o, self.clamp)


class RationalGates(KrauseGates):
    """The krause form without transcendentals: m(o) = r(clamp(o)); a, d, d₀ formed in the pass from 1/(RMS+ε)
    and Krause's decay rate, two per-coordinate streams instead of three (the pass is bound by memory traffic); the
    constant tensors (λ = 0, no rms_scale) are folded into the compiled pass, not read."""

    def context(self, dyn: Any, features: tuple[str, ...]) -> dict[str, Tensor]:
        if self.grouped:  # per-group η, λ: a, d, d₀ read per coordinate, as the krause form does
            return super().context(dyn, features)
        rms, rate = krause_rate(dyn.ms, dyn.spec)
        return {"inv": 1.0 / (rms + self.eps), "rate": rate}

    def coefficients(self, ctx: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        if self.grouped:
            return super().coefficients(ctx)
        rate = ctx["rate"]
        a = -self.lr * ctx["inv"] if self.rms_scale else torch.full_like(rate, -self.lr)
        d, d0 = ((lam * rate.clamp(max=1.0 / lam) if lam > 0 else torch.zeros_like(rate))
                 for lam in (self.lamb, self.lamb0))
        return a, d, d0

    def correction(self, o: Tensor) -> Tensor:
        return rational_exp(o, self.clamp)

    def bounded(self, o: Tensor) -> Tensor:
        return o.clamp(-self.clamp, self.clamp) if self.clamp > 0 else o


FORMS: dict[str, type[PaperGates] | type[KrauseGates]] = {"paper": PaperGates, "krause": KrauseGates,
                                                          "rational": RationalGates}
