"""The meta-learner and online meta-training (issue 4): exactness against independent loops,
meta-gradients against finite differences, checkpointing, and a short run that learns something."""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from dynlm_pl.artifacts import load_meta
from dynlm_pl.data import Corpus
from dynlm_pl.errors import DynlmError
from dynlm_pl.fisher import FisherArtifact
from dynlm_pl.meta import unroll as unroll_module
from dynlm_pl.meta.gates import rational_exp
from dynlm_pl.meta.learner import MetaLearner
from dynlm_pl.meta.rules import GateRule, RecordingGateRule, RMSRule, Rule, build_rule
from dynlm_pl.meta.scoring import adaptive_eval
from dynlm_pl.meta.unroll import FastFirstOrder, Unroller, inner_step
from dynlm_pl.meta.weights import (
    CoordinateSample,
    DynamicSpec,
    DynamicWeights,
    drift_norm,
    sample_coordinates,
    select_dynamic,
    tensor_group,
)
from dynlm_pl.models.awd_lstm import AWDLSTM, detach_hidden, lm_loss
from dynlm_pl.runtime import make_datamodule
from dynlm_pl.systems.meta import MetaTrainModule

REPO = Path(__file__).resolve().parents[1]
SEG = 5


def tiny_lm(vocab: int, seed: int = 0, emb: int = 8, hid: int = 12) -> AWDLSTM:
    torch.manual_seed(seed)
    return AWDLSTM(vocab, emb_size=emb, hidden_size=hid, num_layers=2, dropout=0.0, dropouth=0.0, dropouti=0.0,
                   dropoute=0.0, wdrop=0.0).eval().requires_grad_(False)


