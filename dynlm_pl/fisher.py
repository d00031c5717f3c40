"""The static long-term memory θ_0: a Laplace approximation around the pretrained LM (EWC).

Wolf et al. 2018 (appendix A), after Kirkpatrick et al. 2017: the posterior over the pretrained
weights is approximated by a Gaussian with mean θ* (the LM) and diagonal precision F, the diagonal of
the Fisher information, estimated from first derivatives of the LM loss over the training stream.
Later stages read F per coordinate and may add the EWC penalty λ/2 Σ F (θ − θ_0)².

Two estimators, both with dropout off (model.eval()) and the hidden state carried along each stream:

- `empirical`: F = mean over examples n of g_n², g_n = ∇θ ℓ_n. An *example* is one window of
  `window` consecutive tokens of one stream; ℓ_n is the mean token cross-entropy over that window,
  given the hidden state the (frozen) model carried into it from the stream's earlier windows (no
  gradient flows across windows). The training split is read as `batch_size` contiguous streams, so
  `batch_size` examples are taken at once. Per-example gradients are exact, from one batched backward:
  each weight's gradient is Σ_t δ_t ⊗ input_t per example (see `_per_example_sq`); this was ~2.4x
  faster than `vmap(grad(functional_call))` on a `kernel="manual"` copy for model=small, and is checked
  against the model's own forward on the first window and against a one-example loop in the tests.
- `batch_ms`: Krause et al. 2017's gradient statistics (`gradstat` of dynamic evaluation): the mean
  over mini-batches of the squared mini-batch gradient, the batch being `batch_size` streams (100 by
  default) × `window` tokens (5), loss = mean token loss of the batch. Its square root is the RMS that
  scales his updates; the artifact always carries it as `ms`.

The scale of F depends on what an example is (a longer window averages more tokens into ℓ_n, so its
squared gradient is smaller); EWC's λ absorbs it, as in Kirkpatrick et al.

DDP: the global streams are cut once and each rank reads its own contiguous block (`data.shard_streams`).
Sums of squares, example and token counts are all-reduced and divided by the global count; batch_ms
all-reduces each mini-batch gradient first (the global batch gradient is the mean of the ranks'
equal-sized local ones), so one process and several give the same F up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from tqdm import tqdm

from dynlm_pl.data import StreamWindows, fisher_streams, shard_streams
from dynlm_pl.errors import require
from dynlm_pl.models.awd_lstm import AWDLSTM, Hidden, detach_hidden, lm_loss

ESTIMATORS = ("empirical", "batch_ms")


# ----------------------------------------------------------------------------------------------------
# The posterior (fisher.pt holds it: dynlm_pl.artifacts)
# ----------------------------------------------------------------------------------------------------


@dataclass
class FisherArtifact:
    theta0: dict[str, Tensor]  # θ_0 = the LM's parameters, keyed like model.named_parameters()
    fisher: dict[str, Tensor]  # diag F of `estimator`, same keys and shapes, >= 0
    ms: dict[str, Tensor]  # Krause et al. 2017 mean squared batch gradients, same keys
    estimator: str  # "empirical" | "batch_ms"
    tokens: int  # tokens (targets scored) the estimate of F used
    lm_sha256: str  # sha256 of the lm.ckpt it came from
    meta: dict[str, Any] = field(default_factory=dict)  # batch, window, seed, data, seconds, ...

    def to(self, device: torch.device | str) -> FisherArtifact:
        """A copy with every tensor on `device` (once, rather than in every penalty call)."""
        mv = lambda d: {k: v.to(device) for k, v in d.items()}
        return FisherArtifact(mv(self.theta0), mv(self.fisher), mv(self.ms), self.estimator, self.tokens,
                              self.lm_sha256, dict(self.meta))


def ewc_penalty_of(theta: Tensor, theta0: Tensor, fisher: Tensor, lam: float) -> Tensor:
    """λ/2 Σ F (θ − θ_0)² of tensors of one shape (a parameter, or the flat dynamic vector [P] or [B, P])."""
    return 0.5 * lam * (fisher * (theta - theta0).square()).sum()


def ewc_penalty(params: dict[str, Tensor], art: FisherArtifact, lam: float) -> Tensor:
    """λ/2 Σ F (θ − θ_0)², summed over the keys present in `params` (differentiable in `params`)."""
    require(len(params) > 0, "ewc_penalty got an empty parameter dict")
    total = None
    for k, p in params.items():
        require(k in art.fisher, f"parameter {k!r} has no Fisher entry; the fisher.pt belongs to another "
                "model: rerun `python train.py stage=fisher`")
        f, t0 = art.fisher[k], art.theta0[k]
        require(f.shape == p.shape, f"parameter {k!r} has shape {tuple(p.shape)} but its Fisher entry "
                f"{tuple(f.shape)}; the fisher.pt belongs to another model: rerun stage=fisher")
        term = ewc_penalty_of(p, t0.to(p.device, p.dtype), f.to(p.device, p.dtype), lam)
        total = term if total is None else total + term
    return total


def log_prior(params: dict[str, Tensor], art: FisherArtifact) -> Tensor:
    """log N(θ; θ_0, F⁻¹) up to a constant: −½ Σ F (θ − θ_0)²."""
    return -ewc_penalty(params, art, 1.0)


# ----------------------------------------------------------------------------------------------------
# Estimation
# ----------------------------------------------------------------------------------------------------


def _per_example_sq(params: dict[str, Tensor], x: Tensor, y: Tensor, hidden: Hidden,
                    chunk: int = 4) -> tuple[dict[str, Tensor], Hidden, Tensor]:
    """Σ_b g_b² over the B examples of one window, g_b the exact gradient of example b's loss.

    AWDLSTM's eval-mode forward (no dropout) written out so that one batched backward yields every
    per-example gradient: examples share weights but no activations, so the gradient of Σ_b ℓ_b with
    respect to example b's activations is that of ℓ_b alone, and a weight's per-example gradient is a
    sum over time of outer products (backprop δ ⊗ layer input), one bmm per weight. The tied
    [V, E] matrix gets its decoder part δlogits_b^T out_b plus its embedding rows; those [V, E] are
    made `chunk` examples at a time to bound memory. x, y: int64 [B, T]; hidden: per layer [B, H].
    Returns (sums [shape] float32, new hidden, logits [B, T, V] for the caller's consistency check).
    """
    B, T = x.shape
    W = params["encoder.weight"]  # [V, E], tied encoder/decoder
    n_layers = sum(1 for k in params if k.endswith(".weight_hh"))
    # Weights are constants here: autograd only carries activation gradients (the δ's).
    emb = F.embedding(x, W).requires_grad_(True)  # [B, T, E], a leaf
    inp, new_hidden, saved = emb, [], []
    for layer in range(n_layers):
        w_ih, w_hh = params[f"rnns.{layer}.weight_ih"], params[f"rnns.{layer}.weight_hh"]
        b = params[f"rnns.{layer}.bias_ih"] + params[f"rnns.{layer}.bias_hh"]
        xs = inp @ w_ih.t() + b  # [B, T, 4H]: gates minus the recurrent term; its grad is δgates
        xs.retain_grad()
        h, c = hidden[layer]
        prev, outs = [], []
        for t in range(T):  # the same recurrence as awd_lstm.lstm_manual (gates i, f, g, o)
            prev.append(h)
            gates = xs[:, t] + h @ w_hh.t()
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        saved.append((inp.detach(), xs, torch.stack(prev, 1).detach()))  # input [B,T,I], h_{t-1} [B,T,H]
        new_hidden.append((h.detach(), c.detach()))
        inp = torch.stack(outs, 1)
    out = inp.detach()  # [B, T, E], the decoder's input
    logits = inp @ W.t() + params["decoder_bias"]  # [B, T, V]
    logits.retain_grad()
    # Σ_b (mean token loss of example b) = summed token loss / T.
    (lm_loss(logits, y, reduction="sum") / T).backward()
    d_logits, d_emb = logits.grad, emb.grad  # [B, T, V], [B, T, E]
    sq: dict[str, Tensor] = {"decoder_bias": d_logits.sum(1).square().sum(0)}
    for layer, (a_in, xs, h_prev) in enumerate(saved):
        d = xs.grad.transpose(1, 2)  # [B, 4H, T]
        sq[f"rnns.{layer}.weight_ih"] = torch.bmm(d, a_in).square_().sum(0)
        sq[f"rnns.{layer}.weight_hh"] = torch.bmm(d, h_prev).square_().sum(0)
        sq[f"rnns.{layer}.bias_ih"] = sq[f"rnns.{layer}.bias_hh"] = d.sum(2).square().sum(0)
    V, E = W.shape
    enc = torch.zeros_like(W)
    for s in range(0, B, chunk):
        n = min(chunk, B - s)
        g = torch.bmm(d_logits[s : s + n].transpose(1, 2), out[s : s + n])  # [n, V, E] decoder part
        rows = (torch.arange(n, device=x.device) * V).unsqueeze(1) + x[s : s + n]  # [n, T] rows of g
        g.view(n * V, E).index_add_(0, rows.reshape(-1), d_emb[s : s + n].reshape(-1, E))  # embedding part
        enc += g.square_().sum(0)
    sq["encoder.weight"] = enc
    return sq, new_hidden, logits.detach()


class FisherAccumulator:
    """Running sums of one estimator over one rank's windows; `step` per window, `result` at the end.

    The model is only read: its parameters are used detached, so it may be frozen.
    """

    def __init__(self, model: AWDLSTM, estimator: str, world: int = 1) -> None:
        require(estimator in ESTIMATORS, f"fisher.estimator must be one of {', '.join(ESTIMATORS)}, "
                f"got {estimator!r}")
        self.estimator, self.world = estimator, world
        self.model = model.eval()
        self.params = {k: p.detach() for k, p in model.named_parameters()}
        require(type(model) is AWDLSTM, f"the Fisher pass knows AWDLSTM's forward, got {type(model).__name__}")
        self._checked = False  # the written-out forward is compared with the model's on the first window
        # Sums in float64: many small squares, and rank-order independent to well below 1e-6.
        self.sq = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in self.params.items()}
        self.count = 0  # examples (empirical) or mini-batches (batch_ms) seen by this rank
        self.tokens = 0  # targets scored by this rank
        self.hidden: Hidden | None = None

    def reset_hidden(self) -> None:
        self.hidden = None

    def step(self, x: Tensor, y: Tensor) -> None:
        """One window of this rank's streams: x, y int64 [B, T]."""
        if self.hidden is None or self.hidden[0][0].size(0) != x.size(0):
            self.hidden = self.model.init_hidden(x.size(0))
        if self.estimator == "empirical":
            with torch.enable_grad():
                sums, hidden, logits = _per_example_sq(self.params, x, y, self.hidden)
            if not self._checked:
                with torch.no_grad():
                    ref = self.model(x, self.hidden).logits
                require(torch.allclose(logits, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())),
                        "the Fisher pass's forward disagrees with the model's (AWDLSTM changed?); "
                        "update dynlm_pl.fisher._per_example_sq")
                self._checked = True
            for k, s in sums.items():
                self.sq[k] += s.double()
            self.count += x.size(0)
        else:
            leaves = {k: p.clone().requires_grad_(True) for k, p in self.params.items()}
            # cuDNN has no backward in eval mode; the native kernel has (a no-op on CPU).
            with torch.enable_grad(), torch.backends.cudnn.flags(enabled=False):
                out = functional_call(self.model, leaves, (x, self.hidden))
                loss = lm_loss(out.logits, y)
                gs = torch.autograd.grad(loss, list(leaves.values()))
            hidden = out.hidden
            if self.world > 1:  # the global batch gradient: the mean of the ranks' equal-sized ones
                flat = torch.cat([g.reshape(-1) for g in gs])
                dist.all_reduce(flat)
                gs = (flat / self.world).split([g.numel() for g in gs])
            for k, g in zip(leaves, gs, strict=True):
                self.sq[k] += g.reshape(self.sq[k].shape).square().double()
            self.count += 1
        self.hidden = detach_hidden(hidden)
        self.tokens += y.numel()

    def result(self) -> tuple[dict[str, Tensor], int]:
        """(mean squares as float32, global tokens); a collective under DDP: every rank must call it."""
        sq, count, tokens = self.sq, self.count, self.tokens
        if self.world > 1:
            dev = next(iter(sq.values())).device
            ct = torch.tensor([count, tokens], dtype=torch.float64, device=dev)
            dist.all_reduce(ct)
            tokens = int(ct[1].item())
            if self.estimator == "empirical":  # batch_ms sums are already identical on every rank
                flat = torch.cat([s.reshape(-1) for s in sq.values()])
                dist.all_reduce(flat)
                sq = dict(zip(sq, (f.view_as(s) for f, s in zip(flat.split([s.numel() for s in sq.values()]),
                                                                sq.values(), strict=True)), strict=True))
                count = int(ct[0].item())
        require(count > 0, "the Fisher pass saw no examples; raise fisher.tokens or lower the batch size")
        return {k: (s / count).float() for k, s in sq.items()}, tokens


