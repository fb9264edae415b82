"""Multi-head attention, Transformer-XL relative attention and the position-wise
feed-forward network, laid out sequence-first like labml_nn 0.5.1.

Shape letters: ``L`` query length, ``K`` key length, ``B`` batch, ``H`` heads,
``d_k`` features per head, ``D`` = ``d_model``.
"""
import math
from typing import Optional, Sequence

import torch
from torch import nn


class PrepareForMultiHeadAttention(nn.Module):
    """Linear projection ``[..., D] -> [..., H, d_k]`` split into heads.

    Used for the query, key and value projections.
    """

    def __init__(self, d_model: int, heads: int, d_k: int, bias: bool):
        super().__init__()
        self.linear = nn.Linear(d_model, heads * d_k, bias=bias)
        self.heads = heads
        self.d_k = d_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., D]`` (e.g. ``[L, B, D]``) -> ``[..., H, d_k]``."""
        return self.linear(x).view(*x.shape[:-1], self.heads, self.d_k)


class MultiHeadAttention(nn.Module):
    r"""Scaled dot-product attention over ``H`` heads.

    ``out = W_o · concat_h softmax_j(Q_i · K_j / sqrt(d_k)) V_j``, the softmax
    running over keys. ``bias`` applies to the query and key projections only;
    the value projection always has a bias. After each forward ``self.attn``
    holds the detached attention weights ``[L, K, B, H]`` (after dropout).
    """

    def __init__(self, heads: int, d_model: int, dropout_prob: float = 0.1, bias: bool = True):
        super().__init__()
        self.d_k = d_model // heads
        self.heads = heads
        self.query = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=bias)
        self.key = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=bias)
        self.value = PrepareForMultiHeadAttention(d_model, heads, self.d_k, bias=True)
        # Scores are [L, K, B, H]: normalise over the key axis.
        self.softmax = nn.Softmax(dim=1)
        self.output = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout_prob)
        self.scale = 1 / math.sqrt(self.d_k)
        self.attn: Optional[torch.Tensor] = None

    def get_scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Unscaled scores ``[L, K, B, H]`` from ``query`` ``[L, B, H, d_k]`` and
        ``key`` ``[K, B, H, d_k]``; subclasses override this for other score terms."""
        return torch.einsum("ibhd,jbhd->ijbh", query, key)

    def prepare_mask(self, mask: torch.Tensor, query_shape: Sequence[int], key_shape: Sequence[int]) -> torch.Tensor:
        """Check ``mask`` ``[L or 1, K, B or 1]`` and add a head axis: ``[L or 1, K, B or 1, 1]``."""
        if mask.dim() != 3:
            raise ValueError(f"mask must be [seq_len_q, seq_len_k, batch], got shape {tuple(mask.shape)}")
        if mask.shape[0] not in (1, query_shape[0]):
            raise ValueError(f"mask.shape[0] must be 1 or the query length {query_shape[0]}, got {mask.shape[0]}")
        if mask.shape[1] != key_shape[0]:
            raise ValueError(f"mask.shape[1] must be the key length {key_shape[0]}, got {mask.shape[1]}")
        if mask.shape[2] not in (1, query_shape[1]):
            raise ValueError(f"mask.shape[2] must be 1 or the batch size {query_shape[1]}, got {mask.shape[2]}")
        return mask.unsqueeze(-1)

    def forward(self, *,
                query: torch.Tensor,
                key: torch.Tensor,
                value: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``query`` ``[L, B, D]``, ``key`` and ``value`` ``[K, B, D]``; ``mask``
        ``[L or 1, K, B or 1]``, nonzero where query ``i`` may attend key ``j``.
        Returns ``[L, B, D]``."""
        seq_len, batch_size, _ = query.shape
        if mask is not None:
            mask = self.prepare_mask(mask, query.shape, key.shape)
        query = self.query(query)
        key = self.key(key)
        value = self.value(value)
        scores = self.get_scores(query, key) * self.scale
        if mask is not None:
            scores = scores.masked_fill(mask == 0, float("-inf"))
        attn = self.dropout(self.softmax(scores))
        x = torch.einsum("ijbh,jbhd->ibhd", attn, value)
        self.attn = attn.detach()
        return self.output(x.reshape(seq_len, batch_size, -1))


class RelativeMultiHeadAttention(MultiHeadAttention):
    r"""Transformer-XL attention with relative positions.

    For query ``i`` and key ``j`` (keys are memory followed by the current
    segment, so key ``j`` sits at position ``j - (K - L)`` relative to query 0)
    the score is

    ``(Q_i + u) · K_j + Q_i · R_{p} + S_{p}``, with ``p = P + (j - (K - L)) - i``

    where ``u = query_pos_bias`` ``[H, d_k]``, ``R = key_pos_embeddings``
    ``[2P, H, d_k]`` and ``S = key_pos_bias`` ``[2P, H]``; row ``P`` is distance
    zero. Query and key projections have no bias. Supports ``L <= P`` and
    ``K <= P`` (``P = 2**12``).
    """

    def __init__(self, heads: int, d_model: int, dropout_prob: float = 0.1):
        super().__init__(heads, d_model, dropout_prob, bias=False)
        self.P = 2 ** 12
        self.key_pos_embeddings = nn.Parameter(torch.zeros((self.P * 2, heads, self.d_k)), requires_grad=True)
        self.key_pos_bias = nn.Parameter(torch.zeros((self.P * 2, heads)), requires_grad=True)
        self.query_pos_bias = nn.Parameter(torch.zeros((heads, self.d_k)), requires_grad=True)

    def get_scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``query`` ``[L, B, H, d_k]``, ``key`` ``[K, B, H, d_k]`` -> ``[L, K, B, H]``."""
        q_len, k_len = query.shape[0], key.shape[0]
        if q_len > self.P or k_len > self.P:
            raise ValueError(
                f"RelativeMultiHeadAttention supports at most P={self.P} queries and P keys "
                f"(positional table of 2P rows), got {q_len} queries and {k_len} keys"
            )
        # Distances p - P run from -(K-1) (last query, first key) to L-1 (first
        # query, last key): table rows P-K+1 .. P+L-1, i.e. K+L-1 rows.
        first = self.P - k_len + 1
        rows = slice(first, self.P + q_len)
        ac = torch.einsum("ibhd,jbhd->ijbh", query + self.query_pos_bias[None, None], key)
        # Score every query against every distance once ([L, K+L-1, B, H]), then
        # pick for each (i, j) the column of its distance: L-1-i+j.
        bd_all = torch.einsum("ibhd,jhd->ijbh", query, self.key_pos_embeddings[rows])
        bd_all = bd_all + self.key_pos_bias[rows][None, :, None, :]
        i = torch.arange(q_len, device=query.device)[:, None]
        j = torch.arange(k_len, device=query.device)[None, :]
        bd = bd_all[i, q_len - 1 - i + j]
        return ac + bd


class FeedForward(nn.Module):
    r"""Position-wise feed-forward network.

    ``FFN(x) = W_2 dropout(act(W_1 x + b_1)) + b_2``; with ``is_gated`` the
    hidden activation is multiplied by a gate ``V x + b_v`` (GLU variants).
    """

    def __init__(self, d_model: int, d_ff: int,
                 dropout: float = 0.1,
                 activation=nn.ReLU(),
                 is_gated: bool = False,
                 bias1: bool = True,
                 bias2: bool = True,
                 bias_gate: bool = True):
        super().__init__()
        self.layer1 = nn.Linear(d_model, d_ff, bias=bias1)
        self.layer2 = nn.Linear(d_ff, d_model, bias=bias2)
        self.dropout = nn.Dropout(dropout)
        self.activation = activation
        self.is_gated = is_gated
        if is_gated:
            self.linear_v = nn.Linear(d_model, d_ff, bias=bias_gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., D]`` -> ``[..., D]``."""
        hidden = self.activation(self.layer1(x))
        if self.is_gated:
            hidden = hidden * self.linear_v(x)
        return self.layer2(self.dropout(hidden))


__all__ = ["PrepareForMultiHeadAttention", "MultiHeadAttention", "RelativeMultiHeadAttention", "FeedForward"]