def fake_fisher(model: nn.Module, seed: int = 0) -> FisherArtifact:
    """Positive random statistics spread over several orders of magnitude (so Krause's clip bites)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    rnd = {k: torch.exp(torch.randn(p.shape, generator=g, dtype=p.dtype) * 2.0 - 6.0) for k, p in params.items()}
    return FisherArtifact(theta0={k: p.detach().clone() for k, p in params.items()},
                          fisher={k: v * 3.0 for k, v in rnd.items()}, ms=rnd, estimator="batch_ms", tokens=1,
                          lm_sha256="x", meta={})


class ConstGates(nn.Module):
    """Gates fixed at constants (f, i, z), through the same GateRule as the meta-learner."""

    def __init__(self, f: float, i: float, z: float) -> None:
        super().__init__()
        self.f, self.i, self.z = f, i, z

    def forward(self, theta: Tensor, grad: Tensor, loss: Tensor, dyn: DynamicWeights):
        full = lambda v: torch.full_like(theta, v)
        return full(self.f), full(self.i), full(self.z)


@pytest.fixture(scope="module")
def stream(synthetic_corpus_session: Corpus) -> tuple[Tensor, int]:
    """The first 251 validation tokens of the synthetic corpus (50 segments of 5) and the vocab size."""
    return synthetic_corpus_session.splits["valid"][:251].clone(), len(synthetic_corpus_session.vocab)


# ----------------------------------------------------------------------------------------------------
# Exactness of the gated update against the static LM, plain SGD and Krause's rule
# ----------------------------------------------------------------------------------------------------


def static_losses(model: AWDLSTM, tokens: Tensor, grad_mode: bool = False) -> Tensor:
    """Independent: the module's own weights, segment by segment, hidden carried.

    `grad_mode`: run with the weights requiring grad, as dynamic evaluation must (CPU LSTM kernels
    differ in the last bit between inference and autograd mode; with the same mode: bitwise equal).
    """
    model = copy.deepcopy(model).requires_grad_(grad_mode)
    hidden, out = model.init_hidden(1), []
    with torch.set_grad_enabled(grad_mode):
        for s in range(0, tokens.numel() - 1, SEG):
            x, y = tokens[s : s + SEG][None], tokens[s + 1 : s + 1 + SEG][None]
            o = model(x, hidden)
            hidden = detach_hidden(o.hidden)
            out.append(lm_loss(o.logits, y, reduction="none").detach())
    return torch.cat(out)


def reference_dynamic_eval(model: AWDLSTM, tokens: Tensor, update: Callable[[AWDLSTM], None]) -> Tensor:
    """Independent dynamic evaluation on a trainable copy: score a segment, backward its mean loss,
    then `update(copy)` edits the parameters in place (under no_grad). Per-token losses [N-1]."""
    ref = copy.deepcopy(model).requires_grad_(True)
    hidden, want = ref.init_hidden(1), []
    for s in range(0, tokens.numel() - 1, SEG):
        x, y = tokens[s : s + SEG][None], tokens[s + 1 : s + 1 + SEG][None]
        ref.zero_grad()
        o = ref(x, hidden)
        hidden = detach_hidden(o.hidden)
        losses = lm_loss(o.logits, y, reduction="none")
        losses.mean().backward()
        with torch.no_grad():
            update(ref)
        want.append(losses.detach())
    return torch.cat(want)


def test_copy_gates_reproduce_static_losses(stream: tuple[Tensor, int]) -> None:
    tokens, vocab = stream
    model = tiny_lm(vocab)
    dyn = DynamicWeights.build(model)
    got = adaptive_eval(model, tokens, GateRule(ConstGates(1.0, 0.0, 0.0), dyn), SEG, dyn)[0]
    assert torch.equal(got, static_losses(model, tokens, grad_mode=True))
    assert torch.allclose(got, static_losses(model, tokens), atol=1e-5, rtol=0)
    # The differentiable meta-training step gives the same losses too.
    theta, hidden, losses = dyn.theta0.clone(), model.init_hidden(1), []
    rule = GateRule(ConstGates(1.0, 0.0, 0.0), dyn)
    for s in range(0, 50 * SEG, SEG):
        x, y = tokens[s : s + SEG][None], tokens[s + 1 : s + 1 + SEG][None]
        theta, hidden, lsum = inner_step(model, rule, dyn.spec, theta, hidden, x, y)
        losses.append(lsum.detach())
    assert torch.allclose(torch.stack(losses), static_losses(model, tokens).view(-1, SEG).sum(1), atol=1e-5)


def test_descent_gates_equal_plain_sgd(stream: tuple[Tensor, int]) -> None:
    tokens, vocab = stream
    lr = 0.5
    model = tiny_lm(vocab)
    dyn = DynamicWeights.build(model)
    got = adaptive_eval(model, tokens, GateRule(ConstGates(1.0, -lr, 0.0), dyn), SEG, dyn)[0]
    # Independent loop: a trainable copy, backward, p -= lr * grad.
    def sgd(ref: AWDLSTM) -> None:
        for p in ref.parameters():
            p -= lr * p.grad

    want = reference_dynamic_eval(model, tokens, sgd)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert (got - static_losses(model, tokens)).abs().max() > 1e-2  # SGD really changed something
    # gate=krause_init started from a tuned SGD rule (rms_scale=False, λ=0) IS that rule until it trains,
    # through both the differentiable update and the chunked in-place one evaluation uses
    dyn_f = DynamicWeights.build(model, fisher_art=fake_fisher(model))
    meta = MetaLearner(len(dyn_f.spec.names), hidden=[8], features=["theta", "delta", "grad", "loss", "rms"],
                       param="krause", embed_dim=3, lr=lr, lamb=0.0, rms_scale=False)
    assert torch.allclose(adaptive_eval(model, tokens, GateRule(meta, dyn_f), SEG, dyn_f)[0], want, atol=1e-5)
    theta, grad = dyn_f.theta0 + 0.01, torch.randn_like(dyn_f.theta0)
    with torch.no_grad():
        diff = GateRule(meta, dyn_f).update(theta, grad, torch.tensor(3.0)) - (theta - lr * grad)
    assert diff.abs().max() < 1e-6


# the features each residual form is shipped with (conf/gate/krause_init.yaml, krause_fast.yaml)
FORM_FEATURES = {"krause": ["theta", "delta", "grad", "loss", "fisher", "rms"],
                 "rational": ["theta", "dnorm", "gnorm", "loss", "fisher", "rms"]}


@pytest.mark.parametrize(("param", "per_coordinate"), [("krause", False), ("rational", False), ("rational", True)])
def test_krause_init_matches_independent_krause(stream: tuple[Tensor, int], param: str, per_coordinate: bool) -> None:
    """gate=krause_init, gate=krause_fast and gate=meta_sgd (per-coordinate offsets) ARE Krause's rule until they
    train."""
    tokens, vocab = stream
    lr, lamb, eps = 2e-3, 0.5, 2e-5
    model = tiny_lm(vocab)
    art = fake_fisher(model)
    dyn = DynamicWeights.build(model, fisher_art=art)
    meta = MetaLearner(len(dyn.spec.names), hidden=[8], features=FORM_FEATURES[param],
                       param=param, embed_dim=3, lr=lr, lamb=lamb, eps=eps, per_coordinate=per_coordinate,
                       n_coords=dyn.spec.numel)
    final: dict[str, Tensor] = {}
    got = adaptive_eval(model, tokens, GateRule(meta, dyn), SEG, dyn,
                        on_segment=lambda s, th, _: final.update(theta=th.detach().clone()))[0]
    got_rms = adaptive_eval(model, tokens, RMSRule(dyn, lr, lamb, eps), SEG, dyn)[0]

    # Independent implementation, after Krause's dynamiceval.py (gradstat + evaluate), per tensor.
    params = [(n, p.shape) for n, p in model.named_parameters()]
    rms = {n: art.ms[n].sqrt() for n, _ in params}
    gsum = sum(r.mean() for r in rms.values()) / len(rms)
    decrate = {n: torch.clamp(r / gsum, max=1 / lamb) for n, r in rms.items()}
    assert any(bool((r / gsum > 1 / lamb).any()) for r in rms.values())  # the clip is exercised
    data0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_final: dict[str, Tensor] = {}

    def krause(ref: AWDLSTM) -> None:
        for n, p in ref.named_parameters():
            p += lamb * decrate[n] * (data0[n] - p) - lr * p.grad / (rms[n] + eps)
            ref_final[n] = p.detach()

    want = reference_dynamic_eval(model, tokens, krause)
    assert want.numel() == 250
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(got_rms, want, atol=1e-5, rtol=0)
    theta_ref = torch.cat([ref_final[n].reshape(-1) for n, _ in params])
    assert torch.allclose(final["theta"], theta_ref, atol=1e-5, rtol=0)
    assert (got - static_losses(model, tokens)).abs().max() > 1e-2


@pytest.mark.parametrize("per_coordinate", [False, True])
def test_rational_gate_matches_its_formula(per_coordinate: bool) -> None:
    """gate=krause_fast (param rational), trained-looking φ, against the formula written out independently:
    o = W·[θ, dnorm, gnorm, L/10, rms feature] + b (+ the per-coordinate offsets of gate=meta_sgd: c_step on o_i,
    c_decay on o_f and o_z), r(o) = 1 + o (o ≥ 0) or 1/(1 − o), o clamped to ±c;
    i = a·r(o_i), f = 1 − clip((d + d₀)·r(o_f) − d₀), z = clip((d + d₀)·r(o_z) − d₀)."""
    model = tiny_lm(50)
    art = fake_fisher(model)
    dyn = DynamicWeights.build(model, fisher_art=art)
    lr, lamb, lamb0, eps, c = 1e-2, 0.05, 1e-3, 2e-5, 0.8
    meta = MetaLearner(len(dyn.spec.names), hidden=[], features=["theta", "dnorm", "gnorm", "loss", "rms"],
                       param="rational", lr=lr, lamb=lamb, lamb0=lamb0, eps=eps, clamp=c,
                       per_coordinate=per_coordinate, pull=2.0, n_coords=dyn.spec.numel)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        meta.out.weight.copy_(torch.randn(3, 5, generator=g))
        meta.out.bias.copy_(torch.randn(3, generator=g))
        offsets = torch.zeros(2, dyn.spec.numel)
        if per_coordinate:
            offsets = torch.randn(2, dyn.spec.numel, generator=g)
            meta.coord_step.copy_(offsets[0])
            meta.coord_decay.copy_(offsets[1])
    theta = dyn.theta0 + 1e-3 * torch.randn(dyn.theta0.shape, generator=g)
    grad, loss = 1e-2 * torch.randn(theta.shape, generator=g), torch.tensor(4.0)
    f, i, z = meta(theta, grad, loss, dyn)
    # independent: Krause's coefficients from dynamiceval.py's definitions
    rms = torch.cat([art.ms[n].sqrt().reshape(-1) for n, _ in model.named_parameters()])
    gmean = torch.stack([t.mean() for t in rms.split(dyn.spec.sizes)]).mean()
    a = -lr / (rms + eps)
    d, d0 = lamb * torch.clamp(rms / gmean, max=1 / lamb), lamb0 * torch.clamp(rms / gmean, max=1 / lamb0)
    x = torch.stack([theta, (theta - dyn.theta0) / (10 * a.abs()), grad / (rms + eps), loss / 10 + 0 * theta,
                     torch.log(rms) / 10], dim=-1)
    x[:, 1:3] = x[:, 1:3] / (1 + x[:, 1:3].abs())
    o = (x @ meta.out.weight.T + meta.out.bias + offsets[[1, 0, 1]].T).clamp(-c, c)
    r = torch.where(o >= 0, 1 + o, 1 / (1 - o))
    assert bool((o.abs() == c).any()) and bool((o < 0).any()) and bool((o > 0).any())  # every branch taken
    assert torch.allclose(i, a * r[:, 1], rtol=1e-5, atol=0)
    assert torch.allclose(f, 1 - ((d + d0) * r[:, 0] - d0).clamp(0, 1), rtol=1e-5, atol=1e-7)
    assert torch.allclose(z, ((d + d0) * r[:, 2] - d0).clamp(0, 1), rtol=1e-5, atol=1e-7)
    meta.pull_(0.1)  # the offsets' pull toward zero after a step of φ at lr 0.1: a factor 1 − 0.1·2
    if per_coordinate:
        assert torch.allclose(meta.coord_step, 0.8 * offsets[0]) and torch.allclose(meta.coord_decay, 0.8 * offsets[1])
    # r is smooth through 0 (value and slope 1 on both sides) and its gradient is finite everywhere
    t = torch.tensor([-30.0, -1.0, -1e-4, 0.0, 1e-4, 1.0, 30.0], requires_grad=True)
    rt = rational_exp(t, 20.0)
    (dr,) = torch.autograd.grad(rt.sum(), t)
    assert torch.allclose(rt, torch.tensor([1 / 21, 0.5, 1 / 1.0001, 1.0, 1.0001, 2.0, 21.0]))
    assert torch.allclose(dr, torch.tensor([0.0, 0.25, 1 / 1.0001**2, 1.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="need param krause"):  # gnorm/dnorm are defined by Krause's a and RMS
        MetaLearner(3, hidden=[], features=["theta", "gnorm"], param="paper")


def test_drift_feature_is_the_relative_distance_from_theta0_per_stream() -> None:
    """The `drift` feature: log(‖θ − θ_0‖ / ‖θ_0‖ + 1e-6) / 10, the same for every coordinate of a stream and its
    own for each stream; eager and compiled updates agree with it in the features."""
    model = tiny_lm(50)
    dyn = DynamicWeights.build(model, fisher_art=fake_fisher(model))
    meta = MetaLearner(len(dyn.spec.names), hidden=[], features=["theta", "dnorm", "drift"], param="rational",
                       lr=1e-2, lamb=0.05)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        meta.out.weight.copy_(torch.randn(3, 3, generator=g))
    far, near = (dyn.theta0 + s * torch.randn(dyn.theta0.shape, generator=g) for s in (1e-1, 1e-4))
    theta = torch.stack([far, near])
    grad, loss = 1e-2 * torch.randn(theta.shape, generator=g), torch.tensor([4.0, 3.0])
    cols = meta.feature_columns(theta, grad, loss, dyn.theta0, meta._inputs(dyn, theta))
    for b, th in enumerate((far, near)):
        want = math.log(float((th - dyn.theta0).norm() / dyn.theta0.norm()) + 1e-6) / 10
        assert torch.allclose(cols[2][b], torch.full_like(cols[2][b], want), rtol=1e-5)
    assert float(cols[2][0, 0]) > float(cols[2][1, 0])  # the stream that wandered further reads a larger drift
    eager, compiled = eager_and_compiled_updates(meta, dyn, theta, grad, loss)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-7)


def eager_and_compiled_updates(meta: MetaLearner, dyn: DynamicWeights, theta: Tensor, grad: Tensor,
                               loss: Tensor) -> tuple[Tensor, Tensor]:
    """θ after one in-place update of `meta`'s rule, eager and then compiled (eval.fused_gate)."""
    outs = []
    for fused in (False, True):
        meta.fused = fused
        th = theta.clone()
        GateRule(meta, dyn).update_(th, grad, loss)
        outs.append(th)
    return outs[0], outs[1]


