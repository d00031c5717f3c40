"""AWD-LSTM: functional forward, kernels, tied weights, second order, size of the paper's preset."""

from __future__ import annotations

import hydra
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from dynlm_pl.models.awd_lstm import AWDLSTM, Hidden, detach_hidden, lm_loss

V, B, T = 50, 3, 9
KERNELS = ["fused", "manual"]


def make_model(kernel: str = "fused", seed: int = 0, **kw: float) -> AWDLSTM:
    torch.manual_seed(seed)
    # Three layers so the input, middle and output layer shapes all appear; every dropout is on.
    args = dict(emb_size=16, hidden_size=24, num_layers=3, dropout=0.3, dropouth=0.2, dropouti=0.3,
                dropoute=0.1, wdrop=0.4)
    args.update(kw)
    return AWDLSTM(V, kernel=kernel, **args)


def tokens(seed: int = 1, length: int = T, high: int = V) -> Tensor:
    return torch.randint(0, high, (B, length), generator=torch.Generator().manual_seed(seed))


def cloned_params(model: AWDLSTM) -> dict[str, Tensor]:
    """A separate parameter dict (new tensors), as the meta stage swaps in its dynamic weights."""
    return {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}


def assert_hidden_equal(a: Hidden, b: Hidden, atol: float = 0.0) -> None:
    assert len(a) == len(b)
    for (ha, ca), (hb, cb) in zip(a, b, strict=True):
        torch.testing.assert_close(ha, hb, rtol=0, atol=atol)
        torch.testing.assert_close(ca, cb, rtol=0, atol=atol)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("train", [False, True])
def test_functional_forward_equals_module_forward(kernel: str, train: bool) -> None:
    model = make_model(kernel).train(train)
    x, params = tokens(), cloned_params(model)
    h0 = [(torch.randn(B, r.hidden_size), torch.randn(B, r.hidden_size)) for r in model.rnns]
    torch.manual_seed(123)  # same dropout masks on both paths
    ref = model(x, h0)
    torch.manual_seed(123)
    out = functional_call(model, params, (x, h0))
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.raw_output, ref.raw_output) and torch.equal(out.output, ref.output)
    assert_hidden_equal(out.hidden, ref.hidden)
    if train:  # guard: the masks really are random, so the seeding above is what made them agree
        assert not torch.equal(model(x, h0).logits, ref.logits)


@pytest.mark.parametrize("train", [False, True])
def test_fused_equals_manual_kernel(train: bool) -> None:
    fused = make_model("fused").train(train)
    manual = make_model("manual").train(train)
    manual.load_state_dict(fused.state_dict())
    x = tokens()
    torch.manual_seed(7)
    a = fused(x)
    torch.manual_seed(7)
    b = manual(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    assert_hidden_equal(a.hidden, b.hidden, atol=1e-6)
    # Same gradients too: the kernels are interchangeable for training.
    ga = torch.autograd.grad(lm_loss(a.logits, tokens(2)), list(fused.parameters()))
    gb = torch.autograd.grad(lm_loss(b.logits, tokens(2)), list(manual.parameters()))
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)


def test_tied_weights_single_parameter() -> None:
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    assert names.count("encoder.weight") == 1
    assert not any(n.startswith("decoder") and n != "decoder_bias" for n in names), names


