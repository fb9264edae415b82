"""The C++ kernels' buffer caches: :func:`empty_cache`, :func:`set_cache_limit`, :func:`cache_info`.

CPU kernels keep large buffers between calls (``cpu::RecycledBlocks`` in ``csrc/cpu_utils.h``)
so that each step does not pay fresh page faults. These functions give that memory back, bound
it, and report it; they are ops in ``torch.ops.fastformers`` (kernels in ``csrc/cache.cpp``).
The environment variable ``FASTFORMERS_CACHE_LIMIT`` (bytes, or with a K/M/G suffix: ``512M``)
sets the limit when fastformers is imported.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Optional

import torch

from . import _backend
from ._library import lib

lib.define("empty_cache() -> int")
lib.define("set_cache_limit(int? bytes) -> ()")
lib.define("cache_info() -> int[]")

_INFO_FIELDS = ("held_bytes", "held_blocks", "lent_bytes", "limit_bytes", "hits", "misses", "evictions",
                "other_held_bytes")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def empty_cache() -> int:
    """Free every cached kernel buffer (and trim the C heap); returns the bytes freed.

    Buffers still in use by live tensors return to the cache when those tensors die."""
    if not _backend.extension_available():
        return 0
    return torch.ops.fastformers.empty_cache()


def set_cache_limit(bytes: Optional[int]) -> None:
    """Hold at most ``bytes`` of cached buffers, evicting the least recently used ones now and
    whenever a returned buffer would exceed it; ``None`` restores the automatic limit (the largest
    working set one call declared, at least 256 MiB). ``0`` disables caching."""
    if bytes is not None and (isinstance(bytes, bool) or not isinstance(bytes, int)):
        raise TypeError(f"set_cache_limit: bytes must be an int or None, got {type(bytes).__name__}")
    if bytes is not None and bytes < 0:
        raise ValueError(f"set_cache_limit: bytes must be >= 0 (or None), got {bytes}")
    if _backend.extension_available():
        torch.ops.fastformers.set_cache_limit(bytes)


def cache_info() -> Dict[str, int]:
    """What the caches hold: ``held_bytes`` / ``held_blocks`` (cached, free for reuse),
    ``lent_bytes`` (cache-allocated buffers alive in tensors), ``limit_bytes``, ``hits``,
    ``misses``, ``evictions`` (blocks freed by the limit) and ``other_held_bytes`` (other
    registered caches, such as per-thread scratch). All zero without the C++ extension."""
    if not _backend.extension_available():
        return dict.fromkeys(_INFO_FIELDS, 0)
    return dict(zip(_INFO_FIELDS, torch.ops.fastformers.cache_info()))


def parse_bytes(text: str, name: str = "FASTFORMERS_CACHE_LIMIT") -> int:
    """``"1048576"``, ``"512M"``, ``"2GiB"`` -> bytes; ValueError naming ``name`` otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"{name} must be a number of bytes, optionally with a K, M, G or T suffix "
                         f"(e.g. 536870912 or 512M), got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def apply_environment() -> None:
    """Set the cache limit from ``FASTFORMERS_CACHE_LIMIT`` when it is set."""
    text = os.environ.get("FASTFORMERS_CACHE_LIMIT", "").strip()
    if text:
        set_cache_limit(parse_bytes(text))