def test_a_meta_learner_that_compiled_its_passes_pickles() -> None:
    """ddp_spawn pickles the LightningModule, and so φ, into its processes after the meta stage has evaluated φ at
    init with the compiled passes: the copy leaves the compiled functions behind and updates θ as the original."""
    model = tiny_lm(50)
    dyn = DynamicWeights.build(model, fisher_art=fake_fisher(model))
    meta = MetaLearner(len(dyn.spec.names), hidden=[], features=FORM_FEATURES["rational"], param="rational", lr=1e-2,
                       lamb=0.05)
    meta.fused = True
    theta = dyn.theta0 + 1e-3 * torch.randn_like(dyn.theta0)
    grad, loss = 1e-2 * torch.randn_like(theta), torch.tensor(4.0)
    want = theta.clone()
    GateRule(meta, dyn).update_(want, grad, loss)  # compiles and caches
    GateRule(meta, dyn).update(theta, grad, loss)
    assert {"_compiled_nostats", "_compiled_new"} <= set(vars(meta))
    clone = pickle.loads(pickle.dumps(meta))
    assert not any(k.startswith("_compiled") for k in vars(clone))
    got = theta.clone()
    GateRule(clone, dyn).update_(got, grad, loss)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dynamic_selection_and_streams(stream: tuple[Tensor, int]) -> None:
    tokens, vocab = stream
    model = tiny_lm(vocab)
    spec = select_dynamic(model, include=["rnns.*"], exclude=["*bias*"])
    assert spec.names == ("rnns.0.weight_ih", "rnns.0.weight_hh", "rnns.1.weight_ih", "rnns.1.weight_hh")
    # Two streams with their own θ (vmap, manual kernel) == each stream alone.
    model.kernel = "manual"
    dyn = DynamicWeights.build(model)
    rule = GateRule(ConstGates(1.0, -0.5, 0.0), dyn)
    both = adaptive_eval(model, tokens[:201], rule, SEG, dyn, batch_size=2)
    for b in range(2):  # row b reads tokens b·100 .. b·100+100 (rows overlap by one token)
        alone = adaptive_eval(model, tokens[b * 100 : (b + 1) * 100 + 1], rule, SEG, dyn)[0]
        assert torch.allclose(both[b], alone, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Meta-gradients: finite differences (float64), checkpointing
# ----------------------------------------------------------------------------------------------------


class ReplayRule(Rule):
    """Feeds the rule the ∇L_t and L_t recorded on a first run: the first-order meta-gradient is the
    exact gradient of the unroll with those inputs held fixed, so finite differences can check it."""

    def __init__(self, inner: Rule) -> None:
        self.inner, self.tape, self.replay, self.k = inner, [], False, 0

    def update(self, theta: Tensor, grad: Tensor, loss: Tensor) -> Tensor:
        if self.replay:
            grad, loss = self.tape[self.k]
            self.k += 1
        else:
            self.tape.append((grad.detach().clone(), loss.detach().clone()))
        return self.inner.update(theta, grad, loss)


def double_module(vocab: int, order: int, checkpointing: bool = False, unroll: int = 4,
                  param: str = "paper") -> MetaTrainModule:
    torch.manual_seed(1)
    model = tiny_lm(vocab, emb=6, hid=8).double()
    art = fake_fisher(model)
    dyn = DynamicWeights.build(model, fisher_art=art)
    gate = dict(param="paper", hidden=[6], features=["theta", "delta", "grad", "loss", "fisher"], embed_dim=2,
                lr=0.3, gate_bias=3.0, init_scale=0.5)
    if param in ("rational", "meta_sgd", "drift"):  # gate=krause_fast's form on a small MLP (last layer at zero)
        feats = [*FORM_FEATURES["rational"], *(["drift"] if param == "drift" else [])]
        gate = dict(param="rational", hidden=[6], features=feats, embed_dim=2, lr=0.3,
                    lamb=0.05, clamp=20.0, per_coordinate=param == "meta_sgd", pull=1.0)
    module = MetaTrainModule(model, dyn, gate, segment=SEG, unroll=unroll, order=order, checkpointing=checkpointing)
    module.meta.double()
    if param == "meta_sgd":  # offsets away from zero, so that they shape the update the gradient flows through
        with torch.no_grad():
            module.meta.coord_step.normal_(0, 0.5)
            module.meta.coord_decay.normal_(0, 0.5)
    return module


def meta_loss(module: MetaTrainModule, chunk: Tensor) -> Tensor:
    theta, hidden = module.initial_state(1)
    return module.unroll(chunk, None, theta, hidden)[0]


@pytest.mark.parametrize("order", [1, 2])
def test_meta_gradient_matches_finite_differences(stream: tuple[Tensor, int], order: int) -> None:
    tokens, vocab = stream
    module = double_module(vocab, order)
    chunk = tokens[None, : 4 * SEG + 1]
    if order == 1:
        module.rule = ReplayRule(module.rule)
    phi = list(module.meta.parameters())
    grads = torch.autograd.grad(meta_loss(module, chunk), phi)
    if order == 1:
        module.rule.replay = True
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # directional derivatives along random directions
        v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in phi]
        h, vals = 1e-5, []
        for sgn in (1, -1):
            with torch.no_grad():
                for p, d in zip(phi, v, strict=True):
                    p.add_(sgn * h * d)
            if order == 1:
                module.rule.k = 0
            vals.append(meta_loss(module, chunk).item())  # grad mode: the inner loop takes ∇L_t
            with torch.no_grad():
                for p, d in zip(phi, v, strict=True):
                    p.sub_(sgn * h * d)
        fd = (vals[0] - vals[1]) / (2 * h)
        an = sum((gr * d).sum() for gr, d in zip(grads, v, strict=True)).item()
        assert abs(fd - an) <= 1e-6 + 1e-5 * abs(fd), (order, fd, an)
    # First and second order really differ (the second differentiates through ∇L_t).
    if order == 2:
        fo = double_module(vocab, 1)
        g1 = torch.autograd.grad(meta_loss(fo, chunk), list(fo.meta.parameters()))
        assert max((a - b).abs().max().item() for a, b in zip(g1, grads, strict=True)) > 1e-8


