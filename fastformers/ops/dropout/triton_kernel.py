"""Philox 4x32-10 keep bits in Triton, bit-identical to ``csrc/philox.h`` and
:mod:`.naive` (the stream layout is documented there).

:func:`keep` is the ``@triton.jit`` helper every Triton kernel with dropout
calls on its tile of element indices; :func:`keep_mask` launches it alone, so
tests can compare its bits with the C++ and Python generators.
"""
import torch
import triton
import triton.language as tl

from ...triton_utils import AotSpec
from . import naive


@triton.jit
def _philox_words(block, seed):
    """The four uint32 words of Philox 4x32-10 at counters ``(block, 0, 0)`` (block int64)."""
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((block >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(10):
        a = c0
        b = c2
        c0 = tl.umulhi(b, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a, 0xD2511F53) ^ c3 ^ k1
        c1 = b * 0xCD9E8D57
        c3 = a * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def keep(seed, offset, index, threshold):
    """Bool tile: whether each element ``index`` (int64 tile) of a call with
    ``(seed, offset)`` is kept; ``threshold`` is :func:`naive.threshold` of p."""
    position = offset.to(tl.int64) + index.to(tl.int64)
    w0, w1, w2, w3 = _philox_words(position >> 2, seed.to(tl.int64))
    lane = position & 3
    word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return word.to(tl.int64) >= threshold


@triton.jit
def _keep_mask_kernel(out_ptr, numel, seed, offset, threshold, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + index, keep(seed, offset, index, threshold).to(tl.int8), mask=index < numel)


_BLOCK = 1024


def keep_mask(numel: int, seed: int, offset: int, p: float, device) -> torch.Tensor:
    """Bool ``[numel]`` on ``device`` (CUDA, or CPU under the interpreter)."""
    out = torch.empty(numel, dtype=torch.int8, device=device)
    if numel:
        _keep_mask_kernel[(triton.cdiv(numel, _BLOCK),)](out, numel, seed, offset, naive.threshold(p), BLOCK=_BLOCK)
    return out.bool()


AOT_SPECS = [
    AotSpec(
        _keep_mask_kernel,
        {"out_ptr": "*i8", "numel": "i64", "seed": "i64", "offset": "i64", "threshold": "i64",
         "BLOCK": "constexpr"},
        {"BLOCK": _BLOCK},
    )
]
