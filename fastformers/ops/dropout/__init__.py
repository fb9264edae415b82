"""Dropout inside the fused kernels: one Philox 4x32-10 stream shared by the
C++ and Triton kernels and the Python reference (see :mod:`.naive`)."""
from . import naive
from .op import DropoutCall, check_p, draw, next_seed_offset, record

__all__ = ["DropoutCall", "check_p", "draw", "naive", "next_seed_offset", "record"]
