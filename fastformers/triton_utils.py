"""Shared Triton plumbing: whether kernels run in the interpreter, and the
ahead-of-time compile specs every kernel module declares (``AOT_SPECS``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """One concrete compilation of a ``@triton.jit`` kernel for the AOT check.

    ``signature`` maps every argument to a Triton type (``*fp32``, ``i32``,
    ``constexpr``); ``constexprs`` gives the constexpr values. ``archs``: the
    compute capabilities (e.g. ``(90,)``) a launcher launches this
    configuration on, so the only ones it must compile spill-free for; None
    for every arch. ``divisible``: integer arguments the launcher guarantees
    to be multiples of 16 (e.g. strides it makes so), compiled as such the way
    Triton compiles them at launch; every other integer is compiled as not
    16-divisible.
    """

    kernel: Any
    signature: dict
    constexprs: dict
    label: str = ""
    num_warps: int = 4
    num_stages: int = 3
    archs: Optional[Tuple[int, ...]] = None
    divisible: Tuple[str, ...] = ()

    def compiles_for(self, arch: int) -> bool:
        return self.archs is None or arch in self.archs

    @property
    def attrs(self) -> dict:
        """Pointers compiled as 16-byte aligned, integers as not 16-divisible
        but for ``divisible``.

        Triton specialises on both at launch; torch allocations are aligned, and
        that variant with odd sizes is the one that needs the most registers.
        """
        return {
            (self.kernel.arg_names.index(name),): [["tt.divisibility", 16]]
            for name, kind in self.signature.items()
            if kind.startswith("*") or (name in self.divisible and kind in ("i32", "i64"))
        }

    @property
    def name(self) -> str:
        base = self.kernel.fn.__name__
        return f"{base}[{self.label}]" if self.label else base


def interpreter_enabled() -> bool:
    """Whether ``@triton.jit`` kernels were built for the Triton interpreter.

    Triton reads ``TRITON_INTERPRET=1`` when it (and our kernels) are imported,
    so it must be set before ``import fastformers``; the interpreter then runs
    every kernel on CPU tensors, and no kernel of this process runs on a GPU.
    """
    from triton import knobs

    return bool(knobs.runtime.interpret)
