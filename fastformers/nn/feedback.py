"""Feedback Transformer: token-by-token recurrence where every layer of step
``t`` attends to the feedback memory of all earlier steps.

The memory of step ``t`` is one vector per token, ``m_t = Σ_l softmax(w)_l · x_l``
over the embedding and every layer's output (``n_layers + 1`` of them),
computed by the fused :func:`fastformers.ops.feedback_memory`.

Shape letters: ``T`` sequence length, ``t`` steps so far, ``B`` batch,
``H`` heads, ``d_k`` features per head, ``D`` = ``d_model``, ``P = 2**12``.
"""
import dataclasses
import math
from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops
from .._backend import resolve_backend
from ._utils import clone_module_list
from .attention import FeedForward, PrepareForMultiHeadAttention


class FeedbackAttention(nn.Module):
    r"""Attention of one query per sequence to the ``t`` memory steps before it.

    Score of memory step ``j`` (``j = t - 1`` is the most recent):
    ``((Q + u) · K_j + Q · R_{r} + S_{r}) / sqrt(d_k)`` with ``r = P - t + j``,
    so the most recent step uses the last row of ``R = key_pos_embeddings``
    ``[P, H, d_k]`` and ``S = key_pos_bias`` ``[P, H]``; ``u = query_pos_bias``
    ``[H, d_k]``. Supports ``t <= P``.

    With ``is_kv_precomputed`` the module has no key/value projections
    (``key`` and ``value`` are None) and takes keys and values already split
    into heads, as :class:`FeedbackTransformerKV` shares them across layers.
    """

    def __init__(self, heads: int, d_model: int, dropout_prob: float = 0.1, *,
                 is_kv_precomputed: bool = False):
        super().__init__()
        self.d_k = d_model // heads
        self.heads = heads
        self.query = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=False)
        if not is_kv_precomputed:
            self.key = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=False)
            self.value = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=True)
        else:
            self.key = None
            self.value = None
        self.output = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout_prob)
        self.scale = 1 / math.sqrt(self.d_k)
        # Scores are [t, B, H]: normalise over the memory steps.
        self.softmax = nn.Softmax(dim=0)
        self.P = 2 ** 12
        self.key_pos_embeddings = nn.Parameter(torch.zeros((self.P, heads, self.d_k)), requires_grad=True)
        self.key_pos_bias = nn.Parameter(torch.zeros((self.P, heads)), requires_grad=True)
        self.query_pos_bias = nn.Parameter(torch.zeros((heads, self.d_k)), requires_grad=True)

    def get_scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Unscaled scores ``[t, B, H]`` from ``query`` ``[B, H, d_k]`` and ``key`` ``[t, B, H, d_k]``."""
        steps = key.shape[0]
        if steps > self.P:
            raise ValueError(
                f"FeedbackAttention supports at most P={self.P} memory steps "
                f"(rows of key_pos_embeddings), got {steps}"
            )
        rows = slice(self.P - steps, self.P)
        ac = torch.einsum("bhd,jbhd->jbh", query + self.query_pos_bias[None], key)
        bd = torch.einsum("bhd,jhd->jbh", query, self.key_pos_embeddings[rows])
        return ac + (bd + self.key_pos_bias[rows, None, :])

    def forward(self, *,
                query: torch.Tensor,
                key: torch.Tensor,
                value: torch.Tensor) -> torch.Tensor:
        """``query`` ``[B, D]``; ``key`` and ``value`` ``[t, B, D]``, or
        ``[t, B, H, d_k]`` when ``is_kv_precomputed``. Returns ``[B, D]``."""
        query = self.query(query)
        if self.key is not None:
            key = self.key(key)
        if self.value is not None:
            value = self.value(value)
        attn = self.dropout(self.softmax(self.get_scores(query, key) * self.scale))
        x = torch.einsum("jbh,jbhd->bhd", attn, value)
        return self.output(x.reshape(x.shape[0], -1))


class FeedbackTransformerLayer(nn.Module):
    """One pre-norm layer for a single step: ``x + attn(norm(x), memory)`` (skipped
    at the first step, which has no memory) then ``x + ffn(norm(x))``."""

    def __init__(self, *,
                 d_model: int,
                 attn: FeedbackAttention,
                 feed_forward: FeedForward,
                 dropout_prob: float):
        super().__init__()
        self.size = d_model
        self.attn = attn
        self.feed_forward = feed_forward
        self.dropout = nn.Dropout(dropout_prob)
        self.norm_self_attn = nn.LayerNorm([d_model])
        self.norm_ff = nn.LayerNorm([d_model])

    def forward(self, *,
                x: torch.Tensor,
                key: Optional[torch.Tensor],
                value: Optional[torch.Tensor]) -> torch.Tensor:
        """``x`` ``[B, D]``; ``key``/``value`` the memory ``[t, B, D]`` (or
        ``[t, B, H, d_k]`` if precomputed), None at the first step. Returns ``[B, D]``."""
        if key is not None:
            x = x + self.dropout(self.attn(query=self.norm_self_attn(x), key=key, value=value))
        return x + self.dropout(self.feed_forward(self.norm_ff(x)))


def _append_step(steps: Optional[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """``steps`` ``[t, ...]`` (None for ``t = 0``) and ``new`` ``[...]`` -> ``[t + 1, ...]``.

    A fresh tensor per step rather than a shared buffer, so every forward call
    owns its memory; one concatenation per step (instead of re-stacking all
    steps) keeps the autograd graph linear in the sequence length.
    """
    new = new.unsqueeze(0)
    return new if steps is None else torch.cat((steps, new), dim=0)


@dataclasses.dataclass
class FeedbackState:
    """What a Feedback Transformer needs to continue after ``t`` steps.

    :class:`FeedbackTransformer` keeps the memory vectors ``memory``
    ``[t, B, D]``; :class:`FeedbackTransformerKV` keeps their shared key and
    value projections ``key``/``value`` ``[t, B, H, d_k]``. Steps are counted
    by the cache length (``steps``). :meth:`window` keeps only the most recent
    steps, as generation past ``P`` steps must.
    """

    memory: Optional[torch.Tensor] = None
    key: Optional[torch.Tensor] = None
    value: Optional[torch.Tensor] = None

    @property
    def steps(self) -> int:
        cache = self.memory if self.memory is not None else self.key
        return 0 if cache is None else cache.shape[0]

    def window(self, max_steps: int) -> "FeedbackState":
        """The state restricted to its last ``max_steps`` steps."""
        def last(cache: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if cache is None else cache[-max_steps:]

        return FeedbackState(memory=last(self.memory), key=last(self.key), value=last(self.value))


class FeedbackTransformer(nn.Module):
    """Feedback Transformer whose layers project the memory ``[t, B, D]`` to keys
    and values themselves.

    ``backend`` (settable; None = automatic) selects the implementation of the
    feedback-memory op; ``last_backend`` records the one the last forward used.
    """

    def __init__(self, layer: FeedbackTransformerLayer, n_layers: int):
        super().__init__()
        self.layers = clone_module_list(layer, n_layers)
        self.norm = nn.LayerNorm([layer.size])
        # Logits of the per-layer memory mixing weights, over the embedding and each layer.
        self.weights = nn.Parameter(torch.ones(n_layers + 1), requires_grad=True)
        self.backend: Optional[str] = None
        self.last_backend: Optional[str] = None

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """``x_seq`` ``[T, B, D]`` -> normalised outputs ``[T, B, D]``."""
        return self.forward_with_state(x_seq)[0]

    def forward_with_state(self, x_seq: torch.Tensor, state: Optional["FeedbackState"] = None
                           ) -> Tuple[torch.Tensor, "FeedbackState"]:
        """Continue the recurrence from ``state`` (None: from the first step).

        ``x_seq`` ``[T, B, D]`` -> (normalised outputs ``[T, B, D]``, the state
        after its last step, whose ``memory`` is ``[t + T, B, D]``). Running a
        sequence in pieces, passing the state along, gives the same outputs as
        one call on the whole sequence: generation costs one step per token.
        """
        backend = self.last_backend = resolve_backend(x_seq.device, self.backend)
        res = []
        mem = state.memory if state is not None else None
        for x in torch.unbind(x_seq, dim=0):
            layer_outputs = [x]
            for layer in self.layers:
                x = layer(x=x, key=mem, value=mem)
                layer_outputs.append(x)
            step_mem = ops.feedback_memory(torch.stack(layer_outputs), self.weights, backend=backend)
            mem = _append_step(mem, step_mem)
            res.append(x)
        return self.norm(torch.stack(res)), FeedbackState(memory=mem)


class FeedbackTransformerKV(nn.Module):
    """Feedback Transformer with key/value projections shared by all layers.

    Each step's memory is projected once to a key and a value ``[B, H, d_k]``;
    the layers' :class:`FeedbackAttention` must be built with
    ``is_kv_precomputed=True``. Keys and values (``[t, B, H, d_k]``) are
    tensors local to each forward call, not a buffer shared between calls, so
    several forwards may share one backward; any sequence length up to
    ``P = 2**12`` works (longer ones raise ValueError).

    ``backend`` (settable; None = automatic) selects the implementation of the
    feedback-memory op; ``last_backend`` records the one the last forward used.
    """

    def __init__(self, layer: FeedbackTransformerLayer, n_layers: int, d_model: int, heads: int):
        super().__init__()
        self.layers = clone_module_list(layer, n_layers)
        self.norm = nn.LayerNorm([layer.size])
        # Logits of the per-layer memory mixing weights, over the embedding and each layer.
        self.weights = nn.Parameter(torch.ones(n_layers + 1), requires_grad=True)
        d_k = d_model // heads
        self.key = PrepareForMultiHeadAttention(d_model, heads, d_k, bias=False)
        self.value = PrepareForMultiHeadAttention(d_model, heads, d_k, bias=False)
        self.backend: Optional[str] = None
        self.last_backend: Optional[str] = None

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """``x_seq`` ``[T, B, D]`` -> normalised outputs ``[T, B, D]``."""
        return self.forward_with_state(x_seq)[0]

    def forward_with_state(self, x_seq: torch.Tensor, state: Optional["FeedbackState"] = None
                           ) -> Tuple[torch.Tensor, "FeedbackState"]:
        """Continue the recurrence from ``state`` (None: from the first step).

        ``x_seq`` ``[T, B, D]`` -> (normalised outputs ``[T, B, D]``, the state
        after its last step, whose ``key``/``value`` caches are
        ``[t + T, B, H, d_k]``). Running a sequence in pieces, passing the
        state along, gives the same outputs as one call on the whole sequence:
        generation costs one step per token.
        """
        backend = self.last_backend = resolve_backend(x_seq.device, self.backend)
        res = []
        key = state.key if state is not None else None
        value = state.value if state is not None else None
        for x in torch.unbind(x_seq, dim=0):
            layer_outputs = [x]
            for layer in self.layers:
                x = layer(x=x, key=key, value=value)
                layer_outputs.append(x)
            mem = ops.feedback_memory(torch.stack(layer_outputs), self.weights, backend=backend)
            key = _append_step(key, self.key(mem))
            value = _append_step(value, self.value(mem))
            res.append(x)
        return self.norm(torch.stack(res)), FeedbackState(key=key, value=value)

    def free(self) -> None:
        """Kept for labml_nn API compatibility: no state outlives a forward call."""
