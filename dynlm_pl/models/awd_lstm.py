"""AWD-LSTM (Merity et al. 2017) as a pure nn.Module whose forward also runs on swapped-in weights.

Every weight is read from `self` inside `forward`, so `torch.func.functional_call(model, params, ...)`
runs the same code on a dynamic parameter dict θ_t, differentiably (second order included). The
decoder has no weight of its own: it is `encoder.weight` by construction, so tied weights cannot come
untied when a dict is swapped in, and appear once in `named_parameters()`.

Two LSTM kernels share one weight layout (nn.LSTM's: gates i, f, g, o stacked in 4H rows):
`fused` calls `torch.lstm` (what nn.LSTM runs; fast, double-differentiable on CPU), `manual` writes
the recurrence with matmuls (double-differentiable on GPUs where cuDNN is not, usable for backward in
eval mode). Both give the same numbers. Any weight may also carry a leading stream dimension (one set of
weights per row, `meta.scoring.score` with θ [B, P]): batched matmuls, with `StreamLSTM` under `fused`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynlm_pl.models.backbone import LMOutput

Hidden = list[tuple[Tensor, Tensor]]  # per layer (h, c), each [B, H_l]


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Variational dropout: one mask per sequence, shared across time. x: [B, T, D]."""
    if not training or p == 0.0:
        return x
    mask = x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - p) / (1 - p)
    return x * mask


def embedding_dropout(weight: Tensor, p: float, training: bool) -> Tensor:
    """Drop whole words: rows of the embedding matrix [V, E] are zeroed (and the rest rescaled)."""
    if not training or p == 0.0:
        return weight
    mask = weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)
    return weight * mask