@pytest.mark.parametrize("order", [1, 2])
def test_checkpointing_gives_the_same_meta_gradient(stream: tuple[Tensor, int], order: int) -> None:
    tokens, vocab = stream
    chunk = tokens[None, : 6 * SEG + 1]
    grads = []
    for ck in (False, True):
        module = double_module(vocab, order, checkpointing=ck, unroll=6)
        grads.append(torch.autograd.grad(meta_loss(module, chunk), list(module.meta.parameters())))
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    def hwm():
        # this process's own RSS high-water mark (kB): /proc's VmHWM starts afresh at exec, while ru_maxrss keeps
        # the forking parent's (pytest's) peak, which can hide the child's whole growth
        try:
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from dynlm_pl.meta.weights import DynamicWeights
    from dynlm_pl.models.awd_lstm import AWDLSTM
    from dynlm_pl.systems.meta import MetaTrainModule
    torch.set_num_threads(1)
    ck = sys.argv[1] == "1"
    torch.manual_seed(0)
    model = AWDLSTM(3000, emb_size=32, hidden_size=64, num_layers=2).eval().requires_grad_(False)
    dyn = DynamicWeights.build(model)
    gate = dict(param="paper", hidden=[32], features=["theta", "delta", "grad", "loss"], embed_dim=4)
    m = MetaTrainModule(model, dyn, gate, segment=5, unroll=40, checkpointing=ck)
    chunk = torch.randint(0, 3000, (1, 40 * 5 + 1))
    theta, hidden = m.initial_state(1)
    base = hwm()
    loss = m.unroll(chunk, None, theta, hidden)[0]
    loss.backward()
    peak = hwm()
    print(json.dumps({"extra_kb": peak - base, "grad": m.meta.out.bias.grad.tolist()}))
