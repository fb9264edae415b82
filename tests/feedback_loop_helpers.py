"""Launch counting and a host-synchronisation guard for the Feedback recurrence's
GPU loop, usable under the Triton interpreter (CPU tensors) and on a GPU."""
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# ATen calls that launch no kernel: allocation and metadata.
_NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
              aten.new_empty.default, aten.new_empty_strided.default, aten.lift_fresh.default}
# Calls that make the host wait for the device.
_SYNCING = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}


class HostSyncError(AssertionError):
    pass


class LaunchCounter(TorchDispatchMode):
    """Counts kernel launches: every ATen call that computes (not a view, not an
    allocation) and every Triton kernel launch (whose own interpreter work is not
    counted); raises :class:`HostSyncError` on any call that waits for the device
    (``.item()``, ``bool(tensor)``, a copy to the host)."""

    def __init__(self):
        super().__init__()
        self.aten = 0
        self.triton = 0
        self.names = []
        self._in_triton = 0

    @property
    def total(self) -> int:
        return self.aten + self.triton

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._in_triton:
            if func in _SYNCING:
                raise HostSyncError(f"{func} waits for the device inside the token loop")
            if func in (aten._to_copy.default, aten.copy_.default) and _device_to_host(func, args, kwargs):
                raise HostSyncError(f"{func} copies to the host inside the token loop")
            if not func.is_view and func not in _NO_KERNEL:
                self.aten += 1
                self.names.append(str(func))
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def _triton_launch(self, name):
        self.triton += 1
        self.names.append(f"triton:{name}")
        self._in_triton += 1
        try:
            yield
        finally:
            self._in_triton -= 1


def _device_to_host(func, args, kwargs) -> bool:
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"
    destination, source = args[0], args[1]
    return destination.device.type == "cpu" and source.device.type != "cpu"


@contextlib.contextmanager
def count_launches():
    """``with count_launches() as counter:`` every launch inside is counted (see :class:`LaunchCounter`)."""
    import triton.runtime.interpreter as interpreter
    from triton.runtime.jit import JITFunction

    counter = LaunchCounter()
    originals = {cls: cls.run for cls in (interpreter.InterpretedFunction, JITFunction)}

    def wrap(original):
        def run(self, *args, **kwargs):
            with counter._triton_launch(getattr(self, "__name__", repr(self))):
                return original(self, *args, **kwargs)
        return run

    for cls, original in originals.items():
        cls.run = wrap(original)
    try:
        with counter:
            yield counter
    finally:
        for cls, original in originals.items():
            cls.run = original
