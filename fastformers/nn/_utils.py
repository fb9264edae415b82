import copy

from torch import nn


def clone_module_list(module: nn.Module, n: int) -> nn.ModuleList:
    """``n`` independent deep copies of ``module`` (the argument itself is not used)."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])