""")


def test_checkpointing_cuts_peak_memory_at_unroll_40() -> None:
    """Peak RSS above the set-up baseline, each variant in a fresh process (maxrss never goes down).

    A fixed glibc mmap threshold makes freed tensors go back to the OS, so RSS follows live memory
    (otherwise the adaptive threshold keeps freed per-step temporaries in the heap and blurs it).
    """
    res = {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for ck in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, ck], capture_output=True, text=True,
                             cwd=REPO, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        res[ck] = json.loads(out.stdout.strip().splitlines()[-1])
    assert torch.allclose(torch.tensor(res["0"]["grad"]), torch.tensor(res["1"]["grad"]), rtol=1e-4, atol=1e-7)
    # ~130k coordinates × ~50 floats of graph per step × 40 steps ≈ 1 GB without; θ and ∇L per step with
    # (measured 117 MB vs 1043 MB).
    assert res["1"]["extra_kb"] < 0.25 * res["0"]["extra_kb"], res


# ----------------------------------------------------------------------------------------------------
# The stage: a short meta-training run on synthetic data learns something
# ----------------------------------------------------------------------------------------------------

SMALL_DATA = ["data.synthetic.articles.train=20", "data.synthetic.articles.valid=4",
              "data.synthetic.articles.test=4", "data.synthetic.article_len=200"]


def test_short_meta_training_lowers_validation_adaptive_loss(compose_cfg, tmp_path: Path) -> None:
    from dynlm_pl.stages import lm as lm_stage
    from dynlm_pl.stages import meta as meta_stage

    cfg = compose_cfg(["experiment=smoke", "stage=lm", "lm.trainer.max_epochs=2", *SMALL_DATA])
    lm_stage.run(cfg)
    # No fisher.pt: gate=krause_init must refuse with a pointer to the fisher stage...
    cfg = compose_cfg(["experiment=smoke", "stage=meta", "gate=krause_init", *SMALL_DATA])
    with pytest.raises(Exception, match="stage=fisher"):
        meta_stage.run(cfg)
    # ... while gate=paper runs with the Fisher feature switched off. Roles: the selection slice is valid[:600]
    # (baselines tuned, φ selected on its first 500 tokens), meta-training reads valid[600:].
    cfg = compose_cfg(["experiment=smoke", "stage=meta", "gate=paper", "unroll=5", "meta.steps=16", "meta.val_every=8",
                       "meta.val_tokens=500", "eval.tune.tokens=600", "meta.optim.lr=0.02", *SMALL_DATA])
    res = meta_stage.run(cfg)
    out = Path(cfg.paths.run_dir)
    assert (out / "meta.ckpt").is_file() and (out / "meta-last.ckpt").is_file()
    assert res["skipped"] == 0 and res["steps"] == 16
    assert res["val_ppl_trained"] < res["val_ppl_init"], res  # the trained φ itself, not the fallback
    assert res["val_ppl"] <= res["val_ppl_init"]
    assert math.isfinite(res["val_ppl_static"])
    meta, hp = load_meta(out / "meta.ckpt")
    assert isinstance(meta, MetaLearner) and hp["provenance"]["lm_sha256"]
    n_valid = make_datamodule(cfg).load().splits["valid"].numel()
    assert hp["provenance"]["roles"] == {"φ selection": "valid[0:500]", "meta-training": f"valid[600:{n_valid}]"}
    # A fair paper gate: its UPDATE gate started at the tuned SGD step, so at init it was (nearly: f = σ(10)) the
    # tuned sgd rule on the selection slice.
    tuned = json.loads((out / "tuned.json").read_text())["best"]
    assert hp["gate"]["lr"] == tuned["sgd"]["hparams"]["lr"]
    assert res["val_ppl_init"] == pytest.approx(res["val_ppl_sgd"], rel=2e-3)


@pytest.mark.parametrize("param", ["paper", "krause", "rational"])
def test_chunked_in_place_update_equals_the_differentiable_one(param: str) -> None:
    """Evaluation updates θ chunk by chunk in place (MetaLearner.apply_); it must be the same rule as the
    differentiable update meta-training uses, with the tensor embedding, over chunk and tensor boundaries."""
    model = tiny_lm(50)
    dyn = DynamicWeights.build(model, fisher_art=fake_fisher(model))
    feats = ["theta", "delta", "grad", "loss", "rms"] if param != "rational" else FORM_FEATURES[param]
    meta = MetaLearner(len(dyn.spec.names), hidden=[8], features=feats, param=param, embed_dim=3, lr=1e-2)
    with torch.no_grad():  # a trained-looking φ: the output layer is no longer its (near-)constant init
        meta.out.weight.normal_(0, 0.3)
    theta = dyn.theta0 + 1e-3 * torch.randn_like(dyn.theta0)
    grad, loss = torch.randn_like(theta), torch.tensor(4.0)
    rule = GateRule(meta, dyn)
    with torch.no_grad():
        want = rule.update(theta, grad, loss)
        got = theta.clone()
        means = meta.apply_(got, grad, loss, dyn, chunk=100)  # small chunks: many chunk boundaries per tensor
    assert torch.allclose(got, want, atol=1e-7, rtol=1e-6)
    assert (got - theta).abs().max() > 1e-4  # the update did something
    _, i, _ = meta(theta, grad, loss, dyn)
    assert torch.allclose(means[1], torch.stack([t.mean() for t in i.split(dyn.spec.sizes)]), atol=1e-6)
    th2 = theta.clone()
    # what adaptive_eval calls (default chunks: a vector lane's σ and the scalar tail's round differently)
    assert rule.update_(th2, grad, loss) is th2 and torch.allclose(th2, got, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize(("param", "hidden", "flush", "lamb"),
                         [("krause", [], True, 0.01), ("paper", [8], True, 0.01), ("krause", [], False, 0.0),
                          ("rational", [], True, 0.01), ("rational", [], False, 0.0)])
def test_fused_compiled_update_equals_the_chunked_one(stream: tuple[Tensor, int], param: str,
                                                     hidden: list[int], flush: bool, lamb: float) -> None:
    """eval.fused_gate: the coordinate-wise network under torch.compile == the matmul network, chunked (also
    meta_noflush at the tuned λ = 0, where f ≡ 1 and the compiled pass drops o_f)."""
    _, vocab = stream
    model = tiny_lm(vocab)
    dyn = DynamicWeights.build(model, fisher_art=fake_fisher(model))
    meta = MetaLearner(len(dyn.spec.names), hidden=hidden, features=FORM_FEATURES.get(param, FORM_FEATURES["krause"]),
                       param=param, embed_dim=3, lr=0.1, lamb=lamb, flush=flush)
    with torch.no_grad():  # away from the initial (constant) output, so every feature and weight matters
        meta.out.weight.normal_(0, 0.3)
        meta.embed_proj.weight.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    theta = dyn.theta0 + 1e-2 * torch.randn(dyn.theta0.shape, generator=g)
    grad = 1e-2 * torch.randn(theta.shape, generator=g)
    loss = torch.tensor(4.2)
    eager, fused = theta.clone(), theta.clone()
    means_eager = meta.apply_(eager, grad, loss, dyn)
    meta.fused = True
    means_fused = meta.apply_(fused, grad, loss, dyn)
    assert (eager - theta).abs().max() > 1e-4  # the update did something
    assert torch.allclose(fused, eager, atol=1e-6, rtol=1e-5)
    assert torch.allclose(means_fused, means_eager, atol=1e-6, rtol=1e-5)
    nostats = theta.clone()  # the second compiled graph, which skips the gate sums: the same θ_t, no means
    assert meta.apply_(nostats, grad, loss, dyn, stats=False) is None
    assert torch.allclose(nostats, fused, atol=1e-7, rtol=1e-6)


def test_compiled_pass_over_streams_equals_stream_by_stream() -> None:
    """The compiled pass over B streams' θ [B, P], chunk-major (each chunk of the shared constants read once for
    all streams), == each stream's θ [P] updated alone with its own loss, over chunk and tensor boundaries."""
    model = tiny_lm(50)
    dyn = DynamicWeights.build(model, fisher_art=fake_fisher(model))
    meta = MetaLearner(len(dyn.spec.names), hidden=[], features=FORM_FEATURES["rational"], param="rational",
                       embed_dim=3, lr=0.1, lamb=0.01)
    with torch.no_grad():
        meta.out.weight.normal_(0, 0.3)
        meta.embed_proj.weight.normal_(0, 0.3)
    meta.fused = True
    g = torch.Generator().manual_seed(4)
    B = 3
    theta = dyn.theta0 + 1e-2 * torch.randn(B, dyn.spec.numel, generator=g)
    grad, loss = 1e-2 * torch.randn(theta.shape, generator=g), torch.tensor([3.0, 4.0, 5.0])
    together = theta.clone()
    means = meta.fused_apply_(together, grad, loss, dyn, chunk=100)  # many chunks per tensor
    alone = theta.clone()
    means_alone = torch.stack([meta.fused_apply_(alone[b], grad[b], loss[b], dyn) for b in range(B)])
    assert (together - theta).abs().max() > 1e-4 and not torch.allclose(together[0] - theta[0], together[1] - theta[1])
    assert torch.allclose(together, alone, atol=1e-7, rtol=1e-6)
    assert torch.allclose(means, means_alone.mean(0), atol=1e-6, rtol=1e-5)
    rule_th = theta.clone()  # what adaptive_eval calls with eval.streams = B
    GateRule(meta, dyn).update_(rule_th, grad, loss)
    assert torch.allclose(rule_th, alone, atol=1e-7, rtol=1e-6)