class StreamLookup(torch.autograd.Function):
    """tokens [B, T] looked up in w [V, E], or row b in its own table w [B, V, E], -> [B, T, E], with a SPARSE
    gradient for w (first order): the B·T rows instead of a zero-filled table (`AWDLSTM.forward(sparse_grad=True)`).

    `tie`: the dict the tied decoder's `StreamLinear` left its dense gradient of w in (its backward runs first:
    this lookup's input gradient depends on it). The rows are then added into that tensor in place and no
    gradient is returned for w. Why: autograd sums a dense and a sparse gradient of one tensor out of place, a
    full copy of the table per segment (a fifth of an sgd segment on model=small at B = 1 and at B = 8,
    bench_eval --profile); the engine still waits for this node before it passes w's gradient on."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, tokens: Tensor, tie: dict[str, Tensor] | None = None) -> Tensor:
        ctx.save_for_backward(tokens)
        ctx.w_shape, ctx.tie = w.shape, tie
        return w[tokens] if w.dim() == 2 else w[torch.arange(w.size(0), device=w.device)[:, None], tokens]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None]:
        (tokens,) = ctx.saved_tensors
        b, t = tokens.shape
        index = (tokens.reshape(-1),) if len(ctx.w_shape) == 2 else \
            (torch.arange(b, device=g.device).repeat_interleave(t), tokens.reshape(-1))  # (stream, word) per row
        rows = g.reshape(b * t, -1)
        dense = ctx.tie.pop("grad", None) if ctx.tie is not None else None
        if dense is not None and dense.dtype == rows.dtype:  # (under autocast the decoder's is bf16: summed later)
            dense.index_put_(index, rows, accumulate=True)
            return None, None, None
        return torch.sparse_coo_tensor(torch.stack(index), rows, ctx.w_shape, check_invariants=False), None, None


class StreamLinear(torch.autograd.Function):
    """x [B, T, I] @ w^T (w [O, I] shared, or [B, O, I] per stream) -> [B, T, O], with w's gradient formed as
    g^T @ x in w's own layout. Why: autograd's gradient for a transposed per-stream operand is a transposed view,
    which flattening into θ's gradient copies once more (the decoder's [B, V, E] and the LSTM input weights,
    every segment). `tie`: a dict to leave w's gradient in for a `StreamLookup` of the same w. Twice
    differentiable (the backward is plain matmuls)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, tie: dict[str, Tensor] | None = None) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.tie = tie
        return x @ w.t() if w.dim() == 2 else torch.bmm(x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, w = ctx.saved_tensors
        d_x = (g @ w if w.dim() == 2 else torch.bmm(g, w)) if ctx.needs_input_grad[0] else None
        d_w = None
        if ctx.needs_input_grad[1]:  # [O, I] or [B, O, I], contiguous
            d_w = g.reshape(-1, g.size(-1)).t() @ x.reshape(-1, x.size(-1)) if w.dim() == 2 else \
                torch.bmm(g.transpose(1, 2), x)
        if ctx.tie is not None and d_w is not None:
            ctx.tie["grad"] = d_w
        return d_x, d_w, None


def input_gates(x: Tensor, w_ih: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """x [B, T, I] -> W_ih x + b [B, T, 4H], for all time steps at once; w_ih [4H, I] or [B, 4H, I], biases
    [4H] or [B, 4H]."""
    bias = b_ih + b_hh
    if w_ih.dim() == 2 and bias.dim() == 1:
        return torch.addmm(bias, x.reshape(-1, x.size(-1)), w_ih.t()).view(x.size(0), x.size(1), -1)
    w = w_ih if w_ih.dim() == 3 else w_ih.expand(x.size(0), -1, -1)
    return StreamLinear.apply(x, w) + bias.expand(x.size(0), -1)[:, None]


def lstm_manual(x: Tensor, state: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
                b_hh: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM layer in plain ops. x: [B, T, I]; state (h, c): [B, H]; w_ih: [4H, I]; w_hh: [4H, H].

    Any weight may carry a leading stream dimension (w_ih [B, 4H, I], b_ih [B, 4H], ...): row b then runs
    on its own weights, as batched matmuls (per-stream dynamic weights, `meta.scoring.score` with θ [B, P]).
    """
    h, c = state
    xs = input_gates(x, w_ih, b_ih, b_hh)
    outs = []
    for t in range(x.size(1)):  # only the recurrent part loops over time
        # [B, 4H]; per stream: [B, 4H, H] @ [B, H, 1], the weight read row-major as it is stored
        gates = xs[:, t] + (h @ w_hh.t() if w_hh.dim() == 2 else torch.bmm(w_hh, h[:, :, None])[:, :, 0])
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=1), (h, c)


class StreamLSTM(torch.autograd.Function):
    """The recurrence of one LSTM layer with a recurrent weight per stream, backward written out.

    xs [B, T, 4H] (input projections, biases included), h0, c0 [B, H], w_hh [B, 4H, H] -> hs [B, T, H],
    h_T, c_T. Autograd through per-step `bmm`s would form the weight gradient as T outer products
    [B, 4H, 1] x [B, 1, H] (each a pass over B weight matrices);
    here it is one bmm over time, as in a fused kernel. First order only, like cuDNN's kernel.
    """

    @staticmethod
    def forward(ctx: Any, xs: Tensor, h: Tensor, c: Tensor, w_hh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hs, acts, cs = [h], [], [c]
        for t in range(xs.size(1)):
            g = torch.baddbmm(xs[:, t, :, None], w_hh, h[:, :, None])[:, :, 0]  # [B, 4H]
            i, f, gg, o = g.chunk(4, dim=1)
            i, f, gg, o = i.sigmoid(), f.sigmoid(), gg.tanh(), o.sigmoid()
            c = f * c + i * gg
            h = o * c.tanh()
            hs.append(h)
            acts.append(torch.cat([i, f, gg, o], 1))
            cs.append(c)
        hs_all = torch.stack(hs, 1)  # [B, T+1, H]: h_0 .. h_T
        ctx.save_for_backward(w_hh, torch.stack(acts, 1), torch.stack(cs, 1), hs_all)
        return hs_all[:, 1:], h, c

    @staticmethod
    def backward(ctx: Any, d_out: Tensor | None, d_h: Tensor | None,
                 d_c: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w_hh, acts, cs, hs = ctx.saved_tensors  # acts [B, T, 4H], cs [B, T+1, H], hs [B, T+1, H]
        T = acts.size(1)
        dh = torch.zeros_like(hs[:, 0]) if d_h is None else d_h.clone()
        dc = torch.zeros_like(cs[:, 0]) if d_c is None else d_c.clone()
        dgates = torch.empty_like(acts)
        for t in range(T - 1, -1, -1):
            if d_out is not None:
                dh = dh + d_out[:, t]
            i, f, gg, o = acts[:, t].chunk(4, dim=1)
            tc = cs[:, t + 1].tanh()
            dc = dc + dh * o * (1 - tc * tc)
            torch.cat([dc * gg * i * (1 - i), dc * cs[:, t] * f * (1 - f), dc * i * (1 - gg * gg),
                       dh * tc * o * (1 - o)], 1, out=dgates[:, t])
            dc = dc * f
            dh = torch.bmm(dgates[:, t, None], w_hh)[:, 0]  # [B, 1, 4H] @ [B, 4H, H]
        d_w = torch.bmm(dgates.transpose(1, 2), hs[:, :-1])  # Σ_t dgates_t ⊗ h_{t-1}: [B, 4H, H]
        return dgates, dh, dc, d_w


def lstm_streams(x: Tensor, state: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
                 b_hh: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """`lstm_manual`'s contract with per-stream weights through `StreamLSTM` (first order)."""
    xs = input_gates(x, w_ih, b_ih, b_hh)  # [B, T, 4H]
    out, h, c = StreamLSTM.apply(xs, *state, w_hh.expand(x.size(0), -1, -1) if w_hh.dim() == 2 else w_hh)
    return out, (h, c)


def lstm_fused(x: Tensor, state: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
               b_hh: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Same contract as `lstm_manual`, through the fused kernel nn.LSTM uses."""
    h, c = state
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # CPU autocast sends the LSTM to oneDNN in bf16, which fails on CPUs without native bf16 ("could not
        # create a primitive descriptor", even for plain nn.LSTM); bf16 buys no speed on CPU anyway, so under
        # `trainer.precision=bf16-mixed` on CPU this layer runs in float32 (the decoder matmul still autocasts).
        with torch.autocast("cpu", enabled=False):
            f32 = [t.float() for t in (x, h, c, w_ih, w_hh, b_ih, b_hh)]
            return lstm_fused(f32[0], (f32[1], f32[2]), *f32[3:])
    out, h_n, c_n = torch.lstm(x, (h.unsqueeze(0), c.unsqueeze(0)), [w_ih, w_hh, b_ih, b_hh],
                               True, 1, 0.0, False, False, True)
    return out, (h_n.squeeze(0), c_n.squeeze(0))


class LSTMLayer(nn.Module):
    """Parameters of one nn.LSTM layer (same names without the `_l0` suffix, same init)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size))
        bound = 1.0 / math.sqrt(hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)


class AWDLSTM(nn.Module):
    """Embedding -> num_layers LSTMs -> tied softmax, with AWD-LSTM's regularizers.

    Layer sizes: emb_size -> hidden_size ... -> emb_size (the last layer returns to the embedding
    width so the decoder can reuse `encoder.weight`). A `Backbone` (models/backbone.py).
    """

    supports_stream_weights = True

    def __init__(self, vocab_size: int, emb_size: int = 400, hidden_size: int = 1150, num_layers: int = 3,
                 dropout: float = 0.4, dropouth: float = 0.25, dropouti: float = 0.4, dropoute: float = 0.1,
                 wdrop: float = 0.5, kernel: str = "fused") -> None:
        super().__init__()
        if kernel not in ("fused", "manual"):
            raise ValueError(f"kernel must be 'fused' or 'manual', got {kernel!r}")
        self.vocab_size, self.emb_size, self.hidden_size = vocab_size, emb_size, hidden_size
        self.num_layers, self.wdrop = num_layers, wdrop
        self.dropout, self.dropouth, self.dropouti, self.dropoute = dropout, dropouth, dropouti, dropoute
        self.kernel = kernel
        self.encoder = nn.Embedding(vocab_size, emb_size)
        sizes = [emb_size] + [hidden_size] * (num_layers - 1) + [emb_size]
        self.rnns = nn.ModuleList(LSTMLayer(sizes[i], sizes[i + 1]) for i in range(num_layers))
        self.decoder_bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)

    def init_hidden(self, batch_size: int) -> Hidden:
        w = self.encoder.weight
        return [(w.new_zeros(batch_size, r.hidden_size), w.new_zeros(batch_size, r.hidden_size)) for r in self.rnns]

    def forward(self, tokens: Tensor, hidden: Hidden | None = None, sparse_grad: bool = False) -> LMOutput:
        """tokens: int64 [B, T] -> LMOutput with logits [B, T, V].

        `sparse_grad`: the embedding lookup's gradient as its rows only (first-order adaptation, `adaptive_eval`):
        they are added in place into the tied decoder's dense gradient (`StreamLookup`, `StreamLinear`) instead of
        zero-filling a second table and adding the two, ~15% of a 5-token segment's backward on model=small.
        Not twice differentiable: off for second-order meta-training and for training the LM."""
        if hidden is None:
            hidden = self.init_hidden(tokens.size(0))
        # A weight with a leading stream dimension (θ [B, P] unflattened by `meta.scoring.score`): row b runs on
        # its own weights, as batched matmuls (kernel=fused: StreamLSTM, first order; manual: plain ops)
        per_stream = any(t.dim() > (1 if "bias" in n else 2) for n, t in self._weights())
        tie = None  # set with sparse_grad: where the decoder leaves the tied table's gradient for the lookup
        if per_stream and self.training:
            raise ValueError("per-stream weights are for adaptation of a frozen LM: call .eval() first")
        lstm = (lstm_streams if per_stream else lstm_fused) if self.kernel == "fused" else lstm_manual
        emb_w = embedding_dropout(self.encoder.weight, self.dropoute, self.training)
        if sparse_grad:  # [V, E] or [B, V, E] (row b looks its words up in its own table)
            tie = {} if emb_w is self.encoder.weight else None  # its rows go into the tied decoder's gradient
            x = StreamLookup.apply(emb_w, tokens, tie)
        elif emb_w.dim() == 2:
            x = F.embedding(tokens, emb_w)
        else:
            x = emb_w[torch.arange(tokens.size(0), device=tokens.device)[:, None], tokens]
        x = locked_dropout(x, self.dropouti, self.training)
        new_hidden = []
        for layer, rnn in enumerate(self.rnns):
            # DropConnect on the recurrent weights: one mask per forward (i.e. per window), as AWD-LSTM.
            w_hh = F.dropout(rnn.weight_hh, self.wdrop, self.training) if self.wdrop else rnn.weight_hh
            x, state = lstm(x, hidden[layer], rnn.weight_ih, w_hh, rnn.bias_ih, rnn.bias_hh)
            new_hidden.append(state)
            if layer < self.num_layers - 1:
                x = locked_dropout(x, self.dropouth, self.training)
        raw = x
        out = locked_dropout(raw, self.dropout, self.training)
        w, b = self.encoder.weight, self.decoder_bias  # tied decoder
        if tie is None and w.dim() == 2 and b.dim() == 1:
            logits = F.linear(out, w, b)
        else:  # per-stream table [B, V, E] and/or bias [B, V], or the lookup's rows to add into w's gradient
            logits = StreamLinear.apply(out, w, tie) + (b if b.dim() == 1 else b[:, None])
        return LMOutput(logits, new_hidden, raw, out)

    def detach_state(self, hidden: Hidden) -> Hidden:
        return detach_hidden(hidden)

    def _weights(self) -> list[tuple[str, Tensor]]:
        """The weights forward reads, as named attributes (swapped in by functional_call)."""
        out = [("encoder.weight", self.encoder.weight), ("decoder_bias", self.decoder_bias)]
        for i, r in enumerate(self.rnns):
            out += [(f"rnns.{i}.{k}", getattr(r, k)) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        return out


def detach_hidden(hidden: Hidden) -> Hidden:
    return [(h.detach(), c.detach()) for h, c in hidden]


def lm_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Token cross-entropy in float32 (stable under mixed precision). logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
