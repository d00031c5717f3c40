"""The contract every language model of dynlm meets, so stages, update rules and the meta-learner work on any.

A backbone is an `nn.Module` that reads all its weights from its own attributes inside `forward`, so that
`torch.func.functional_call(model, θ_t, ...)` runs it on swapped-in dynamic weights (the update rules adapt any
subset of `named_parameters()`: every parameter may be dynamic). Its state between segments (an LSTM's hidden
state) is carried by the caller.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import Tensor


class LMOutput(NamedTuple):
    logits: Tensor  # [B, T, V]
    hidden: Any  # the state after the segment, to carry into the next one
    raw_output: Tensor  # [B, T, E] last layer before output dropout (for TAR)
    output: Tensor  # [B, T, E] after output dropout (for AR)


@runtime_checkable
class Backbone(Protocol):
    """What the rest of dynlm calls. `vocab_size` [V] is the first constructor argument (from the corpus); the
    other constructor arguments come from `conf/model/<name>.yaml`, which names the class in `_target_`."""

    vocab_size: int
    # True: forward accepts dynamic weights with a leading stream dimension (θ [B, P] unflattened to [B, *shape]),
    # each of the B rows running on its own weights (per-stream evaluation and meta-training with streams > 1).
    supports_stream_weights: bool

    def init_hidden(self, batch_size: int) -> Any:
        """The state before the first segment, for `batch_size` streams."""
        ...

    def forward(self, tokens: Tensor, hidden: Any = None, sparse_grad: bool = False) -> LMOutput:
        """tokens int64 [B, T] from state `hidden` -> logits [B, T, V] and the next state. `sparse_grad`: the
        embedding's gradient may be returned as rows (first-order adaptation only)."""
        ...

    def detach_state(self, hidden: Any) -> Any:
        """`hidden` cut from the graph (truncated backpropagation between segments or unrolls)."""
        ...
