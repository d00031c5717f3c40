"""AWD-LSTM (Merity et al. 2017) as a pure nn.Module whose forward also runs on swapped-in weights.

Every weight is read from `self` inside `forward`, so `torch.func.functional_call(model, params, ...)`
runs the same code on a dynamic parameter dict θ_t, differentiably (second order included). The
decoder has no weight of its own: it is `encoder.weight` by construction, so tied weights cannot come
untied when a dict is swapped in, and appear once in `named_parameters()`.

Two LSTM kernels share one weight layout (nn.LSTM's: gates i, f, g, o stacked in 4H rows):
`fused` calls `torch.lstm` (what nn.LSTM runs; fast, double-differentiable on CPU), `manual` writes
the recurrence with matmuls (vmappable, double-differentiable on GPUs where cuDNN is not, usable for
backward in eval mode). Both give the same numbers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Hidden = list[tuple[Tensor, Tensor]]  # per layer (h, c), each [B, H_l]


class LMOutput(NamedTuple):
    logits: Tensor  # [B, T, V]
    hidden: Hidden  # state after the window, to carry into the next one
    raw_output: Tensor  # [B, T, E] last LSTM layer before output dropout (for TAR)
    output: Tensor  # [B, T, E] after output dropout (for AR)


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


def lstm_manual(x: Tensor, state: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor,
                b_hh: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM layer in plain ops. x: [B, T, I]; state (h, c): [B, H]; w_ih: [4H, I]; w_hh: [4H, H]."""
    h, c = state
    xs = torch.addmm(b_ih + b_hh, x.reshape(-1, x.size(-1)), w_ih.t()).view(x.size(0), x.size(1), -1)
    outs = []
    for t in range(x.size(1)):  # only the recurrent part loops over time
        gates = xs[:, t] + h @ w_hh.t()  # [B, 4H]
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=1), (h, c)


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
    width so the decoder can reuse `encoder.weight`).
    """

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

    def forward(self, tokens: Tensor, hidden: Hidden | None = None) -> LMOutput:
        """tokens: int64 [B, T] -> LMOutput with logits [B, T, V]."""
        if hidden is None:
            hidden = self.init_hidden(tokens.size(0))
        lstm = lstm_fused if self.kernel == "fused" else lstm_manual
        emb_w = embedding_dropout(self.encoder.weight, self.dropoute, self.training)
        x = locked_dropout(F.embedding(tokens, emb_w), self.dropouti, self.training)
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
        logits = F.linear(out, self.encoder.weight, self.decoder_bias)  # tied decoder
        return LMOutput(logits, new_hidden, raw, out)


def detach_hidden(hidden: Hidden) -> Hidden:
    return [(h.detach(), c.detach()) for h, c in hidden]


def lm_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Token cross-entropy in float32 (stable under mixed precision). logits [B, T, V], targets [B, T]."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