def test_recording_rule_keeps_the_gate_means_every_few_segments() -> None:
    """evaluate.py's RecordingGateRule: means at segments 0, every, 2·every, ... (the fused pass skips the sums
    in between), and θ updated at every segment all the same."""
    model = tiny_lm(50)
    dyn = DynamicWeights.build(model, fisher_art=fake_fisher(model))
    meta = MetaLearner(len(dyn.spec.names), hidden=[], features=["theta", "grad", "loss", "rms"], param="krause",
                       lr=0.1)
    meta.fused = True
    rule, plain = RecordingGateRule(meta, dyn, every=3), GateRule(meta, dyn)
    theta, ref = dyn.theta0.clone(), dyn.theta0.clone()
    g = torch.Generator().manual_seed(2)
    for _ in range(7):
        grad = 1e-2 * torch.randn(theta.shape, generator=g)
        rule.update_(theta, grad, torch.tensor(4.0))
        plain.update_(ref, grad, torch.tensor(4.0))
    assert len(rule.history) == 3 and rule.history[0].shape == (3, len(dyn.spec.names))  # segments 0, 3, 6
    assert torch.allclose(theta, ref, atol=1e-7, rtol=1e-6) and not torch.equal(theta, dyn.theta0)


@pytest.mark.parametrize(("order", "param"), [(1, "paper"), (2, "paper"), (1, "rational")])
def test_fused_training_update_gives_the_same_meta_gradient(stream: tuple[Tensor, int], order: int,
                                                           param: str) -> None:
    """meta.fused_gate: the compiled differentiable update (MetaLearner.fused_update), checkpointed, gives the
    eager meta-gradient (float64: agreement to rounding, not to float32's reduction-order noise)."""
    tokens, vocab = stream
    chunk = tokens[None, : 6 * SEG + 1]
    grads = []
    for fused in (False, True):
        module = double_module(vocab, order, checkpointing=True, unroll=6, param=param)
        module.meta.fused = fused
        grads.append(torch.autograd.grad(meta_loss(module, chunk), list(module.meta.parameters())))
    assert max(float(g.abs().max()) for g in grads[0]) > 1e-6
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("order", "streams"), [(1, 1), (2, 1), (1, 2)])
def test_nested_checkpointing_gives_the_same_meta_gradient(stream: tuple[Tensor, int], order: int,
                                                           streams: int) -> None:
    """meta.checkpoint_group: groups of steps rerun in backward (CheckpointedSteps) give the per-step
    checkpointed meta-loss, θ_U, hidden state and φ gradient (float64; group 3 of 7 leaves a short last group)."""
    tokens, vocab = stream
    chunk = tokens[: streams * (7 * SEG + 1)].view(streams, -1)
    out = []
    for group in (0, 3):
        module = double_module(vocab, order, checkpointing=True, unroll=7)
        module.hparams.checkpoint_group = group
        module.hparams.ewc_lambda = 0.1  # the EWC term is part of each group's loss too
        loss, theta, hidden, _ = module.unroll(chunk, None, *module.initial_state(streams))
        grads = torch.autograd.grad(loss, list(module.meta.parameters()))
        out.append((loss.detach(), theta.detach(), hidden[-1][0].detach(), grads))
    (l0, t0, h0, g0), (l1, t1, h1, g1) = out
    assert torch.allclose(l0, l1, rtol=1e-12) and torch.allclose(t0, t1, rtol=1e-10, atol=1e-12)
    assert torch.allclose(h0, h1, rtol=1e-10, atol=1e-12)
    assert max(float(g.abs().max()) for g in g0) > 1e-6
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_trust_region_applies_in_meta_training_and_selection_when_on(stream: tuple[Tensor, int]) -> None:
    """eval.max_drift on (the module's max_drift): every inner step of an unroll ends inside the ball — the
    meta-gradient flows through the projection — and φ's selection loss is adaptive_eval with the same ball."""
    tokens, vocab = stream
    module = double_module(vocab, order=1, unroll=6)
    free = module.adaptive_loss(tokens[:200])
    radius = 1e-3 * float(module.dyn.theta0.norm())
    bounded = double_module(vocab, order=1, unroll=6)
    bounded.hparams.max_drift = 1e-3
    theta, hidden = bounded.initial_state(1)
    loss, theta_u, _, _ = bounded.unroll(tokens[None, : 6 * SEG + 1], None, theta, hidden)
    assert float(drift_norm(theta_u, bounded.dyn.theta0)) <= radius * (1 + 1e-9)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in bounded.meta.parameters()
               if p.grad is not None)
    sel = bounded.adaptive_loss(tokens[:200])
    ref = adaptive_eval(bounded.lm, tokens[:200], bounded.rule, SEG, bounded.dyn, max_drift=1e-3)
    assert sel == pytest.approx(float(ref.mean()), rel=1e-12) and sel != pytest.approx(free, rel=1e-6)


def test_rms_pt_with_equal_groups_is_krause_and_groups_split_by_layer(stream: tuple[Tensor, int]) -> None:
    """rms_pt with every group at rms's η and λ is Krause's rule; the groups are the embedding, each layer and the
    biases; a group's own λ changes only its own coordinates' decay."""
    tokens, vocab = stream
    model = tiny_lm(vocab).double()
    dyn = DynamicWeights.build(model, fisher_art=fake_fisher(model))
    groups = sorted(set(dyn.spec.groups))
    assert groups == ["bias", "encoder", "rnns.0", "rnns.1"]
    assert tensor_group("blocks.3.attn.c_attn.weight") == "blocks.3" and tensor_group("decoder_bias") == "bias"
    rms = {"lr": 3e-3, "lamb": 0.02, "eps": 2e-5}
    pt = {"eps": 2e-5, **{f"lr@{g}": 3e-3 for g in groups}, **{f"lamb@{g}": 0.02 for g in groups}}
    a = adaptive_eval(model, tokens[:300], build_rule("rms", rms, dyn), SEG, dyn)
    b = adaptive_eval(model, tokens[:300], build_rule("rms_pt", pt, dyn), SEG, dyn)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    one = build_rule("rms_pt", {**pt, "lamb@bias": 0.0}, dyn)
    base = build_rule("rms", rms, dyn)
    is_bias = torch.cat([torch.full((n,), g == "bias") for g, n in zip(dyn.spec.groups, dyn.spec.sizes,
                                                                      strict=True)])
    assert bool((one.d[is_bias] == 0).all()) and torch.equal(one.d[~is_bias], base.d[~is_bias])
    with pytest.raises(DynlmError, match=r"no value for the parameter group\(s\) \['rnns.1'\]"):
        build_rule("rms_pt", {k: v for k, v in pt.items() if not k.endswith("rnns.1")}, dyn)


