"""Plain-PyTorch reference of relative-position attention (Transformer-XL):
the oracle of the fused kernels' tests and the baseline of their benchmarks.

Keys are ``[memory; segment]``: ``K = M + L`` keys for ``L`` queries, query
``i`` sits at key position ``M + i``. With the learned tables
``R = key_pos_embeddings [2P, H, d]`` and ``S = key_pos_bias [2P, H]``,

    score[i, j] = scale * ((q_i + u) · k_j + q_i · R[P - (M + i - j)] + S[P - (M + i - j)])

which is what labml_nn's ``shift_right(b + d)[:, -K:]`` selects. The rows it
reads are ``P - K + 1 .. P + L - 1``: the op takes that window,

    pos_emb[r] = R[P - K + 1 + r],  r = L - 1 - i + j,  r in [0, K + L - 1)

so rows ``r >= K`` are only reached by future keys (``j > M + i``), which the
causal mask removes.

Attention dropout (``dropout_p > 0``) drops probability ``(b, h, i, j)`` when
element ``n = ((b·H + h)·L + i)·K + j`` of the Philox stream of
``(seed, offset)`` says so (:func:`dropout_keep`, layout ``[B, H, L, K]``) and
scales the kept ones by ``1 / (1 - p)``, after the softmax (whose
log-sum-exp it leaves unchanged).
"""
from typing import Optional

import torch

from ..dropout import naive as dropout_naive


def position_window(table: torch.Tensor, P: int, n_queries: int, n_keys: int) -> torch.Tensor:
    """Rows ``P - K + 1 .. P + L - 1`` of a ``[2P, ...]`` relative table: ``[K + L - 1, ...]``."""
    return table[P - n_keys + 1 : P + n_queries]


def causal_mask(n_queries: int, n_keys: int, device=None) -> torch.Tensor:
    """``[L, K]`` bool: query ``i`` sees keys ``j <= M + i`` (all memory and the segment up to itself)."""
    memory = n_keys - n_queries
    i = torch.arange(n_queries, device=device)[:, None]
    j = torch.arange(n_keys, device=device)[None, :]
    return j <= memory + i


def relative_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    pos_emb: torch.Tensor,
    pos_bias: torch.Tensor,
    query_pos_bias: torch.Tensor,
) -> torch.Tensor:
    """Unscaled scores ``[L, K, B, H]``.

    query ``[L, B, H, d]``, key ``[K, B, H, d]``, pos_emb ``[K + L - 1, H, d]``,
    pos_bias ``[K + L - 1, H]``, query_pos_bias ``[H, d]``.
    """
    L, K = query.shape[0], key.shape[0]
    content = torch.einsum("ibhd,jbhd->ijbh", query + query_pos_bias, key)
    # position[i, r] for every window row, then pick r = L - 1 - i + j per (i, j).
    position = torch.einsum("ibhd,rhd->irbh", query, pos_emb) + pos_bias[None, :, None, :]
    rows = (L - 1 - torch.arange(L, device=query.device)[:, None]) + torch.arange(K, device=query.device)[None, :]
    position = torch.gather(position, 1, rows[:, :, None, None].expand(L, K, *position.shape[2:]))
    return content + position


def dropout_keep(seed: int, offset: int, p: float, B: int, H: int, L: int, K: int, device=None) -> torch.Tensor:
    """Keep mask of the attention probabilities in the scores' layout ``[L, K, B, H]``
    (generated in the op's mask layout ``[B, H, L, K]``)."""
    return dropout_naive.keep_mask(seed, offset, B * H * L * K, p, device).view(B, H, L, K).permute(2, 3, 0, 1)


def attention_dropout(probs: torch.Tensor, dropout_p: float, seed: int, offset: int) -> torch.Tensor:
    """Inverted dropout of probabilities ``[L, K, B, H]`` with the op's keep bits; ``p == 0`` returns ``probs``."""
    if dropout_p == 0:
        return probs
    L, K, B, H = probs.shape
    return dropout_naive.apply(probs, dropout_keep(seed, offset, dropout_p, B, H, L, K, probs.device), dropout_p)


def rel_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pos_emb: torch.Tensor,
    pos_bias: torch.Tensor,
    query_pos_bias: torch.Tensor,
    scale: float,
    mask: Optional[torch.Tensor] = None,
    causal: bool = True,
    dropout_p: float = 0.0,
    seed: int = 0,
    offset: int = 0,
) -> torch.Tensor:
    """Relative-position attention; returns ``[L, B, H, d]``.

    query ``[L, B, H, d]``; key, value ``[K, B, H, d]`` (``K = M + L``, memory
    first); pos_emb ``[K + L - 1, H, d]`` and pos_bias ``[K + L - 1, H]`` (the
    window of :func:`position_window`); query_pos_bias ``[H, d]``. ``causal``
    applies :func:`causal_mask`; ``mask`` (bool ``[L, K, B]`` or ``[L, K, 1]``,
    True = visible, labml's layout) is applied as well when given.
    ``dropout_p``, ``seed``, ``offset``: attention dropout (module docstring).
    """
    scores = relative_scores(query, key, pos_emb, pos_bias, query_pos_bias) * scale
    visible = None
    if causal:
        visible = causal_mask(query.shape[0], key.shape[0], query.device)[:, :, None, None]
    if mask is not None:
        explicit = mask.bool().unsqueeze(-1)
        visible = explicit if visible is None else visible & explicit
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    attn = attention_dropout(torch.softmax(scores, dim=1), dropout_p, seed, offset)
    return torch.einsum("ijbh,jbhd->ibhd", attn, value)
