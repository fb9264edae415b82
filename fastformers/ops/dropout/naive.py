"""Plain-PyTorch Philox 4x32-10 keep bits: the oracle of the C++
(``csrc/philox.h``) and Triton (:mod:`.triton_kernel`) dropout generators.

Element ``n`` of a call with ``(seed, offset)`` reads stream position
``s = offset + n``: Philox counter ``(lo32(s // 4), hi32(s // 4), 0, 0)``, key
``(lo32(seed), hi32(seed))``, output word ``s % 4``; the element is kept when
that word is ``>= threshold(p) = floor(p * 2**32)``. The uint32 arithmetic is
emulated in int64 (products split in 16-bit halves so nothing overflows).
"""
import torch

MUL_A, MUL_B = 0xD2511F53, 0xCD9E8D57
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def threshold(p: float) -> int:
    """The uint32 bound below which a Philox word drops its element."""
    return int(min(p * 4294967296.0, 4294967295.0))


def _mulhilo(a: int, b: torch.Tensor):
    """``(hi, lo)`` 32-bit halves of the 64-bit product of the constant ``a`` and uint32s ``b``."""
    low_product = (a & 0xFFFF) * b  # < 2^48
    high_product = (a >> 16) * b  # < 2^48
    hi = (high_product + (low_product >> 16)) >> 16
    lo = (((high_product & 0xFFFF) << 16) + low_product) & _U32
    return hi, lo


def philox4x32_10(block: torch.Tensor, seed: int) -> torch.Tensor:
    """The four output words ``[4, N]`` (int64 holding uint32) of counters ``(block, 0, 0)``."""
    c0, c1 = block & _U32, (block >> 32) & _U32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    seed &= (1 << 64) - 1
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi_a, lo_a = _mulhilo(MUL_A, c0)
        hi_b, lo_b = _mulhilo(MUL_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & _U32, (k1 + KEY_B) & _U32
    return torch.stack((c0, c1, c2, c3))


def keep_mask(seed: int, offset: int, numel: int, p: float, device=None) -> torch.Tensor:
    """Bool ``[numel]``: which elements of a call with ``(seed, offset)`` dropout keeps."""
    positions = offset + torch.arange(numel, dtype=torch.int64, device=device)
    words = philox4x32_10(positions >> 2, seed)
    word = torch.gather(words, 0, (positions & 3)[None]).squeeze(0)
    return word >= threshold(p)


def apply(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of ``x`` with the given keep mask (``x * keep / (1 - p)``)."""
    if p == 0:
        return x
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))