@pytest.mark.parametrize(("param", "flush"), [("krause", True), ("rational", True), ("rational", False)])
def test_residual_gates_started_from_rms_pt_are_rms_pt(stream: tuple[Tensor, int], param: str, flush: bool) -> None:
    """A krause form given rms_pt's per-group η and λ ({group: value}) IS rms_pt until it trains (eager, compiled,
    along a stream; without FLUSH: rms_pt without decay), and its no-FLUSH COPY gate reads each group's own λ; the
    meta stage starts φ from whichever of sgd, rms and rms_pt tuned best."""
    from dynlm_pl.stages.meta import start_from_tuned

    tokens, vocab = stream
    model = tiny_lm(vocab)
    dyn = DynamicWeights.build(model, fisher_art=fake_fisher(model))
    lrs = {"bias": 4e-3, "encoder": 1e-3, "rnns.0": 2e-3, "rnns.1": 5e-4}
    lambs = {"bias": 0.0, "encoder": 0.02, "rnns.0": 0.5, "rnns.1": 0.0}
    pt = {"eps": 2e-5, **{f"lr@{g}": v for g, v in lrs.items()},
          **{f"lamb@{g}": v if flush else 0.0 for g, v in lambs.items()}}
    gate = {"param": param, "hidden": [], "features": FORM_FEATURES[param], "flush": flush, "embed_dim": 3}
    tuned = {"sgd": {"tune_loss": 4.2, "hparams": {"lr": 0.3}},
             "rms": {"tune_loss": 4.1, "hparams": {"lr": 2e-3, "lamb": 0.0, "eps": 2e-5}},
             "rms_pt": {"tune_loss": 4.0, "hparams": {**pt, **{f"lamb@{g}": v for g, v in lambs.items()}}}}
    assert start_from_tuned(gate, tuned) == "rms_pt" and gate["lr"] == lrs and gate["lamb"] == lambs
    meta = MetaLearner(len(dyn.spec.names), **gate, n_coords=dyn.spec.numel)
    want_rule = build_rule("rms_pt", pt, dyn)
    g = torch.Generator().manual_seed(1)
    theta = dyn.theta0 + 1e-3 * torch.randn(dyn.theta0.shape, generator=g)
    grad, loss = 1e-2 * torch.randn(theta.shape, generator=g), torch.tensor(4.0)
    want = want_rule.update(theta, grad, loss)
    for got in eager_and_compiled_updates(meta, dyn, theta, grad, loss):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert not torch.equal(want, build_rule("rms", tuned["rms"]["hparams"], dyn).update(theta, grad, loss))
    meta.fused = False
    torch.testing.assert_close(adaptive_eval(model, tokens[:300], GateRule(meta, dyn), SEG, dyn),
                               adaptive_eval(model, tokens[:300], want_rule, SEG, dyn), rtol=1e-5, atol=1e-5)
    if not flush:  # f = 1 + λ_group·clamp(o_f): each group's own λ
        with torch.no_grad():
            meta.out.bias[0] = 0.7
        f = meta(theta, grad, loss, dyn)[0]
        torch.testing.assert_close(f, 1 + 0.7 * dyn.spec.per_group(lambs, dyn.ms))
    del tuned["rms_pt"]
    assert start_from_tuned(gate, tuned) == "rms" and gate["lr"] == 2e-3 and gate["rms_scale"]
    tuned["sgd"]["tune_loss"] = 4.0
    assert start_from_tuned(gate, tuned) == "sgd" and gate["lr"] == 0.3 and not gate["rms_scale"]


def _phi_grad(module: MetaTrainModule, unroller: Unroller, chunk: Tensor, resets: Tensor | None) -> list[Tensor]:
    for p in module.meta.parameters():
        p.grad = None
    theta, hidden = unroller.initial_state(chunk.size(0))
    loss = unroller(chunk, resets, theta, hidden)[0]
    if loss.requires_grad:
        loss.backward()
    return [p.grad.clone() for p in module.meta.parameters()]


@pytest.mark.parametrize(("param", "streams", "ewc", "reset"), [
    ("paper", 1, 0.0, False), ("rational", 1, 0.0, False), ("paper", 2, 0.5, True), ("rational", 1, 0.5, True),
    ("meta_sgd", 1, 0.0, True), ("drift", 2, 0.0, True)])
def test_fast_first_order_equals_autograd_with_the_hidden_path_detached(stream: tuple[Tensor, int], param: str,
                                                                       streams: int, ewc: float, reset: bool) -> None:
    """FastFirstOrder (the gates' vector-Jacobian products only) gives autograd's first-order meta-gradient when
    autograd too ignores the path through the hidden state: the same φ gradient to float64 rounding, also with B
    streams, the EWC term and article resets, also rebuilding groups of steps in the reverse pass; and the same
    meta-loss."""
    tokens, vocab = stream
    module = double_module(vocab, order=1, unroll=6, param=param)
    hp = module.hparams
    hp.ewc_lambda = ewc
    chunk = torch.stack([tokens[b * 200 : b * 200 + 6 * SEG + 1] for b in range(streams)])
    resets = torch.zeros(streams, 6, dtype=torch.bool)
    resets[0, 3] = reset
    args = (module.lm, module.rule, module.dyn, list(module.meta.parameters()), SEG, 6, 1, False, 0, ewc)
    ref = _phi_grad(module, Unroller(*args, detach_hidden=True), chunk, resets if reset else None)
    fast = _phi_grad(module, FastFirstOrder(*args), chunk, resets if reset else None)
    for a, b in zip(ref, fast, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    # groups of 4 + 2 steps rebuilt in the reverse pass (meta.checkpoint_group): the same gradient
    grouped = _phi_grad(module, FastFirstOrder(*args[:7], True, 4, ewc), chunk, resets if reset else None)
    for a, b in zip(fast, grouped, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)
    full = _phi_grad(module, Unroller(*args), chunk, resets if reset else None)  # with the hidden-state path
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in full]),
                                                torch.cat([g.flatten() for g in fast]), dim=0)
    assert 0.5 < float(cos) < 1.0  # close in direction, not equal: the dropped path carries some of it
    theta, hidden = module.initial_state(streams)
    l_ref = Unroller(*args)(chunk, None, theta, hidden)[0]
    l_fast = FastFirstOrder(*args)(chunk, None, theta, hidden)[0]
    assert float(l_fast) == pytest.approx(float(l_ref), rel=1e-12)

@pytest.mark.parametrize(("param", "streams", "ewc", "group"), [
    ("paper", 1, 0.5, 0), ("meta_sgd", 1, 0.0, 4), ("drift", 2, 0.5, 0)])
