"""Transformer-XL: pre-norm layers attending over cached memory of the previous
segment with relative positions.

Shape letters: ``L`` segment length, ``M`` memory length, ``B`` batch, ``D`` = ``d_model``.
"""
from typing import List, Optional, Tuple

import torch
from torch import nn

from ._utils import check_sequence, clone_module_list, init_pre_norm_layer
from .attention import FeedForward, RelativeMultiHeadAttention


class TransformerXLLayer(nn.Module):
    """One pre-norm Transformer-XL layer: ``x + attn(norm(x) | norm(mem))`` then
    ``x + ffn(norm(x))``; memory is normalised with the same norm as ``x``."""

    def __init__(self, *,
                 d_model: int,
                 self_attn: RelativeMultiHeadAttention,
                 feed_forward: FeedForward,
                 dropout_prob: float):
        super().__init__()
        self.size = d_model
        self.self_attn = self_attn
        init_pre_norm_layer(self, d_model, feed_forward, dropout_prob)

    def forward(self, *,
                x: torch.Tensor,
                mem: Optional[torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        """``x`` ``[L, B, D]``, ``mem`` ``[M, B, D]`` or None, ``mask``
        ``[L, M + L, B or 1]`` (true where query ``i`` sees key ``j``; a query that
        sees no key gives NaN, as in labml_nn). Returns ``[L, B, D]``."""
        check_segment(x, [] if mem is None else [mem], self.size)
        return attend_over_history(self, x, () if mem is None else (mem,), mask)


def check_segment(x: torch.Tensor, mem: List[torch.Tensor], d_model: int) -> None:
    """ValueError/TypeError naming the argument and dimension for a segment ``x`` ``[L, B, D]``
    and memories ``[M, B, D]`` that no backend can take (L = 0 or B = 0 included: the attention
    over an empty segment or batch is not defined the same way by every backend)."""
    check_sequence(x, d_model)
    batch = x.shape[1]
    for i, m in enumerate(mem):
        if not isinstance(m, torch.Tensor) or m.dim() != 3 or tuple(m.shape[1:]) != (batch, d_model):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"mem[{i}] must be [mem_len, batch = {batch}, d_model = {d_model}], got {shape}")


def attend_over_history(layer: nn.Module, x: torch.Tensor, history: Tuple[torch.Tensor, ...],
                        mask: torch.Tensor) -> torch.Tensor:
    """The pre-norm step of a Transformer-XL or Compressive layer: attention of
    ``x`` ``[L, B, D]`` over ``[*history; x]`` (each ``[*, B, D]``, oldest first),
    then the feed-forward. Returns ``[L, B, D]``."""
    # One LayerNorm over [*history; x] (row-wise, so identical to normalising
    # each part) and z a view of its tail: the memory is copied once per call,
    # by this cat. It cannot be cached across calls while training: the norm
    # and the key/value projections applied to it change every optimizer step.
    keys = layer.norm_self_attn(torch.cat((*history, x), dim=0) if history else x)
    z = keys[keys.shape[0] - x.shape[0]:]
    x = x + layer.dropout(layer.self_attn(query=z, key=keys, value=keys, mask=mask))
    return x + layer.dropout(layer.feed_forward(layer.norm_ff(x)))


class TransformerXL(nn.Module):
    """A stack of ``n_layers`` copies of ``layer`` followed by a final LayerNorm."""

    def __init__(self, layer: TransformerXLLayer, n_layers: int):
        super().__init__()
        self.layers = clone_module_list(layer, n_layers)
        self.norm = nn.LayerNorm([layer.size])

    def forward(self, x: torch.Tensor, mem: List[torch.Tensor],
                mask: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``x`` ``[L, B, D]``; ``mem`` one ``[M, B, D]`` per layer, or an empty
        list for no memory; ``mask`` ``[L, M + L, B or 1]`` (a query that sees no
        key gives NaN, as in labml_nn).

        Returns the normalised output ``[L, B, D]`` and the new memory: each
        layer's (detached) input ``[L, B, D]``.
        """
        check_segment(x, list(mem), self.layers[0].size)
        if mem and len(mem) != len(self.layers):
            raise ValueError(f"mem has {len(mem)} entries, expected one per layer ({len(self.layers)}) or none")
        new_mem = []
        for i, layer in enumerate(self.layers):
            new_mem.append(x.detach())
            x = layer(x=x, mem=mem[i] if mem else None, mask=mask)
        return self.norm(x), new_mem