@pytest.mark.parametrize("kernel", KERNELS)
def test_tied_weights_under_functional_path(kernel: str) -> None:
    model = make_model(kernel).eval()
    x = tokens(high=V // 2)  # only the first half of the vocabulary is read as input
    y = tokens(seed=5)
    params = cloned_params(model)
    out = functional_call(model, params, (x,))
    loss = lm_loss(out.logits, y)
    (g_total,) = torch.autograd.grad(loss, [params["encoder.weight"]], retain_graph=True)
    # The decoder's share of d loss / d W: dlogits^T @ output, with dlogits = (softmax - onehot) / N.
    logits = out.logits.detach().reshape(-1, V)
    dlogits = (logits.softmax(-1) - F.one_hot(y.reshape(-1), V).float()) / y.numel()
    g_dec = dlogits.t() @ out.output.detach().reshape(-1, out.output.size(-1))
    unread = torch.arange(V // 2, V)
    # Words never read as input get gradient from the decoder alone; it must be there (tied) ...
    assert g_dec[unread].abs().sum() > 0
    torch.testing.assert_close(g_total[unread], g_dec[unread], rtol=1e-5, atol=1e-7)
    # ... and words that were read get the encoder's share on top of it.
    read = x.unique()
    assert (g_total[read] - g_dec[read]).abs().sum() > 1e-6

    # A swapped-in encoder weight is also the decoder: logits = output @ W'^T + b.
    w_new = torch.randn_like(params["encoder.weight"])
    swapped = functional_call(model, {**params, "encoder.weight": w_new}, (x,))
    torch.testing.assert_close(swapped.logits, F.linear(swapped.output, w_new, params["decoder_bias"]),
                               rtol=0, atol=1e-6)
    assert not torch.allclose(swapped.logits, out.logits)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("train", [False, True])
def test_double_backward(kernel: str, train: bool) -> None:
    model = make_model(kernel).train(train)
    params = cloned_params(model)
    torch.manual_seed(0)
    loss = lm_loss(functional_call(model, params, (tokens(),)).logits, tokens(2))
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    # A second-order quantity of every parameter: d/dθ |∇θ L|².
    gnorm = sum((g * g).sum() for g in grads)
    second = torch.autograd.grad(gnorm, list(params.values()))
    for (name, _), g2 in zip(params.items(), second, strict=True):
        assert torch.isfinite(g2).all(), name
        assert g2.abs().sum() > 0, f"second derivative w.r.t. {name} is zero"


def test_double_backward_same_for_both_kernels() -> None:
    """The second derivatives agree between kernels, so neither is silently wrong."""
    results = []
    for kernel in KERNELS:
        model = make_model(kernel).eval()
        params = cloned_params(model)
        loss = lm_loss(functional_call(model, params, (tokens(),)).logits, tokens(2))
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        results.append(torch.autograd.grad(sum((g * g).sum() for g in grads), list(params.values())))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_awd_lstm_preset_parameter_count(compose_cfg) -> None:
    cfg = compose_cfg(["model=awd_lstm"])
    model = hydra.utils.instantiate(cfg.model, vocab_size=33_278)
    assert isinstance(model, AWDLSTM)
    assert (model.emb_size, model.hidden_size, model.num_layers) == (400, 1150, 3)
    assert sum(p.numel() for p in model.parameters()) == 33_556_078


@pytest.mark.parametrize("kernel", KERNELS)
def test_eval_mode_is_deterministic(kernel: str) -> None:
    model = make_model(kernel)
    x = tokens()
    model.train()
    torch.manual_seed(0)
    a = model(x).logits
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x).logits), "train mode must apply dropout"
    model.eval()
    torch.manual_seed(0)
    e1 = model(x).logits
    torch.manual_seed(1)
    e2 = model(x).logits
    assert torch.equal(e1, e2)


@pytest.mark.parametrize("kernel", KERNELS)
def test_carried_hidden_equals_one_long_sequence(kernel: str) -> None:
    model = make_model(kernel).eval()
    x = tokens(length=2 * T)
    with torch.no_grad():
        full = model(x)
        first = model(x[:, :T])
        second = model(x[:, T:], detach_hidden(first.hidden))
        restart = model(x[:, T:])
    joined = torch.cat([first.logits, second.logits], dim=1)
    torch.testing.assert_close(joined, full.logits, rtol=0, atol=1e-6)
    assert_hidden_equal(second.hidden, full.hidden, atol=1e-6)
    # Guard: starting the second window from zeros instead gives other numbers.
    assert not torch.allclose(restart.logits, second.logits, atol=1e-4)


def test_stream_lstm_backward_equals_autograd_through_plain_ops() -> None:
    """StreamLSTM (per-stream recurrent weights, backward written out) against autograd through
    lstm_manual's per-step bmm, in float64: outputs and every input gradient, incl. h_T / c_T cotangents."""
    from dynlm_pl.models.awd_lstm import StreamLSTM, lstm_manual

    g = torch.Generator().manual_seed(0)
    B, T, H, In = 3, 4, 5, 6
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)
    x, h0, c0 = mk(B, T, In), mk(B, H), mk(B, H)
    w_ih, w_hh, b_ih, b_hh = mk(B, 4 * H, In), mk(B, 4 * H, H), mk(B, 4 * H), mk(B, 4 * H)
    w_out, w_h, w_c = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, T, H), (B, H), (B, H)))
    inputs = [x, h0, c0, w_ih, w_hh, b_ih, b_hh]

    def run(fast: bool) -> tuple[Tensor, list[Tensor]]:
        if fast:
            xs = torch.baddbmm((b_ih + b_hh)[:, None], x, w_ih.transpose(1, 2))
            out, h, c = StreamLSTM.apply(xs, h0, c0, w_hh)
        else:
            out, (h, c) = lstm_manual(x, (h0, c0), w_ih, w_hh, b_ih, b_hh)
        loss = (out * w_out).sum() + (h * w_h).sum() + (c * w_c).sum()
        return out.detach(), list(torch.autograd.grad(loss, inputs))

    (o1, g1), (o2, g2) = run(True), run(False)
    assert torch.allclose(o1, o2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda xs, w: StreamLSTM.apply(xs, h0.detach(), c0.detach(), w),
                                    (mk(B, T, 4 * H), mk(B, 4 * H, H)))
