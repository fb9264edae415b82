"""``torch.autocast`` for the fused ops: every floating input (positional
tables, biases and scales included) is cast to the autocast dtype, as autocast
casts a linear layer's weight; the kernels accumulate in float32.

:func:`register` installs the rule as the op's ``AutocastCPU`` and
``AutocastCUDA`` kernels, so direct ``torch.ops.fastformers`` calls follow it;
:func:`cast` applies it in the Python wrappers before their input checks.
"""
from typing import Optional

import torch

from .._library import lib

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def dtype_for(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None."""
    if device_type in _AUTOCAST_KEYS and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast_value(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast_value(item, dtype) for item in value)
    return value


def cast(device_type: str, *values):
    """``values`` with floating tensors (also inside lists) cast to the active
    autocast dtype of ``device_type``; unchanged when autocast is off."""
    dtype = dtype_for(device_type)
    if dtype is None:
        return values
    return tuple(_cast_value(value, dtype) for value in values)


def register(name: str) -> None:
    """Make ``torch.ops.fastformers.<name>`` follow autocast on CPU and CUDA."""
    op = getattr(torch.ops.fastformers, name).default
    for device_type, key in _AUTOCAST_KEYS.items():
        exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(*args, device_type=device_type, exclude=exclude):
            dtype = torch.get_autocast_dtype(device_type)
            with torch._C._ExcludeDispatchKeyGuard(exclude):
                return op(*(_cast_value(arg, dtype) for arg in args))

        lib.impl(name, kernel, key)
