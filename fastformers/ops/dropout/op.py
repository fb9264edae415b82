"""The dropout generator every fused op shares: where a call's ``(seed,
offset)`` comes from, how ``p`` is checked, and a debug recorder that gives
back the mask any call used.

A fused op with dropout takes ``(dropout_p, seed, offset)``: element ``n`` of
its documented mask layout is kept iff :func:`naive.keep_mask` says so, the
same bits in C++ (``csrc/philox.h``), Triton (:mod:`.triton_kernel`) and the
reference. Backward regenerates the bits; no mask is stored.

``dropout_keep_mask(like, seed, offset, p)`` in ``torch.ops.fastformers``
returns the bool mask ``like.shape`` on ``like``'s device from the device's
kernel (C++ on CPU, Triton on CUDA), for comparing the generators.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Iterator, List, Optional, Tuple

import torch

from ... import _backend
from ..._library import lib, qualname
from . import naive

lib.define("dropout_keep_mask(Tensor like, int seed, int offset, float p) -> Tensor")


def _keep_mask_reference(like, seed, offset, p):
    return naive.keep_mask(seed, offset, like.numel(), p, like.device).view(like.shape)


lib.impl("dropout_keep_mask", _keep_mask_reference, "CompositeExplicitAutograd")


@torch.library.register_fake(qualname("dropout_keep_mask"))
def _keep_mask_fake(like, seed, offset, p):
    return torch.empty(like.shape, dtype=torch.bool, device=like.device)


if _backend.triton_available():
    def _keep_mask_cuda(like, seed, offset, p):
        from . import triton_kernel

        return triton_kernel.keep_mask(like.numel(), seed, offset, p, like.device).view(like.shape)

    lib.impl("dropout_keep_mask", _keep_mask_cuda, "CUDA")


def check_p(p: float, name: str = "dropout_p") -> float:
    """``p`` as a float in [0, 1); ValueError naming ``name`` otherwise."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    p = float(p)
    if not (0.0 <= p < 1.0) or math.isnan(p):
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p


def next_seed_offset(device: torch.device, numel: int) -> Tuple[int, int]:
    """A fresh ``(seed, offset)`` for a call that draws ``numel`` keep bits.

    CUDA: the device's default Philox generator (its seed, and its offset
    advanced past this call), so no host sync. Other devices: 63 random bits
    from torch's default CPU generator as the seed, offset 0. Either way
    ``torch.manual_seed`` reproduces a run and consecutive calls never share a
    stream.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        generator = torch.cuda.default_generators[index]
        offset = generator.get_offset()
        generator.set_offset(offset + ((numel + 3) // 4) * 4)
        return generator.initial_seed(), offset
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    return seed, 0


@dataclasses.dataclass(frozen=True)
class DropoutCall:
    """One fused call's dropout: ``mask()`` rebuilds the bool mask it used, in
    the layout ``shape`` its op documents."""

    op: str
    p: float
    seed: int
    offset: int
    shape: Tuple[int, ...]

    def mask(self, device=None) -> torch.Tensor:
        return naive.keep_mask(self.seed, self.offset, math.prod(self.shape), self.p, device).view(self.shape)


_recorders = threading.local()


@contextlib.contextmanager
def record() -> Iterator[List[DropoutCall]]:
    """Collect a :class:`DropoutCall` for every fused forward with active
    dropout in this block (this thread): the debug entry point that gives back
    each call's mask."""
    stack = getattr(_recorders, "stack", None)
    if stack is None:
        stack = _recorders.stack = []
    calls: List[DropoutCall] = []
    stack.append(calls)
    try:
        yield calls
    finally:
        stack.pop()


def draw(op: str, p: float, shape: Tuple[int, ...], device: torch.device,
         seed: Optional[int] = None, offset: int = 0) -> Tuple[int, int]:
    """``(seed, offset)`` for one call of ``op`` whose mask has ``shape``:
    the caller's when ``seed`` is given, else :func:`next_seed_offset`;
    recorded by any active :func:`record` block. With ``p == 0`` nothing is drawn."""
    if p == 0:
        return 0, 0
    if seed is None:
        seed, offset = next_seed_offset(device, math.prod(shape))
    stack = getattr(_recorders, "stack", None)
    if stack:
        stack[-1].append(DropoutCall(op, p, seed, offset, tuple(shape)))
    return seed, offset
