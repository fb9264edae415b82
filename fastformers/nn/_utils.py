import copy

import torch
from torch import nn


def clone_module_list(module: nn.Module, n: int) -> nn.ModuleList:
    """``n`` independent deep copies of ``module`` (the argument itself is not used)."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def init_pre_norm_layer(layer: nn.Module, d_model: int, feed_forward: nn.Module, dropout_prob: float) -> None:
    """The parts every pre-norm layer shares, registered after its attention
    module and in labml's order (which fixes the ``state_dict`` key order)."""
    layer.feed_forward = feed_forward
    layer.dropout = nn.Dropout(dropout_prob)
    layer.norm_self_attn = nn.LayerNorm([d_model])
    layer.norm_ff = nn.LayerNorm([d_model])


def check_sequence(x: torch.Tensor, d_model: int, name: str = "x") -> None:
    """TypeError/ValueError naming the argument and dimension unless ``x`` is a
    ``[seq_len, batch, d_model]`` tensor with at least one position and one
    sequence: zero-size inputs are refused the same way on every backend
    (their attention, softmax over layers or stack of steps is not defined
    alike by all of them)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must be [seq_len, batch, d_model] (rank 3), got shape {tuple(x.shape)}")
    seq_len, batch, features = x.shape
    for dim, size in (("seq_len", seq_len), ("batch", batch)):
        if size == 0:
            raise ValueError(f"{name} has {dim} 0 (shape {tuple(x.shape)}): it needs at least one position and "
                             "one sequence")
    if features != d_model:
        raise ValueError(f"{name} has d_model {features}, the layer was built for {d_model}")