def test_the_reverse_pass_on_sampled_coordinates_is_the_whole_pass_restricted_to_them(
        stream: tuple[Tensor, int], monkeypatch: pytest.MonkeyPatch, param: str, streams: int, ewc: float,
        group: int) -> None:
    """meta.reverse_sample: the φ gradients of two samples that split the coordinates between them, each coordinate
    weighted 1, add up to the whole reverse pass's (to float64 rounding): the restricted gates read the whole
    vector's constants, Meta-SGD offsets, drift feature, EWC term, resets and B streams as the whole pass does. A
    weight w scales a sample's contribution by w, and the meta-loss is the forward pass's, unchanged."""
    tokens, vocab = stream
    module = double_module(vocab, order=1, unroll=6, param=param)
    chunk = torch.stack([tokens[b * 200 : b * 200 + 6 * SEG + 1] for b in range(streams)])
    resets = torch.zeros(streams, 6, dtype=torch.bool)
    resets[0, 3] = True
    args = (module.lm, module.rule, module.dyn, list(module.meta.parameters()), SEG, 6, 1, group > 0, group, ewc)
    whole = _phi_grad(module, FastFirstOrder(*args), chunk, resets)
    spec = module.dyn.spec
    owner = torch.repeat_interleave(torch.arange(len(spec.sizes)), torch.tensor(spec.sizes))
    halves = []
    for half, w in ((0, 1.0), (1, 1.0), (1, 2.0)):
        keep = (torch.arange(spec.numel) // 3) % 2 == half
        sample = CoordinateSample(torch.arange(spec.numel)[keep], torch.full((int(keep.sum()),), w),
                                  torch.bincount(owner[keep], minlength=len(spec.sizes)).tolist())
        monkeypatch.setattr(unroll_module, "sample_coordinates", lambda *_a, s=sample, **_k: s)
        halves.append(_phi_grad(module, FastFirstOrder(*args, sample=0.5), chunk, resets))
    for g, a, b, b2 in zip(whole, *halves, strict=True):
        torch.testing.assert_close(a + b, g, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b2, 2 * b, rtol=1e-12, atol=1e-15)
    assert all(float(torch.cat([g.flatten() for g in h]).abs().sum()) > 0 for h in halves)  # both carry part of it
    theta, hidden = module.initial_state(streams)
    l_whole = FastFirstOrder(*args)(chunk, None, theta, hidden)[0]
    l_half = FastFirstOrder(*args, sample=0.5)(chunk, None, theta, hidden)[0]
    assert float(l_half) == float(l_whole)


def test_sample_coordinates_weights_each_coordinate_by_the_inverse_of_its_probability() -> None:
    """Each tensor keeps ⌈fraction·n_blocks⌉ of its blocks (at least one; whole blocks but a tensor's last), the
    indices ascend without repeats, and weight × indicator averages to 1 for every coordinate: the weighted sum over
    a sample is an unbiased estimate of the sum over all coordinates. fraction 1 draws everything with weight 1."""
    spec = DynamicSpec(("a", "b", "c"), (torch.Size([10, 7]), torch.Size([5]), torch.Size([33])))
    gen = torch.Generator().manual_seed(0)
    acc, n = torch.zeros(spec.numel, dtype=torch.float64), 4000
    for _ in range(n):
        s = sample_coordinates(spec, 0.3, block=4, generator=gen)
        assert bool((s.index.diff() > 0).all()) and sum(s.sizes) == s.index.numel() == s.weight.numel()
        assert s.sizes[0] in (24, 22) and s.sizes[1] in (4, 1) and s.sizes[2] in (12, 9)  # 6, 1 and 3 blocks
        acc[s.index] += s.weight.double()
    assert float((acc / n - 1).abs().max()) < 0.1  # 4.5 standard errors of the largest-variance coordinate
    full = sample_coordinates(spec, 1.0, block=4)
    assert torch.equal(full.index, torch.arange(spec.numel)) and bool((full.weight == 1).all())


def test_sample_coordinates_always_takes_the_rows_of_the_words_read() -> None:
    """The rows of `rows` in the tensors whose first dimension is the vocabulary (a table [V, E], a bias [V]) are in
    every sample with weight 1; every other coordinate keeps weight × indicator averaging to 1 (still unbiased), and
    a tensor of another shape is sampled as without rows."""
    spec = DynamicSpec(("emb", "w", "bias"), (torch.Size([6, 4]), torch.Size([5, 3]), torch.Size([6])))
    rows, vocab = torch.tensor([1, 4]), 6
    taken = torch.zeros(spec.numel, dtype=torch.bool)
    taken[torch.tensor([4, 5, 6, 7, 16, 17, 18, 19, 40, 43])] = True  # emb rows 1 and 4, bias entries 1 and 4
    gen = torch.Generator().manual_seed(0)
    acc, n = torch.zeros(spec.numel, dtype=torch.float64), 4000
    for _ in range(n):
        s = sample_coordinates(spec, 0.25, block=4, generator=gen, rows=rows, vocab=vocab)
        assert bool((s.index.diff() > 0).all()) and sum(s.sizes) == s.index.numel() == s.weight.numel()
        assert bool(taken[s.index].sum() == taken.sum()) and bool((s.weight[taken[s.index]] == 1).all())
        assert s.sizes[1] in (4, 3)  # "w" [5, 3] is not a vocabulary table: 1 of its 4 blocks (the last is short)
        acc[s.index] += s.weight.double()
    assert float((acc / n - 1).abs().max()) < 0.15  # 4.5 standard errors of the largest-variance coordinate
    assert bool((acc[taken] == n).all())



@pytest.mark.parametrize("lamb", ["none", "one group", "all"])
def test_rms_update_in_place_equals_the_whole_vector_update(lamb: str) -> None:
    """RMSRule.update_ runs its decay pass only over the coordinates with d > 0 (none for λ = 0, one group's span
    for an rms_pt rule decaying one group): the same numbers as the out-of-place update over all of θ, for one
    stream and for B streams."""
    model = tiny_lm(30)
    dyn = DynamicWeights.build(model, fisher_art=fake_fisher(model))
    groups = dict.fromkeys(dyn.spec.groups)
    lam = {"none": dict.fromkeys(groups, 0.0), "all": dict.fromkeys(groups, 0.3),
           "one group": {g: 0.3 if g == "rnns.0" else 0.0 for g in groups}}[lamb]
    rule = RMSRule(dyn, 1e-3, dyn.spec.per_group(lam, dyn.theta0), 2e-5)
    lo, hi = rule.span
    assert {"none": hi == lo, "all": hi - lo == dyn.spec.numel, "one group": 0 < hi - lo < dyn.spec.numel}[lamb]
    for shape in ((dyn.spec.numel,), (3, dyn.spec.numel)):
        theta = dyn.theta0 + 0.1 * torch.randn(shape)
        grad = torch.randn(shape)
        want = rule.update(theta, grad, torch.tensor(0.0))
        torch.testing.assert_close(rule.update_(theta.clone(), grad, torch.tensor(0.0)), want, rtol=0, atol=0)


def test_selection_slice_read_in_pieces_scores_as_one_pass(stream: tuple[Tensor, int]) -> None:
    """The meta stage's validation reads the selection slice as pieces (a bar that moves): carrying θ and the hidden
    state from piece to piece gives exactly the losses of one pass, whatever the piece count."""
    from dynlm_pl.data import stream_pieces

    tokens, vocab = stream[0][:248], stream[1]  # 247 targets: the last segment is shorter
    lm = tiny_lm(vocab)
    dyn = DynamicWeights.build(lm, fisher_art=fake_fisher(lm))
    rule = build_rule("rms", {"lr": 3e-3, "lamb": 0.01, "eps": 2e-5}, dyn)
    whole = adaptive_eval(lm, tokens, rule, 5, dyn)
    for pieces in (1, 3, 7, 40):
        parts = stream_pieces(tokens, 5, pieces)
        assert all((p.numel() - 1) % 5 == 0 for p in parts[:-1]) and len(parts) <= pieces
        carry: dict = {}
        got = torch.cat([adaptive_eval(lm, p, rule, 5, dyn, carry=carry) for p in parts], dim=1)
        assert torch.equal(got, whole), pieces