def estimate_fisher(model: AWDLSTM, tokens: Tensor, estimator: str, n_tokens: int | None, batch_size: int,
                    window: int, seed: int, progress: bool = False, rank: int = 0,
                    world: int = 1) -> tuple[dict[str, Tensor], int]:
    """diag F of `model` (read in eval mode) over `tokens` [N] (a whole split, flat).

    `batch_size` is the global number of streams, `window` the tokens per window; under DDP
    (`world` > 1, torch.distributed initialized) rank `rank` reads its own block of streams and every
    rank returns the same result. Returns ({name: F [shape]} keyed like named_parameters(), tokens used).
    """
    require(window >= 1, f"fisher window must be a positive number of tokens, got {window}")
    streams = fisher_streams(tokens, n_tokens, batch_size, seed)
    mine = shard_streams(streams, rank, world).to(next(model.parameters()).device)
    acc = FisherAccumulator(model, estimator, world)
    windows = StreamWindows(mine, window)
    for x, y in tqdm(windows, total=len(windows), disable=not progress or rank != 0, desc=f"fisher {estimator}",
                     leave=False):
        acc.step(x, y)
    return acc.result()


def summarize(fisher: dict[str, Tensor]) -> list[tuple[str, tuple[int, ...], float, float, float]]:
    """(name, shape, min, median, max) per tensor, for printing."""
    rows = []
    for k, f in fisher.items():
        v = f.reshape(-1).double()
        # torch.median refuses very large tensors on some builds; quantile of a sample would be inexact.
        med = float(v.sort().values[(v.numel() - 1) // 2]) if v.numel() else math.nan
        rows.append((k, tuple(f.shape), float(v.min()), med, float(v.max())))
    return rows
