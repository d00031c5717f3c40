"""The meta-learner g_φ of Wolf et al. 2018 (section 2.1): a coordinate-sharing feed-forward net.

The same small MLP reads a feature vector for every coordinate of the dynamic weights and emits
three gates per coordinate, used as θ_t = f⊙θ_{t-1} + i⊙∇L_t + z⊙θ_0 (COPY, UPDATE, FLUSH; see
`dynlm_pl.meta.rules.GateRule`). Everything is flat: θ is [P] (or [B, P] for B streams), features are
[..., P, k], the MLP runs as two or three matmuls over all P coordinates at once.

Features per coordinate (`features`, in this order):
  theta   θ_{t-1}                                        1
  delta   θ_{t-1} − θ_0, log-magnitude/sign preprocessed  2
  grad    ∇L_t, log-magnitude/sign (Andrychowicz 2016)   2
  loss    L_t (mean token loss of the segment) / 10      1
  fisher  log diag F / 10 (needs fisher.pt)              1
  rms     log RMS / 10, RMS = sqrt(ms) (needs fisher.pt) 1
  gnorm   softsign(∇L_t / (RMS+ε)): the gradient in units of its training-set RMS    1
  dnorm   softsign((θ_{t-1} − θ_0) / (10·|a|)): the drift in units of 10 of Krause's steps a   1
          (gnorm/dnorm: scale-free like log_sign but transcendental-free; param krause|rational only)
  drift   log(‖θ_{t-1} − θ_0‖ / ‖θ_0‖ + 1e-6) / 10, one per stream: how far the weights have wandered in all  1
          (with `loss`, what a FLUSH can react to at a topic change; a constant of the meta-gradient, like L_t)
plus, with `embed_dim > 0`, a learned embedding of the parameter tensor the coordinate belongs to
(enters as a per-tensor bias of the first layer: no [P, embed_dim] tensor is built).

`hidden: []` makes g_φ linear in the features (o = W·x + b_tensor): a few multiply-adds per coordinate,
so an update costs about what Krause's rule costs, and the rule it learns is his with per-tensor and
feature-dependent corrections of the step and the decay. A hidden layer of H units costs ~H·(k+3)
multiply-adds per coordinate more (k features).

Gate parametrizations (`param`: paper, krause, rational) are the classes of `meta/gates.py`.

`per_coordinate` (gate=meta_sgd, Meta-SGD's per-coordinate learning rates, Li et al. 2017): two learned offsets per
coordinate, zero at init, added to the network's outputs: c_i to o_i (a log-step: the step is a·m(o_i + c_i)) and
c_d to o_f and o_z (a log-decay). The rule starts exactly at Krause's; `pull` decays the offsets toward zero after
each optimizer step (c ← (1 − lr·pull)·c), so a coordinate keeps a correction only while the meta-gradient holds it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynlm_pl.errors import require
from dynlm_pl.meta.gates import FORMS, Value
from dynlm_pl.meta.rules import gated_update
from dynlm_pl.meta.weights import drift_norm, offsets

FEATURE_WIDTH = {"theta": 1, "delta": 2, "grad": 2, "loss": 1, "fisher": 1, "rms": 1, "gnorm": 1, "dnorm": 1,
                 "drift": 1}
SCALARS = ("drift",)  # per-stream inputs (a scalar, or [B]): never sliced with the coordinates
KRAUSE_FORMS = tuple(k for k, form in FORMS.items() if form.needs_ms)  # residuals around Krause's rule
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


def softsign(x: Tensor) -> Tensor:
    """x / (1 + |x|): bounded by ±1, slope 1 at 0, one division."""
    return x / (1.0 + x.abs())


class MetaLearner(nn.Module):
    """g_φ: per-coordinate features -> gates (f, i, z). Call as `gates(θ, ∇L, L, dyn)`."""

    def __init__(self, n_tensors: int, hidden: Sequence[int] = (16,), activation: str = "tanh",
                 features: Sequence[str] = ("theta", "delta", "grad", "loss"), param: str = "paper",
                 flush: bool = True, embed_dim: int = 0, lr: Value = 1e-3, lamb: Value = 0.002, eps: float = 2e-5,
                 lamb0: float = 1e-3, rms_scale: bool = True, gate_bias: float = 10.0, init_scale: float = 1e-3,
                 clamp: float = 5.0, per_coordinate: bool = False, pull: float = 0.0, n_coords: int = 0) -> None:
        super().__init__()
        unknown = [f for f in features if f not in FEATURE_WIDTH]
        needs_krause = [f for f in features if f in ("gnorm", "dnorm")] if param not in KRAUSE_FORMS else []
        if unknown or needs_krause or param not in ("paper", *KRAUSE_FORMS) or activation not in ACTIVATIONS or \
                any(int(h) < 1 for h in hidden):
            raise ValueError(f"bad meta-learner config: features {unknown} unknown (use {list(FEATURE_WIDTH)}), "
                             f"features {needs_krause} need param krause|rational, "
                             f"param={param!r} (paper|krause|rational), activation={activation!r} "
                             f"({list(ACTIVATIONS)}), hidden={list(hidden)} (positive layer widths; [] for a linear "
                             "gate)")
        if per_coordinate and (param not in KRAUSE_FORMS or n_coords < 1 or pull < 0):
            raise ValueError(f"bad meta-learner config: gate.per_coordinate needs param krause|rational (got "
                             f"{param!r}), the number of dynamic coordinates (got {n_coords}) and gate.pull >= 0 "
                             f"(got {pull})")
        self.features, self.param, self.flush = tuple(features), param, flush
        # how the outputs become gates (meta/gates.py): plain objects, no parameters of their own
        self.form = FORMS[param](lr=lr, flush=flush, lamb=lamb, eps=eps, lamb0=lamb0, rms_scale=rms_scale,
                                 clamp=clamp, gate_bias=gate_bias, init_scale=init_scale)
        width = sum(FEATURE_WIDTH[f] for f in features)
        sizes = [width, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.act = ACTIVATIONS[activation]()
        self.out = nn.Linear(sizes[-1], 3)  # (o_f, o_i, o_z)
        self.embed = nn.Embedding(n_tensors, embed_dim) if embed_dim > 0 else None
        # the per-tensor bias enters the first linear map (`first`)
        self.embed_proj = nn.Linear(embed_dim, self.first.out_features, bias=False) if self.embed is not None else None
        # Meta-SGD offsets [P] each (two tensors, not one [2, P]: a row's backward would fill a [2, P] zero tensor)
        self.coord_step = nn.Parameter(torch.zeros(n_coords)) if per_coordinate else None
        self.coord_decay = nn.Parameter(torch.zeros(n_coords)) if per_coordinate else None
        self.pull = float(pull)
        with torch.no_grad():
            self.form.init_output(self.out)  # krause forms: exactly Krause's rule; paper: near COPY
            if self.embed is not None:
                self.embed.weight.normal_(0, 0.1)
                if not len(self.layers):  # linear gate: the embedding adds to the output, which starts as set above
                    self.embed_proj.weight.zero_()
        # Caches keyed by the DynamicWeights object itself, held (an id() would be reused by the next short-lived
        # DynamicWeights.restrict of the reverse pass, which would then read another sample's constants)
        self._ctx: tuple[Any, dict[str, Tensor]] | None = None
        self._sub_ctx: tuple[Any, dict[str, Tensor]] | None = None  # of a DynamicWeights.restrict (reverse pass)
        self._norm0: tuple[Any, float] | None = None  # ‖θ_0‖ of the DynamicWeights it was computed for (drift)
        self.last_gates: dict[str, Tensor] = {}
        # Not a hyperparameter (set from eval.fused_gate / meta.fused_gate): `apply_` and GateRule.update run as
        # torch.compile'd passes over θ instead of eager chunks / whole-vector ops.
        self.fused = False

    def __getstate__(self) -> dict[str, Any]:
        """Without the compiled passes (process-local functions, not picklable) and the cached constants: ddp_spawn
        pickles the module into its processes, which compile and cache their own on first use."""
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_compiled")}
        state.update(_ctx=None, _sub_ctx=None, _norm0=None)
        return state

    @property
    def first(self) -> nn.Linear:
        """The first linear map: layers[0], or `out` itself for a linear gate (hidden=[])."""
        return self.layers[0] if len(self.layers) else self.out

    # -- constants per coordinate, computed once per DynamicWeights ---------------------------------
    def _context(self, dyn: Any) -> dict[str, Tensor]:
        if getattr(dyn, "parent", None) is not None:  # a sample of coordinates: the whole vector's constants, sliced
            if self._sub_ctx is None or self._sub_ctx[0] is not dyn:
                full = self._context(dyn.parent)
                self._sub_ctx = (dyn, {k: v.index_select(0, dyn.index) for k, v in full.items()})
            return self._sub_ctx[1]
        if self._ctx is not None and self._ctx[0] is dyn:
            return self._ctx[1]
        ctx: dict[str, Tensor] = {}
        need = {"fisher": dyn.fisher, "rms": dyn.ms}
        for f in ("fisher", "rms"):
            if f in self.features:
                if need[f] is None:
                    raise ValueError(f"meta-learner feature {f!r} needs fisher.pt (run `python train.py "
                                     "stage=fisher`), or drop it from gate.features")
                v = dyn.fisher if f == "fisher" else dyn.ms.clamp_min(0).sqrt()
                ctx[f] = torch.log(v.clamp_min(1e-20)) / 10.0
        if self.form.needs_ms:
            if dyn.ms is None:
                raise ValueError("gate=krause_init needs Krause's gradient statistics (ms) from fisher.pt: "
                                 "run `python train.py stage=fisher` first")
            ctx.update(self.form.context(dyn, self.features))
        self._ctx = (dyn, ctx)
        return ctx

    def _inputs(self, dyn: Any, theta: Tensor) -> dict[str, Tensor]:
        """The inputs of the gates besides θ, ∇L and L: per coordinate [P] the constants and the Meta-SGD offsets
        (learned); per stream (SCALARS, a scalar or [B] like L) the drift of θ [P] or [B, P]."""
        ctx = self._context(dyn)
        sub = getattr(dyn, "parent", None) is not None  # a sample of coordinates (DynamicWeights.restrict)
        if self.coord_step is not None:
            offs = (self.coord_step, self.coord_decay)
            c_step, c_decay = (c.index_select(0, dyn.index) for c in offs) if sub else offs
            ctx = {**ctx, "c_step": c_step, "c_decay": c_decay}
        if "drift" in self.features:  # relative to ‖θ_0‖ (scale-free), detached: a constant of the meta-gradient
            require(not sub or dyn.drift is not None, "a sample of coordinates needs the drift of the whole θ "
                    "(DynamicWeights.drift)")
            ctx = {**ctx, "drift": dyn.drift if sub else self.drift_feature(theta, dyn)}
        return ctx

    def drift_feature(self, theta: Tensor, dyn: Any) -> Tensor:
        """The drift feature of θ [P] or [B, P]: log(‖θ − θ_0‖/‖θ_0‖ + 1e-6)/10, a scalar or [B]."""
        if self._norm0 is None or self._norm0[0] is not dyn:
            self._norm0 = (dyn, float(dyn.theta0.detach().double().norm()))
        rel = drift_norm(theta, dyn.theta0) / self._norm0[1]
        return (torch.log(rel + 1e-6) / 10.0).to(theta.dtype)

    @staticmethod
    def _slice(ctx: dict[str, Tensor], s: int, e: int) -> dict[str, Tensor]:
        """The inputs of coordinates s..e-1: per-coordinate tensors sliced, per-stream scalars as they are."""
        return {k: v if k in SCALARS else v[s:e] for k, v in ctx.items()}

    @torch.no_grad()
    def pull_(self, lr: float) -> None:
        """The pull of the Meta-SGD offsets toward their initialisation (zero), after an optimizer step of φ."""
        if self.coord_step is not None and self.pull > 0:
            for c in (self.coord_step, self.coord_decay):
                c.mul_(1.0 - lr * self.pull)

    def features_of(self, theta: Tensor, grad: Tensor, loss: Tensor, theta0: Tensor,
                    ctx: dict[str, Tensor]) -> Tensor:
        """[..., n, k] per-coordinate inputs of n coordinates; `loss` is a scalar or [B] (one per stream)."""
        return torch.stack(self.feature_columns(theta, grad, loss, theta0, ctx), dim=-1)

    def feature_columns(self, theta: Tensor, grad: Tensor, loss: Tensor, theta0: Tensor,
                        ctx: dict[str, Tensor]) -> list[Tensor]:
        """The k feature columns, each [..., n]."""
        cols: list[Tensor] = []
        for f in self.features:
            if f == "theta":
                cols.append(theta)
            elif f == "delta":
                cols.extend(log_sign(theta - theta0))
            elif f == "grad":
                cols.extend(log_sign(grad))
            elif f == "gnorm":
                cols.append(softsign(grad * ctx["inv"]))
            elif f == "dnorm":  # softsign(u/v) = u/(v + |u|) for v = 10|a| > 0: one division, not two
                u = theta - theta0
                cols.append(u / (10.0 * self.form.coefficients(ctx)[0].abs() + u.abs()))
            elif f == "drift":
                d = ctx["drift"]  # a scalar, or [B]
                cols.append(d.reshape(*d.shape, *([1] * (theta.dim() - d.dim()))).expand_as(theta))
            elif f == "loss":
                cols.append((loss.reshape(*loss.shape, *([1] * (theta.dim() - loss.dim()))) / 10.0).expand_as(theta))
            else:
                cols.append(ctx[f].expand_as(theta))
        return cols

    def mlp(self, x: Tensor, bias1: Tensor) -> Tensor:
        """[..., n, k] -> [..., n, 3], the first layer with bias `bias1` [H] (or [3]: a linear gate)."""
        if not len(self.layers):
            return F.linear(x, self.out.weight, bias1)
        h = self.act(F.linear(x, self.layers[0].weight, bias1))
        for layer in self.layers[1:]:
            h = self.act(layer(h))
        return self.out(h)

    def _gates(self, theta: Tensor, grad: Tensor, loss: Tensor, theta0: Tensor, ctx: dict[str, Tensor],
               bias1: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(f, i, z) of n coordinates (θ, ∇L, θ_0 and the ctx tensors all [..., n])."""
        o_f, o_i, o_z = self.mlp(self.features_of(theta, grad, loss, theta0, ctx), bias1).unbind(-1)
        return self.to_gates(o_f, o_i, o_z, ctx)

    def to_gates(self, o_f: Tensor, o_i: Tensor, o_z: Tensor,
                 ctx: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """The network's outputs o [..., n] -> gates (f, i, z) under the parametrization `param`."""
        if "c_step" in ctx:  # Meta-SGD: the per-coordinate log-step and log-decay offsets
            o_i, o_f, o_z = o_i + ctx["c_step"], o_f + ctx["c_decay"], o_z + ctx["c_decay"]
        return self.form.gates(o_f, o_i, o_z, ctx)

    def _bias1(self) -> Tensor:
        """First-layer bias per dynamic tensor [n_tensors, H] (the tensor embedding enters here), or [H]."""
        if self.embed is None:
            return self.first.bias
        return self.first.bias + self.embed_proj(self.embed.weight)

    def forward(self, theta: Tensor, grad: Tensor, loss: Tensor, dyn: Any) -> tuple[Tensor, Tensor, Tensor | None]:
        ctx = self._inputs(dyn, theta)
        bias = self._bias1()
        if self.embed is None:
            f, i, z = self._gates(theta, grad, loss, dyn.theta0, ctx, bias)
        else:  # a per-tensor bias of layer 1: run tensor by tensor (no [P, embed_dim] tensor is built)
            parts = [self._gates(*(t.narrow(-1, s, n) for t in (theta, grad)), loss, dyn.theta0.narrow(0, s, n),
                                 self._slice(ctx, s, s + n), bias[k])
                     for k, (s, n) in enumerate(offsets(dyn.spec.sizes))]
            f, i = (torch.cat([p[j] for p in parts], dim=-1) for j in (0, 1))
            z = torch.cat([p[2] for p in parts], dim=-1) if self.flush else None
        self.last_gates = {"f": f.detach().mean(), "i": i.detach().mean(),
                           "z": z.detach().mean() if z is not None else torch.zeros(())}
        return f, i, z

    @torch.no_grad()
    def apply_(self, theta: Tensor, grad: Tensor, loss: Tensor, dyn: Any, chunk: int = 1 << 15,
               stats: bool = True) -> Tensor | None:
        """θ ← f⊙θ + i⊙∇L + z⊙θ_0 IN PLACE, chunk by chunk (evaluation; θ [P]); returns the per-tensor
        mean gates [3, n_tensors] (the compiled pass: None with `stats=False`, which skips their sums).

        Why: run over all P coordinates at once, the MLP writes [P, k] features and two [P, H]
        activations to memory and reads them back (for P = 10.9M and H = 16, > 1 GB per update); a
        chunk of 32k coordinates keeps them in cache, so the update costs the MLP's arithmetic only.
        """
        if self.fused:  # θ [P] or [B, P]
            return self.fused_apply_(theta, grad, loss, dyn, stats)
        ctx = self._inputs(dyn, theta)
        bias = self._bias1()
        sums = theta.new_zeros(3, len(dyn.spec.sizes))
        for k, (s0, n) in enumerate(offsets(dyn.spec.sizes)):
            b = bias if self.embed is None else bias[k]
            for s in range(s0, s0 + n, chunk):
                e = min(s + chunk, s0 + n)
                th, g, th0 = theta[s:e], grad[s:e], dyn.theta0[s:e]
                f, i, z = self._gates(th, g, loss, th0, self._slice(ctx, s, e), b)
                sums[0, k] += f.sum()
                sums[1, k] += i.sum()
                if z is not None:
                    sums[2, k] += z.sum()
                th.copy_(gated_update(th, g, th0, f, i, z))
        means = sums / torch.tensor(dyn.spec.sizes, dtype=sums.dtype, device=sums.device)
        self.last_gates = {"f": means[0].mean(), "i": means[1].mean(), "z": means[2].mean()}
        return means


    # -- one fused pass over θ (evaluation and training): torch.compile of the update, coordinate-wise ---
    def mlp_pointwise(self, cols: list[Tensor], bias1: Tensor) -> list[Tensor]:
        """The same network as `mlp`, one coordinate at a time: k columns [n] -> 3 outputs [n].

        Every unit is a sum of scalar-times-column terms, so under torch.compile the whole network, the
        gates and the update fuse into ONE loop over the coordinates with the H hidden units in registers:
        no [n, k] feature or [n, H] activation tensor is ever written to memory. Eager, it is slow (H·k
        separate ops): use it compiled only. `bias1` [H]: the first layer's bias for these coordinates.
        """

        def affine(w: Tensor, b: Tensor, xs: list[Tensor]) -> list[Tensor]:
            out = []
            for m in range(w.size(0)):
                acc = b[m]
                for j in range(len(xs)):
                    acc = acc + w[m, j] * xs[j]
                out.append(acc)
            return out

        if not len(self.layers):
            return affine(self.out.weight, bias1, cols)
        h = [self.act(v) for v in affine(self.layers[0].weight, bias1, cols)]
        for layer in self.layers[1:]:
            h = [self.act(v) for v in affine(layer.weight, layer.bias, h)]
        return affine(self.out.weight, self.out.bias, h)

    def _fused_gated(self, theta: Tensor, grad: Tensor, loss: Tensor, theta0: Tensor, ctx: dict[str, Tensor],
                     bias1: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """θ_t of one tensor's coordinates [n] (or [B, n]: B streams, loss [B]) and its gates (f, i, z), as the
        compiled passes trace them."""
        o_f, o_i, o_z = self.mlp_pointwise(self.feature_columns(theta, grad, loss, theta0, ctx), bias1)
        f, i, z = self.to_gates(o_f, o_i, o_z, ctx)
        return gated_update(theta, grad, theta0, f, i, z), f, i, z

    def _fused_new(self, theta: Tensor, grad: Tensor, loss: Tensor, theta0: Tensor, ctx: dict[str, Tensor],
                   bias1: Tensor) -> tuple[Tensor, Tensor]:
        """θ_t of one tensor's coordinates [n], differentiable (the compiled training update), and the gate
        sums [3] (for logging)."""
        new, f, i, z = self._fused_gated(theta, grad, loss, theta0, ctx, bias1)
        return new, torch.stack([f.sum(), i.sum(), z.sum() if z is not None else f.new_zeros(())]).detach()

    def fused_update(self, theta: Tensor, grad: Tensor, loss: Tensor, dyn: Any) -> Tensor:
        """θ_t = f⊙θ + i⊙∇L + z⊙θ_0 over the flat [P], differentiable, compiled tensor by tensor (meta-training
        with gate.fused / eval.fused_gate): inductor fuses the forward into one loop and writes a backward that
        recomputes the pointwise network instead of storing [P, H] activations."""
        ctx = self._inputs(dyn, theta)
        bias = self._bias1()
        if getattr(self, "_compiled_new", None) is None:
            self._compiled_new = _compile(self._fused_new)
        loss = loss.reshape(()).to(theta.dtype)
        # split, not slices, of what has a gradient (θ, the Meta-SGD offsets): a slice's backward writes its gradient
        # into a zero-filled [P] tensor, one per parameter tensor (a fill and an add over all P each); split's is a cat
        thetas = theta.split(dyn.spec.sizes)
        ctxs = {key: v.split(dyn.spec.sizes) if v.dim() else [v] * len(dyn.spec.sizes) for key, v in ctx.items()}
        parts = [self._compiled_new(thetas[k], grad[s : s + n], loss, dyn.theta0[s : s + n],
                                    {key: v[k] for key, v in ctxs.items()}, bias if self.embed is None else bias[k])
                 for k, (s, n) in enumerate(offsets(dyn.spec.sizes))]
        sums = torch.stack([p[1] for p in parts]).sum(0) / dyn.spec.numel
        self.last_gates = {"f": sums[0], "i": sums[1], "z": sums[2]}
        return torch.cat([p[0] for p in parts])

    def _fused_update_(self, theta: Tensor, grad: Tensor, loss: Tensor, theta0: Tensor, ctx: dict[str, Tensor],
                       bias1: Tensor) -> Tensor:
        """`_fused_new` written into θ [n] in place (evaluation); returns the gate sums [3]."""
        new, sums = self._fused_new(theta, grad, loss, theta0, ctx, bias1)
        theta.copy_(new)
        return sums

    def _fused_update_nostats_(self, theta: Tensor, grad: Tensor, loss: Tensor, theta0: Tensor,
                               ctx: dict[str, Tensor], bias1: Tensor) -> None:
        """`_fused_update_` without the gate sums. Why a second graph: inductor fuses one of the three sums into
        the update's loop but writes f and i out and re-reads them for the other two, 4 extra passes over θ's
        size."""
        theta.copy_(self._fused_gated(theta, grad, loss, theta0, ctx, bias1)[0])

    @torch.no_grad()
    def fused_apply_(self, theta: Tensor, grad: Tensor, loss: Tensor, dyn: Any, stats: bool = True,
                     chunk: int = 1 << 18) -> Tensor | None:
        """`apply_` as compiled passes over θ [P] or B streams' θ [B, P] (loss scalar or [B]); the same numbers
        to float rounding. Returns the per-tensor mean gates [3, n_tensors] (over streams), None with `stats=False`.

        One stream: one call per parameter tensor. B streams: one call per chunk of `chunk` coordinates of a
        tensor, covering all B rows [B, chunk] (the kernel's loop runs stream by stream within the chunk). Why
        chunks: the per-coordinate constants (θ_0, 1/(RMS+ε), rate, the Fisher/RMS features: 20 bytes) are shared
        by the streams; streamed once per stream from DRAM they cost more than θ and ∇L's own traffic, while a
        1 MB chunk of each is still in cache when the next stream reads it. Why one call for all streams: each
        call of a compiled function pays dynamo's guards and wrapper, which a call per stream and chunk would pay
        dozens of times per stream update (`bench/bench_gate.py --streams`).
        Compiled once per input rank with symbolic sizes (dynamic=True); the first call compiles (seconds to tens
        of seconds on a CPU).
        """
        ctx = self._inputs(dyn, theta)
        bias = self._bias1()
        name = "_compiled" if stats else "_compiled_nostats"
        if getattr(self, name, None) is None:
            setattr(self, name, _compile(self._fused_update_ if stats else self._fused_update_nostats_))
        step = getattr(self, name)
        if theta.dim() == 2 and theta.size(0) == 1:  # one stream: the 1-D graph
            theta, grad = theta[0], grad[0]
        n_rows = theta.size(0) if theta.dim() == 2 else 1
        losses = loss.reshape(-1).to(theta.dtype).expand(n_rows)  # [B]
        losses = losses if theta.dim() == 2 else losses[0]
        span = chunk if n_rows > 1 else max(dyn.spec.sizes)  # one stream: whole tensors
        sums = []
        for k, (s0, n) in enumerate(offsets(dyn.spec.sizes)):
            b1 = bias if self.embed is None else bias[k]
            acc = theta.new_zeros(3) if stats else None
            for s in range(s0, s0 + n, span):
                e = min(s + span, s0 + n)
                out = step(theta[..., s:e], grad[..., s:e], losses, dyn.theta0[s:e],
                           self._slice(ctx, s, e), b1)
                if stats:
                    acc += out
            sums.append(acc)
        if not stats:
            return None
        means = torch.stack(sums, dim=1) / (n_rows * torch.tensor(dyn.spec.sizes, dtype=theta.dtype,
                                                                   device=theta.device))
        self.last_gates = {"f": means[0].mean(), "i": means[1].mean(), "z": means[2].mean()}
        return means


def _compile(fn: Any) -> Any:
    """torch.compile with a symbolic length. Each MetaLearner instance compiles its own graph (its features and
    layers are baked in), so a process holding many (tests, sweeps, benches) needs more than dynamo's default 8
    graphs per function; past the limit dynamo falls back to eager (same numbers, slower) instead of failing."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    # fp-contract=fast lets the C++ compiler fuse the pointwise network's multiply-adds into FMAs (inductor's CPU
    # default is off: a multiply and an add, each rounded). The pass is a long chain of dependent vector ops, so
    # fewer, shorter ops pay (bench/bench_gate.py); the result differs from eager by float rounding.
    return torch.compile(fn, dynamic=True, options={"cpp.enable_floating_point_contract_flag": "fast"})


def build_meta_learner(gate_cfg: dict[str, Any], n_tensors: int, flush: bool | None = None,
                       n_coords: int = 0) -> MetaLearner:
    """From the `gate` config group (conf/gate/*.yaml); `flush` overrides gate.flush when given; `n_coords`: the
    number of dynamic coordinates P (what gate.per_coordinate's offsets need)."""
    kw = {k: v for k, v in gate_cfg.items() if k not in ("name",) and not k.startswith("_")}
    if flush is not None:
        kw["flush"] = flush
    return MetaLearner(n_tensors, **kw, n_coords=n_coords)
