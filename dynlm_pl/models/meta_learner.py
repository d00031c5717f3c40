"""The meta-learner g_φ of Wolf et al. 2018 (section 2.1): a coordinate-sharing feed-forward net.

The same small MLP reads a feature vector for every coordinate of the dynamic weights and emits
three gates per coordinate, used as θ_t = f⊙θ_{t-1} + i⊙∇L_t + z⊙θ_0 (COPY, UPDATE, FLUSH; see
`dynlm_pl.dynamic.GateRule`). Everything is flat: θ is [P] (or [B, P] for B streams), features are
[..., P, k], the MLP runs as two or three matmuls over all P coordinates at once.

Features per coordinate (`features`, in this order):
  theta   θ_{t-1}                                        1
  delta   θ_{t-1} − θ_0, log-magnitude/sign preprocessed  2
  grad    ∇L_t, log-magnitude/sign (Andrychowicz 2016)   2
  loss    L_t (mean token loss of the segment) / 10      1
  fisher  log diag F / 10 (needs fisher.pt)              1
  rms     log RMS / 10, RMS = sqrt(ms) (needs fisher.pt) 1
plus, with `embed_dim > 0`, a learned embedding of the parameter tensor the coordinate belongs to
(enters as a per-tensor bias of the first layer: no [P, embed_dim] tensor is built).

Gate parametrizations (`param`):
  paper   plain MLP, f = σ(o_f), i = −η·softplus(o_i)/ln 2, z = σ(o_z); the last layer starts near
          zero with biases (+b, 0, −b): f ≈ 1, z ≈ 0 (COPY, f + z = 1 exactly) and i ≈ −η.
  krause  residual around Krause et al. 2017's RMS rule: with a = −η/(RMS+ε) and his decay d,
          i = a·e^{o_i}, f = 1 − min(d·e^{o_f}, 1), z = min(d·e^{o_z}, 1). The last layer is zero at
          init, so o = 0 and the rule IS Krause's update until training moves it. Corrections o are
          soft-clamped to ±`clamp` (a factor e^±clamp around his coefficients).
`flush=False` (meta_noflush): z ≡ 0; the krause form then keeps f = 1 + λ·o_f (no decay at init).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_WIDTH = {"theta": 1, "delta": 2, "grad": 2, "loss": 1, "fisher": 1, "rms": 1}
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def log_sign(x: Tensor, p: float = 10.0) -> tuple[Tensor, Tensor]:
    """Andrychowicz et al. 2016, appendix A: (log|x|/p, sign x) if |x| ≥ e^−p, else (−1, e^p·x).

    The log is taken of |x| clamped at e^−p so that the unused branch of `where` is finite and its
    gradient zero (second-order mode differentiates through this).
    """
    small = x.abs() < math.exp(-p)
    mag = torch.where(small, torch.full_like(x, -1.0), torch.log(x.abs().clamp_min(math.exp(-p))) / p)
    sgn = torch.where(small, x * math.exp(p), torch.sign(x))
    return mag, sgn


def soft_clamp(x: Tensor, c: float) -> Tensor:
    """c·tanh(x/c): identity near 0 (exactly 0 at 0), bounded by ±c."""
    return c * torch.tanh(x / c) if c > 0 else x


class MetaLearner(nn.Module):
    """g_φ: per-coordinate features -> gates (f, i, z). Call as `gates(θ, ∇L, L, dyn)`."""

    def __init__(self, n_tensors: int, hidden: Sequence[int] = (16,), activation: str = "tanh",
                 features: Sequence[str] = ("theta", "delta", "grad", "loss"), param: str = "paper",
                 flush: bool = True, embed_dim: int = 0, lr: float = 1e-3, lamb: float = 0.002, eps: float = 2e-5,
                 gate_bias: float = 10.0, init_scale: float = 1e-3, clamp: float = 5.0) -> None:
        super().__init__()
        unknown = [f for f in features if f not in FEATURE_WIDTH]
        if unknown or param not in ("paper", "krause") or activation not in ACTIVATIONS or not hidden:
            raise ValueError(f"bad meta-learner config: features {unknown} unknown (use {list(FEATURE_WIDTH)}), "
                             f"param={param!r} (paper|krause), activation={activation!r} ({list(ACTIVATIONS)}), "
                             f"hidden={list(hidden)} (at least one layer)")
        self.features, self.param, self.flush = tuple(features), param, flush
        self.lr, self.lamb, self.eps, self.clamp = lr, lamb, eps, clamp
        width = sum(FEATURE_WIDTH[f] for f in features)
        sizes = [width, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.act = ACTIVATIONS[activation]()
        self.out = nn.Linear(sizes[-1], 3)  # (o_f, o_i, o_z)
        self.embed = nn.Embedding(n_tensors, embed_dim) if embed_dim > 0 else None
        self.embed_proj = nn.Linear(embed_dim, hidden[0], bias=False) if self.embed is not None else None
        with torch.no_grad():
            if param == "krause":  # exactly Krause's rule at init
                self.out.weight.zero_()
                self.out.bias.zero_()
            else:  # near COPY: f = σ(b), z = σ(−b), i = −η
                self.out.weight.mul_(init_scale)
                self.out.bias.copy_(torch.tensor([gate_bias, 0.0, -gate_bias]))
            if self.embed is not None:
                self.embed.weight.normal_(0, 0.1)
        self._ctx: tuple[int, dict[str, Tensor]] | None = None
        self.last_gates: dict[str, Tensor] = {}

    # -- constants per coordinate, computed once per DynamicWeights ---------------------------------
    def _context(self, dyn: Any) -> dict[str, Tensor]:
        if self._ctx is not None and self._ctx[0] == id(dyn):
            return self._ctx[1]
        from dynlm_pl.dynamic import krause_coefficients  # dynamic imports models: avoid a cycle

        ctx: dict[str, Tensor] = {}
        need = {"fisher": dyn.fisher, "rms": dyn.ms}
        for f in ("fisher", "rms"):
            if f in self.features:
                if need[f] is None:
                    raise ValueError(f"meta-learner feature {f!r} needs fisher.pt (run `python train.py "
                                     "stage=fisher`), or drop it from gate.features")
                v = dyn.fisher if f == "fisher" else dyn.ms.clamp_min(0).sqrt()
                ctx[f] = torch.log(v.clamp_min(1e-20)) / 10.0
        if self.param == "krause":
            if dyn.ms is None:
                raise ValueError("gate=krause_init needs Krause's gradient statistics (ms) from fisher.pt: "
                                 "run `python train.py stage=fisher` first")
            ctx["a"], ctx["d"] = krause_coefficients(dyn.ms, dyn.spec, self.lr, self.lamb, self.eps)
        self._ctx = (id(dyn), ctx)
        return ctx

    def features_of(self, theta: Tensor, grad: Tensor, loss: Tensor, dyn: Any, ctx: dict[str, Tensor]) -> Tensor:
        """[..., P, k] per-coordinate inputs; `loss` is a scalar or [B] (one per stream)."""
        cols: list[Tensor] = []
        for f in self.features:
            if f == "theta":
                cols.append(theta)
            elif f == "delta":
                cols.extend(log_sign(theta - dyn.theta0))
            elif f == "grad":
                cols.extend(log_sign(grad))
            elif f == "loss":
                cols.append((loss.reshape(*loss.shape, *([1] * (theta.dim() - loss.dim()))) / 10.0).expand_as(theta))
            else:
                cols.append(ctx[f].expand_as(theta))
        return torch.stack(cols, dim=-1)

    def mlp(self, x: Tensor, bias1: Tensor) -> Tensor:
        """[..., n, k] -> [..., n, 3], the first layer with bias `bias1` [H]."""
        h = self.act(F.linear(x, self.layers[0].weight, bias1))
        for layer in self.layers[1:]:
            h = self.act(layer(h))
        return self.out(h)

    def forward(self, theta: Tensor, grad: Tensor, loss: Tensor, dyn: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        ctx = self._context(dyn)
        x = self.features_of(theta, grad, loss, dyn, ctx)  # [..., P, k]
        if self.embed is None:
            o = self.mlp(x, self.layers[0].bias)
        else:  # the tensor embedding is a per-tensor bias of layer 1: run the MLP tensor by tensor
            bias = self.layers[0].bias + self.embed_proj(self.embed.weight)  # [n_tensors, H]
            o = torch.cat([self.mlp(xk, bias[k]) for k, xk in enumerate(x.split(dyn.spec.sizes, dim=-2))], dim=-2)
        o_f, o_i, o_z = o.unbind(-1)  # each [..., P]
        if self.param == "paper":
            f = torch.sigmoid(o_f)
            i = -self.lr * F.softplus(o_i) / math.log(2.0)
            z = torch.sigmoid(o_z) if self.flush else None
        else:
            o_f, o_i, o_z = (soft_clamp(o, self.clamp) for o in (o_f, o_i, o_z))
            a, d = ctx["a"], ctx["d"]
            i = a * torch.exp(o_i)
            if self.flush:
                f = 1.0 - (d * torch.exp(o_f)).clamp(max=1.0)
                z = (d * torch.exp(o_z)).clamp(max=1.0)
            else:
                f, z = 1.0 + self.lamb * o_f, None
        self.last_gates = {"f": f.detach().mean(), "i": i.detach().mean(),
                           "z": z.detach().mean() if z is not None else torch.zeros(())}
        return f, i, z


def build_meta_learner(gate_cfg: dict[str, Any], n_tensors: int, flush: bool | None = None) -> MetaLearner:
    """From the `gate` config group (conf/gate/*.yaml); `flush` overrides gate.flush when given."""
    kw = {k: v for k, v in gate_cfg.items() if k not in ("name",) and not k.startswith("_")}
    if flush is not None:
        kw["flush"] = flush
    return MetaLearner(n_tensors, **kw)
