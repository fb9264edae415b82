import copy

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
