"""Switch Transformer: the feed-forward network is replaced by ``n_experts``
FFNs and a router that sends every token to exactly one of them.

Shape letters: ``L`` sequence length, ``B`` batch, ``N = L * B`` tokens,
``E`` experts, ``D`` = ``d_model``.
"""
from typing import List, Tuple

import torch
from torch import nn

from ._utils import clone_module_list
from .attention import FeedForward, MultiHeadAttention


class SwitchFeedForward(nn.Module):
    """Top-1 routed mixture of ``n_experts`` copies of ``expert``.

    Each token goes to the expert of highest routing probability ``p_max``.
    An expert takes at most ``capacity = int(capacity_factor * N / E)``
    tokens; with ``drop_tokens`` the surplus of an overloaded expert is chosen
    by ``torch.randperm(n)`` (n = tokens routed to it) on the global CPU
    generator, one draw per overloaded expert in expert order, exactly as
    labml_nn 0.5.1 draws it, so under the same ``torch.manual_seed`` the same
    tokens are dropped. Dropped tokens pass through unchanged.

    The output is scaled by ``p_max`` when ``is_scale_prob``; otherwise by
    ``p_max / p_max.detach()`` (value 1) so the router still gets gradients.
    """

    def __init__(self, *,
                 capacity_factor: float,
                 drop_tokens: bool,
                 is_scale_prob: bool,
                 n_experts: int,
                 expert: FeedForward,
                 d_model: int):
        super().__init__()
        self.capacity_factor = capacity_factor
        self.is_scale_prob = is_scale_prob
        self.n_experts = n_experts
        self.drop_tokens = drop_tokens
        self.experts = clone_module_list(expert, n_experts)
        self.switch = nn.Linear(d_model, n_experts)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """``x`` ``[L, B, D]``. Returns

        * the output ``[L, B, D]``,
        * ``counts`` ``[E]`` (dtype of ``x``): tokens routed to each expert, before dropping,
        * the routing probabilities summed over tokens ``[E]``,
        * the number of dropped tokens (a Python ``int``),
        * ``p_max`` ``[N]``, each token's highest routing probability.
        """
        seq_len, batch_size, d_model = x.shape
        x = x.reshape(-1, d_model)
        route_prob = self.softmax(self.switch(x))
        route_prob_max, routes = torch.max(route_prob, dim=-1)
        indexes = [torch.eq(routes, i).nonzero(as_tuple=True)[0] for i in range(self.n_experts)]
        counts = x.new_tensor([len(idx) for idx in indexes])
        capacity = int(self.capacity_factor * len(x) / self.n_experts)

        dropped: List[torch.Tensor] = []
        if self.drop_tokens:
            for i, idx in enumerate(indexes):
                if len(idx) > capacity:
                    idx = idx[torch.randperm(len(idx))]
                    dropped.append(idx[capacity:])
                    indexes[i] = idx[:capacity]

        out = x.new_zeros(x.shape)
        for expert, idx in zip(self.experts, indexes):
            out[idx, :] = expert(x[idx, :])
        n_dropped = 0
        if dropped:
            dropped_idx = torch.cat(dropped)
            out[dropped_idx, :] = x[dropped_idx, :]
            n_dropped = len(dropped_idx)

        if self.is_scale_prob:
            out = out * route_prob_max.view(-1, 1)
        else:
            out = out * (route_prob_max / route_prob_max.detach()).view(-1, 1)
        return out.view(seq_len, batch_size, d_model), counts, route_prob.sum(0), n_dropped, route_prob_max


class SwitchTransformerLayer(nn.Module):
    """Pre-norm layer: ``x + attn(norm(x))`` then ``x + switch_ffn(norm(x))``,
    passing the router statistics through."""

    def __init__(self, *,
                 d_model: int,
                 attn: MultiHeadAttention,
                 feed_forward: SwitchFeedForward,
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
                mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor]:
        """``x`` ``[L, B, D]``, ``mask`` ``[L, L, B or 1]``. Returns ``x`` ``[L, B, D]``
        and the :class:`SwitchFeedForward` statistics ``(counts, route_prob_sum, n_dropped, p_max)``."""
        z = self.norm_self_attn(x)
        x = x + self.dropout(self.attn(query=z, key=z, value=z, mask=mask))
        ff, counts, route_prob, n_dropped, route_prob_max = self.feed_forward(self.norm_ff(x))
        x = x + self.dropout(ff)
        return x, counts, route_prob, n_dropped, route_prob_max


class SwitchTransformer(nn.Module):
    """A stack of ``n_layers`` copies of ``layer`` followed by a final LayerNorm."""

    def __init__(self, layer: SwitchTransformerLayer, n_layers: int):
        super().__init__()
        self.layers = clone_module_list(layer, n_layers)
        self.norm = nn.LayerNorm([layer.size])

    def forward(self, x: torch.Tensor, mask: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[int], torch.Tensor]:
        """``x`` ``[L, B, D]``, ``mask`` ``[L, L, B or 1]``. Returns the normalised
        output ``[L, B, D]``, ``counts`` ``[n_layers, E]``, summed routing
        probabilities ``[n_layers, E]``, dropped-token counts (list of ``int``,
        one per layer) and ``p_max`` ``[n_layers, N]``."""
        counts, route_prob, n_dropped, route_prob_max = [], [], [], []
        for layer in self.layers:
            x, f, p, n_d, p_max = layer(x=x, mask=mask)
            counts.append(f)
            route_prob.append(p)
            n_dropped.append(n_d)
            route_prob_max.append(p_max)
        return self.norm(x), torch.stack(counts), torch.stack(route_prob), n_dropped, torch.stack(route_prob_max)
